"""Work a compile or a load no longer repeats, side by side in one run (ratios).

    python benchmarks/reuse.py            # writes benchmarks/results/reuse.md

Rows, each the median of `ROUNDS` interleaved repeats (each after a garbage collection), `torch.set_num_threads(1)`:
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
  cleared, as every save did before) against the JSON kept for its graph (`program_io.dump_program`);
- compiling demo again with each program's module after its passes unlifted from the lifted program (as every
  compile did before) against the rewritten module kept (`memopt.lift.adopt`);
- making a program's JSON with torch's serializer's self-test (it canonicalizes a deep copy of what it wrote and
  drops it) against without it;
- launching a 2-stage demo pipeline (`memopt.serve.distributed.launch`, 8 tokens) with each rank a new interpreter
  that imports torch and memopt (as torchrun's workers and every launch did before) against forked from the rank
  server (a launch after the first: the first also starts the server, ~3 s).
"""

from __future__ import annotations

import gc
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
    gc.collect()  # the garbage of the run before is not charged to this one
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

    import memopt.pipeline as pipeline_module

    real_adopt = pipeline_module.adopt
    opts = dict(quantize="int8", kv="kivi:k4v4:g16:r16")

    def unlifted():
        pipeline_module.adopt = lambda gm, ep: False
        try:
            compile_model(demo, seq=64, **opts)
        finally:
            pipeline_module.adopt = real_adopt

    before, after = side_by_side(unlifted, lambda: compile_model(demo, seq=64, **opts))
    rows.append(["compile demo again (int8 + KIVI): each lifted program's module unlifted from it -> the rewritten "
                 "module kept (`lift.adopt`)", f"{before:.2f} s", f"{after:.2f} s", f"{before / after:.2f}x"])

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

    real_unchecked = program_io._unchecked

    def checked():
        program_io._unchecked = lambda check, ep, constants=None: check(ep, constants)
        try:
            [program_io._program_json(p) for p in result.programs.values()]
        finally:
            program_io._unchecked = real_unchecked

    before, after = side_by_side(checked, lambda: [program_io._program_json(p) for p in result.programs.values()])
    rows.append(["a demo artifact's two program JSONs: torch's serializer with its discarded self-test (canonicalize "
                 "a deep copy) -> without", f"{before:.3f} s", f"{after:.3f} s", f"{before / after:.2f}x"])

    import multiprocessing

    from memopt.emit.stages import compile_stages, save_stages
    from memopt.serve import distributed

    ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    real_context = distributed._rank_context
    with tempfile.TemporaryDirectory() as tmp:
        staged = save_stages(compile_stages(demo, [(0, 2), (2, 4)], passes=(), seq=16, max_cache=64),
                             os.path.join(tmp, "pp"))

        def fresh_ranks():  # each rank a new interpreter that imports everything, as torchrun's workers do
            distributed._rank_context = lambda: multiprocessing.get_context("spawn")
            try:
                distributed.launch(staged, input_ids=ids, max_new_tokens=8)
            finally:
                distributed._rank_context = real_context

        def forked_ranks():
            distributed.launch(staged, input_ids=ids, max_new_tokens=8)

        forked_ranks()  # the rank server started (what the first launch of a process pays)
        before, after = side_by_side(fresh_ranks, forked_ranks)
    rows.append(["launch a 2-stage demo pipeline (8 tokens): ranks started as new interpreters -> forked from the "
                 "rank server", f"{before:.2f} s", f"{after:.2f} s", f"{before / after:.2f}x"])

    text = f"""# Work not repeated: kept traces, lifted programs and modules, GGUF tokenizer, program JSON, rank start

{environment()}

Command: `python benchmarks/reuse.py`

{__doc__.split(chr(10) + chr(10))[2].strip()}

{ROUNDS} alternating repeats per row, medians.

{table(["what", "before", "after", "speed-up"], rows)}
"""
    write("reuse.md", text)


if __name__ == "__main__":
    main()
