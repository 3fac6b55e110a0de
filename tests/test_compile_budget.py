"""`memopt compile --budget`: plan-only answers on presets, infeasible budgets fail clearly, and a
compiled model really fits the budget it was planned for."""

import json
import os
import subprocess
import sys

import pytest
import torch

from memopt.pipeline import compile_model
from memopt.frontend.units import parse_bytes

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memopt", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_plan_only_on_a_preset_without_weights(tmp_path):
    proc = _cli("compile", "llama-3-8b", "--target", "rtx-4090", "--seq", "32768", "--plan-only", "--json",
                "-o", str(tmp_path / "plan"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(proc.stdout)
    for key in ("fits", "budget_bytes", "predicted_peak_bytes", "predicted_decode_s_per_token", "decisions", "solver"):
        assert key in d, key
    assert d["fits"] and d["predicted_peak_bytes"] <= d["budget_bytes"]
    assert {"status", "time_s", "gap"} <= set(d["solver"])
    assert (tmp_path / "plan" / "plan.json").is_file() and not (tmp_path / "plan" / "program.pt2").exists()


def test_infeasible_budget_is_one_clear_line():
    proc = _cli("compile", "llama-3-70b", "--target", "t4", "--budget", "8GiB", "--seq", "131072", "--batch", "8",
                "--plan-only")
    assert proc.returncode == 2 and proc.stdout == ""
    line = proc.stderr.strip()
    assert "\n" not in line and "smallest plan needs" in line and "KV cache" in line and "budget 8.0 GiB" in line


def _resident_bytes(module) -> int:
    """Every distinct storage both programs hold (weights, KV cache, arena): a weight the two programs
    do not share is counted twice, as it is in memory."""
    storages = {}
    for program in (module.gm, module.generator):
        if program is not None:
            for _, t in [*program.named_parameters(remove_duplicate=False), *program.named_buffers(remove_duplicate=False)]:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_compiled_module_fits_its_budget():
    budget = "3MiB"
    result = compile_model("demo", seq=256, budget=budget, target="custom:mem=4GiB,bw=100GB/s")
    m = result.module
    assert result.plan.predictions["budget"]["fits"]
    assert _resident_bytes(m) <= parse_bytes(budget)
    assert any(d.weight_format == "int8" for d in result.plan.decisions)
    ids = result.captured.example_inputs[0]
    ref = result.source.traceable()(ids).float()
    out = m(ids).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).item()
    assert cos >= 0.99, f"cosine {cos} too low"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_budget_plan_compresses_the_kv_cache_it_priced():
    from memopt.planning.budget import plan_budget
    from memopt.emit.plan_check import LAYER_INDEX

    result = compile_model("demo", seq=256, budget="3MiB", target="custom:mem=4GiB,bw=100GB/s")
    planned = result.plan.predictions["budget"]
    # the cache each layer holds, with every parameter the planner priced (group 32, residual 128)
    priced = plan_budget("demo", target="custom:mem=4GiB,bw=100GB/s", budget_bytes="3MiB", seq=256)
    want = {d.name: "full" if d.kv_bits == 16 else f"kivi:k{d.kv_bits}v{d.kv_bits}:g32:r128"
            for d in priced.decisions if d.kv_bits is not None}
    kv_policies = {d.name.removeprefix("model."): d.kv_policy for d in result.plan.decisions
                   if LAYER_INDEX.search(d.name)}
    assert result.plan.predictions["kv_cache_bytes"] > 0
    if "kv" in result.plan.pass_configs:  # the planner chose fewer than 16 bits somewhere
        assert result.plan.predictions["kv_cache_bytes"] < 2 * 4 * 2 * 32 * 256 * 2  # below a 16-bit cache
    assert planned["fits"] and len(want) == 4 and kv_policies == want
    new = result.module.generate(torch.tensor([[5, 17, 99, 4]]), 4)
    assert new.shape == (1, 4)


@pytest.mark.parametrize("quantize", ["int8", "int4:g32:gptq:o0.05", "lossless"])
def test_decoder_programs_share_their_quantized_weights(quantize):
    """Quantized once (GPTQ calibrates on the forward program's inputs; the one-token generation program
    could not), held once: the generation program binds the very same tensors."""
    dtype = torch.bfloat16 if quantize == "lossless" else None  # lossless compresses bf16 weights
    result = compile_model("demo", seq=64, quantize=quantize, dtype=dtype)
    gm, gen = result.module.gm, result.module.generator
    fwd = {n: t for n, t in gm.named_buffers() if n.endswith(("_q", "_scale", "_zero", "_outlier", "_stream", "_sm"))}
    both = [n for n, t in gen.named_buffers() if n in fwd]
    assert fwd and len(both) == len(fwd) and all(gen.get_buffer(n) is fwd[n] for n in both)
    ids = result.captured.example_inputs[0]  # the arena program is planned for this shape
    with torch.no_grad():
        want = result.module(ids)[:, -1].argmax(-1)
    assert torch.equal(result.module.generate(ids, 1)[:, 0], want)
    caches = [t for n, t in gen.named_buffers() if "cache" in n]
    assert caches and all(t.untyped_storage().data_ptr() not in {f.untyped_storage().data_ptr() for f in fwd.values()}
                          for t in caches)


def test_budget_plan_with_16_bit_kv_generates_one_token_per_call():
    """A generous budget keeps the KV cache at 16 bits: no KV pass, and the generation program (captured
    for one token per call) still serves a multi-token prompt."""
    from memopt.serve.decode_program import tokens_per_call

    result = compile_model("demo", seq=64, budget="1GiB", target="custom:mem=4GiB,bw=100GB/s")
    assert "kv" not in result.plan.pass_configs and tokens_per_call(result.module.generator) == 1
    prompt = torch.tensor([[5, 17, 99, 4, 8, 21]])
    ref = result.module.generator
    from memopt.serve.generate import generate as step_by_step

    want = step_by_step(ref, prompt, 4)
    assert torch.equal(result.module.generate(prompt, 4), want)


@pytest.mark.slow  # over 5 s on one core: the full suite runs it
def test_offload_kv_generates_the_same_tokens(tmp_path):
    import memopt

    prompt = torch.tensor([[5, 17, 99, 4, 8, 21]])
    base = compile_model("demo", seq=32, passes=())
    off = compile_model("demo", seq=32, passes=(), offload_kv=[0, "layers.[2-3]"])
    assert "kv_offload" in off.plan.pass_configs
    names = [n for n, _ in off.module.generator.named_buffers()]
    assert any("_memopt_offload_host_kv" in n for n in names) and not any(n == "key_cache_0" for n in names)
    want = base.module.generate(prompt, 6)
    assert torch.equal(off.module.generate(prompt, 6), want)
    memopt.save(off.module, tmp_path / "kv-host", programs=off.programs)
    assert torch.equal(memopt.load(tmp_path / "kv-host").generate(prompt, 6), want)  # the artifact keeps the schedule


@pytest.mark.slow  # over 5 s on one core: the full suite runs it
def test_decoder_programs_share_offload_slots_and_keep_blocks_apart():
    """Weight offload in both programs of a decoder: one set of device staging slots, and each block keeps
    its own weights (equal norms of different layers are not merged, or the block could not move)."""
    kw = dict(seq=32, quantize="int4:g32")
    off = compile_model("demo", offload=["model.layers.1", "model.layers.2"], **kw)
    ref = compile_model("demo", **kw)
    fwd, gen = dict(off.module.gm.named_buffers()), dict(off.module.generator.named_buffers())
    slots = [n for n in gen if n.startswith("_memopt_offload_slot")]
    assert len(slots) == 2 and all(gen[n] is fwd[n] for n in slots)
    assert {"_memopt_offload_host_model_model_layers_1", "_memopt_offload_host_model_model_layers_2"} <= set(gen)
    prompt, ids = torch.tensor([[5, 17, 99, 4]]), off.captured.example_inputs[0]
    assert torch.equal(off.module.generate(prompt, 6), ref.module.generate(prompt, 6))
    assert torch.equal(off.module(ids), ref.module(ids))


def test_budget_int4_layers_quantized_the_way_quantize_says():
    """--budget picks which layers are int4 (and the group); --quantize int4:gptq:had picks how."""
    # (1500 KiB gave a plan that held 1,697,632 bytes; priced as stored, 1800 KiB is the budget for int4 layers)
    kw = dict(seq=256, budget="1800KiB", target="custom:mem=4GiB,bw=100GB/s")
    result = compile_model("demo", quantize="int4:gptq:had", **kw)
    assert result.plan.predictions["budget"]["fits"]
    rows = {d.name: d for d in result.plan.decisions}
    embed = rows.pop("model.model.embed_tokens")  # int8 rows on the device: cheaper than streaming bf16 from the host
    assert (embed.weight_format, embed.placement) == ("int8", "device")
    assert {d.weight_format for d in rows.values()} == {"int4:g64:gptq:had"}
    assert any(n.target is torch.ops.memopt.hadamard.default for n in result.captured.graph.nodes)
    ids = result.captured.example_inputs[0]
    ref = result.source.traceable()(ids).float()
    cos = torch.nn.functional.cosine_similarity(result.module(ids).float().flatten(1), ref.flatten(1)).item()
    assert cos >= 0.95, f"cosine {cos} too low"
    with pytest.raises(ValueError, match="--quantize int8 can only say how its int4 layers are quantized"):
        compile_model("demo", quantize="int8", **kw)
