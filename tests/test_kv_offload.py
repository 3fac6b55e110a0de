"""KV-cache offloading: the pass (host caches streamed one layer ahead, new rows written back) and the
budget ILP's KV placement."""

import dataclasses
import itertools
import json
import warnings
from importlib import resources

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memopt.capture import capture
from memopt.passes.kv_offload import (KV_HOST_PREFIX, KV_SLOT_PREFIX, KVOffloadConfig, KVOffloadPass,
                                      check_kv_schedule, kv_device_bytes, kv_transfer_schedule)
from memopt.passes.offload import OffloadConfig, OffloadPass, offloaded_device_bytes
from memopt.planning.plan import LayerDecision, Plan
from memopt.runtime.offload_ops import KV_PREFETCH, KV_WAIT, KV_WRITEBACK
from memopt.solvers.budget_ilp import (BudgetInfeasible, BudgetProblem, KVOption, LayerOptions, WeightOption,
                                   greedy_budget, solve_budget)
from memopt.frontend.sources import ModelSource

CACHE = 16
MIB = 2**20


def _tiny_llama_source(kv_heads: int) -> ModelSource:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64)
    torch.manual_seed(0)
    return ModelSource(f"tiny-llama-kv{kv_heads}", LlamaForCausalLM(cfg).eval(), "causal_lm", cfg)


@pytest.fixture(scope="module")
def demo_decode(demo_source):
    return capture(demo_source, phase="decode", cache_len=CACHE)


def _steps(gm, tokens, start=0):
    """Logits of one-token decode steps at positions start, start + 1, ..."""
    with torch.no_grad():
        return [gm(input_ids=torch.tensor([[t]]), cache_position=torch.tensor([start + i])) for i, t in
                enumerate(tokens)]


def _offloaded(captured, config, plan=None):
    gm = captured.module()
    result = KVOffloadPass(config)(gm, plan)
    assert result.modified and result.notes[0].startswith("offloaded the KV cache of")
    return gm


TOKENS = [5, 9, 11, 200, 7, 3, 42, 17]
CASES = {  # name: (source, layers, prefetch_depth, offloaded layers, slots)
    "demo_one_layer": ("demo", (2,), 1, [2], 1),
    "demo_three_depth1": ("demo", ("layers.[1-3]",), 1, [1, 2, 3], 2),
    "demo_all_depth2": ("demo", (0, 1, 2, 3), 2, [0, 1, 2, 3], 3),
    "llama_gqa": ("gqa", (0, "model.layers.2"), 1, [0, 2], 2),
    "llama_mha": ("mha", ("layers.*",), 1, [0, 1, 2], 2),
}


@pytest.mark.parametrize("name", CASES)
def test_offloaded_cache_reproduces_the_decode_graph(demo_decode, name):
    src_name, layers, depth, expect, n_slots = CASES[name]
    captured = demo_decode if src_name == "demo" else capture(
        _tiny_llama_source(2 if src_name == "gqa" else 4), phase="decode", cache_len=CACHE)
    ref = captured.module()
    before, weights_before = kv_device_bytes(ref), offloaded_device_bytes(ref)
    gm = _offloaded(captured, KVOffloadConfig(layers=layers, prefetch_depth=depth))
    for want, got in zip(_steps(ref, TOKENS), _steps(gm, TOKENS)):
        assert torch.equal(want, got)
    # the host caches hold exactly what the device caches would
    for layer in expect:
        host = getattr(gm, f"{KV_HOST_PREFIX}{layer}")
        assert torch.equal(host[0].permute(1, 2, 0, 3), getattr(ref, f"key_cache_{layer}"))
        assert torch.equal(host[1].permute(1, 2, 0, 3), getattr(ref, f"value_cache_{layer}"))
    schedule = kv_transfer_schedule(gm)
    check_kv_schedule(schedule)
    assert [t.layer for t in schedule] == expect
    assert [t.slot for t in schedule] == [j % n_slots for j in range(len(expect))]
    per_layer = ref.key_cache_0.nbytes * 2
    slots = [t for n, t in gm.named_buffers() if n.startswith(KV_SLOT_PREFIX)]
    assert len(slots) == n_slots and all(s.nbytes == per_layer for s in slots)
    assert kv_device_bytes(gm) == before - len(expect) * per_layer + n_slots * per_layer
    assert offloaded_device_bytes(gm) == weights_before - len(expect) * per_layer + n_slots * per_layer
    if len(expect) > n_slots:
        assert kv_device_bytes(gm) < before
    assert not any(n.startswith(tuple(f"{kv}_cache_{i}" for kv in ("key", "value") for i in expect))
                   for n, _ in gm.named_buffers())


