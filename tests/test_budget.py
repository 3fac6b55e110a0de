"""Budget planner: the roofline cost model, the budget ILP (against brute force and its greedy baseline) and
`plan_budget` on presets (configs only, no weights).

Oracles written here: the KV-cache formula and a real HF cache, parameter counts of meta-device models,
exhaustive enumeration of small budget problems, and the peak recomputed from the decisions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memopt.planning import cost
from memopt.planning.budget import BudgetConfig, format_budget_table, penalties_from_sqnr, plan_budget
from memopt.planning.plan import Plan
from memopt.solvers.budget_ilp import (BudgetInfeasible, BudgetProblem, KVOption, LayerOptions, WeightOption,
                                   greedy_budget, solve_budget)
from memopt.frontend.targets import get_target

GIB = 2**30
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def shape_of(name: str) -> cost.ModelShape:
    from memopt.frontend.sources import preset_config

    return cost.model_shape(preset_config(name), name=name)


# ---------------------------------------------------------------- cost model
@pytest.mark.parametrize("name", ["llama-3-8b", "llama-2-7b", "llama-3-70b", "qwen2.5-7b", "mistral-7b", "gpt2"])
@pytest.mark.parametrize("batch,context", [(1, 1), (1, 4096), (4, 32768), (3, 1000)])
def test_kv_bytes_16bit_formula(name, batch, context):
    s = shape_of(name)
    assert cost.kv_bytes(s, batch, context) == 2 * s.layers * s.kv_heads * s.head_dim * context * batch * 2


def test_kv_bytes_match_a_real_cache(demo_source):
    """The demo Llama's own cache after a prefill (float32: twice the 16-bit formula)."""
    import torch

    with torch.no_grad():
        out = demo_source.model(input_ids=torch.ones((2, 37), dtype=torch.long), use_cache=True)
    cache = out.past_key_values
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert cache.layers[0].keys.dtype == torch.float32
    assert real == 2 * cost.kv_bytes(cost.model_shape(demo_source.config), 2, 37)


KIVI_CASES = [  # (bits, context): one row = one (batch, kv head); head_dim 128, groups of 32, residual 128
    (2, 1152), (4, 1152), (8, 1152), (2, 100), (4, 129), (2, 161),
]


@pytest.mark.parametrize("bits,context", KIVI_CASES)
def test_kivi_bytes(bits, context):
    s = shape_of("llama-3-8b")
    d, g, resid = 128, 32, min(128, context)
    q = context - resid
    keys = math.ceil(q * d * bits / 8) + math.ceil(q / g) * d * 4  # per-channel groups of tokens: scale + zero
    values = math.ceil(q * d * bits / 8) + q * math.ceil(d / g) * 4  # per-token groups of channels
    row = keys + values + 2 * resid * d * 2
    assert cost.kv_bytes(s, 1, context, bits) == s.layers * s.kv_heads * row
    if context <= 128:
        assert cost.kv_bytes(s, 1, context, bits) == cost.kv_bytes(s, 1, context, 16)


def test_kv_bytes_shrink_with_bits():
    s = shape_of("llama-3-8b")
    sizes = [cost.kv_bytes(s, 1, 131072, b) for b in (16, 8, 4, 2)]
    assert sizes == sorted(sizes, reverse=True)
    assert 5.0 < sizes[0] / sizes[3] < 5.4  # 2 bits + fp16 scale/zero per 32: 96 bytes/token/head vs 512


@pytest.mark.parametrize("fmt,expected", [("bf16", 2.0), ("int8", 1 + 2 / 4096), ("int4:g64", 0.5 + 4 / 64),
                                          ("int4:g128", 0.5 + 4 / 128), ("lossless", 1.4)])
def test_bytes_per_param(fmt, expected):
    assert cost.bytes_per_param(fmt) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bad", ["int3", "fp8", "int4:g0"])
