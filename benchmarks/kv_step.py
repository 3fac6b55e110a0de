"""One compressed-KV decode step of one layer, per store layout and read path, side by side.

    python benchmarks/kv_step.py            # writes benchmarks/results/kv_step.md
    python benchmarks/kv_step.py --quick    # 20 steps per cell: a smoke run

A SmolLM2-shaped layer (3 KV heads, 9 query heads, head_dim 64, RoPE theta 10,000), `torch.set_num_threads(1)`, a
store filled by a prefill of `CONTEXT` random keys and values, then `memopt::kv_attend` one token at a time (the
attention and the new token's insertion, as a generation program calls it) through three paths: memopt's C kernels
(`memopt/runtime/kivi_kernels.c`), the PyTorch fast path (no C compiler) and the general path (`attend_group`, which
dequantizes the store chunk by chunk: what pre-RoPE stores took before they had a C kernel). Paths are interleaved
round by round, so a busy machine slows them alike; the cell is the median step time, the ratio is against the
general path of the same layout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from common import environment, table, write  # noqa: E402

from memopt.kv.layout import Layout, layouts_to_str  # noqa: E402
from memopt.kv.policy import parse_kv_spec  # noqa: E402
from memopt.runtime import kv_ops, native  # noqa: E402

CONTEXT = 1024
SPECS = ["kivi:k4v4:g32:r128", "kivi:k4v4:g32:r128:pre", "kivi:k2v2:g16:r128:pre", "kivi:k2v2:g16:r128:pre:had"]
INV_FREQ = tuple((1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)).tolist())


def layer(spec: str) -> tuple[str, list[torch.Tensor]]:
    layouts = tuple(Layout(**{**x.to_json(), "heads": x.heads, "dtype": "float32", "rope_inv_freq": INV_FREQ})
                    for x in parse_kv_spec(spec).layer_layouts(0, 3, 64, 2 * CONTEXT))
    text = layouts_to_str(layouts)
    state = [t for x in layouts for t in x.allocate(1).values()]
    gen = torch.Generator().manual_seed(0)
    for layout, bufs in kv_ops.split_state(text, state):
        kv_ops.fill_group(layout, bufs, *(torch.randn(1, 3, CONTEXT, 64, generator=gen) for _ in range(2)))
    return text, state


def run(path: str, text: str, state: list[torch.Tensor], steps: int, lib) -> list[float]:
    state = [t.clone() for t in state]
    native._STATE["lib"] = lib if path == "C kernels" else None
    general = path == "general"
    fast_path = kv_ops.fast_path
    if general:
        kv_ops.fast_path = lambda layout: False
    try:
        gen = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(1, heads, 1, 64, generator=gen) for heads in (9, 3, 3))
        times = []
        for i in range(steps):
            t = time.perf_counter()
            kv_ops.attend(q, k, v, state, torch.tensor([CONTEXT + i]), text, 0.125)
            times.append(time.perf_counter() - t)
        return times
    finally:
        kv_ops.fast_path = fast_path
        native._STATE["lib"] = lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lib = native.kernels()
    if lib is None:
        sys.exit(f"memopt's C kernels cannot be built here: {native.why_not()}")
    rounds, steps = (1, 20) if args.quick else (5, 100)
    paths = ("C kernels", "PyTorch fast path", "general")
    layers = {spec: layer(spec) for spec in SPECS}
    times: dict = {}
    for _ in range(rounds):
        for spec, (text, state) in layers.items():
            applies = kv_ops.fast_path(kv_ops.split_state(text, state)[0][0])
            for path in paths if applies else ("general",):
                times.setdefault((spec, path), []).extend(run(path, text, state, steps, lib))
    rows = []
    for spec in SPECS:
        base = statistics.median(times[spec, "general"])
        cells = []
        for path in paths:
            if (spec, path) in times:
                ms = statistics.median(times[spec, path])
                cells.append(f"{ms * 1e3:.3f} ({base / ms:.2f}x)")
            else:
                cells.append("n/a (not a fast-path layout)")
        rows.append([f"`{spec}`", *cells])
    text = f"""# One compressed-KV decode step of a SmolLM2-shaped layer at {CONTEXT} tokens

{environment()}

Command: `python benchmarks/kv_step.py{' --quick' if args.quick else ''}`

{__doc__.split(chr(10) + chr(10))[2].strip()}

{rounds} rounds x {steps} steps per cell; ms per step (median), in brackets the speed-up over the general path.

{table(["layout", *(f"{p} ms" for p in paths)], rows)}
"""
    write("kv_step.md", text)


if __name__ == "__main__":
    main()
