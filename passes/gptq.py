"""GPTQ for group-wise int4 weights (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization").

Columns are quantized one at a time and the rounding error of each is pushed onto the columns not yet
quantized through the inverse Hessian H = E[x^T x] of the layer's inputs, so the layer *output*
error, not the weight error, is minimized. Act-order (columns by decreasing H diagonal) with static
groups: group scales/zeros are fixed up front from the original weights, so the stored format is the
plain group-wise int4 of `memopt.runtime.quant_ops`. Columns listed in `keep` (outlier channels kept
in 16-bit) are processed last and not rounded, so they absorb error from the others.
Shapes: w `[N, K]`, hessian `[K, K]`. It runs with one intra-op thread (restored afterwards): the
column loop is K rounds of small ops on `[N]` vectors, and contended threads made it ~10x slower.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

from memopt.runtime.quant_ops import int4_group_params


def _inverse_hessian_cholesky(h: Tensor, damp: float) -> Tensor:
    h = h.clone()
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    for extra in (0.0, 1e-3, 1e-2, 1e-1):
        try:
            h_try = h + extra * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
            inv = torch.cholesky_inverse(torch.linalg.cholesky(h_try))
            return torch.linalg.cholesky(inv, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even after damping; "
                     "give more (or more varied) calibration inputs")


@contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_int4(w: Tensor, hessian: Tensor, group_size: int, *, keep: Tensor | None = None,
              damp: float = 0.1, block: int = 128) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (q uint8 `[N, K]`, scales bf16 `[N, K/g]`, zeros uint8 `[N, K/g]`, w_final fp32 `[N, K]`).

    `w_final` holds the error-compensated weights; its `keep` columns are what to store in 16-bit
    (their `q` entries equal the zero point, i.e. dequantize to 0).
    """
    with _one_thread():
        return _gptq_int4(w, hessian, group_size, keep, damp, block)


def _gptq_int4(w: Tensor, hessian: Tensor, group_size: int, keep: Tensor | None, damp: float,
               block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n, k = w.shape
    w = w.detach().float().clone()
    h = hessian.detach().double().clone()
    keep_mask = torch.zeros(k, dtype=torch.bool)
    if keep is not None and keep.numel():
        keep_mask[keep] = True
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead & ~keep_mask] = 0.0
    grid_w = w.clone()
    grid_w[:, keep_mask] = 0.0  # zeroed outlier columns do not widen the groups' ranges
    scales, zeros = int4_group_params(grid_w.reshape(n, k // group_size, group_size))
    s_cols = scales.float().repeat_interleave(group_size, dim=1)  # [N, K]
    z_cols = zeros.float().repeat_interleave(group_size, dim=1)

    diag = torch.diag(h).clone()
    diag[keep_mask] = -1.0  # kept columns go last
    perm = torch.argsort(diag, descending=True, stable=True)
    inv_perm = torch.argsort(perm)
    w, h = w[:, perm], h[perm][:, perm]
    s_cols, z_cols, keep_p = s_cols[:, perm], z_cols[:, perm], keep_mask[perm]
    hinv = _inverse_hessian_cholesky(h, damp)

    q = torch.empty(n, k)
    _gptq_columns(w, q, hinv, s_cols, z_cols, keep_p, block)
    return q[:, inv_perm].to(torch.uint8), scales, zeros, w[:, inv_perm]


def _gptq_columns(w: Tensor, q: Tensor, hinv: Tensor, s_cols: Tensor, z_cols: Tensor, keep: Tensor,
                  block: int) -> None:
    """The GPTQ sweep, in the permuted column order; fills `q` and updates `w` in place."""
    n, k = w.shape
    keep, s_rows, z_rows = keep.tolist(), s_cols.t().contiguous(), z_cols.t().contiguous()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            col = w1[:, i]
            if keep[c]:
                q[:, c] = z_rows[c]
                continue
            qc = torch.round(col / s_rows[c] + z_rows[c]).clamp_(0, 15)
            q[:, c] = qc
            e = (col - (qc - z_rows[c]) * s_rows[c]) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]


__all__ = ["gptq_int4"]
