"""Artifacts: compile -> save -> load in a fresh process -> same outputs; ONNX Runtime agrees;
tampered directories fail with one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt.emit.artifact import ArtifactError, load, save
from memopt.pipeline import compile_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
CASES = [("demo", None), ("demo", "int8"), ("minilm", None), ("minilm", "int8")]
# the quick loop checks ONNX on demo-int8, compiled anyway for test_generation_program_round_trip; each
# other case costs its own compile and ONNX export (5-25 s)
ONNX_CASES = [pytest.param("demo", None, 1e-4, marks=pytest.mark.slow), ("demo", "int8", 1e-4),
              pytest.param("demo", "int4:g32", 2e-2, marks=pytest.mark.slow),
              pytest.param("demo", "int4:g32:gptq:had", 2e-2, marks=pytest.mark.slow),
              pytest.param("minilm", None, 1e-4, marks=pytest.mark.slow)]
WITH_ONNX = {("demo", None), ("demo", "int8"), ("demo", "int4:g32"), ("demo", "int4:g32:gptq:had"), ("minilm", None)}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, request):
    """`compiled(model, quantize)` -> (CompileResult, saved directory), compiled and saved once per module
    (with model.onnx for the ONNX cases). Tests read both; one that tampers copies the directory first."""
    cache = {}

    def get(model: str, quantize: str | None):
        if (model, quantize) not in cache:
            source = request.getfixturevalue("minilm_source") if model == "minilm" else model
            result = compile_model(source, seq=24, quantize=quantize, max_cache=64)
            out = save(result.module, tmp_path_factory.mktemp("artifact") / f"{model}-{quantize}",
                       programs=result.programs, onnx=(model, quantize) in WITH_ONNX, report=result)
            cache[model, quantize] = result, out
        return cache[model, quantize]

    return get


def _fresh_process_outputs(directory: Path, args: tuple, tmp_path: Path) -> torch.Tensor:
    torch.save(args, tmp_path / "args.pt")
    code = ("import torch, memopt; m = memopt.load(%r); args = torch.load(%r);"
            "torch.save(m(*args), %r)") % (str(directory), str(tmp_path / "args.pt"), str(tmp_path / "out.pt"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return torch.load(tmp_path / "out.pt")


@pytest.mark.slow  # a fresh Python process per case
@pytest.mark.parametrize("model, quantize", CASES)
def test_round_trip_in_a_fresh_process(model, quantize, tmp_path, compiled):
    result, out = compiled(model, quantize)
    args = result.captured.example_inputs
    before = result.module(*args)
    after = _fresh_process_outputs(out, args, tmp_path)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)
    files = {p.name for p in out.iterdir()}
    assert {"plan.json", "weights.safetensors", "program.pt2", "manifest.json", "report.html", "memory.png"} <= files
    assert ("generate.pt2" in files) == (model == "demo")


@pytest.mark.slow  # over 5 s on one core: the full suite runs it
def test_generation_program_round_trip(compiled):
    result, out = compiled("demo", "int8")
    ids = torch.tensor([[5, 17, 99, 4]])
    loaded = load(out)
    assert torch.equal(loaded.generate(ids, 8), result.module.generate(ids, 8))
    # quantized weights are stored packed, once for both programs
    from safetensors import safe_open

    with safe_open(str(out / "weights.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert "I8" in dtypes
    assert (out / "weights.safetensors").stat().st_size < 0.5 * result.plan.predictions["weights_bytes_before"]


@pytest.mark.slow  # four int4 compiles and an ONNX export
def test_int4_saved_after_running_stores_the_canonical_layout(tmp_path):
    """The CPU int4 kernel rewrites a weight's layout in place on its first call; the forward and
    generation programs share that tensor, and save/ONNX must still write the canonical bytes."""
    from memopt.emit.onnx_export import run_onnx

    fresh = compile_model("demo", seq=16, quantize="int4:g32", passes=())
    used = compile_model("demo", seq=16, quantize="int4:g32", passes=())
    ids = torch.tensor([[5, 17, 99, 4]])
    want_gen = fresh.module.generate(ids, 6)
    args = fresh.captured.example_inputs
    want = fresh.module(*args)
    assert torch.equal(used.module(*args), want)  # first call: layout converted
    assert torch.equal(used.module.generate(ids, 6), want_gen)  # the generator reads the shared, converted tensor
    out = save(used.module, tmp_path / "used", programs=used.programs, onnx=True)
    save(fresh.module, tmp_path / "fresh", programs=fresh.programs)
    assert (out / "weights.safetensors").read_bytes() == (tmp_path / "fresh" / "weights.safetensors").read_bytes()
    loaded = load(out)
    assert torch.equal(loaded(*args), want) and torch.equal(loaded.generate(ids, 6), want_gen)
    assert (run_onnx(out / "model.onnx", args) - want).abs().max().item() <= 2e-2


@pytest.mark.parametrize("model, quantize, atol", ONNX_CASES)
def test_onnx_runtime_matches_pytorch(model, quantize, atol, compiled):
    from memopt.emit.onnx_export import run_onnx

    result, out = compiled(model, quantize)
    args = result.captured.example_inputs
    ort_out = run_onnx(out / "model.onnx", args)
    expected = result.module(*args)
    assert (ort_out - expected).abs().max().item() <= atol


@pytest.mark.slow  # two fresh Python processes
def test_run_cli_prompt_and_inputs(tmp_path, compiled):
    _, out = compiled("demo", None)
    proc = subprocess.run([sys.executable, "-m", "memopt", "run", str(out), "--json"], capture_output=True,
                          text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(proc.stdout)
    assert d["outputs"]["output0"]["shape"] == [1, 24, 1024]
    ids = torch.randint(3, 1000, (1, 24))
    torch.save({"input_ids": ids}, tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-m", "memopt", "run", str(out), "--inputs", str(tmp_path / "in.pt"),
                           "--json"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _tamper_flip(d: Path):
    p = d / "weights.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def _tamper_missing(d: Path):
    (d / "program.pt2").unlink()


def _tamper_future(d: Path):
    m = json.loads((d / "manifest.json").read_text())
    m["plan_schema_version"] = 999
    (d / "manifest.json").write_text(json.dumps(m))


def _tamper_foreign(d: Path):
    (d / "manifest.json").unlink()


@pytest.mark.slow  # a fresh Python process per case
@pytest.mark.parametrize("tamper, fragment", [(_tamper_flip, "fails its SHA-256 check"),
                                              (_tamper_missing, "program.pt2 is missing"),
                                              (_tamper_future, "schema version 999"),
                                              (_tamper_foreign, "is not a memopt artifact")])
def test_tampered_artifacts_fail_cleanly(tamper, fragment, tmp_path, compiled):
    out = shutil.copytree(compiled("demo", None)[1], tmp_path / "tampered")
    tamper(out)
    with pytest.raises(ArtifactError) as info:
        load(out)
    assert fragment in str(info.value) and "\n" not in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "memopt", "run", str(out)], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode != 0
    assert fragment in proc.stderr and proc.stderr.count("\n") == 1 and proc.stdout == ""


def test_save_is_atomic(tmp_path, monkeypatch):
    result = compile_model("demo", seq=16, generation=False)
    target = tmp_path / "art"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("memopt.emit.artifact._write_weights", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save(result.module, target, programs=result.programs)
    assert not target.exists() and not list(tmp_path.iterdir())


def test_python_api_one_call():
    import memopt

    opt = memopt.compile("demo", seq=16, target="rtx-4090", passes=["arena"])
    assert isinstance(opt, torch.nn.Module) and opt.plan.target == "rtx-4090" and opt.plan.arena is not None


@pytest.mark.slow  # a KIVI compile: 4-15 s; the quick loop has test_kv.py and test_generation_program_round_trip
def test_compressed_kv_generation_round_trip(tmp_path):
    result = compile_model("demo", seq=16, quantize="int8", kv="kivi:k4v2:g32:r32", max_cache=256)
    assert result.plan.predictions["kv_cache_bytes"] < 2 * 4 * 2 * 32 * 256 * 4 * 0.25  # < 1/4 of the fp32 cache
    ids = torch.tensor([[5, 17, 99, 4]])
    expected = result.module.generate(ids, 6)
    out = save(result.module, tmp_path / "kv")
    assert torch.equal(load(out).generate(ids, 6), expected)


def test_bad_kv_policy_fails_before_capture():
    with pytest.raises(ValueError, match="residual"):
        compile_model("demo", seq=16, kv="kivi:k4v2:g32:r16")


@pytest.mark.slow  # an int4 + offload compile: 6-19 s
def test_to_device_keeps_outputs_shared_weights_and_host_buffers():
    """`memopt.emit.device.to_device` (here to the CPU it is already on: the moves are real calls, the
    results must not change) keeps one copy of each shared weight and leaves offloaded buffers on the host."""
    from memopt.emit.device import to_device

    r = compile_model("demo", seq=32, quantize="int4:g32", offload=["model.layers.1"], offload_kv=[0])
    ids, prompt = r.captured.example_inputs[0], torch.tensor([[5, 17, 99, 4]])
    want, want_gen = r.module(ids), r.module.generate(prompt, 5)
    moved = to_device(r.module, "cpu")
    assert torch.equal(moved(ids), want) and torch.equal(moved.generate(prompt, 5), want_gen)
    fwd, gen = dict(moved.gm.named_buffers()), dict(moved.generator.named_buffers())
    shared = [n for n in fwd if n in gen and n.endswith("_q")]
    assert shared and all(fwd[n] is gen[n] for n in shared)
    assert "_memopt_offload_host_kv0" in gen
    with pytest.raises(ValueError, match="'bogus' is not a torch device"):
        to_device(r.module, "bogus")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_on_cuda_fits_the_budget(tmp_path):
    """A budget plan on the GPU: measured peak (torch.cuda.max_memory_allocated) within the budget."""
    from memopt.eval.measure import cuda_peak_bytes
    from memopt.frontend.units import parse_bytes

    r = compile_model("demo", seq=64, budget="3MiB", target="custom:mem=4GiB,bw=100GB/s")
    out = save(r.module, tmp_path / "fit", programs=r.programs)
    prompt = torch.tensor([[5, 17, 99, 4]])
    want = r.module.generate(prompt, 6)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module = load(out, device="cuda")
    got = module.generate(prompt.cuda(), 6)
    assert torch.equal(got.cpu(), want)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= parse_bytes("3MiB"), f"measured {peak} bytes on the GPU, budget 3 MiB"
    assert cuda_peak_bytes(lambda: module.generate(prompt.cuda(), 2)) >= 0