def test_multi_token_steps_write_every_new_row_back(demo_source):
    """A dynamic-token program: a 5-token chunk, then single tokens; all rows reach the host cache."""
    captured = capture(demo_source, phase="decode", cache_len=CACHE, dynamic=True)
    gm = _offloaded(captured, KVOffloadConfig(layers=(0, 3)))
    with warnings.catch_warnings():  # as compile's re-export does it: tokens stay symbolic
        warnings.simplefilter("ignore")
        reloaded = torch.export.export(gm, (), captured.example_kwargs, dynamic_shapes=captured.dynamic_shapes,
                                       strict=False).module()
    ids = torch.tensor([TOKENS])
    for program in (gm, reloaded):
        ref = captured.module()
        with torch.no_grad():
            for lo, hi in ((0, 5), (5, 6), (6, 8)):
                kwargs = {"input_ids": ids[:, lo:hi], "cache_position": torch.arange(lo, hi)}
                assert torch.equal(ref(**kwargs), program(**kwargs))
        host = getattr(program, f"{KV_HOST_PREFIX}3")
        assert torch.equal(host[0].permute(1, 2, 0, 3), ref.key_cache_3)


def test_prefetch_is_one_layer_ahead(demo_decode):
    gm = _offloaded(demo_decode, KVOffloadConfig(layers=(1, 2, 3)))
    s = kv_transfer_schedule(gm)
    assert s[0].issue_op == "copy_"  # the first layer's cache is issued at the graph's start
    blocks = {t.block for t in s}
    assert blocks == {f"model.model.layers.{i}" for i in (1, 2, 3)}
    assert all(t.wait_op.startswith("index_copy_") for t in s)  # waited just before the cache update
    assert s[0].last_use_index < s[2].issue_index < s[1].wait_index  # slot 0 reused after layer 1's attention
    assert all(t.wait_index < t.last_write_index < t.writeback_index < t.last_use_index for t in s)


@pytest.mark.parametrize("index, change, message", [
    (1, lambda s: {"writeback_index": -1}, "never written back"),
    (1, lambda s: {"writeback_index": 1}, "written back at 1"),
    (0, lambda s: {"last_write_index": 10**6}, "before its last cache update"),
    (2, lambda s: {"issue_index": 10**6}, "not resident"),
    (2, lambda s: {"issue_index": s[0].last_use_index}, "slot 0 is overwritten by model.model.layers.3"),
    (0, lambda s: {"bytes": 10**9}, "needs 1000000000 bytes"),
])
def test_check_kv_schedule_rejects(demo_decode, index, change, message):
    schedule = kv_transfer_schedule(_offloaded(demo_decode, KVOffloadConfig(layers=(1, 2, 3))))
    check_kv_schedule(schedule)
    schedule[index] = dataclasses.replace(schedule[index], **change(schedule))
    with pytest.raises(ValueError, match=message):
        check_kv_schedule(schedule)


def test_rewritten_graph_reexports(demo_decode):
    gm = _offloaded(demo_decode, KVOffloadConfig(layers=(1, 2)))
    ref = demo_decode.module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(gm, (), demo_decode.example_kwargs, strict=False)
    targets = [n.target for n in ep.graph.nodes]
    assert targets.count(KV_PREFETCH) == targets.count(KV_WAIT) == targets.count(KV_WRITEBACK) == 2
    reloaded = ep.module()
    check_kv_schedule(kv_transfer_schedule(reloaded))
    assert kv_device_bytes(reloaded) == kv_device_bytes(gm)
    for want, got in zip(_steps(ref, TOKENS), _steps(reloaded, TOKENS)):
        assert torch.equal(want, got)


