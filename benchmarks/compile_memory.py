"""Compile-time memory: the peak RSS of `memopt compile smollm2` (plain, --quantize int8, --quantize int4), each in
a fresh process, beside a plain transformers load of the same GGUF, the artifact's size and the largest layer in
full precision.

    python benchmarks/compile_memory.py                                # the working tree: the "after" column
    python benchmarks/compile_memory.py --tree DIR --column before     # another checkout of memopt, e.g. the code
                                                                       # before streamed weights, as "before"

Each measurement is a child process; its peak is `ru_maxrss` from `os.wait4` (the kernel's high-water mark of
resident memory: every page touched, Python and torch included), and a timeline is sampled from the parent with
psutil every 20 ms against the compile's `memopt:` progress lines. Results accumulate by column in
benchmarks/results/compile_memory.json; benchmarks/results/compile_memory.md is written from it.

The target (issue 20, cause 4): peak <= 1.5 x max(artifact, largest layer in full precision) + the export's working
set, measured here as the peak of a process that builds the streamed model and captures both programs without
reading a weight (imports, the traced graphs, the generation program's static KV cache).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import RESULTS, environment, table, write  # noqa: E402

JSON = RESULTS / "compile_memory.json"
COMPILES = {"plain": [], "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4"]}

# Run in the child before anything imports memopt: `memopt` (and its `passes` / `solvers` packages, installed as
# memopt.passes / memopt.solvers) from the tree given, instead of the installed editable checkout.
_TREE_FINDER = """
import importlib.abc, importlib.util, sys
TREE = {tree!r}
DIRS = {{"memopt": TREE + "/memopt", "memopt.passes": TREE + "/passes", "memopt.solvers": TREE + "/solvers"}}
class _Tree(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in DIRS:
            return importlib.util.spec_from_file_location(name, DIRS[name] + "/__init__.py",
                                                          submodule_search_locations=[DIRS[name]])
        return None
sys.meta_path.insert(0, _Tree())
"""

_TRANSFORMERS_LOAD = """
import torch
from transformers import AutoModelForCausalLM
from memopt.frontend.gguf import smollm2_path
path = smollm2_path()
model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                             local_files_only=True)
"""

_CAPTURE_ONLY = """
from memopt.capture import capture
from memopt.frontend.checks import generation_cache_tokens
from memopt.frontend.sources import resolve_source
src = resolve_source("smollm2", stream=True)
assert src.weights is not None, src.notes
fwd = capture(src)
gen = capture(src, phase="decode", cache_len=generation_cache_tokens(src, max_cache=None, seq=fwd.seq, budget=None),
              dynamic=True)
