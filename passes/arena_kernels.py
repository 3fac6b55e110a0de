"""The kernels the arena pass writes with: which op can compute its result into a given tensor (`writer`),
the substitutes that reach a direct `out=` kernel where the captured op has none, which elementwise op may
write over its dying input (`inplace_pairs`), and which convolutions may compute in channels_last.

Every substitute computes what the op it replaces computes (bit for bit, checked in tests/test_arena_pass.py):
  relu -> clamp_min.out; eval batch_norm -> native_batch_norm.out (`batch_norm_out`); reshape that copies,
  clone, to(dtype) -> copy_ into `out` (`copy_out`); embedding -> index_select.out (`embedding_out`);
  max_pool2d -> running maximum of strided views (`max_pool2d_out`: ATen's kernel also makes int64 argmax
  indices, twice a float32 result, that max_pool2d drops).
An op may also get planned scratch (`scratch_of`): SDPA's additive form of a boolean mask (`sdpa_scratch_mask`).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

# out= overloads ATen generates from the functional op ("autogen"): they allocate the result, then copy it
# into `out`, so writing through them saves nothing (torchgen's native_functions.yaml; tests check the list)
AUTOGEN_OUT = frozenset("""
convolution.out _convolution.out conv_tbc.out embedding.out native_layer_norm.out native_group_norm.out
_native_batch_norm_legit_no_training.out relu.out prelu.out celu.out add.Scalar_out sub.Scalar_out
mul.Scalar_out div.Scalar_out div.Scalar_mode_out rsub.Tensor_out rsub.Scalar_out clone.out constant_pad_nd.out
repeat.out repeat_interleave.Tensor_out flip.out roll.out sum.out prod.out masked_fill.Scalar_out
masked_fill.Tensor_out index_put.out index_fill.int_Scalar_out index_fill.int_Tensor_out native_dropout.out
pixel_shuffle.out pixel_unshuffle.out channel_shuffle.out upsample_nearest2d.vec_out upsample_bilinear2d.vec_out
native_norm.out norm.Scalar_out norm.ScalarOpt_dtype_out block_diag.out diag_embed.out fill.Scalar_out
fill.Tensor_out zeros_like.out ones_like.out full_like.out empty_like.out scalar_tensor.out _to_copy.out
scaled_dot_product_attention.out slice_scatter.out select_scatter.out diagonal_scatter.out count_nonzero.out
isnan.out isinf.out copy.out
""".split())

# elementwise ops that may write over an input of identical layout: op name -> positions of such inputs
INPLACE_ARGS = {"add": (0, 1), "sub": (0, 1), "mul": (0, 1), "div": (0, 1), "neg": (0,), "abs": (0,),
                "exp": (0,), "sqrt": (0,), "rsqrt": (0,), "pow": (0,), "tanh": (0,), "sigmoid": (0,),
                "silu": (0,), "gelu": (0,), "relu": (0,), "clamp": (0,), "clamp_min": (0,), "hardtanh": (0,),
                "batch_norm": (0,)}


def out_variant(op) -> torch._ops.OpOverload | None:
    """The `out=` overload whose other arguments match `op`'s exactly, with a single `out` tensor."""
    packet = getattr(op, "overloadpacket", None)
    schema = getattr(op, "_schema", None)
    if packet is None or schema is None:
        return None
    want = [(a.name, str(a.type)) for a in schema.arguments]
    for name in packet.overloads():
        cand = getattr(packet, name)
        args = cand._schema.arguments
        outs = [a for a in args if a.is_out]
        if len(outs) != 1 or outs[0].name != "out" or len(cand._schema.returns) != 1:
            continue
        if [(a.name, str(a.type)) for a in args if not a.is_out] == want:
            return cand
    return None


def batch_norm_out(input, weight, bias, running_mean, running_var, momentum: float, eps: float, *, out):
    """`aten.batch_norm` in eval mode written into `out` by `native_batch_norm`'s out= kernel (eval mode saves
    no mean or invstd: they get empty tensors). Bit-identical to `batch_norm`; `out` may be `input`."""
    return torch.ops.aten.native_batch_norm.out(input, weight, bias, running_mean, running_var, False, momentum,
                                                eps, out=out, save_mean=input.new_empty(0),
                                                save_invstd=input.new_empty(0))[0]


def copy_out(input, shape: list[int], *, out):
    """`input`'s values in its logical order written into the contiguous `out` (shape `shape`): what `reshape`
    that must copy, `clone` and `to(dtype)` compute (`out` viewed as `input`'s shape, then `copy_`)."""
    out.view(input.shape).copy_(input)
    return out


