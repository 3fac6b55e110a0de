"""Measured memory, for benchmarks (tests check correctness, not speed or bytes measured this way).

CPU: `cpu_peak_bytes` runs a function under the PyTorch profiler with memory profiling and replays
the allocator's records (every tensor storage created and destroyed, in time order, as
`torch.profiler._memory_profiler` reconstructs them); the peak of that running sum is the most
memory the function held at once beyond what existed before it started (weights, an arena).
CUDA: `cuda_peak_bytes` uses `torch.cuda.max_memory_allocated` around the call.
"""

from __future__ import annotations

from typing import Callable

import torch


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:
        result = fn()
    del result
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - base
