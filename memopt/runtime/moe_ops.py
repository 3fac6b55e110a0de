"""Runtime ops for quantized mixture-of-experts weights, namespace `memopt`.

transformers 5.x stores a MoE layer's experts as fused 3-D parameters (`experts.gate_up_proj` `[E, 2I, H]`,
`experts.down_proj` `[E, H, I]`) and multiplies them with a grouped matmul over tokens sorted by expert
(`aten._grouped_mm` for bf16, the `transformers::grouped_mm_fallback` custom op otherwise):
rows `[offs[e-1], offs[e])` of `x` go through expert e. These ops do the same with each expert's weight
stored the way `memopt.runtime.quant_ops` stores one linear's, stacked on a leading expert dimension:
- int8 per output channel of each expert: `qweight` int8 `[E, N, K]`, `scales` fp32 `[E, N]`.
- int4 group-wise: `packed` uint8 `[E, N, K/2]`, `scales` bf16 / `zeros` uint8 `[E, N, K/g]`.
Rows past `offs[-1]` come out as zeros. Each expert runs the single-linear kernel on its rows (int8) or a
tile-wise dequantize + matmul (int4: the CPU int4 kernel rewrites its weight in place, which a per-expert
view cannot keep tagged).
"""

from __future__ import annotations

import torch
from torch import Tensor

from memopt.runtime import quant_ops as q


def _grouped(x: Tensor, offs: Tensor, n: int, expert_linear) -> Tensor:
    """y `[S, n]`: `expert_linear(e, rows)` for each expert's rows of `x` `[S, K]`, zeros elsewhere."""
    out = x.new_zeros((x.shape[0], n))
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = expert_linear(e, x[start:end])
        start = max(start, end)
    return out


@torch.library.custom_op("memopt::grouped_linear_int8", mutates_args=())
def grouped_linear_int8(x: Tensor, qweight: Tensor, scales: Tensor, offs: Tensor, act_int8: bool = False) -> Tensor:
    """Row group e of x `[S, K]` times (qweight[e] * scales[e][:, None]).T; offs int `[E]` cumulative row counts."""
    return _grouped(x, offs, qweight.shape[1],
                    lambda e, xe: q.linear_int8(xe, qweight[e], scales[e], None, act_int8))


@grouped_linear_int8.register_fake
def _(x, qweight, scales, offs, act_int8=False):
    return x.new_empty((x.shape[0], qweight.shape[1]))


@torch.library.custom_op("memopt::grouped_linear_int4", mutates_args=())
def grouped_linear_int4(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                        offs: Tensor) -> Tensor:
    """Row group e of x `[S, K]` times the int4 group dequantization of expert e's weight, transposed."""
    n = packed.shape[1]

    def expert_linear(e: int, xe: Tensor) -> Tensor:
        def rows(i, j):
            w = q.unpack_int4(packed[e, i:j]).reshape(j - i, -1, group_size).to(x.dtype)
            w = w.sub_(zeros[e, i:j].to(x.dtype)[..., None]).mul_(scales[e, i:j].to(x.dtype)[..., None])
            return w.reshape(j - i, -1)
        return q._tiled_linear(xe, n, rows, None)

    return _grouped(x, offs, n, expert_linear)


@grouped_linear_int4.register_fake
def _(x, packed, scales, zeros, group_size, offs):
    return x.new_empty((x.shape[0], packed.shape[1]))


def quantize_experts_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """`w` `[E, N, K]` -> (qweight int8 `[E, N, K]`, scales fp32 `[E, N]`): per-row int8 of every expert."""
    e, n, k = w.shape
    qw, s = q.quantize_int8_rows(w.reshape(e * n, k))
    return qw.reshape(e, n, k), s.reshape(e, n)


def quantize_experts_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """`w` `[E, N, K]` -> (packed `[E, N, K/2]`, scales, zeros `[E, N, K/g]`): round-to-nearest group-wise int4."""
    e, n, k = w.shape
    packed, s, z = q.quantize_int4_groups(w.reshape(e * n, k), group_size)
    return packed.reshape(e, n, k // 2), s.reshape(e, n, -1), z.reshape(e, n, -1)


__all__ = ["grouped_linear_int8", "grouped_linear_int4", "quantize_experts_int8", "quantize_experts_int4"]
