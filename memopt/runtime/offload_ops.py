"""Runtime ops for weight offloading: stream a block's weights from host memory into a device staging slot.

    offload_prefetch(slot, host, slot_index)   start copying `host` into `slot[:host.numel()]`
    offload_wait(slot, host, slot_index)       make the compute stream wait until that copy has landed
      slot        (slot_bytes,) uint8 on the device   one reusable staging buffer; mutated
      host        (block_bytes,) uint8 on the host    the block's weights packed at aligned byte offsets
                                                      (pinned when CUDA is available)
      slot_index  int                                 which staging slot (for the schedule and messages)

The graph reads the block's weights as aten views of `slot` (slice -> view(dtype) -> view(shape)) taken
after `offload_wait`; a custom op may not return a view of its input, so the ops mutate the slot in place
and return nothing. On CUDA the copy runs on a side stream: the side stream first waits for the compute
stream (the slot's previous block has been read), then copies with `non_blocking=True` from pinned memory
and records an event; `offload_wait` makes the compute stream wait on that event, so the transfer overlaps
the compute issued between the two calls (FlexGen, Sheng et al. 2023; LLM in a flash, Alizadeh et al.
2023). With host and device the same (CPU-only), the prefetch is a plain copy and the wait does nothing.
Registered with `torch.library` (fake kernels included), so a graph calling them still exports.
"""

from __future__ import annotations

import torch
from torch import Tensor

_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}
_pending: dict[tuple[torch.device, int], "torch.cuda.Event"] = {}  # (device, slot data_ptr) -> copy done


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def _check(slot: Tensor, host: Tensor, slot_index: int) -> None:
    if slot.dtype != torch.uint8 or host.dtype != torch.uint8 or slot.dim() != 1 or host.dim() != 1:
        raise ValueError(f"offload slot {slot_index}: slot and host must be 1-d uint8, got "
                         f"{slot.dtype}{tuple(slot.shape)} and {host.dtype}{tuple(host.shape)}")
    if host.numel() > slot.numel():
        raise ValueError(f"offload slot {slot_index} holds {slot.numel()} bytes, the block needs {host.numel()}")


@torch.library.custom_op("memopt::offload_prefetch", mutates_args=("slot",))
def offload_prefetch(slot: Tensor, host: Tensor, slot_index: int) -> None:
    _check(slot, host, slot_index)
    dst = slot[: host.numel()]
    if slot.device.type != "cuda" or host.device.type == "cuda":
        dst.copy_(host)  # same memory space (CPU-only, or a block already on the device): a plain copy
        return
    stream = _side_stream(slot.device)
    stream.wait_stream(torch.cuda.current_stream(slot.device))  # the slot's previous block has been read
    with torch.cuda.stream(stream):
        dst.copy_(host, non_blocking=True)  # async only from pinned memory; pageable memory copies in sync
        done = torch.cuda.Event()
        done.record(stream)
    _pending[(slot.device, slot.data_ptr())] = done


@offload_prefetch.register_fake
def _(slot, host, slot_index):
    return None


@torch.library.custom_op("memopt::offload_wait", mutates_args=("slot",))
def offload_wait(slot: Tensor, host: Tensor, slot_index: int) -> None:
    done = _pending.pop((slot.device, slot.data_ptr()), None)
    if done is not None:
        torch.cuda.current_stream(slot.device).wait_event(done)


@offload_wait.register_fake
def _(slot, host, slot_index):
    return None


PREFETCH = torch.ops.memopt.offload_prefetch.default
WAIT = torch.ops.memopt.offload_wait.default