def test_plan_kv_placement_selects_layers(demo_decode):
    plan = Plan(decisions=(LayerDecision("model.layers.2", kv_placement="host"),
                           LayerDecision("model.layers.1", placement="host"),  # weights only: not a KV choice
                           LayerDecision("lm_head", kv_placement="host")))
    gm = demo_decode.module()
    result = KVOffloadPass()(gm, plan)
    assert [t.layer for t in kv_transfer_schedule(gm)] == [2]
    assert any("lm_head" in n and "kept on device" in n for n in result.notes)
    assert not KVOffloadPass()(demo_decode.module(), Plan()).modified


def test_composes_with_weight_offload(demo_decode):
    ref, gm = demo_decode.module(), demo_decode.module()
    OffloadPass(OffloadConfig(blocks=("layers.[1-3]",)))(gm, None)
    KVOffloadPass(KVOffloadConfig(layers=(1, 2, 3)))(gm, None)
    for want, got in zip(_steps(ref, TOKENS), _steps(gm, TOKENS)):
        assert torch.equal(want, got)
    check_kv_schedule(kv_transfer_schedule(gm))
    with pytest.raises(ValueError, match="already offloaded"):
        KVOffloadPass(KVOffloadConfig(layers=(0,)))(gm, None)


@pytest.mark.parametrize("make, bad", [
    (lambda: KVOffloadConfig(layers=3), "3"),
    (lambda: KVOffloadConfig(layers=(-1,)), "-1"),
    (lambda: KVOffloadConfig(layers=("",)), "''"),
    (lambda: KVOffloadConfig(layers=(True,)), "True"),
    (lambda: KVOffloadConfig(prefetch_depth=0), "0"),
    (lambda: KVOffloadConfig(pin_memory="yes"), "'yes'"),
    (lambda: KVOffloadConfig.from_json({"type": "kv_offload", "version": 1, "depth": 2}), "depth"),
    (lambda: KVOffloadConfig.from_json({"type": "offload", "version": 1}), "'kv_offload'"),
])
def test_bad_config_is_one_line_error(make, bad):
    with pytest.raises(ValueError) as err:
        make()
    assert bad in str(err.value) and "\n" not in str(err.value)