def embedding_out(weight, indices, *, out):
    """`aten.embedding`'s forward (rows of `weight`) written into the contiguous `out` by `index_select`."""
    torch.index_select(weight, 0, indices.reshape(-1), out=out.view(-1, weight.shape[1]))
    return out


def sdpa_scratch_mask(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, *, scratch):
    """`scaled_dot_product_attention` with its boolean `attn_mask` made additive in `scratch` (0 where True,
    -inf where False, in the query's dtype): what SDPA does at every call in a temporary of its own, four
    times the mask's bytes; planned, the arena holds it while the op runs. Bit-identical."""
    torch.where(attn_mask, torch.zeros((), dtype=scratch.dtype), torch.full((), float("-inf"), dtype=scratch.dtype),
                out=scratch)
    return torch.ops.aten.scaled_dot_product_attention.default(query, key, value, scratch, dropout_p, is_causal,
                                                               scale=scale, enable_gqa=enable_gqa)


def scratch_of(node: fx.Node) -> torch.Tensor | None:
    """The scratch tensor (a meta tensor) an op needs while it runs and the arena can hold: for SDPA with a
    boolean mask, the additive mask (the mask's shape, the query's dtype); None for other ops."""
    if node.op != "call_function" or node.target is not torch.ops.aten.scaled_dot_product_attention.default:
        return None
    mask = (node.args[3:4] or [node.kwargs.get("attn_mask")])[0]
    val = mask.meta.get("val") if isinstance(mask, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool:
        return None
    return torch.empty(val.shape, dtype=node.args[0].meta["val"].dtype, device="meta")


def max_pool2d_out(input, kernel_size, stride=(), padding=(0, 0), dilation=(1, 1), ceil_mode=False, *, out):
    """`aten.max_pool2d` (floating point, `ceil_mode=False`) written into `out` as the running maximum of the
    window's strided views: ATen's kernel computes argmax indices too (int64, twice a float32 result), which
    `max_pool2d` then drops. Under torch.compile `max_pool2d` itself (Dynamo takes no strided `out=`)."""
    if torch.compiler.is_compiling():
        return out.copy_(torch.ops.aten.max_pool2d.default(input, kernel_size, stride, padding, dilation, ceil_mode))
    (kh, kw), (sh, sw) = _pair(kernel_size), _pair(stride or kernel_size)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    (h, w), (oh, ow) = input.shape[-2:], out.shape[-2:]
    out.fill_(float("-inf"))
    for i in range(kh):
        r0, r1 = max(0, -(-(ph - i * dh) // sh)), min(oh, (h - 1 + ph - i * dh) // sh + 1)
        for j in range(kw):
            c0, c1 = max(0, -(-(pw - j * dw) // sw)), min(ow, (w - 1 + pw - j * dw) // sw + 1)
            if r0 < r1 and c0 < c1:
                src = input[..., r0 * sh - ph + i * dh::sh, c0 * sw - pw + j * dw::sw][..., :r1 - r0, :c1 - c0]
                dst = out[..., r0:r1, c0:c1]
                torch.maximum(dst, src, out=dst)
    return out


def _pair(x) -> tuple[int, int]:
    return (x[0], x[-1]) if isinstance(x, (list, tuple)) else (x, x)


_COPIES = (torch.ops.aten.reshape.default, torch.ops.aten.clone.default, torch.ops.aten.to.dtype,
           torch.ops.aten._to_copy.default)


def _copies_on_device(node: fx.Node) -> bool:
    """A reshape / clone / to / _to_copy that makes a new tensor on its input's device (not a view, no move)."""
    src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return (isinstance(src, torch.Tensor) and src.device == node.meta["val"].device and not _aliases_first(node)
            and (node.target is not torch.ops.aten._to_copy.default or set(node.kwargs) <= {"dtype"}))


def writer(node: fx.Node) -> tuple | None:
    """(target, args, kwargs) that compute `node`'s single tensor result into an `out=` tensor, writing it
    directly; None when no kernel does."""
    val = node.meta.get("val")
    if node.op != "call_function" or not isinstance(val, torch.Tensor):
        return None
    if node.target is torch.ops.aten.relu.default:
        return torch.ops.aten.clamp_min.out, (node.args[0], 0), {}
    if node.target is torch.ops.aten.batch_norm.default and not node.args[5]:
        return batch_norm_out, tuple(node.args[:5]) + tuple(node.args[6:8]), {}
    if node.target is torch.ops.aten.__and__.Tensor:
        return torch.ops.aten.bitwise_and.Tensor_out, node.args, {}
    contiguous = val.is_contiguous() and val.numel() > 0
    if node.target in _COPIES and contiguous and _copies_on_device(node):
        return copy_out, (node.args[0], list(val.shape)), {}
    if (node.target is torch.ops.aten.max_pool2d.default and val.is_floating_point() and val.dim() == 4
            and not (node.args[5:6] or [node.kwargs.get("ceil_mode", False)])[0]):
        return max_pool2d_out, node.args, {k: v for k, v in node.kwargs.items() if k != "ceil_mode"}
    if node.target is torch.ops.aten.embedding.default and contiguous:
        return embedding_out, tuple(node.args[:2]), {}
    op = out_variant(node.target)
    if op is None or f"{op._schema.name.split('::')[1]}.{op._overloadname}" in AUTOGEN_OUT:
        return None
    return op, node.args, node.kwargs


def conv2d_channels_last(input, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """`aten.conv2d` on `input` in channels_last (a no-op when it already is): the result is channels_last.
    Under torch.compile the captured conv2d (Inductor chooses conv layouts itself)."""
    if not torch.compiler.is_compiling():
        input = input.contiguous(memory_format=torch.channels_last)
    return torch.ops.aten.conv2d.default(input, weight, bias, stride, padding, dilation, groups)


# ops that read a 4-D tensor in any layout and give the same values (their results follow the input's layout)
ANY_LAYOUT = frozenset(INPLACE_ARGS) | {"conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean",
                                        "flatten", "cat", "linear"}


def channels_last_convs(graph: fx.Graph) -> list[fx.Node]:
    """The conv2d nodes that may compute in channels_last: every op their results reach (through ops whose
    4-D results follow their input's layout) is in `ANY_LAYOUT` or is the graph's output."""
    out, seen = [], set()
    for conv in (n for n in graph.nodes if n.target is torch.ops.aten.conv2d.default):
        if conv in seen:
            continue
        component, todo, ok = [], [conv], True
        while todo:
            n = todo.pop()
            if n in component:
                continue
            component.append(n)
            for u in n.users:
                packet = getattr(getattr(u.target, "overloadpacket", None), "__name__", "")
                if u.op == "output":
                    continue
                if packet not in ANY_LAYOUT:
                    ok = False
                elif isinstance(u.meta.get("val"), torch.Tensor) and u.meta["val"].dim() == 4:
                    todo.append(u)
        seen.update(component)
        out += [n for n in component if n.target is torch.ops.aten.conv2d.default] if ok else []
    return out


# ---------------------------------------------------------------- which op may write over which input
def _aliases_first(node: fx.Node) -> bool:
    from memopt.analysis.accounting import _aliases_input

    return node.op == "call_function" and node.target is not operator.getitem and _aliases_input(node)


def inplace_pairs(graph: fx.Graph) -> dict[str, str]:
    """{name of an op: name of the input it writes over}: an `INPLACE_ARGS` op with a direct `out=` kernel whose
    input (an op's own result, not a view, not a graph output) is last read there, through any alias, and
    has the result's shape, dtype and contiguous layout, read by the op through no other alias."""
    ops = [n for n in graph.nodes if n.op == "call_function"]
    index = {n: i for i, n in enumerate(ops)}
    base, end = {}, {}
    for n in graph.nodes:
        base[n] = base.get(n.args[0], n) if _aliases_first(n) and isinstance(n.args[0], fx.Node) else n
    for n in ops:
        for arg in n.all_input_nodes:
            end[base[arg]] = index[n]
    for arg in graph.output_node().all_input_nodes:
        end[base[arg]] = len(ops)
    pairs = {}
    for n in ops:
        packet = getattr(getattr(n.target, "overloadpacket", None), "__name__", "")
        y = n.meta.get("val")
        if packet not in INPLACE_ARGS or writer(n) is None or end.get(base[n], -1) >= len(ops):
            continue
        for i in INPLACE_ARGS[packet]:
            x = n.args[i] if i < len(n.args) else None
            v = x.meta.get("val") if isinstance(x, fx.Node) else None
            if (not isinstance(x, fx.Node) or x.op != "call_function" or base[x] is not x or end.get(x) != index[n]
                    or not isinstance(v, torch.Tensor) or v.shape != y.shape or v.dtype != y.dtype
                    or not v.is_contiguous() or not y.is_contiguous() or v.numel() == 0
                    or any(base[a] is x for a in n.all_input_nodes if a is not x)):
                continue
            pairs[n.name] = x.name
            break
    return pairs
