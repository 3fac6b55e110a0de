"""Runtime ops for weight-only quantized linears and embeddings, namespace `memopt`.

Stored (canonical) formats, the ones artifacts save:
- int8, symmetric per output row: `qweight` int8 `[N, K]`, `scales` fp32 `[N]`; w ~= qweight * scales[:, None].
- int4, asymmetric per group of `group_size` input channels: `packed` uint8 `[N, K/2]` (two values per
  byte: element 2j in the low nibble, 2j+1 in the high one), `scales` bf16 `[N, K/g]`, `zeros` uint8
  `[N, K/g]` (integer zero points in [0, 15]); w ~= (q - zeros) * scales.
  Optional outliers: `outlier_idx` int64 `[n_out]` input channels kept in 16-bit, `outlier_weight` bf16
  `[N, n_out]`; their columns in `packed` dequantize to exactly 0 (block quantization with outliers).

Kernels (CPU): int8 uses `aten._weight_int8pack_mm` (bf16 activations) for up to 16 rows when
K % 16 == 0 (it returns garbage or crashes for other K), else a tile-wise dequantize + matmul whose
temporary fp weight is at most 4M elements. With `act_int8=True` the activations are quantized per
row on the fly and multiplied with `torch._int_mm` (int32 accumulation): W8A8-dynamic, the fastest
path at every M, but it adds activation error. int4 uses `aten._weight_int4pack_mm_for_cpu` (bf16
activations) for up to 128 rows when N % 16 == 0: its layout is derived from the canonical bytes on
first use and cached on the `packed` tensor (as many bytes again as `packed`, so resident int4
weights are 2x their stored size on this path); its dequantization is (q - 8) * scale + zero', so
zero' = (8 - zeros) * scales. Larger M (prefill, batches) uses the tile-wise reference, which runs at
fp32 speed there. CUDA and every other case: the tile-wise reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_TILE_ELEMS = 1 << 22  # weight elements dequantized at a time on the reference path (16 MiB in fp32)
_INT8PACK_MAX_ROWS = 16
_INT4_KERNEL_MAX_ROWS = 128
_CLIP_RATIOS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)


# ---------------------------------------------------------------- storage formats
def quantize_int8_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row int8. `w` `[N, K]` -> (`qweight` int8 `[N, K]`, `scales` fp32 `[N]`)."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return qweight.to(dtype) * scales.to(dtype)[:, None]


def pack_int4(q: Tensor) -> Tensor:
    """`q` uint8 `[N, K]` with values in [0, 15] -> `[N, K/2]`, element 2j low nibble, 2j+1 high."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: `[N, K/2]` -> uint8 `[N, K]`."""
    q = torch.empty(*packed.shape, 2, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 15, out=q[..., 0])
    torch.bitwise_right_shift(packed, 4, out=q[..., 1])
    return q.reshape(packed.shape[0], -1)