def test_config_round_trips_through_json():
    config = KVOffloadConfig(layers=(0, "layers.[23]"), prefetch_depth=2, pin_memory=False)
    assert KVOffloadConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_unknown_layer_and_wrong_graph(demo_source, demo_decode):
    with pytest.raises(ValueError, match=r"layer 7 matches no cached layer") as err:
        KVOffloadPass(KVOffloadConfig(layers=(7,)))(demo_decode.module(), None)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="found no key_cache"):
        KVOffloadPass(KVOffloadConfig(layers=(0,)))(capture(demo_source, seq=8).module(), None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_the_cache_from_pinned_host():
    from memopt.runtime.offload_ops import flush_kv_writebacks
    from memopt.frontend.sources import resolve_source

    src = resolve_source("demo")
    src.model.to("cuda")
    captured = capture(src, phase="decode", cache_len=CACHE)
    ref, gm = captured.module(), captured.module()
    KVOffloadPass(KVOffloadConfig(layers=(0, 1, 2, 3)))(gm, None)
    hosts = [t for n, t in gm.named_buffers() if n.startswith(KV_HOST_PREFIX)]
    assert hosts and all(t.device.type == "cpu" and t.is_pinned() for t in hosts)
    with torch.no_grad():
        for i, t in enumerate(TOKENS):
            kwargs = {"input_ids": torch.tensor([[t]], device="cuda"),
                      "cache_position": torch.tensor([i], device="cuda")}
            torch.testing.assert_close(gm(**kwargs), ref(**kwargs), rtol=1e-5, atol=1e-5)
    torch.cuda.synchronize()
    flush_kv_writebacks()
    assert torch.equal(gm._memopt_offload_host_kv2[1].permute(1, 2, 0, 3), ref.value_cache_2.cpu())


# ---------------------------------------------------------------- the budget ILP's KV placement
def _layer(name: str, kv_gib: float, host_s: float) -> LayerOptions:
    kv = int(kv_gib * 2**30)
    return LayerOptions(name, (WeightOption("bf16", "device", 2**28, 0, 1e-3),),
                        (KVOption(16, kv, 1e-3), KVOption(8, kv // 2, 1.2e-3, 0.01),
                         KVOption(16, 0, 1e-3, 0.0, "host", kv, host_s)))


def test_ilp_puts_kv_on_host_only_when_the_budget_forces_it():
    """8 layers of 0.25 GiB weights and a 1 GiB cache: 10 GiB on device, 6 GiB at 8 bits, 4 GiB with every
    cache on host (two 1 GiB staging buffers)."""
    layers = tuple(_layer(f"model.layers.{i}", 1.0, 0.05) for i in range(8))
    solve = lambda gib: solve_budget(BudgetProblem(layers, budget_bytes=int(gib * 2**30), lam=0.1))  # noqa: E731
    roomy, tight, tighter = solve(11), solve(7), solve(5)
    assert all(d.kv_placement == "device" and d.kv_bits == 16 for d in roomy.decisions)
    assert all(d.kv_placement == "device" for d in tight.decisions)  # 8 bits where needed is cheaper
    hosts = [d for d in tighter.decisions if d.kv_placement == "host"]
    assert tighter.fits and len(hosts) >= 6 and all(d.kv_bytes == 0 and d.kv_stream_bytes == 2**30 for d in hosts)
    assert tighter.breakdown["kv_staging_bytes"] == 2 * 2**30  # two staging buffers of one layer's cache
    assert tighter.predicted_peak_bytes <= 5 * 2**30
    assert tighter.predicted_decode_s_per_token > tight.predicted_decode_s_per_token
    with pytest.raises(BudgetInfeasible, match="the smallest plan needs 4.0 GiB"):
        solve(3.9)


def _oracle(prob: BudgetProblem):
    """Every combination, host KV staging included: (fits, peak, objective key)."""
    out = []
    for combo in itertools.product(*[[(w, k) for w in l.weights for k in (l.kv or (None,))] for l in prob.layers]):
        peak = prob.fixed_bytes + sum(w.device_bytes + (k.bytes if k else 0) for w, k in combo)
        peak += prob.prefetch_buffers * max((w.stream_bytes for w, _ in combo if w.placement == "host"), default=0)
        peak += prob.prefetch_buffers * max((k.stream_bytes for _, k in combo if k and k.placement == "host"),
                                            default=0)
        lat = sum(max(w.compute_s + (k.compute_s if k else 0), w.transfer_s + (k.transfer_s if k else 0))
                  for w, k in combo)
        pen = sum(w.penalty + (k.penalty if k else 0) for w, k in combo)
        out.append((peak <= prob.capacity_bytes, peak, lat + prob.lam * pen))
    return out


weight_opt = st.builds(
    lambda host, b, c, x, pen: WeightOption("int8" if pen else "bf16", "host" if host else "device", 0 if host else b,
                                            b if host else 0, c, x if host else 0.0, pen),
    st.booleans(), st.integers(1, 300).map(lambda v: v * MIB), st.floats(0.001, 1.0), st.floats(0.001, 3.0),
    st.sampled_from([0.0, 0.01]))
kv_opt = st.builds(
    lambda bits, host, b, c, x, pen: KVOption(bits, 0 if host else b, c, pen, "host" if host else "device",
                                              b if host else 0, x if host else 0.0),
    st.sampled_from([16, 8]), st.booleans(), st.integers(1, 200).map(lambda v: v * MIB), st.floats(0.0, 0.5),
    st.floats(0.0, 3.0), st.sampled_from([0.0, 0.02]))


@st.composite
def kv_problems(draw):
    templates = []
    for _ in range(draw(st.integers(1, 2))):
        ws = {(w.format, w.placement): w for w in draw(st.lists(weight_opt, min_size=1, max_size=3))}
        ks = {(k.bits, k.placement): k for k in draw(st.lists(kv_opt, min_size=1, max_size=3))}
        templates.append((tuple(ws.values()), tuple(ks.values())))
    picks = draw(st.lists(st.sampled_from(templates), min_size=1, max_size=4))
    prob = BudgetProblem(tuple(LayerOptions(f"layer.{i}", w, k) for i, (w, k) in enumerate(picks)), budget_bytes=0,
                         prefetch_buffers=draw(st.sampled_from([1, 2])), lam=draw(st.sampled_from([0.0, 10.0])))
    peaks = [p[1] for p in _oracle(prob)]
    lo, hi = min(peaks), max(peaks)
    return dataclasses.replace(prob, budget_bytes=lo + (hi - lo) * draw(st.integers(-5, 105)) // 100)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv_problems())
def test_ilp_with_kv_placement_matches_brute_force_and_beats_greedy(prob):
    plans = _oracle(prob)
    feasible = [p for p in plans if p[0]]
    if not feasible:
        with pytest.raises(BudgetInfeasible):
            solve_budget(prob, time_limit_s=2.0)
        return
    best = solve_budget(prob, time_limit_s=2.0)
    assert best.fits and best.predicted_peak_bytes <= prob.capacity_bytes
    # the reported peak is the plan's own: resident bytes + both kinds of staging
    by_kv = {(d.kv_bits, d.kv_placement) for d in best.decisions}
    assert all(p in {(k.bits, k.placement) for l in prob.layers for k in l.kv} for p in by_kv)
    assert best.objective_value == pytest.approx(min(p[2] for p in feasible), rel=1e-3, abs=1e-9)
    greedy = greedy_budget(prob)
    if greedy.fits:
        assert best.objective_value <= greedy.objective_value * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("gib", [24, 20, 16, 12])
def test_plan_with_host_kv_never_exceeds_the_budget(gib):
    from memopt.planning import cost
    from memopt.planning.budget import format_budget_table, plan_budget
    from memopt.frontend.targets import get_target

    plan = plan_budget("llama-3-8b", target="rtx-4090", seq=131072, batch=8, budget_bytes=gib * 2**30, kv_host=True,
                       strict=False)
    assert plan.fits and plan.predicted_peak_bytes <= plan.budget_bytes - plan.reserve_bytes
    host = [d for d in plan.decisions if d.kv_placement == "host"]
    assert host, "at 131072 tokens x batch 8 the KV cache cannot all stay on a 4090"
    assert "host" in format_budget_table(plan) and "KV staging" in format_budget_table(plan)
    hosts = {d.name for d in plan.to_plan().decisions if d.kv_placement == "host"}
    assert hosts == {d.name for d in host}
    preset = resources.files("memopt").joinpath("data/presets/llama-3-8b.json")
    shape = cost.model_shape(json.loads(preset.read_text()), name="llama-3-8b")
    layers = cost.layer_weights(shape)
    choices = [cost.Choice(d.format, d.placement, d.kv_bits or 16, d.kv_placement) for d in plan.decisions]
    p = cost.predict(shape, layers, choices, get_target("rtx-4090"), batch=8, seq=131072)
    assert p.peak_bytes == plan.predicted_peak_bytes
    assert p.decode_s_per_token == pytest.approx(plan.predicted_decode_s_per_token, rel=1e-9)


def test_kv_host_is_off_by_default_and_round_trips():
    from memopt.planning.budget import BudgetConfig, plan_budget

    with pytest.raises(BudgetInfeasible):
        plan_budget("llama-3-8b", target="rtx-4090", seq=131072, batch=8)
    config = BudgetConfig(kv_host=True)
    assert BudgetConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(ValueError, match="kv_host must be True or False, got 'yes'"):
        BudgetConfig(kv_host="yes")
    roomy = plan_budget("llama-3-8b", target="rtx-4090", seq=4096, kv_host=True)
    assert all(d.kv_placement == "device" for d in roomy.decisions)