"""

_COMPILE = """
import runpy, sys
sys.argv = ["memopt", "compile", "smollm2", *{args!r}, "-o", {out!r}]
runpy.run_module("memopt", run_name="__main__")
"""


def measure(code: str, tree: str | None) -> dict:
    """Run `code` in a fresh Python; its peak RSS (bytes), wall seconds and a timeline of (seconds, RSS bytes,
    peak since the last line, progress line) for each `memopt:` line it prints on stderr."""
    import psutil

    prelude = _TREE_FINDER.format(tree=os.path.abspath(tree)) if tree else ""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", prelude + code], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True, env=env)
    proc, lines = psutil.Process(child.pid), []

    def read() -> None:
        for line in child.stderr:
            if line.startswith("memopt:"):
                lines.append((time.perf_counter() - t0, line.strip()[8:]))
            elif "Error" in line or "Traceback" in line:
                lines.append((time.perf_counter() - t0, "!" + line.strip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples = []
    while True:  # not child.poll(): it would reap the child, and os.wait4 below reads its rusage
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                break
            samples.append((time.perf_counter() - t0, proc.memory_info().rss))
        except psutil.Error:
            break
        time.sleep(0.02)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    wall_s = time.perf_counter() - t0
    if child.returncode:
        raise RuntimeError(f"child failed (exit {child.returncode}): " + " | ".join(m for _, m in lines[-3:]))
    timeline, last = [], 0.0
    for t, msg in lines + [(wall_s, "(exit)")]:
        window = [r for s, r in samples if last <= s <= t]
        at = next((r for s, r in reversed(samples) if s <= t), 0)
        timeline.append([round(t, 1), at, max(window, default=at), msg])
        last = t
    return {"peak_bytes": usage.ru_maxrss * 1024, "wall_s": round(wall_s, 1), "timeline": timeline}


def model_facts() -> dict:
    """The GGUF's largest tensor and largest block in float32 (what "one layer in full precision" holds)."""
    from memopt.frontend.gguf import read_gguf_header, smollm2_path

    info = read_gguf_header(smollm2_path())
    numel = {name: _prod(shape) for name, _, shape, _ in info.tensors}
    blocks: dict[str, int] = {}
    for name, n in numel.items():
        key = ".".join(name.split(".")[:2]) if name.startswith("blk.") else name
        blocks[key] = blocks.get(key, 0) + n
    big_tensor = max(numel, key=numel.get)
    big_block = max((b for b in blocks if b.startswith("blk.")), key=blocks.get)
    return {"file_bytes": info.file_bytes, "largest_tensor": big_tensor, "largest_tensor_fp32_bytes": 4 * numel[big_tensor],
            "largest_block": big_block, "largest_block_fp32_bytes": 4 * blocks[big_block],
            "model_fp32_bytes": 4 * sum(numel.values())}


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def run(column: str, tree: str | None, only: list[str]) -> None:
    results = json.loads(JSON.read_text()) if JSON.exists() else {}
    col = results.setdefault(column, {})
    col["tree"] = os.path.abspath(tree) if tree else "working tree"
    col["environment"] = environment()
    if "transformers" in only:
        print("transformers load ...", flush=True)
        col["transformers"] = measure(_TRANSFORMERS_LOAD, tree)
    if "capture" in only and tree is None:
        print("capture only (streamed, no weight read) ...", flush=True)
        col["capture"] = measure(_CAPTURE_ONLY, tree)
    for name, args in COMPILES.items():
        if name not in only:
            continue
        out = Path(tempfile.mkdtemp(prefix="memopt_compile_memory_")) / "artifact"
        print(f"memopt compile smollm2 {' '.join(args)} ...", flush=True)
        try:
            result = measure(_COMPILE.format(args=args, out=str(out)), tree)
            result["artifact_bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        col[name] = result
        print(f"  peak {result['peak_bytes'] / 2**20:.0f} MiB, {result['wall_s']} s", flush=True)
    results["facts"] = model_facts()
    JSON.parent.mkdir(parents=True, exist_ok=True)
    JSON.write_text(json.dumps(results, indent=1))


def render() -> str:
    results = json.loads(JSON.read_text())
    facts, columns = results["facts"], [c for c in ("before", "after") if c in results]
    m = lambda n: f"{n / 2**20:,.0f}" if n is not None else "—"  # noqa: E731
    get = lambda c, row, key: results[c].get(row, {}).get(key)  # noqa: E731
    export_set = get("after", "capture", "peak_bytes") if "after" in results else None
    layer = max(facts["largest_tensor_fp32_bytes"], facts["largest_block_fp32_bytes"])
    rows = []
    for row, label in [("transformers", "transformers `from_pretrained(gguf_file=...)`, fp32 (no memopt)"),
                       ("capture", "memopt: streamed model + capture of both programs, no weight read (export working set)"),
                       *[(name, f"`memopt compile smollm2{''.join(' ' + a for a in args)}`")
                         for name, args in COMPILES.items()]]:
        cells = [label] + [m(get(c, row, "peak_bytes")) for c in columns]
        if row in COMPILES:
            artifact = get(columns[-1], row, "artifact_bytes")
            target = 1.5 * max(artifact, layer) + export_set if export_set and artifact else None
            cells += [m(artifact), m(target)]
        else:
            cells += ["", ""]
        cells.append(" / ".join(str(get(c, row, "wall_s") or "—") for c in columns))
        rows.append(cells)
    headers = ["process", *[f"peak RSS {c} (MiB)" for c in columns], "artifact (MiB)", "target (MiB)",
               "wall s (" + " / ".join(columns) + ")"]
    text = [
        "# Compile-time memory (SmolLM2-135M-Instruct Q4_1 GGUF)",
        "",
        f"`python benchmarks/compile_memory.py` — {results[columns[-1]]['environment']}. Each row is a fresh process; "
        "peak = `ru_maxrss` of that process (every resident page: Python, torch, transformers, the tokenizer).",
        "",
        table(headers, rows),
        "",
        f"Largest layer in full precision: `{facts['largest_tensor']}` {m(facts['largest_tensor_fp32_bytes'])} MiB "
        f"(the largest block, `{facts['largest_block']}`, is {m(facts['largest_block_fp32_bytes'])} MiB); the whole model "
        f"in fp32 is {m(facts['model_fp32_bytes'])} MiB, the GGUF file {m(facts['file_bytes'])} MiB.",
        "Target (issue 20, cause 4) = 1.5 × max(artifact, largest layer in fp32) + the export working set (the "
        "capture-only row: imports, traced graphs, the generation program's 2048-slot static KV cache).",
        "",
    ]
    if "before" in results:
        text += [f"before: a copy of the working tree without streamed weights ({results['before']['tree']}); after: "
                 "the working tree. Same outputs: the int4 artifacts' `weights.safetensors` are byte-identical and "
                 "their program graphs equal but for stack-trace paths; tests/test_streamed_compile.py checks every "
                 "tensor of both programs, the outputs and greedy tokens against the loaded model's compile (SmolLM2 "
                 "plain, int8, int4; tiny GGUFs; safetensors directories)."]
    text += ["", "## What the compile holds (after)", "",
             "`memopt compile smollm2` resolves the model with streamed weights (`memopt/frontend/weights.py`): the "
             "model is built with fake parameters (FakeTensors on the CPU, no storage) and real buffers, captured "
             "as the loaded model is (the same graphs, node for node), and each weight is read from the GGUF file "
             "and dequantized when a pass needs it: `QuantizePass` quantizes weight by weight in blocks of rows and "
             "drops the float copy; the weights no format rewrites (norms; everything in a plain compile) are read "
             "once after the quantize stage, one tensor shared by both programs. A compile that runs the loaded "
             "model (a budget plan, GPTQ or outlier calibration) or a model passed as an object loads as before.", ""]
    text += ["## What remains above the target (after)", "",
             "The int4 compile's quantize stage now peaks about 100 MiB above the export working set (the packed weights, "
             "one 8 MiB block of the embedding table in float32, the quantizer's temporaries). Above it, still: "
             "re-exporting the rewritten programs and planning (≈ +70 MiB of graphs and analyses, the first export "
             "kept as `CompileResult.before`), and writing the artifact (≈ +80 MiB of Python objects while the "
             "programs are serialized to JSON, `memopt/emit/program_io.py`, whatever the weight format). "
             "A plain compile holds the whole model in float32 because the artifact does.", ""]
    for c in columns:
        tl = results[c].get("int4", {}).get("timeline")
        if not tl:
            continue
        text += [f"### Timeline of the int4 compile ({c})", "",
                 table(["s", "RSS (MiB)", "peak since previous line (MiB)", "progress"],
                       [[t, m(rss), m(peak), msg[:110]] for t, rss, peak, msg in tl]), ""]
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", help="a checkout of memopt to measure instead of the installed one")
    parser.add_argument("--column", default="after", choices=("before", "after"))
    parser.add_argument("--only", default="transformers,capture,plain,int8,int4",
                        help="comma-separated rows to (re)measure")
    parser.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    args = parser.parse_args()
    if not args.render:
        run(args.column, args.tree, args.only.split(","))
    write("compile_memory.md", render())


if __name__ == "__main__":
    main()
