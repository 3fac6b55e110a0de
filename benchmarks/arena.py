"""Arena planning: lower bound vs greedy vs ILP vs no reuse, and measured peaks, side by side.

    python benchmarks/arena.py              # writes benchmarks/results/arena.md
    python benchmarks/arena.py --inductor   # also torch.compile (inductor) peaks: minutes of compiling

Eager PyTorch's CPU peak is measured with memopt.eval.measure.cpu_peak_bytes: the profiler's allocator
records (every storage created/destroyed, in order) replayed to a running sum; weights exist
before the call and are not counted. The arena module is compiled with outputs_in_arena=True; the
planning columns are for the tensors the arena pass places (ops with a direct out= kernel, in-place
pairs merged: `memopt.passes.arena.arena_memgraph`). Its measured total is the arena plus what runs
outside it, measured the same way: results of ops without a direct out= kernel (convolutions, SDPA,
layer_norm, custom ops), which allocate as eager does (elementwise ops after them write in place), and
the ops' own scratch (SDPA's additive mask is planned in the arena: `<op>:scratch`). Inductor: the same
module under torch.compile, which compiles the arena-free program (passes/arena.py) and plans its own
buffers; its peak (the profiler's raw allocation records summed in order) is set beside memopt's total.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import environment, mib, table, write  # noqa: E402

from memopt.analysis.accounting import analyze  # noqa: E402
from memopt.capture import capture  # noqa: E402
from memopt.eval.measure import cpu_peak_bytes  # noqa: E402
from memopt.passes.arena import ArenaConfig, arena_memgraph  # noqa: E402
from memopt.pipeline import compile_model  # noqa: E402
from memopt.solvers.arena import greedy_arena, no_reuse_bytes, solve_arena  # noqa: E402
from memopt.frontend.sources import ModelSource, resolve_source  # noqa: E402

KINDS = ("activation", "output")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18(nn.Module):
    """ResNet-18's architecture (random init): conv stem, 4 stages of 2 basic blocks, linear head."""

    def __init__(self, classes: int = 1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def cases():
    torch.manual_seed(0)
    yield "demo (prefill 512)", resolve_source("demo"), 512
    yield "minilm (batch 8 x 128)", resolve_source("minilm"), (8, 128)
    yield "llama-3.2-1b preset, meta (prefill 2048)", resolve_source("llama-3.2-1b"), 2048
    yield "resnet-18 arch (batch 8, 224x224)", ModelSource("resnet18", ResNet18().eval(), "module",
                                                           fixed_inputs=(torch.randn(8, 3, 224, 224),)), None


def _allocator_peak_bytes(fn) -> int:
    """The running sum of the profiler's raw allocation records (what cpu_peak_bytes replays, without its
    per-tensor attribution, which takes minutes and gigabytes on an Inductor-compiled call)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    current = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        current += nbytes
        peak = max(peak, current)
    return peak


def _measured(src, batch: int, seq, inductor: bool) -> tuple[str, str, str, str]:
    """(eager peak, arena + outside, total / eager, inductor peak) in MiB, measured."""
    args = src.example_inputs(batch, seq) if src.fixed_inputs is None else src.fixed_inputs
    model = src.traceable()
    model(*args)  # warm up lazy initialisation before measuring
    eager = cpu_peak_bytes(lambda: model(*args))
    r = compile_model(src, batch=batch, seq=seq, outputs_in_arena=True, generation=False)
    r.module(*args)
    outside = cpu_peak_bytes(lambda: r.module(*args))
    total = r.plan.arena.size_bytes + outside
    compiled = "not run"
    if inductor:
        fn = torch.compile(r.module, backend="inductor")
        fn(*args)
        compiled = mib(_allocator_peak_bytes(lambda: fn(*args)))
    return (mib(eager), f"{mib(r.plan.arena.size_bytes)} + {mib(outside)} = {mib(total)}",
            f"{total / max(eager, 1):.2f}", compiled)


def main() -> None:
    inductor = "--inductor" in sys.argv[1:]
    rows = []
    for label, src, shape in cases():
        batch, seq = shape if isinstance(shape, tuple) else (1, shape)
        a = analyze(capture(src, batch=batch, seq=seq))
        g, _ = arena_memgraph(a, ArenaConfig(outputs_in_arena=True))
        greedy = greedy_arena(g, kinds=KINDS)
        t0 = time.perf_counter()
        ilp = solve_arena(g, kinds=KINDS, time_limit_s=10.0)
        solve_s = time.perf_counter() - t0
        measured = ("n/a (meta)",) * 4 if src.on_meta else _measured(src, batch, seq, inductor)
        rows.append([label, len(g.of_kind(*KINDS)), mib(ilp.lower_bound_bytes), mib(greedy.size_bytes),
                     mib(ilp.size_bytes), f"{ilp.size_bytes / max(ilp.lower_bound_bytes, 1):.4f}",
                     mib(no_reuse_bytes(g, KINDS)), f"{solve_s:.2f}", ilp.solver.status, *measured])
        print(rows[-1], flush=True)
    headers = ["model", "tensors", "lower bound MiB", "greedy MiB", "ILP MiB", "ILP / bound", "no reuse MiB",
               "solve s", "solver status", "eager peak MiB (measured)", "arena + outside = total MiB (measured)",
               "total / eager", "inductor peak MiB (measured)"]
    text = (f"# Arena planning\n\n{environment()}\n\nCommand: `python benchmarks/arena.py"
            + (" --inductor" if inductor else "") + "`\n\n"
            + table(headers, rows) + "\n\n" + (__doc__ or "").split("\n\n", 1)[1].strip("\n") + "\n")
    write("arena.md", text)


if __name__ == "__main__":
    main()
