"""Several devices: target specs with interconnects, MoE bytes in the cost model, and the split ILP (pipeline
stages + tensor-parallel degree, chosen with the weight formats and KV bits) on presets (configs only).

Oracles written here: parameter counts of meta-device MoE models, exhaustive enumeration of small split
problems, and every device's peak recomputed from its layer range.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
from memopt.solvers.budget_ilp import KVOption, LayerOptions, WeightOption
from memopt.solvers.split_ilp import SplitInfeasible, SplitProblem, Stage, solve_split

from memopt.planning import cost
from memopt.planning.budget import format_budget_table, plan_budget
from memopt.planning.split import plan_split
from memopt.frontend.targets import get_target, parse_cluster

GIB = 2**30


# ---------------------------------------------------------------- targets
@pytest.mark.parametrize("spec, kw, names, nodes, link, network", [
    ("4xh100-80gb", {}, ["h100-80gb"] * 4, 1, "nvlink4", None),
    ("2x(rtx-4090)", {}, ["rtx-4090"] * 2, 1, "pcie4-no-p2p", None),
    ("1x(rtx-4090)+1x(rtx-3090)", {}, ["rtx-4090", "rtx-3090"], 1, "pcie4-no-p2p", None),
    ("1xa100-40gb+1xa100-80gb", {}, ["a100-40gb", "a100-80gb"], 1, "pcie@32 GB/s", None),  # no NVLink across kinds
    ("a100-80gb", {"devices": 3}, ["a100-80gb"] * 3, 1, "nvlink3", None),
    ("2xh100", {"nodes": 2}, ["h100-80gb"] * 4, 2, "nvlink4", "ib-ndr400"),
    ("h100", {"devices": 2, "nodes": 2, "network": "eth-10g"}, ["h100-80gb"] * 4, 2, "nvlink4", "eth-10g"),
    ("2x(custom:mem=24GiB,bw=1TB/s,link=nvlink3)", {}, ["custom"] * 2, 1, "nvlink3", None),
    ("h100", {}, ["h100-80gb"], 1, None, None),
])
def test_cluster_specs(spec, kw, names, nodes, link, network):
    c = parse_cluster(spec, **kw)
    assert [t.name for t in c.devices] == names and c.nodes == nodes
    assert (c.intra_link.name if c.intra_link else None) == link
    assert (c.network.name if c.network else None) == network
    if nodes > 1:
        assert c.link(0, 1) is c.intra_link and c.link(0, len(names) - 1) is c.network


@pytest.mark.parametrize("spec, kw, fragment", [
    ("0xh100", {}, "a device count must be at least 1"),
    ("2xh300", {}, "unknown target 'h300'"),
    ("2x", {}, "names no device"),
    ("2x(h100", {}, "unbalanced parentheses"),
    ("x(h100)", {}, "write COUNTxDEVICE"),
    ("2x2xh100", {}, "is not one device"),
    ("2xh100", {"devices": 4}, "contradicts"),
    ("h100+a100", {"devices": 2}, "needs one kind of device"),
    ("h100", {"devices": 0}, "devices must be an int >= 1"),
    ("h100", {"nodes": 0}, "nodes must be an int >= 1"),
    ("2xh100", {"nodes": 2, "network": "carrier-pigeon"}, "network 'carrier-pigeon' is unknown"),
])
def test_bad_cluster_specs_are_one_line(spec, kw, fragment):
    with pytest.raises(ValueError) as info:
        parse_cluster(spec, **kw)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_one_device_apis_refuse_several_devices():
    with pytest.raises(ValueError, match="names several devices"):
        get_target("2xh100-80gb")


def test_targets_have_links():
    for name in ("h100-80gb", "a100-80gb", "a100-40gb", "rtx-3090", "rtx-4090", "l40s", "h100-pcie"):
        t = get_target(name)
        assert t.interconnect and t.network and t.to_json()["interconnect"] == t.interconnect


# ---------------------------------------------------------------- MoE bytes
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_moe_layer_weights_count_every_expert(family):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tiny = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    config = {"mixtral": lambda: transformers.MixtralConfig(**tiny, num_local_experts=4, num_experts_per_tok=2),
              "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**tiny, num_experts=4, num_experts_per_tok=2,
                                                               moe_intermediate_size=64,
                                                               shared_expert_intermediate_size=128),
              "olmoe": lambda: transformers.OlmoeConfig(**tiny, num_experts=4, num_experts_per_tok=2)}[family]()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shape = cost.model_shape(config, name=family)
    assert sum(l.params for l in cost.layer_weights(shape)) == sum(p.numel() for p in model.parameters())


def test_mixtral_size_bytes_and_decode_reads_only_routed_experts():
    config = dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=4096, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, vocab_size=32000,
                  num_local_experts=8, num_experts_per_tok=2)
    s = cost.model_shape(config, name="mixtral")
    layers = cost.layer_weights(s)
    assert sum(l.params for l in layers) == pytest.approx(46.70e9, rel=1e-3)  # Mixtral-8x7B: 46.7B parameters
    block, t = layers[1], get_target("a100-80gb")
    one = cost.weights_time_s(s, block, "bf16", t, 1)
    assert one == pytest.approx((block.bytes("bf16") - 6 * block.expert_bytes("bf16")) / t.bandwidth, rel=0.02)
    assert cost.weights_time_s(s, block, "bf16", t, 64) > 3 * one  # 64 tokens touch nearly every expert


# ---------------------------------------------------------------- the split ILP against brute force
def _toy(caps, times, sizes, seed):
    """len(caps) stages, 5 layers (embed pinned first, head last); per layer two formats whose bytes and
    times differ per stage (a faster second stage)."""
    import random

    rng = random.Random(seed)
    stages = tuple(Stage(f"s{i}", cap, rng.randrange(0, 3), rng.random() * 0.1) for i, cap in enumerate(caps))
    per_stage = []
    for s in range(len(caps)):
        layers = []
        for i in range(5):
            b = sizes[i]
            kv = (KVOption(16, 2, 0.1), KVOption(4, 1, 0.12, 0.01)) if 0 < i < 4 else ()
            layers.append(LayerOptions(f"l{i}", (WeightOption("bf16", "device", 2 * b, 0, times[s] * b),
                                                 WeightOption("int4:g64", "device", b, 0, times[s] * b * 0.6,
                                                              0.0, 0.02)), kv))
        per_stage.append(tuple(layers))
    pin = (0, None, None, None, len(caps) - 1)
    return SplitProblem(stages, tuple(per_stage), pin, "latency", lam=2.0)


def _brute(prob: SplitProblem):
    """Every contiguous non-empty split and every option pair: the best objective S * max T_s + lam * pen."""
    S, n = len(prob.stages), prob.layers
    best = math.inf
    for cuts in itertools.combinations(range(1, n), S - 1):
        bounds = (0,) + cuts + (n,)
        stage_of = [s for s in range(S) for _ in range(bounds[s], bounds[s + 1])]
        if any(prob.pin[i] is not None and prob.pin[i] != stage_of[i] for i in range(n)):
            continue
        choices = [[(w, k) for w in prob.stage_layers[stage_of[i]][i].weights
                    for k in (prob.stage_layers[stage_of[i]][i].kv or (None,))] for i in range(n)]
        for combo in itertools.product(*choices):
            mem, tim, pen = [st.fixed_bytes for st in prob.stages], [st.fixed_s for st in prob.stages], 0.0
            for i, (w, k) in enumerate(combo):
                s = stage_of[i]
                mem[s] += w.device_bytes + (k.bytes if k else 0)
                tim[s] += w.compute_s + (k.compute_s if k else 0)
                pen += w.penalty + (k.penalty if k else 0)
            if all(m <= st.capacity_bytes for m, st in zip(mem, prob.stages)):
                best = min(best, S * max(tim) + prob.lam * pen)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("caps", [(14, 14), (9, 20), (8, 8, 9)])
def test_split_ilp_matches_brute_force(seed, caps):
    prob = _toy(caps, (1.0, 0.7, 1.2), (3, 2, 2, 2, 3), seed)
    want = _brute(prob)
    if math.isinf(want):
        with pytest.raises(SplitInfeasible):
            solve_split(prob)
        return
    got = solve_split(prob)
    assert got.fits and got.objective_value == pytest.approx(want, rel=1e-6)
    assert list(got.stage_of) == sorted(got.stage_of) and got.stage_of[0] == 0 and got.stage_of[-1] == len(caps) - 1
    assert all(st.peak_bytes <= st.capacity_bytes for st in got.stages)


# ---------------------------------------------------------------- plans
def _check(plan):
    """Every layer on exactly one stage, ranges contiguous and in stage order, the embedding first and the
    head last, one range per tensor-parallel group, every device's peak recomputed and within its budget."""
    devs = plan.devices
    assert devs and plan.fits
    stages = sorted({d.stage for d in devs})
    ranges = [next((d.first, d.last) for d in devs if d.stage == s) for s in stages]
    assert ranges[0][0] == 0 and ranges[-1][1] == len(plan.decisions) - 1
    assert all(a[1] + 1 == b[0] and a[0] <= a[1] for a, b in zip(ranges, ranges[1:]))
    assert "embed" in devs[0].layers and devs[-1].layers.endswith("head")
    for d in devs:
        assert (d.first, d.last) == ranges[d.stage]
        assert sum(1 for e in devs if e.stage == d.stage) == plan.tensor_parallel
        ds = plan.decisions[d.first:d.last + 1]
        assert d.weights_bytes == sum(x.weight_bytes for x in ds) and d.kv_bytes == sum(x.kv_bytes for x in ds)
        assert d.peak_bytes == d.weights_bytes + d.kv_bytes + d.arena_bytes + d.pipeline_buffer_bytes + d.prefetch_bytes
        assert d.peak_bytes <= d.budget_bytes - d.reserve_bytes
    assert sum(d.time_share for d in devs) == pytest.approx(plan.tensor_parallel)