def test_unknown_format_is_named(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[")):
        cost.bytes_per_param(bad)


@pytest.mark.parametrize("name", ["gpt2", "bert-base", "qwen2.5-0.5b", "llama-3.2-1b"])
def test_layer_weights_count_every_parameter(name):
    from memopt.frontend.sources import resolve_source

    src = resolve_source(name)
    shape = cost.model_shape(src.config, name=name)
    assert sum(l.params for l in cost.layer_weights(shape)) == sum(p.numel() for p in src.model.parameters())


def test_roofline_decode_is_bandwidth_bound():
    s, t = shape_of("llama-3-8b"), get_target("rtx-4090")
    layers = cost.layer_weights(s)
    p16 = cost.predict(s, layers, [cost.Choice()] * len(layers), t, batch=1, seq=128)
    weights = sum(l.bytes("bf16") for l in layers[1:])  # the embedding is read by row
    assert p16.decode_s_per_token == pytest.approx(weights / t.bandwidth, rel=0.03)
    p4 = cost.predict(s, layers, [cost.Choice("int4:g64")] * len(layers), t, batch=1, seq=128)
    assert p4.decode_s_per_token < 0.4 * p16.decode_s_per_token
    flops = 2 * sum(l.params for l in layers[1:-1]) * 4096  # prefill is at least its matmul FLOPs
    prefill = cost.predict(s, layers, [cost.Choice()] * len(layers), t, batch=1, seq=4096).prefill_s
    assert prefill >= flops / t.flops_for("bf16")


def test_host_layer_overlaps_transfer_with_compute():
    s, t = shape_of("llama-3-70b"), get_target("rtx-4090")
    block = cost.layer_weights(s)[1]
    for fmt in ("bf16", "int4:g64"):
        compute = cost.weights_time_s(s, block, fmt, t, 1) + cost.kv_decode_time_s(s, t, 1, 4096)
        transfer = block.bytes(fmt) / t.host_link
        host = cost.layer_decode_s(s, block, cost.Choice(fmt, "host"), t, 1, 4096)
        assert host == pytest.approx(max(compute, transfer))


# ---------------------------------------------------------------- the solver against brute force
def _oracle(prob: BudgetProblem):
    """Every combination: (fits, objective key, peak, latency, penalty) per plan."""
    per_layer = [[(w, k) for w in l.weights for k in (l.kv or (None,))] for l in prob.layers]
    plans = []
    for combo in itertools.product(*per_layer):
        peak = prob.fixed_bytes + sum(w.device_bytes + (k.bytes if k else 0) for w, k in combo)
        peak += prob.prefetch_buffers * max((w.stream_bytes for w, _ in combo if w.placement == "host"), default=0)
        lat = prob.fixed_s + sum(max(w.compute_s + (k.compute_s if k else 0), w.transfer_s) for w, k in combo)
        pen = sum(w.penalty + (k.penalty if k else 0) for w, k in combo)
        ok = peak <= prob.capacity_bytes and (prob.max_quality_loss is None or pen <= prob.max_quality_loss + 1e-6)
        plans.append((ok, peak, lat, pen))
    return plans


def _peak_of(prob: BudgetProblem, result) -> int:
    by_name = {}
    for l, d in zip(prob.layers, result.decisions):
        w = next(w for w in l.weights if (w.format, w.placement) == (d.format, d.placement))
        k = next((k for k in l.kv if k.bits == d.kv_bits), None)
        by_name[len(by_name)] = (w, k)
    return (prob.fixed_bytes + sum(w.device_bytes + (k.bytes if k else 0) for w, k in by_name.values())
            + prob.prefetch_buffers * max((w.stream_bytes for w, _ in by_name.values() if w.placement == "host"),
                                          default=0))


FMTS = ["bf16", "int8", "int4:g64", "lossless"]
weight_opt = st.builds(
    lambda f, host, b, c, x, pen: WeightOption(f, "host" if host else "device", 0 if host else b, b if host else 0,
                                               c, x if host else 0.0, pen),
    st.sampled_from(FMTS), st.booleans(), st.integers(1, 400).map(lambda v: v * 2**20),
    st.floats(0.001, 1.0), st.floats(0.001, 5.0), st.sampled_from([0.0, 0.001, 0.01, 0.03]))
kv_opt = st.builds(KVOption, st.sampled_from([16, 8, 4, 2]), st.integers(0, 200).map(lambda v: v * 2**20),
                   st.floats(0.0, 0.5), st.sampled_from([0.0, 0.002, 0.02]))


def _dedupe(opts, key):
    seen, out = set(), []
    for o in opts:
        if key(o) not in seen:
            seen.add(key(o))
            out.append(o)
    return tuple(out)


layer = st.builds(lambda ws, ks: LayerOptions("l", _dedupe(ws, lambda w: (w.format, w.placement)),
                                              _dedupe(ks, lambda k: k.bits)),
                  st.lists(weight_opt, min_size=1, max_size=4), st.lists(kv_opt, max_size=3))


@st.composite
def problems(draw):
    templates = draw(st.lists(layer, min_size=1, max_size=3))
    layers = tuple(LayerOptions(f"layer.{i}", t.weights, t.kv)
                   for i, t in enumerate(draw(st.lists(st.sampled_from(templates), min_size=1, max_size=4))))
    prob = BudgetProblem(layers, budget_bytes=0, fixed_bytes=draw(st.integers(0, 50)) * 2**20,
                         prefetch_buffers=draw(st.sampled_from([1, 2])),
                         objective=draw(st.sampled_from(["latency", "latency", "quality"])),
                         lam=draw(st.sampled_from([0.0, 1.0, 10.0])),
                         max_quality_loss=draw(st.sampled_from([None, None, None, 0.0, 0.02, 0.05])))
    peaks = [p[1] for p in _oracle(prob)]  # budgets from a little under the smallest plan to over the largest
    lo, hi = min(peaks), max(peaks)
    budget = max(0, lo + (hi - lo) * draw(st.integers(-10, 110)) // 100 + draw(st.sampled_from([0, -1])))
    return dataclasses.replace(prob, budget_bytes=budget, reserve_bytes=draw(st.sampled_from([0, 0, 2**20])))


@SETTINGS
@given(problems())
def test_ilp_matches_brute_force_and_beats_greedy(prob):
    plans = _oracle(prob)
    feasible = [p for p in plans if p[0]]
    greedy = greedy_budget(prob)
    if not feasible:
        with pytest.raises(BudgetInfeasible) as info:
            solve_budget(prob)
        msg = str(info.value)
        assert "\n" not in msg and "smallest plan" in msg and "budget" in msg
        if info.value.dominant != "max_quality_loss":
            assert info.value.min_bytes == min(p[1] for p in plans)
        assert not greedy.fits
        return
    r = solve_budget(prob)
    assert r.fits and _peak_of(prob, r) == r.predicted_peak_bytes <= prob.capacity_bytes
    assert r.solver.status == "optimal"
    if prob.max_quality_loss is not None:
        assert r.quality_loss <= prob.max_quality_loss + 1e-6
    if prob.objective == "latency":
        best = min(p[2] + prob.lam * p[3] for p in feasible)
        assert r.objective_value == pytest.approx(best, rel=1e-6, abs=1e-9)
        if greedy.fits:
            assert r.objective_value <= greedy.objective_value + 1e-9
    else:
        least = min(p[3] for p in feasible)
        assert r.quality_loss == pytest.approx(least, abs=1e-6)
        fastest = min(p[2] + prob.lam * p[3] for p in feasible if p[3] <= least + 1e-6)
        assert r.objective_value == pytest.approx(fastest, rel=1e-6, abs=1e-9)
        if greedy.fits:  # lexicographic: penalty, then latency
            assert r.quality_loss <= greedy.quality_loss + 1e-9
            assert r.quality_loss < greedy.quality_loss - 1e-9 or r.objective_value <= greedy.objective_value + 1e-9


@pytest.mark.parametrize("field,value", [("objective", "speed"), ("budget_bytes", -1), ("lam", math.inf),
                                         ("max_quality_loss", -0.1), ("prefetch_buffers", 0)])
def test_problem_validation_names_the_value(field, value):
    base = dict(layers=(LayerOptions("a", (WeightOption("bf16", "device", 10),)),), budget_bytes=100)
    with pytest.raises(ValueError, match=str(value).replace("-", r"\-")):
        BudgetProblem(**{**base, field: value})


def test_solver_imports_no_torch():
    code = "import sys, memopt.solvers.budget_ilp, memopt.planning.budget, memopt.planning.cost; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- plan_budget on presets
def test_llama3_8b_32k_fits_a_4090_in_time():
    t0 = time.perf_counter()
    plan = plan_budget("llama-3-8b", target="rtx-4090", seq=32768)
    assert time.perf_counter() - t0 < 5.0
    assert plan.fits and plan.predicted_peak_bytes <= plan.budget_bytes - plan.reserve_bytes
    assert plan.budget_bytes == get_target("rtx-4090").memory_bytes
    assert plan.solver.status == "optimal" and plan.solver.gap == 0.0
    d = json.loads(json.dumps(plan.to_json()))
    for key in ("fits", "budget_bytes", "predicted_peak_bytes", "predicted_decode_s_per_token", "decisions"):
        assert key in d
    assert set(d["solver"]) >= {"status", "time_s", "gap"}
    assert len(d["decisions"]) == 34 and {"format", "placement", "kv_bits", "bytes"} <= set(d["decisions"][0])
    table = format_budget_table(plan)
    assert "model.layers.0-31" in table and "tokens/s" in table and "predicted peak" in table
    assert any("max_position_embeddings" in n for n in plan.notes)  # 32k is past the config's 8192


def test_predictions_agree_with_the_cost_model():
    plan = plan_budget("llama-3-70b", target="rtx-4090", seq=4096)
    s, t = shape_of("llama-3-70b"), get_target("rtx-4090")
    layers = cost.layer_weights(s)
    choices = [cost.Choice(d.format, d.placement, d.kv_bits or 16) for d in plan.decisions]
    p = cost.predict(s, layers, choices, t, batch=1, seq=4096)
    assert p.peak_bytes == plan.predicted_peak_bytes
    assert p.decode_s_per_token == pytest.approx(plan.predicted_decode_s_per_token, rel=1e-9)
    assert p.prefill_s == pytest.approx(plan.predicted_prefill_s, rel=1e-9)


BUDGETS_GIB = [24, 16, 12, 10, 8, 7, 6, 5, 4, 3]


@pytest.mark.parametrize("lam", [0.0, None])
def test_tighter_budgets_never_help(lam):
    """lam = 0: latency never drops as the budget tightens. With the default lam the objective
    (latency + lam * penalty) never drops; latency alone may, as tighter plans quantize more."""
    last_latency = last_objective = 0.0
    for gib in BUDGETS_GIB:
        plan = plan_budget("llama-3-8b", target="rtx-4090", seq=32768, budget_bytes=gib * GIB, lam=lam)
        assert plan.fits and plan.predicted_peak_bytes <= gib * GIB - plan.reserve_bytes
        objective = plan.predicted_decode_s_per_token + plan.lam * plan.quality_loss
        assert objective >= last_objective * (1 - 1e-9)
        if lam == 0.0:
            assert plan.predicted_decode_s_per_token >= last_latency * (1 - 1e-9)
        last_latency, last_objective = plan.predicted_decode_s_per_token, objective


def test_infeasible_budget_names_the_minimum():
    with pytest.raises(BudgetInfeasible) as info:
        plan_budget("llama-3-8b", target="rtx-4090", seq=131072, batch=8)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("KV cache at 131072 tokens x batch 8 needs") and "even at 2 bits" in msg
    assert "the smallest plan needs" in msg and "budget 24.0 GiB" in msg
    assert isinstance(info.value, ValueError) and info.value.min_bytes > 23 * GIB
    # the minimum is achievable: that budget (no reserve) fits, a byte less does not
    m = info.value.min_bytes
    assert plan_budget("llama-3-8b", target="rtx-4090", seq=131072, batch=8, budget_bytes=m, reserve_bytes=0).fits
    with pytest.raises(BudgetInfeasible):
        plan_budget("llama-3-8b", target="rtx-4090", seq=131072, batch=8, budget_bytes=m - 1, reserve_bytes=0)
    plan = plan_budget("llama-3-8b", target="rtx-4090", seq=131072, batch=8, strict=False)
    assert not plan.fits and plan.predicted_peak_bytes == m and "does not fit" in plan.notes[-1]


def test_70b_on_24gib_streams_from_host_or_says_why():
    plan = plan_budget("llama-3-70b", target="rtx-4090", budget_bytes="24GiB", seq=4096)
    assert plan.fits and any(d.placement == "host" for d in plan.decisions)
    assert plan.breakdown["prefetch_bytes"] > 0 and plan.predicted_peak_bytes <= 23 * GIB
    assert "host" in format_budget_table(plan)
    with pytest.raises(BudgetInfeasible, match=r"^weights kept on the device need .* even at int4:g64; "
                                               r"the smallest plan needs [0-9.]+ GiB, budget 24.0 GiB"):
        plan_budget("llama-3-70b", target="rtx-4090", budget_bytes="24GiB", seq=4096, allow_host=False)


def test_quality_cap_and_objective():
    kw = dict(target="rtx-4090", seq=32768, budget_bytes=8 * GIB)
    fast = plan_budget("llama-3-8b", **kw)
    capped = plan_budget("llama-3-8b", max_quality_loss=0.01, **kw)
    best = plan_budget("llama-3-8b", objective="quality", **kw)
    assert capped.quality_loss <= 0.01 + 1e-6 < fast.quality_loss
    assert best.quality_loss <= capped.quality_loss + 1e-9
    assert capped.predicted_decode_s_per_token >= fast.predicted_decode_s_per_token
    with pytest.raises(BudgetInfeasible, match="max_quality_loss 0 is binding"):
        plan_budget("llama-3-8b", max_quality_loss=0.0, allow_host=False, **kw)


def test_sensitivity_keeps_a_layer_precise():
    kw = dict(target="rtx-4090", seq=4096, budget_bytes=7 * GIB, lam=0.0)
    plain = plan_budget("llama-3-8b", **kw)
    assert all(d.format == "int4:g64" for d in plain.decisions[1:33])
    plan = plan_budget("llama-3-8b", sensitivity={0: {"int4:g64": 1.0, "kv2": 1.0}}, max_quality_loss=0.5, **kw)
    assert plan.decisions[1].name == "model.layers.0" and plan.decisions[1].format != "int4:g64"
    assert plan.decisions[1].kv_bits != 2
    with pytest.raises(ValueError, match="'model.layers.99'"):
        plan_budget("llama-3-8b", sensitivity={"model.layers.99": {"int8": 0.1}}, **kw)
    with pytest.raises(ValueError, match="'int3'"):
        plan_budget("llama-3-8b", sensitivity={0: {"int3": 0.1}}, **kw)


def test_measured_sqnr_becomes_relative_penalties():
    """A {linear: {format: sqnr_db}} table (memopt.analysis.sensitivity): a block 14 dB noisier than the rest in int4
    gets a larger int4 penalty and is kept off int4 where every other block goes int4."""
    table = {f"m.model.layers.{i}.{p}": {"int8": 45.0, "int4:g64": 8.0 if i == 0 else 22.0, "int4:g32": 24.0}
             for i in range(32) for p in ("self_attn.q_proj", "mlp.down_proj")}
    pen = penalties_from_sqnr(table, "llama-3-8b")
    assert set(pen) == {f"model.layers.{i}" for i in range(32)}
    assert pen["model.layers.0"]["int4:g64"] > 10 * pen["model.layers.1"]["int4:g64"]
    assert pen["model.layers.0"]["int8"] == pytest.approx(pen["model.layers.1"]["int8"])
    assert "int4:g32" not in pen["model.layers.0"]
    layers = cost.layer_weights(shape_of("llama-3-8b"))  # the mean keeps the default scale: 0.03 x blocks' share
    share = sum(l.params for l in layers if l.kind == "block") / sum(l.params for l in layers)
    assert sum(d["int4:g64"] for d in pen.values()) == pytest.approx(0.03 * share)
    plan = plan_budget("llama-3-8b", target="rtx-4090", seq=4096, budget_bytes=7 * GIB, sensitivity=pen)
    assert plan.decisions[1].format != "int4:g64" and plan.decisions[2].format == "int4:g64"


def test_encoder_and_small_models():
    bert = plan_budget("bert-base", target="l4", seq=512)
    assert bert.fits and bert.predicted_decode_s_per_token is None
    assert all(d.kv_bits is None for d in bert.decisions)
    gpt2 = plan_budget("gpt2", target="l4", budget_bytes="100MiB", seq=1024)
    assert gpt2.fits and gpt2.decisions[0].name == "transformer.wte (tied lm_head)"


def test_plan_round_trips():
    plan = plan_budget("qwen2.5-7b", target="l4", seq=8192)
    p = plan.to_plan()
    assert Plan.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert {d.weight_format for d in p.decisions} <= {"native", "int8", "int4:g64", "lossless"}
    assert BudgetConfig.from_json(plan.config.to_json()) == plan.config


@pytest.mark.parametrize("field,value", [("objective", "fast"), ("batch", 0), ("seq", -5), ("formats", ("int3",)),
                                         ("kv_bits", (3,)), ("lam", -1.0), ("max_quality_loss", math.nan),
                                         ("time_limit_s", 0)])
def test_config_validation_names_the_value(field, value):
    with pytest.raises(ValueError, match=field):
        BudgetConfig(**{field: value})
