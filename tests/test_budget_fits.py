"""`--budget` keeps its promise: the compiled artifact's device bytes are within the budget, the planner's bytes
are the artifact's (it plans the captured programs' tensors), and an artifact over its budget is one error line
naming the gap and its cause.

Tiny random-init Hugging Face directories of the dense families (Llama, Mistral, Qwen2, Phi-3, Gemma-3, GPT-2's
tied Conv1D, GPT-NeoX) and Mixtral (fused experts), compiled at ~60% of their bf16 size. Plus: the planner's
bytes per format equal what the quantize and lossless passes store, and a compressed KV cache on a
sliding-window model generates what transformers does past the window.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings

import memopt
from memopt.emit.fits import BudgetExceeded, check_fits, layer_names, resident_bytes
from memopt.frontend.units import fmt_bytes
from memopt.names import HOST_PREFIX
from memopt.frontend.sources import resolve_source
from memopt.pipeline import compile_model
from memopt.planning.captured import captured_model
from memopt.solvers.budget_ilp import BudgetInfeasible, solve_budget
from test_budget import problems  # the solver's random problems (tests/test_budget.py)

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0),
    "gemma3": lambda: transformers.Gemma3TextConfig(**TINY, head_dim=16, sliding_window=8,
                                                    layer_types=["sliding_attention", "full_attention"]),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   max_position_embeddings=128),
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
}
FAST = ("llama", "gpt2")
SEQ = 64
TARGET = "custom:mem=4GiB,bw=100GB/s"


def _table(names, quick=FAST) -> list:
    return [pytest.param(n, marks=() if n in quick else pytest.mark.slow) for n in names]


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """family -> a saved tiny model directory (built once per session)."""
    made: dict = {}

    def get(name: str):
        if name not in made:
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(FAMILIES[name]()).eval()
            made[name] = tmp_path_factory.mktemp(name)
            model.save_pretrained(made[name])
        return made[name]
    return get


def device_bytes(module) -> int:
    """Every distinct storage the module's programs hold, except the offload passes' host copies: counted here
    independently of memopt's own measure."""
    storages = {}
    for program in (module.gm, module.generator):
        if program is None:
            continue
        for name, t in [*program.named_parameters(remove_duplicate=False), *program.named_buffers(remove_duplicate=False)]:
            if HOST_PREFIX not in name:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.fixture(scope="session")