@pytest.mark.parametrize("model, target, kw", [
    ("llama-3-70b", "2xa100-80gb", {}),
    ("llama-3-70b", "4x(rtx-4090)", {"seq": 32768}),
    ("llama-3-8b", "1x(rtx-4090)+1x(rtx-3090)", {"seq": 65536, "batch": 4, "tensor_parallel": 1}),
    ("llama-3-8b", "2xl4", {"nodes": 2, "seq": 32768, "batch": 4}),
    ("qwen2.5-0.5b", "4xa100-40gb", {"tensor_parallel": 1}),  # tied embedding: a copy of it is the last stage's head
])
def test_plans_fit_and_cover_every_layer_once(model, target, kw):
    plan = plan_split(model, target=target, **kw)
    _check(plan)
    j = json.loads(json.dumps(plan.to_json()))
    assert len(j["devices"]) == len(plan.devices) and j["tensor_parallel"] == plan.tensor_parallel
    assert plan.to_plan().predictions["devices"] == j["devices"]


def test_smaller_device_takes_fewer_layers():
    for spec in ("1xa100-40gb+1xa100-80gb", "1xa100-80gb+1xa100-40gb"):
        plan = plan_split("llama-3-70b", target=spec, tensor_parallel=1, formats=("int8",), kv_bits=(16,),
                          allow_host=False, seq=8192)
        _check(plan)
        small, big = sorted(plan.devices, key=lambda d: d.budget_bytes)
        assert small.device == "a100-40gb" and small.last - small.first < big.last - big.first


