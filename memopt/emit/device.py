"""Put a compiled model on its device: `to_device(opt, "cuda")` moves every program of an OptimizedModule.

memopt compiles on the CPU (a model that does not fit the GPU must not be loaded onto it first); the
programs are then moved, weights once for both programs of a decoder, by `torch.export`'s
`move_to_device_pass` (state, constants, and the device arguments burnt into ops such as `arange`). Buffers
the offload passes keep in host memory (`_memopt_offload_host_*`: weight blocks and KV caches) stay on
the host, pinned when the device is CUDA, so the device never holds them. The arena is re-applied on the
moved forward program. The programs are moved in place: use the returned module, not the old one.
"""

from __future__ import annotations

import torch

from memopt.names import HOST_PREFIX as HOST_MARK


def to_device(module, device: str | torch.device):
    """`module` (an OptimizedModule with `.programs`) rebuilt on `device`."""
    from torch.export.passes import move_to_device_pass

    from memopt.emit.module import assemble

    device = check_device(device)
    programs = getattr(module, "programs", None) or {}
    if "program" not in programs:
        raise ValueError("to_device needs the module's exported programs (memopt.compile or memopt.load results "
                         "have them)")
    from memopt.runtime.quant_ops import canonicalize_int4_

    for ep in programs.values():  # a CPU-kernel int4 layout means nothing on another device
        canonicalize_int4_(_tensors(ep).values())
    location = {str(t.device): str(device) for ep in programs.values() for t in _tensors(ep).values()}
    location.pop("meta", None)
    moved: dict[int, torch.Tensor] = {}  # id(tensor before) -> on the device: shared weights move once
    pin = device.type == "cuda"
    for ep in programs.values():
        before = _tensors(ep)
        host = {}
        for table in (ep._state_dict, ep._constants):
            for name, t in list(table.items()):
                if not isinstance(t, torch.Tensor):
                    continue
                if HOST_MARK in name:  # stays on the host: hide it from the pass behind a meta stand-in
                    host[name] = t
                    table[name] = torch.empty_like(t, device="meta")
                elif id(t) in moved:
                    table[name] = _like(t, moved[id(t)])
        move_to_device_pass(ep, location)
        for table in (ep._state_dict, ep._constants):
            for name, t in list(table.items()):
                if name in host:
                    table[name] = _like(before[name], host[name].pin_memory() if pin and not host[name].is_pinned()
                                        else host[name])
                elif name in before and isinstance(t, torch.Tensor):
                    moved.setdefault(id(before[name]), t)
    return assemble(module.plan, programs, getattr(module, "tokenizer", None), dict(getattr(module, "report", {})))


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device this process can use, or a one-line ValueError naming it."""
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use e.g. cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} is not available here (this torch sees no CUDA device); use "
                         "--device cpu")
    return device


def _tensors(ep) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*ep.state_dict.items(), *ep.constants.items()] if isinstance(t, torch.Tensor)}


def _like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """`new` as a Parameter when `old` was one (export keeps parameters and buffers apart)."""
    if isinstance(old, torch.nn.Parameter) and not isinstance(new, torch.nn.Parameter):
        return torch.nn.Parameter(new, requires_grad=False)
    return new