def budget_compile(hf_dir):
    """family -> (budget, CompileResult or the refusal) at 60% of the bf16 compile's device bytes."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            path = str(hf_dir(name))
            full = device_bytes(compile_model(path, seq=SEQ, dtype=torch.bfloat16).module)
            budget = int(0.6 * full)
            try:
                done[name] = budget, compile_model(path, seq=SEQ, budget=budget, target=TARGET)
            except BudgetInfeasible as exc:
                done[name] = budget, exc
        return done[name]
    return get


@pytest.mark.parametrize("name", _table(FAMILIES))
def test_budget_at_60_percent_fits_and_the_plan_is_the_artifact(budget_compile, name):
    budget, result = budget_compile(name)
    if isinstance(result, BudgetInfeasible):  # a refusal is one clear line, never an artifact over budget
        assert "\n" not in str(result) and "smallest plan needs" in str(result)
        return
    held = device_bytes(result.module)
    assert held <= budget, f"{name}: holds {held} bytes for a budget of {budget}"
    measured = result.plan.predictions["budget"]["measured"]
    assert measured["total_bytes"] == held
    got, planned = measured["by_category"], measured["planned_by_category"]
    # weights, KV caches, staging slots and the tensors no layer holds: exactly what the planner charged; the
    # arena planned before the weight passes only shrinks (their custom ops' results are allocated outside it)
    assert {k: v for k, v in got.items() if k != "arena"} == {k: v for k, v in planned.items() if k != "arena"}, \
        measured
    assert got["arena"] <= planned["arena"] and held <= measured["predicted_bytes"]
    assert measured["layers_differing"] == []


def test_the_saved_artifact_fits_its_budget(budget_compile, tmp_path):
    budget, result = budget_compile("llama")
    memopt.save(result.module, tmp_path / "a", programs=result.programs)
    loaded = memopt.load(tmp_path / "a")
    assert device_bytes(loaded) <= budget
    prompt = torch.tensor([[5, 17, 99, 4]])
    assert torch.equal(loaded.generate(prompt, 4), result.module.generate(prompt, 4))


def test_an_artifact_over_its_budget_is_one_line_naming_the_gap_and_its_cause(budget_compile):
    """The check the compile runs, on the compiled programs plus a tensor the plan never priced (64 KiB), with a
    budget that leaves no room for it: the error gives the gap and the category that differs."""
    _, result = budget_compile("llama")
    promised = result.plan.predictions["budget"]["promise"]  # plain JSON: a loaded artifact's plan has it too
    gm = result.module.gm
    programs = {"program": gm, "generate": result.module.generator}
    before = resident_bytes(programs, layer_names(promised))
    check_fits(before, promised)  # what the compile emitted fits
    gm.register_buffer("stray", torch.zeros(64 * 1024, dtype=torch.uint8))
    try:
        after = resident_bytes(programs, layer_names(promised))
        tight = {**promised, "budget_bytes": before.total_bytes + promised["reserve_bytes"] + 1024}
        with pytest.raises(BudgetExceeded) as info:
            check_fits(after, tight)
    finally:
        del gm._buffers["stray"]
    msg = str(info.value)
    assert "\n" not in msg
    assert f"{fmt_bytes(64 * 1024 - 1024)} over the budget {fmt_bytes(tight['budget_bytes'])}" in msg, msg
    other = promised["by_category"]["other"]
    assert f"other {fmt_bytes(other + 64 * 1024)} (planned {fmt_bytes(other)})" in msg, msg
    assert info.value.resident["other"] - info.value.planned["other"] == 64 * 1024


def test_a_layer_holding_more_than_planned_is_named(budget_compile):
    """A planned layer whose tensors grew (here: one of its weights replaced by a larger one) is named with its
    bytes against the plan's."""
    _, result = budget_compile("llama")
    promised = result.plan.predictions["budget"]["promise"]
    gm = result.module.gm
    name, t = next((n, t) for n, t in gm.named_buffers() if ".layers.1." in n and n.endswith("_q"))
    owner, _, leaf = name.rpartition(".")
    module = gm.get_submodule(owner)
    module._buffers[leaf] = torch.zeros(t.numel() + 4096, dtype=t.dtype)
    try:
        held = resident_bytes({"program": gm, "generate": result.module.generator}, layer_names(promised))
        with pytest.raises(BudgetExceeded) as info:
            check_fits(held, {**promised, "budget_bytes": promised["reserve_bytes"] + held.total_bytes - 1})
    finally:
        module._buffers[leaf] = t
    planned = next(row["weight_bytes"] for row in promised["layers"] if row["name"] == "model.layers.1")
    grown = sum(b for n, cat, b in held.tensors if cat == "weights" and ".layers.1." in n)
    assert grown > planned
    assert f"differing most: model.layers.1 weights {fmt_bytes(grown)}, planned {fmt_bytes(planned)};" in str(info.value)