def test_tensor_parallel_only_where_it_pays():
    """NVLink: TP=2 beats two pipeline stages; 10 Gb Ethernet between the same devices: it does not."""
    dev = "custom:mem=24GiB,bw=1TB/s,bf16=165T,host=32GB/s,link={}"
    for link, want in (("nvlink4", 2), ("eth-10g", 1)):
        target = f"2x({dev.format(link)})"
        plan = plan_split("llama-3-8b", target=target)
        other = plan_split("llama-3-8b", target=target, tensor_parallel=3 - want)
        assert plan.tensor_parallel == want
        assert plan.solver.objective < other.solver.objective


def test_infeasible_names_the_least_number_of_devices():
    kw = dict(target="rtx-4090", seq=131072, batch=16, allow_host=False)
    with pytest.raises(ValueError) as info:
        plan_split("llama-3-8b", devices=2, **kw)
    msg = str(info.value)
    assert "\n" not in msg and "KV cache" in msg and "at least 3 x rtx-4090 would fit" in msg
    assert "GiB per device" in msg
    _check(plan_split("llama-3-8b", devices=3, **kw))
    loose = plan_split("llama-3-8b", devices=2, strict=False, **kw)
    assert not loose.fits and any("does not fit" in n for n in loose.notes)


def test_single_device_plans_are_plan_budget():
    a = plan_split("llama-3-8b", target="rtx-4090", seq=32768).to_json()
    b = plan_budget("llama-3-8b", target="rtx-4090", seq=32768).to_json()
    for d in (a, b):
        d.pop("planning_s")
        d["solver"].pop("time_s")
    assert a == b and "devices" not in a
    assert "stage" not in format_budget_table(plan_split("llama-3-8b", target="1xrtx-4090"))


def test_cli_plan_only_prints_a_table_per_device(capsys):
    from memopt.cli import main

    assert main(["compile", "llama-3-70b", "--target", "2xa100-80gb", "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel" in out and out.count("a100-80gb ") >= 2 and "usable" in out
    assert main(["compile", "llama-3-8b", "--target", "a100-80gb", "--devices", "2", "--nodes", "2",
                 "--plan-only", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert len(j["devices"]) == 4 and j["cluster"]["nodes"] == 2 and j["fits"]
    assert main(["compile", "llama-3-8b", "--target", "0xa100-80gb", "--plan-only"]) == 2
    assert "at least 1" in capsys.readouterr().err
