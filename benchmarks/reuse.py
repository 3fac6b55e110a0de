"""Work a compile or a load no longer repeats, side by side in one run (ratios).

    python benchmarks/reuse.py            # writes benchmarks/results/reuse.md

Rows, each the median of `ROUNDS` interleaved repeats, `torch.set_num_threads(1)`:
- compiling demo again (no passes; int8) with the kept traces cleared first (`memopt.capture.clear_captures`: the
  programs are exported, as every compile did before) against with the traces kept (bound to the model's tensors);
- compiling demo from cold (kept traces cleared; int8; int4 + KIVI + offload) with each program exported again
  after its passes (`torch.export`, as every compile did before) against lifted back without tracing
  (`memopt.lift`);
- SmolLM2's GGUF tokenizer through transformers' AutoTokenizer (which parses the whole file again to derive a
  config) against `memopt.frontend.gguf.load_gguf_tokenizer` (the same tokenizer class built directly);
- loading a saved demo artifact's two programs with torch's JSON reader (`_dict_to_dataclass`) against memopt's
  (`program_io._to_dataclass`, type hints looked up once per class), the rest of the load being the same;
- saving a loaded demo artifact again with each program's JSON made afresh by torch's serializer (the kept JSON
  cleared, as every save did before) against the JSON kept for its graph (`program_io.dump_program`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import zipfile

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from common import environment, table, write  # noqa: E402

from memopt.capture import clear_captures  # noqa: E402
from memopt.emit.artifact import save  # noqa: E402
from memopt.emit.program_io import _to_dataclass  # noqa: E402
from memopt.frontend.sources import resolve_source  # noqa: E402
from memopt.pipeline import compile_model  # noqa: E402

ROUNDS = 5


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def side_by_side(before, after) -> tuple[float, float]:
    """Medians of `ROUNDS` alternating runs of the two."""
    a, b = [], []
    for _ in range(ROUNDS):
        a.append(seconds(before))
        b.append(seconds(after))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    demo = resolve_source("demo")
    for quantize in (None, "int8"):
        def fresh(q=quantize):
            clear_captures()
            compile_model(demo, seq=64, quantize=q)

        def kept(q=quantize):
            compile_model(demo, seq=64, quantize=q)

        kept()  # the trace to keep (and every import and kernel warmed)
        before, after = side_by_side(fresh, kept)
        rows.append([f"compile demo again ({quantize or 'no passes'})", f"{before:.2f} s", f"{after:.2f} s",
                     f"{before / after:.2f}x"])

    import memopt.capture as capture_module

    real_lift = capture_module.lift
    for label, opts in (("int8", dict(quantize="int8")),
                        ("int4 + KIVI + offload", dict(quantize="int4:g32", kv="kivi:k4v4:g16:r16",
                                                       offload=["model.layers.1"]))):
        def exported(o=opts):
            clear_captures()
            capture_module.lift = lambda gm, like: None
            try:
                compile_model(demo, seq=64, **o)
            finally:
                capture_module.lift = real_lift

        def lifted(o=opts):
            clear_captures()
            compile_model(demo, seq=64, **o)

        lifted()
        before, after = side_by_side(exported, lifted)
        rows.append([f"compile demo from cold ({label}): after the passes, exported -> lifted", f"{before:.2f} s",
                     f"{after:.2f} s", f"{before / after:.2f}x"])

    from transformers import AutoTokenizer

    from memopt.frontend.gguf import load_gguf_tokenizer, smollm2_path

    try:
        path = smollm2_path()
    except (FileNotFoundError, ValueError) as exc:
        print(f"SmolLM2 not installed ({exc}): tokenizer row skipped", file=sys.stderr)
    else:
        before, after = side_by_side(
            lambda: AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True),
            lambda: load_gguf_tokenizer(path))
        rows.append(["SmolLM2 GGUF tokenizer", f"{before:.2f} s", f"{after:.2f} s", f"{before / after:.2f}x"])

    from torch._export.serde import schema
    from torch._export.serde.serialize import _dict_to_dataclass

    result = compile_model(demo, seq=64, quantize="int8")
    with tempfile.TemporaryDirectory() as tmp:
        out = save(result.module, os.path.join(tmp, "art"), programs=result.programs)
        blobs = []
        for name in ("program", "generate"):
            with zipfile.ZipFile(os.path.join(out, f"{name}.pt2")) as z:
                blobs.append(json.loads(z.read(f"{name}/models/{name}.json")))
    before, after = side_by_side(lambda: [_dict_to_dataclass(schema.ExportedProgram, b) for b in blobs],
                                 lambda: [_to_dataclass(schema.ExportedProgram, b) for b in blobs])
    rows.append(["read a demo artifact's two programs (JSON -> schema)", f"{before:.3f} s", f"{after:.3f} s",
                 f"{before / after:.2f}x"])

    from memopt.emit import program_io
    from memopt.emit.artifact import load

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load(save(result.module, os.path.join(tmp, "art"), programs=result.programs))
        again = os.path.join(tmp, "again")
        save(loaded, again)  # (every import warmed)

        def afresh():
            program_io._DUMPED.clear()
            save(loaded, again)

        before, after = side_by_side(afresh, lambda: save(loaded, again))
    rows.append(["save a loaded demo artifact again", f"{before:.3f} s", f"{after:.3f} s", f"{before / after:.2f}x"])

    text = f"""# Work not repeated: kept traces, lifted programs, the GGUF tokenizer, the program reader and writer

{environment()}

Command: `python benchmarks/reuse.py`

{__doc__.split(chr(10) + chr(10))[2].strip()}

{ROUNDS} alternating repeats per row, medians.

{table(["what", "before", "after", "speed-up"], rows)}
"""
    write("reuse.md", text)


if __name__ == "__main__":
    main()
