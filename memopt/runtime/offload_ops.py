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

KV-cache offloading (passes/kv_offload.py; FlexGen, Sheng et al. 2023; ShadowKV, Sun et al. 2024) adds

    kv_offload_prefetch(slot, host, layer)       start copying the layer's host cache into `slot`
    kv_offload_wait(slot, host, layer)           make the compute stream wait until that copy has landed
    kv_offload_writeback(host, slot, pos, layer) copy the rows at token positions `pos` back to `host`
      slot   (slot_numel,) cache dtype on the device   staging slot; holds host.numel() elements
      host   (2, max_tokens, batch, kv_heads, head_dim) keys then values, token-major (FlexGen's layout),
             so one step's new rows are contiguous on the host; pinned on CUDA
      pos    (new_tokens,) int64                      the cache positions written this step

The graph reads the slot as (batch, kv_heads, max_tokens, head_dim) permuted views. On CUDA the
write-back gathers the new rows on the side stream and copies them to a pinned buffer; they are
scattered into `host` by the layer's next prefetch (or `flush_kv_writebacks()`), one step later, so the
host never waits on the device in the middle of a step.
"""

from __future__ import annotations

import torch
from torch import Tensor

_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}
_pending: dict[tuple[torch.device, int], "torch.cuda.Event"] = {}  # (device, slot data_ptr) -> copy done
_writebacks: dict[int, tuple] = {}  # host data_ptr -> (event, host, pinned rows, pinned positions)


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


def _start_copy(slot: Tensor, host: Tensor) -> None:
    """Copy `host` (flat) into the front of `slot`: a plain copy in one memory space (CPU-only, or a tensor
    already on the device), else on the side stream once the slot's previous reader is done, recording the
    event `_wait` makes the compute stream wait on."""
    dst = slot[: host.numel()]
    if slot.device.type != "cuda" or host.device.type == "cuda":
        dst.copy_(host.reshape(-1))
        return
    stream = _side_stream(slot.device)
    stream.wait_stream(torch.cuda.current_stream(slot.device))  # the slot's previous contents have been read
    with torch.cuda.stream(stream):
        dst.copy_(host.view(-1), non_blocking=True)  # async only from pinned memory; pageable copies in sync
        done = torch.cuda.Event()
        done.record(stream)
    _pending[(slot.device, slot.data_ptr())] = done


def _wait(slot: Tensor) -> None:
    done = _pending.pop((slot.device, slot.data_ptr()), None)
    if done is not None:
        torch.cuda.current_stream(slot.device).wait_event(done)


@torch.library.custom_op("memopt::offload_prefetch", mutates_args=("slot",))
def offload_prefetch(slot: Tensor, host: Tensor, slot_index: int) -> None:
    _check(slot, host, slot_index)
    _start_copy(slot, host)


@offload_prefetch.register_fake
def _(slot, host, slot_index):
    return None


@torch.library.custom_op("memopt::offload_wait", mutates_args=("slot",))
def offload_wait(slot: Tensor, host: Tensor, slot_index: int) -> None:
    _wait(slot)


@offload_wait.register_fake
def _(slot, host, slot_index):
    return None


PREFETCH = torch.ops.memopt.offload_prefetch.default
WAIT = torch.ops.memopt.offload_wait.default


# ---------------------------------------------------------------- KV cache
def _kv_check(slot: Tensor, host: Tensor, layer: int) -> None:
    if slot.dim() != 1 or host.dim() != 5 or slot.dtype != host.dtype or host.shape[0] != 2:
        raise ValueError(f"KV offload layer {layer}: slot must be 1-d and host (2, tokens, batch, kv_heads, "
                         f"head_dim) of one dtype, got {slot.dtype}{tuple(slot.shape)} and "
                         f"{host.dtype}{tuple(host.shape)}")
    if host.numel() > slot.numel():
        raise ValueError(f"KV offload layer {layer}: the slot holds {slot.numel()} elements, the cache needs "
                         f"{host.numel()}")


def _flush(key: int) -> None:
    pending = _writebacks.pop(key, None)
    if pending is not None:
        done, host, rows, pos = pending
        done.synchronize()  # recorded one step ago: normally long complete
        host.index_copy_(1, pos, rows)


def flush_kv_writebacks() -> int:
    """Scatter every pending write-back into its host cache (before reading or saving host caches);
    returns how many were pending. A no-op without CUDA."""
    keys = list(_writebacks)
    for key in keys:
        _flush(key)
    return len(keys)


@torch.library.custom_op("memopt::kv_offload_prefetch", mutates_args=("slot",))
def kv_offload_prefetch(slot: Tensor, host: Tensor, layer: int) -> None:
    _kv_check(slot, host, layer)
    _flush(host.data_ptr())  # last step's new rows land on the host before it is read again (CUDA only)
    _start_copy(slot, host)


@kv_offload_prefetch.register_fake
def _(slot, host, layer):
    return None


@torch.library.custom_op("memopt::kv_offload_wait", mutates_args=("slot",))
def kv_offload_wait(slot: Tensor, host: Tensor, layer: int) -> None:
    _wait(slot)


@kv_offload_wait.register_fake
def _(slot, host, layer):
    return None


@torch.library.custom_op("memopt::kv_offload_writeback", mutates_args=("host",))
def kv_offload_writeback(host: Tensor, slot: Tensor, pos: Tensor, layer: int) -> None:
    _kv_check(slot, host, layer)
    cache = slot[: host.numel()].view(host.shape)
    if slot.device.type != "cuda" or host.device.type == "cuda":
        host.index_copy_(1, pos.to(host.device), cache.index_select(1, pos.to(cache.device)))
        return
    _flush(host.data_ptr())
    stream = _side_stream(slot.device)
    stream.wait_stream(torch.cuda.current_stream(slot.device))  # the new rows are in the slot
    with torch.cuda.stream(stream):
        pos_dev = pos.to(slot.device, non_blocking=True)
        rows = cache.index_select(1, pos_dev)
        rows_host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        pos_host = torch.empty(pos_dev.shape, dtype=pos_dev.dtype, pin_memory=True)
        rows_host.copy_(rows, non_blocking=True)
        pos_host.copy_(pos_dev, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
    _writebacks[host.data_ptr()] = (done, host, rows_host, pos_host)


@kv_offload_writeback.register_fake
def _(host, slot, pos, layer):
    return None


KV_PREFETCH = torch.ops.memopt.kv_offload_prefetch.default
KV_WAIT = torch.ops.memopt.kv_offload_wait.default
KV_WRITEBACK = torch.ops.memopt.kv_offload_writeback.default
