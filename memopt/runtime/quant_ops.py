"""Runtime ops for weight-only quantized linears and embeddings, namespace `memopt`.

Stored (canonical) formats, the ones artifacts save:
- int8, symmetric per output row: `qweight` int8 `[N, K]`, `scales` fp32 `[N]`; w ~= qweight * scales[:, None].
- int4, asymmetric per group of `group_size` input channels: `packed` uint8 `[N, K/2]` (two values per
  byte: element 2j in the low nibble, 2j+1 in the high one), `scales` bf16 `[N, K/g]`, `zeros` uint8
  `[N, K/g]` (integer zero points in [0, 15]); w ~= (q - zeros) * scales.
  Optional outliers: `outlier_idx` int64 `[n_out]` input channels kept in 16-bit, `outlier_weight` bf16
  `[N, n_out]`; their columns in `packed` dequantize to exactly 0 (block quantization with outliers).
  Optional input rotation (`hadamard` = b > 0, QuIP#/QuaRot-style incoherence processing): the stored
  weight is W R with R the block-diagonal orthonormal Hadamard matrix of blocks of b input channels, and
  the graph feeds the linear `memopt::hadamard(x, b)` = x R, so (x R) (W R)^T = x W^T; R is symmetric and
  rebuilt from b, so it costs no stored byte.

Kernels (CPU): int8 uses `aten._weight_int8pack_mm` (bf16 activations) for up to 16 rows when
K % 16 == 0 (it returns garbage or crashes for other K), else a tile-wise dequantize + matmul whose
temporary fp weight is at most 4M elements. With `act_int8=True` the activations are quantized per
row on the fly and multiplied with `torch._int_mm` (int32 accumulation): W8A8-dynamic, the fastest
path at every M, but it adds activation error. int4 uses `aten._weight_int4pack_mm_for_cpu` (bf16
activations) for up to 128 rows when N is a multiple of its row block. Its weight layout is a byte shuffle
of the canonical one of the same size (per block of B rows, byte [k, j] = q[j, k] | q[j + B/2, k] << 4, with
B = 64 where ATen's CPU capability is AVX512 and B = 32 with AVX2 or none, found once per process by comparing
with `aten._convert_weight_to_int4pack_for_cpu`), so `prepare_int4_kernel_layout_(module)` rewrites each
`packed` that a `linear_int4` node reads *in place* into it, outside any op (OptimizedModule does before a
CPU run), and tags it (`_memopt_int4_kernel`): one copy stays resident, never two. The op itself never
writes its inputs (`mutates_args=()` is honest, so torch.compile may reorder and share them): an untagged
`packed` takes the reference path. Every reader here accepts either layout; `canonical_int4_layout(module)`
turns tagged buffers back before saving or exporting (artifacts and ONNX store the canonical layout). Its
dequantization is (q - 8) * scale + zero', so zero' = (8 - zeros) * scales (a small `[K/g, N, 2]`
bf16 table cached on `packed`, 4 bytes per group). Larger M (prefill, batches) uses the tile-wise
reference, which runs at fp32 speed there. CUDA and every other case: the tile-wise reference.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from typing import Iterator, Optional

import torch
from torch import Tensor

_TILE_ELEMS = 1 << 22  # weight elements dequantized at a time on the reference path (16 MiB in fp32)
_INT8PACK_MAX_ROWS = 16
_INT4_KERNEL_MAX_ROWS = 128
_KERNEL_BLOCKS = (64, 32)  # rows per block of the CPU int4 kernel layout: AVX512, then AVX2 / default builds
_KERNEL_TAG = "_memopt_int4_kernel"
_CLIP_RATIOS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)


# ---------------------------------------------------------------- storage formats


def hadamard_block(k: int, cap: int = 128) -> int:
    """The rotation block for `k` input channels: the largest power of two dividing k, at most `cap`."""
    return min(k & -k, cap) if k > 0 else 0


@lru_cache(maxsize=16)
def _hadamard(block: int, dtype: torch.dtype, device: str) -> Tensor:
    from memopt.kv.kivi import hadamard_matrix

    return hadamard_matrix(block).to(dtype=dtype, device=device)


def hadamard_rotate(x: Tensor, block: int) -> Tensor:
    """x R for x `[..., K]`, R block-diagonal with orthonormal Sylvester-Hadamard blocks of `block`
    channels (symmetric, R R = I, so rotating twice gives x back). 16-bit inputs rotate in fp32."""
    k = x.shape[-1]
    if block < 1 or k % block:
        raise ValueError(f"a Hadamard rotation of blocks of {block} channels needs K divisible by it, got K={k}")
    dt = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    y = x.to(dt).reshape(*x.shape[:-1], k // block, block) @ _hadamard(block, dt, str(x.device))
    return y.reshape(x.shape).to(x.dtype)


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
    """`packed` in the canonical layout, or a whole buffer in the CPU kernel layout (see module doc)."""
    n = packed.shape[0]
    w = _unpack_any(packed).reshape(n, -1, group_size).to(dtype)
    return w.sub_(zeros.to(dtype)[..., None]).mul_(scales.to(dtype)[..., None]).reshape(n, -1)


# ---------------------------------------------------------------- CPU kernel layout (in place)
def _kernel_from_q(q: Tensor, block: int) -> Tensor:
    """uint8 values `[N, K]` (N % block == 0) -> the CPU kernel's bytes for row blocks of `block`, `[N, K/2]`."""
    n, k = q.shape
    blk = q.reshape(n // block, 2, block // 2, k)
    return (blk[:, 0] | (blk[:, 1] << 4)).transpose(1, 2).reshape(n, k // 2)


def _q_from_kernel(kernel_w: Tensor, block: int) -> Tensor:
    """Inverse of `_kernel_from_q`: `[N, K/2]` kernel bytes -> uint8 values `[N, K]`."""
    n, k = kernel_w.shape[0], kernel_w.shape[1] * 2
    b = kernel_w.reshape(n // block, k, block // 2).transpose(1, 2)
    return torch.stack([b & 15, b >> 4], dim=1).reshape(n, k)


def _kernel_tag(packed: Tensor) -> int:
    """The row block of the kernel layout `packed` holds, 0 when it holds the canonical layout."""
    tag = getattr(packed, _KERNEL_TAG, None)
    return tag[1] if tag is not None and tag[0] == packed._version else 0


def _is_kernel_layout(packed: Tensor) -> bool:
    return _kernel_tag(packed) > 0


def _unpack_any(packed: Tensor) -> Tensor:
    block = _kernel_tag(packed)
    return _q_from_kernel(packed, block) if block else unpack_int4(packed)


_KERNEL_BLOCK_FOUND: list[int] = []


def _kernel_block() -> int:
    """Once per process: the row block B for which `_kernel_from_q(q, B)` equals
    `aten._convert_weight_to_int4pack_for_cpu` in this build and CPU (64 with AVX512, 32 with AVX2 or no
    vector ISA), 0 when neither does (the kernel is then not used)."""
    if not _KERNEL_BLOCK_FOUND:
        q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
        ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        found = [b for b in _KERNEL_BLOCKS
                 if ref.shape == (128, 32) and torch.equal(ref, _kernel_from_q(q.to(torch.uint8), b))]
        _KERNEL_BLOCK_FOUND.append(found[0] if found else 0)
    return _KERNEL_BLOCK_FOUND[0]


def _to_kernel_layout_(packed: Tensor, block: int) -> None:
    """Rewrite canonical `packed` in place into the kernel layout, `block` rows at a time, and tag it."""
    with torch.no_grad():
        for i in range(0, packed.shape[0], block):
            rows = packed[i:i + block]
            rows.copy_(_kernel_from_q(unpack_int4(rows), block))
    setattr(packed, _KERNEL_TAG, (packed._version, block))


def _to_canonical_layout_(packed: Tensor) -> None:
    block = _kernel_tag(packed)
    with torch.no_grad():
        for i in range(0, packed.shape[0], block):
            rows = packed[i:i + block]
            rows.copy_(pack_int4(_q_from_kernel(rows, block)))
    delattr(packed, _KERNEL_TAG)
    for attr in ("_memopt_cpu_int4_sz",):
        if hasattr(packed, attr):
            delattr(packed, attr)


def canonicalize_int4_(tensors) -> int:
    """Put every int4 buffer among `tensors` that the CPU kernel rewrote back into the canonical layout
    (what artifacts and ONNX store); the kernel re-derives its layout in place on its next call.
    Returns how many were converted."""
    n = 0
    for t in tensors:
        if isinstance(t, Tensor) and _is_kernel_layout(t):
            _to_canonical_layout_(t)
            n += 1
    return n


@contextmanager
def canonical_int4_layout(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block every int4 buffer of `module` holds the canonical layout; those it converted get
    the kernel layout back afterwards."""
    tensors = list(module.buffers()) + list(module.parameters())
    blocks = [(t, _kernel_tag(t)) for t in tensors if isinstance(t, Tensor) and _is_kernel_layout(t)]
    canonicalize_int4_(tensors)
    try:
        yield module
    finally:
        for t, block in blocks:
            if not _is_kernel_layout(t):
                _to_kernel_layout_(t, block)


def prepare_int4_kernel_layout_(module: torch.nn.Module) -> int:
    """Rewrite, in place, every CPU `packed` weight that a `memopt::linear_int4` node of `module`'s graphs reads
    (a parameter or buffer, not a view such as an offload slot's) into the CPU kernel's layout, once (tagged
    ones are skipped). Outside any op, so the op stays free of side effects. Returns how many were converted."""
    block = _kernel_block()
    if not block:
        return 0
    n = 0
    for gm in module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            op = torch.ops.memopt.linear_int4
            packed = node.args[1] if node.target in (op, op.default) else None
            if not isinstance(packed, torch.fx.Node) or packed.op != "get_attr":
                continue
            t = _attr(gm, packed.target)
            if (isinstance(t, Tensor) and t.device.type == "cpu" and t.dtype == torch.uint8 and t.dim() == 2
                    and t.shape[0] % block == 0 and t.is_contiguous() and not _is_kernel_layout(t)):
                _to_kernel_layout_(t, block)
                n += 1
    return n


def _attr(root: torch.nn.Module, target: str):
    for part in target.split("."):
        root = getattr(root, part, None)
    return root


def _cpu_int4_layout(packed: Tensor, scales: Tensor, zeros: Tensor) -> tuple[Tensor, Tensor] | None:
    """(`packed` itself, in the kernel layout, and the `[K/g, N, 2]` bf16 scales-and-zeros), or None when
    the kernel cannot be used (not prepared by `prepare_int4_kernel_layout_`, or an unsupported shape)."""
    block = _kernel_block()
    if not block or packed.shape[0] % block:
        return None
    if _kernel_tag(packed) != block:  # canonical: prepare_int4_kernel_layout_ converts weights, never the op
        if packed._base is None:
            return None
        # a view (an offload staging slot, refilled every step): a converted copy, so that streamed and
        # resident int4 linears run the same kernel and give the same numbers; the slot itself is untouched
        packed = torch.cat([_kernel_from_q(unpack_int4(packed[i:i + block]), block)
                            for i in range(0, packed.shape[0], block)])
        s = scales.float()
        sz = torch.stack([s.t(), ((8.0 - zeros.float()) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
        return packed, sz
    cached = getattr(packed, "_memopt_cpu_int4_sz", None)
    key = (scales._version, zeros._version)
    if cached is not None and cached[0] == key and cached[1].shape[1] == packed.shape[0]:
        return packed, cached[1]
    s = scales.float()
    sz = torch.stack([s.t(), ((8.0 - zeros.float()) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    packed._memopt_cpu_int4_sz = (key, sz)
    return packed, sz


# ---------------------------------------------------------------- kernels
def _tiled_linear(x2: Tensor, n: int, dequant_rows, bias: Optional[Tensor], row_multiple: int = 1) -> Tensor:
    """y = x2 @ W.T + bias with W dequantized at most `_TILE_ELEMS` elements at a time (never whole
    when larger; tiles of whole `row_multiple`-row blocks), so the temporary fp weight stays small."""
    rows = max(row_multiple, _TILE_ELEMS // max(x2.shape[1], 1) // row_multiple * row_multiple)
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


def _linear_out(x: Tensor, y2: Tensor, bias: Optional[Tensor]) -> Tensor:
    if bias is not None:
        y2 = y2 + bias.to(y2.dtype)
    return y2.reshape(*x.shape[:-1], y2.shape[-1])


# ---------------------------------------------------------------- ops
@torch.library.custom_op("memopt::linear_int8", mutates_args=())
def linear_int8(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                act_int8: bool = False) -> Tensor:
    """y = x @ (qweight * scales[:, None]).T + bias. x `[..., K]`, qweight int8 `[N, K]`, scales `[N]`."""
    return int8_linear(x, qweight, scales, bias, act_int8)


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Optional[Tensor] = None,
                act_int8: bool = False) -> Tensor:
    """`memopt::linear_int8` as a plain function, which `memopt.serve.decode_program.decode_program` calls without the
    dispatcher's Python layers."""
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


@torch.library.custom_op("memopt::hadamard", mutates_args=())
def hadamard(x: Tensor, block: int) -> Tensor:
    """x R (see `hadamard_rotate`): the input of int4 linears whose weights are stored rotated, computed once
    for all the linears that read the same input (a transformer's q/k/v, gate/up)."""
    return hadamard_rotate(x, block)


@hadamard.register_fake
def _(x, block):
    return x.new_empty(x.shape)  # contiguous, as the kernel's reshape returns


@torch.library.custom_op("memopt::linear_int4", mutates_args=())
def linear_int4(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Optional[Tensor] = None, outlier_idx: Optional[Tensor] = None,
                outlier_weight: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T (+ x[..., outlier_idx] @ outlier_weight.T) + bias with W the int4 group dequantization.

    x `[..., K]`, packed uint8 `[N, K/2]`, scales bf16 / zeros uint8 `[N, K/g]`, outlier_weight `[N, n_out]`.
    """
    return int4_linear(x, packed, scales, zeros, group_size, bias, outlier_idx, outlier_weight)


def int4_linear(x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                bias: Optional[Tensor] = None, outlier_idx: Optional[Tensor] = None,
                outlier_weight: Optional[Tensor] = None) -> Tensor:
    """`memopt::linear_int4` as a plain function (see `int8_linear`)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    x2 = x.reshape(-1, k)
    layout = None
    if x.device.type == "cpu" and x2.shape[0] <= _INT4_KERNEL_MAX_ROWS:
        layout = _cpu_int4_layout(packed, scales, zeros)
    if layout is not None:
        y2 = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2.to(torch.bfloat16).contiguous(), layout[0], group_size, layout[1]).to(x.dtype)
    else:
        block = _kernel_tag(packed)

        def rows(i, j):
            q = _q_from_kernel(packed[i:j], block) if block else unpack_int4(packed[i:j])
            w = q.reshape(j - i, -1, group_size).to(x.dtype)
            w = w.sub_(zeros[i:j].to(x.dtype)[..., None]).mul_(scales[i:j].to(x.dtype)[..., None])
            return w.reshape(j - i, -1)
        y2 = _tiled_linear(x2, n, rows, bias, block or 1)
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
    "linear_int8", "linear_int4", "embedding_int8", "canonical_int4_layout", "prepare_int4_kernel_layout_",
]