# ---------------------------------------------------------------- the solver, with the passes' buffer count
def _oracle_peaks(prob):
    """(fits, latency + lam * penalty) of every plan, with min(prefetch_buffers, streamed layers) buffers."""
    out = []
    per_layer = [[(w, k) for w in l.weights for k in (l.kv or (None,))] for l in prob.layers]
    for combo in itertools.product(*per_layer):
        streams = [w.stream_bytes for w, _ in combo if w.placement == "host"]
        peak = prob.fixed_bytes + sum(w.device_bytes + (k.bytes if k else 0) for w, k in combo)
        peak += min(prob.prefetch_buffers, len(streams)) * max(streams, default=0)
        lat = sum(max(w.compute_s + (k.compute_s if k else 0), w.transfer_s) for w, k in combo)
        pen = sum(w.penalty + (k.penalty if k else 0) for w, k in combo)
        ok = peak <= prob.capacity_bytes and (prob.max_quality_loss is None or pen <= prob.max_quality_loss + 1e-6)
        out.append((ok, peak, lat + prob.lam * pen))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_ilp_with_one_buffer_per_streamed_layer_matches_brute_force(prob):
    """`buffers_per_streamed_layer` (what the offload passes allocate, and what a captured plan uses): a plan
    streaming one layer holds one buffer; the ILP still finds the best plan and reports its exact peak."""
    prob = dataclasses.replace(prob, buffers_per_streamed_layer=True, objective="latency")
    plans = _oracle_peaks(prob)
    feasible = [p for p in plans if p[0]]
    if not feasible:
        with pytest.raises(BudgetInfeasible):
            solve_budget(prob)
        return
    r = solve_budget(prob)
    streams = [d.stream_bytes for d in r.decisions if d.stream_bytes]
    peak = (prob.fixed_bytes + sum(d.bytes for d in r.decisions)
            + min(prob.prefetch_buffers, len(streams)) * max(streams, default=0))
    assert r.fits and r.predicted_peak_bytes == peak <= prob.capacity_bytes
    assert r.objective_value == pytest.approx(min(p[2] for p in feasible), rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- the planner's bytes per format
@pytest.mark.parametrize("name", _table(["llama", "gpt2", "mixtral"], quick=("gpt2",)))
@pytest.mark.parametrize("fmt", ["int8", "int4:g64", "lossless"])
def test_planned_bytes_per_format_are_what_the_passes_store(hf_dir, name, fmt):
    """Each planned layer's bytes in a format (from the captured state dict) equal what the compiled program
    holds for that layer after `--quantize fmt`: GPT-2's transposed Conv1D weights and its tied table (int4:
    stored as int8 rows), Mixtral's fused experts, DFloat11's entropy-coded streams."""
    # a loaded source (a string would stream its weights: the planner reads values, e.g. DFloat11's histogram)
    src = resolve_source(str(hf_dir(name)), dtype=torch.bfloat16)
    result = compile_model(src, seq=SEQ, quantize=fmt, generation=False)
    model = captured_model(result.before.captured)
    layers = {l.name.split(" (")[0]: l for l in model.layers}
    held = resident_bytes({"program": result.module.gm}, list(layers))
    per_layer: dict = {}
    for tname, cat, b in held.tensors:
        if cat == "weights":
            layer = max((n for n in layers if f".{n}." in f".{tname}."), key=len)
            per_layer[layer] = per_layer.get(layer, 0) + b
    want = {n: l.bytes(fmt) if l.offers(fmt) else l.bytes("bf16") for n, l in layers.items()}
    assert per_layer == want
    assert held.by_category()["other"] == model.fixed_bytes


# ---------------------------------------------------------------- KV compression on sliding-window layers
def test_compressed_kv_on_a_sliding_window_generates_like_transformers_past_the_window(tmp_path):
    """Mistral with a 16-token sliding window, `--kv kivi:4`: 40 tokens after a 20-token prompt, far past the
    window, are transformers' greedy tokens (the compressed cache keeps the window; the mask is not dropped)."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(**TINY, sliding_window=16)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    result = compile_model(str(tmp_path), seq=16, max_cache=128, kv="kivi:4")
    assert any("sliding-window attention kept" in n and "16" in n for n in result.notes), result.notes
    prompt = torch.randint(3, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert result.module.generate(prompt, 40, eos_token_id=None).tolist() == want[:, 20:].tolist()


# ---------------------------------------------------------------- ONNX of a mixture-of-experts model
@pytest.mark.slow
def test_onnx_of_a_mixture_of_experts_model_is_refused_in_one_line(hf_dir, tmp_path):
    result = compile_model(str(hf_dir("mixtral")), seq=16, generation=False)
    with pytest.raises(ValueError, match=r"^--onnx: this model routes tokens to experts with grouped matmuls "
                                         r"\(aten\._grouped_mm\.default\).*compile mixture-of-experts models "
                                         r"without --onnx") as info:
        memopt.save(result.module, tmp_path / "moe", programs=result.programs, onnx=True)
    assert "\n" not in str(info.value) and not (tmp_path / "moe").exists()
