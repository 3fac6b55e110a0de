"""ONNX export of a compiled program, with memopt's runtime ops lowered to ONNX Runtime operators.

    memopt::linear_int8     -> DequantizeLinear(int8 weight, per-row scale, axis=0) + MatMul
    memopt::linear_int4     -> com.microsoft.MatMulNBits (4 bits, block = group size, uint8 zero points
                               packed two per byte, low nibble first: the layout memopt already stores)
    memopt::hadamard        -> Reshape + MatMul by one b x b Hadamard block (rotated int4 linears' input)
    memopt::embedding_int8  -> Gather of rows and scales + Mul

`torch.onnx.export(..., dynamo=True, custom_translation_table=...)` does the rest. Runs on
`onnxruntime` (CPU) and `onnxruntime-gpu`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def _register_matmul_nbits_schema() -> None:
    """The onnx package ships no schemas for ONNX Runtime's contrib ops; onnxscript needs one to build
    the node. This declares com.microsoft::MatMulNBits as ONNX Runtime documents it."""
    from onnx import defs

    if defs.has("MatMulNBits", "com.microsoft"):
        return
    P, A = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
    opt = defs.OpSchema.FormalParameterOption.Optional
    schema = defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1, doc="MatMul with a block-quantized (N-bit) constant right-hand side",
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt),
                P("g_idx", "T4", param_option=opt), P("bias", "T1", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "activations"),
                          ("T2", ["tensor(uint8)", "tensor(int32)"], "packed weights"),
                          ("T3", ["tensor(uint8)", "tensor(int32)", "tensor(float16)", "tensor(float)"], "zero points"),
                          ("T4", ["tensor(int32)"], "group index")],
        attributes=[A("K", defs.OpSchema.AttrType.INT, "input features"),
                    A("N", defs.OpSchema.AttrType.INT, "output features"),
                    A("bits", defs.OpSchema.AttrType.INT, "bits per weight"),
                    A("block_size", defs.OpSchema.AttrType.INT, "quantization block size"),
                    A("accuracy_level", defs.OpSchema.AttrType.INT, "compute accuracy", required=False)])
    defs.register_schema(schema)


def _translations() -> dict:
    import onnxscript
    from onnxscript import opset18 as op

    import memopt.runtime.quant_ops  # noqa: F401  (the ops must exist)
    from memopt.kv.kivi import hadamard_matrix

    _register_matmul_nbits_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)
    matmul_nbits = msft.MatMulNBits

    def _bias(y, bias):
        return y if bias is None else op.Add(y, bias)

    def hadamard(x, block):
        b, k = int(block), int(x.shape[-1])
        h = op.Reshape(op.Constant(value_floats=hadamard_matrix(b).flatten().tolist()), op.Constant(value_ints=[b, b]))
        blocks_shape = op.Concat(op.Shape(x, end=-1), op.Constant(value_ints=[k // b, b]), axis=0)
        return op.Reshape(op.MatMul(op.Reshape(x, blocks_shape), op.CastLike(h, x)), op.Shape(x))

    def linear_int8(x, qweight, scales, bias=None, act_int8=False):
        w = op.DequantizeLinear(qweight, op.Cast(scales, to=1), axis=0)  # [N, K] float32
        return _bias(op.MatMul(x, op.Transpose(w, perm=[1, 0])), bias)

    def linear_int4(x, packed, scales, zeros, group_size, bias=None, outlier_idx=None, outlier_weight=None):
        n, half_k = packed.shape
        k = int(half_k) * 2
        blocks = k // group_size
        b = op.Reshape(packed, op.Constant(value_ints=[int(n), blocks, group_size // 2]))
        s = op.Reshape(op.Cast(scales, to=1), op.Constant(value_ints=[-1]))
        z = op.Cast(zeros, to=2)  # [N, blocks] uint8 -> pack two per byte, low nibble first
        if blocks % 2:
            z = op.Pad(z, op.Constant(value_ints=[0, 0, 0, 1]))
        pairs = op.Reshape(z, op.Constant(value_ints=[int(n), (blocks + 1) // 2, 2]))
        lo = op.Squeeze(op.Slice(pairs, op.Constant(value_ints=[0]), op.Constant(value_ints=[1]),
                                 op.Constant(value_ints=[2])), op.Constant(value_ints=[2]))
        hi = op.Squeeze(op.Slice(pairs, op.Constant(value_ints=[1]), op.Constant(value_ints=[2]),
                                 op.Constant(value_ints=[2])), op.Constant(value_ints=[2]))
        zp = op.BitwiseOr(lo, op.BitShift(hi, op.Cast(op.Constant(value_int=4), to=2), direction="LEFT"))
        y = matmul_nbits(x, b, s, op.Reshape(zp, op.Constant(value_ints=[-1])), K=k, N=int(n), bits=4,
                             block_size=int(group_size))
        if outlier_idx is not None and outlier_weight is not None:
            xo = op.Gather(x, outlier_idx, axis=-1)
            y = op.Add(y, op.MatMul(xo, op.Transpose(op.Cast(outlier_weight, to=1), perm=[1, 0])))
        return _bias(y, bias)

    def embedding_int8(qweight, scales, indices):
        rows = op.Cast(op.Gather(qweight, indices, axis=0), to=1)
        sc = op.Unsqueeze(op.Cast(op.Gather(scales, indices, axis=0), to=1), op.Constant(value_ints=[-1]))
        return op.Mul(rows, sc)

    return {
        torch.ops.memopt.linear_int8.default: linear_int8,
        torch.ops.memopt.linear_int4.default: linear_int4,
        torch.ops.memopt.hadamard.default: hadamard,
        torch.ops.memopt.embedding_int8.default: embedding_int8,
    }


def export_onnx(exported, path: str | Path) -> Path:
    """Write `exported` (an ExportedProgram, memopt ops allowed) as ONNX to `path`."""
    from memopt.runtime.quant_ops import canonicalize_int4_

    path = Path(path)
    _check_exportable(exported)
    canonicalize_int4_([*exported.state_dict.values(), *exported.constants.values()])  # MatMulNBits' layout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(exported, (), dynamo=True, custom_translation_table=_translations(),
                                    verbose=False, optimize=True)
    _dedupe_constants(program.model)
    program.save(str(path))
    return path


# mixture-of-experts matmuls over tokens sorted by expert (memopt.runtime.moe_ops): no ONNX operator computes them
_GROUPED = ("aten._grouped_mm.default", "transformers.grouped_mm_fallback.default",
            "memopt.grouped_linear_int8.default", "memopt.grouped_linear_int4.default")


def _check_exportable(exported) -> None:
    """One line before any work when the program has an op ONNX cannot express (a mixture-of-experts model's
    grouped expert matmuls)."""
    grouped = sorted({str(n.target) for n in exported.graph.nodes if str(n.target) in _GROUPED})
    if grouped:
        raise ValueError(f"--onnx: this model routes tokens to experts with grouped matmuls ({', '.join(grouped)}), "
                         "which ONNX has no operator for; compile mixture-of-experts models without --onnx "
                         "(the torch programs run them)")


def _dedupe_constants(model) -> None:
    """One initializer for identical constants (the Hadamard blocks of rotated int4 linears: 64 KiB each)."""
    try:
        from onnx_ir.passes.common import DeduplicateInitializersPass
    except ImportError:  # older onnxscript: the file is only larger
        return
    DeduplicateInitializersPass(size_limit=1 << 20)(model)


def run_onnx(path: str | Path | bytes, args: tuple, providers: list[str] | None = None):
    """Run a memopt ONNX file (a path, or the model's bytes) with ONNX Runtime (CUDA first when
    onnxruntime-gpu has it)."""
    import onnxruntime as ort

    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    sess = ort.InferenceSession(path if isinstance(path, bytes) else str(path), providers=providers)
    feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
    outs = sess.run(None, feeds)
    return tuple(torch.from_numpy(o) for o in outs) if len(outs) > 1 else torch.from_numpy(outs[0])