def int4_group_params(w: Tensor, clip_search: bool = True) -> tuple[Tensor, Tensor]:
    """Scale (bf16) and integer zero point (uint8) for each row of `w` `[..., g]` (one group a row).

    Min-max with 0 inside the range (so zeroed outlier columns dequantize to exactly 0); with
    `clip_search` the range is shrunk by the ratio in `_CLIP_RATIOS` that minimizes the group's MSE.
    """
    w = w.float()
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    best_err = best_s = best_z = None
    t = torch.empty_like(w)
    for r in _CLIP_RATIOS if clip_search else (1.0,):
        s = ((hi - lo) * r / 15).clamp_min(1e-8).to(torch.bfloat16).float()
        z = torch.round(-lo * r / s).clamp(0, 15)
        s_, z_ = s[..., None], z[..., None]
        torch.div(w, s_, out=t).add_(z_).round_().clamp_(0, 15).sub_(z_).mul_(s_).sub_(w)  # dequant error
        err = torch.linalg.vector_norm(t, dim=-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s.to(torch.bfloat16), best_z.to(torch.uint8)


def quantize_int4_values(w: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """Round `w` `[N, K]` onto the grid given by `scales`/`zeros` `[N, K/g]` -> uint8 `[N, K]`."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    s, z = scales.float()[..., None], zeros.float()[..., None]
    return torch.round(wg / s + z).clamp_(0, 15).to(torch.uint8).reshape(n, k)


def quantize_int4_groups(w: Tensor, group_size: int, clip_search: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest group-wise int4. `w` `[N, K]` -> (packed `[N, K/2]`, scales, zeros `[N, K/g]`)."""
    n, k = w.shape
    scales, zeros = int4_group_params(w.detach().reshape(n, k // group_size, group_size), clip_search)
    return pack_int4(quantize_int4_values(w.detach(), scales, zeros, group_size)), scales, zeros


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    n = packed.shape[0]
    w = unpack_int4(packed).reshape(n, -1, group_size).to(dtype)
    return w.sub_(zeros.to(dtype)[..., None]).mul_(scales.to(dtype)[..., None]).reshape(n, -1)


# ---------------------------------------------------------------- kernels
def _tiled_linear(x2: Tensor, n: int, dequant_rows, bias: Optional[Tensor]) -> Tensor:
    """y = x2 @ W.T + bias with W dequantized at most `_TILE_ELEMS` elements at a time (never whole
    when larger), so the temporary fp weight stays small."""
    rows = max(1, _TILE_ELEMS // max(x2.shape[1], 1))
    b = None if bias is None else bias.to(x2.dtype)
    if n <= rows:
        return torch.nn.functional.linear(x2, dequant_rows(0, n), b)
    tiles = []
    for i in range(0, n, rows):
        j = min(i + rows, n)
        tiles.append(torch.nn.functional.linear(x2, dequant_rows(i, j), None if b is None else b[i:j]))
    return torch.cat(tiles, dim=1)


def _int8_dynamic_mm(x2: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """W8A8-dynamic: per-row symmetric int8 activations, int32 accumulation in `torch._int_mm`."""
    xf = x2.float()
    xs = xf.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    xq = torch.round(xf / xs).clamp_(-127, 127).to(torch.int8)
    return (torch._int_mm(xq, qweight.t()).float() * xs * scales.float()).to(x2.dtype)


def _cpu_int4_layout(packed: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor]:
    """The CPU kernel's weight layout and `[K/g, N, 2]` bf16 scales-and-zeros, cached on `packed`."""
    cached = getattr(packed, "_memopt_cpu_int4", None)
    key = (packed._version, scales._version, zeros._version)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    kernel_w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(packed).to(torch.int32), 1)
    s = scales.float()
    sz = torch.stack([s.t(), ((8.0 - zeros.float()) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    packed._memopt_cpu_int4 = (key, kernel_w, sz)
    return kernel_w, sz


def _linear_out(x: Tensor, y2: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is not None:
        y2 = y2 + bias.to(y2.dtype)
    return y2.reshape(*x.shape[:-1], y2.shape[-1])


# ---------------------------------------------------------------- ops
@torch.library.custom_op("memopt::linear_int8", mutates_args=())
def linear_int8(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                act_int8: bool = False) -> Tensor:
    """y = x @ (qweight * scales[:, None]).T + bias. x `[..., K]`, qweight int8 `[N, K]`, scales `[N]`."""
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    on_cpu = x.device.type == "cpu"
    if on_cpu and act_int8:
        y2 = _int8_dynamic_mm(x2, qweight, scales)
    elif on_cpu and x2.shape[0] <= _INT8PACK_MAX_ROWS and k % 16 == 0:
        y2 = torch.ops.aten._weight_int8pack_mm(
            x2.to(torch.bfloat16).contiguous(), qweight.contiguous(), scales.to(torch.bfloat16)).to(x.dtype)
    else:
        y2 = _tiled_linear(x2, n, lambda i, j: dequantize_int8(qweight[i:j], scales[i:j], x.dtype), bias)
        bias = None
    return _linear_out(x, y2, bias)


@linear_int8.register_fake
def _(x, qweight, scales, bias=None, act_int8=False):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


@torch.library.custom_op("memopt::linear_int4", mutates_args=())
def linear_int4(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Optional[Tensor] = None, outlier_idx: Optional[Tensor] = None,
                outlier_weight: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T (+ x[..., outlier_idx] @ outlier_weight.T) + bias with W the int4 group dequantization.

    x `[..., K]`, packed uint8 `[N, K/2]`, scales bf16 / zeros uint8 `[N, K/g]`, outlier_weight `[N, n_out]`.
    """
    n, k = packed.shape[0], packed.shape[1] * 2
    x2 = x.reshape(-1, k)
    if x.device.type == "cpu" and n % 16 == 0 and x2.shape[0] <= _INT4_KERNEL_MAX_ROWS:
        kernel_w, sz = _cpu_int4_layout(packed, scales, zeros)
        y2 = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(torch.bfloat16).contiguous(), kernel_w, group_size, sz).to(x.dtype)
    else:
        def rows(i, j):
            return dequantize_int4(packed[i:j], scales[i:j], zeros[i:j], group_size, x.dtype)
        y2 = _tiled_linear(x2, n, rows, bias)
        bias = None
    if outlier_idx is not None and outlier_weight is not None:
        y2 = y2 + x2.index_select(1, outlier_idx) @ outlier_weight.to(x.dtype).t()
    return _linear_out(x, y2, bias)


@linear_int4.register_fake
def _(x, packed, scales, zeros, group_size, bias=None, outlier_idx=None, outlier_weight=None):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("memopt::embedding_int8", mutates_args=())
def embedding_int8(qweight: Tensor, scales: Tensor, indices: Tensor) -> Tensor:
    """Rows of an int8 per-row table: `qweight[indices] * scales[indices]`, dtype of `scales`.

    qweight int8 `[V, D]`, scales `[V]`, indices any integer shape -> `[*indices.shape, D]`.
    """
    flat = indices.reshape(-1)
    rows = qweight.index_select(0, flat).to(scales.dtype) * scales.index_select(0, flat)[:, None]
    return rows.reshape(*indices.shape, qweight.shape[1])


@embedding_int8.register_fake
def _(qweight, scales, indices):
    return scales.new_empty((*indices.shape, qweight.shape[1]))


__all__ = [
    "quantize_int8_rows", "dequantize_int8", "pack_int4", "unpack_int4", "int4_group_params",
    "quantize_int4_values", "quantize_int4_groups", "dequantize_int4",
    "linear_int8", "linear_int4", "embedding_int8",
]
