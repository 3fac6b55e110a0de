"""Several devices: one plan that splits a model across them, from the cost model and the split ILP.

    plan = plan_split("llama-3-70b", target="4x(rtx-4090)", seq=32768)
    print(format_budget_table(plan))          # memopt.planning.budget: a per-device table for such a plan

The split ILP (solvers/split_ilp.py) chooses, together with every layer's weight format, placement and KV
bits (the budget planner's options, memopt/planning/budget.py), a pipeline split: contiguous layer ranges, one per
stage, the embedding on the first and the LM head on the last, each device under its own budget (its
layers' weights and KV cache, its activation arena, its pipeline send/receive buffers and any prefetch
buffers). The tensor-parallel degree t (devices of one node that share every layer of a stage, Megatron-LM
style: heads, KV heads, MLP columns and vocabulary split t ways) is tried for every divisor of the devices
per node that also divides the KV heads; each t is one ILP over D / t stages, and the best objective wins,
so t > 1 is kept only where it pays. Priced communication (memopt/planning/cost.py, links from data/targets.json):
per tensor-parallel block two all-reduces of the hidden states (after attention, after the MLP), the
vocabulary-parallel embedding's all-reduce and the LM head's all-gather, and between stages one send of
the hidden states per step over NVLink, PCIe or the network between nodes.

One device: `plan_split` is `memopt.planning.budget.plan_budget`, unchanged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from memopt.planning import cost
from memopt.planning.budget import (
    LAM_FACTOR,
    BudgetConfig,
    BudgetPlan,
    DevicePlan,
    _layer_options,
    _resolved,
    _sensitivity,
    _shape_of,
    plan_budget,
)
from memopt.planning.cost import FORMATS, KV_BITS, KVPolicy, LayerWeights, ModelShape
from memopt.planning.plan import SolverReport
from memopt.solvers.budget_ilp import LayerOptions
from memopt.solvers.split_ilp import (
    SplitInfeasible,
    SplitProblem,
    SplitResult,
    Stage,
    smallest_split,
    solve_split,
    split_bound,
)
from memopt.frontend.targets import Cluster, Target, parse_cluster
from memopt.frontend.units import parse_bytes

MAX_SEARCH_DEVICES = 1024


@dataclass(frozen=True)
class _Bytes:
    bytes: int


@dataclass(frozen=True)
class _Layout:
    """One way to use the cluster: tensor-parallel degree t, stages of t consecutive devices."""

    tp: int
    groups: tuple[tuple[int, ...], ...]  # device indices per stage
    units: tuple[LayerWeights, ...]  # the planned layers (a tied embedding split in two across stages)


# ---------------------------------------------------------------- layers and stages
def _units(shape: ModelShape, stages: int) -> tuple[LayerWeights, ...]:
    """The planned layers; with several stages a tied embedding is stored twice: the table on the first
    stage, its copy as the LM head (with the final norm) on the last."""
    layers = cost.layer_weights(shape)
    if stages == 1 or layers[0].kind != "embed+head":
        return layers
    tied = layers[0]
    norm = shape.hidden * (2 if shape.layernorm_bias else 1)
    embed = LayerWeights(shape.embed_name, "embed", tied.matrices, max(tied.other_params - norm, 0))
    head = LayerWeights(f"lm_head (tied copy of {shape.embed_name})", "head", tied.matrices, norm)
    return (embed,) + layers[1:] + (head,)


def _pin(units: tuple[LayerWeights, ...], stages: int) -> tuple[int | None, ...]:
    return tuple(0 if u.kind in ("embed", "embed+head") else (stages - 1 if u.kind == "head" else None)
                 for u in units)


def _group_target(devices: list[Target]) -> Target:
    """A tensor-parallel group runs in lockstep: its slowest and smallest member sets the pace and the room."""
    if len({t.name for t in devices}) == 1:
        return devices[0]
    keys = set.intersection(*(set(t.flops) for t in devices)) or {"fp32"}
    return Target("+".join(t.name for t in devices), min(t.memory_bytes for t in devices),
                  min(t.bandwidth for t in devices), {k: min(t.flops_for(k) for t in devices) for k in keys},
                  min(t.host_link for t in devices), "tensor-parallel group of mixed devices")


def _tp_degrees(shape: ModelShape, cluster: Cluster, forced: int | None) -> list[int]:
    ok = [t for t in range(1, cluster.per_node + 1) if cluster.per_node % t == 0 and shape.kv_heads % t == 0]
    if forced is None:
        return ok
    if forced not in ok:
        raise ValueError(f"tensor_parallel {forced} is not possible on {cluster.name} for {shape.name} "
                         f"({shape.kv_heads} KV heads, {cluster.per_node} devices per node); choose one of "
                         f"{', '.join(map(str, ok))}")
    return [forced]


def _stage_options(shape: ModelShape, units: tuple[LayerWeights, ...], stages: int, tgt: Target, tp: int, link,
                   config: BudgetConfig, shares: list[float], sens: dict) -> tuple[LayerOptions, ...]:
    """Every planned layer's options on one device of a stage: the tensor-parallel share of its bytes and
    time, plus its all-reduces (blocks), all-reduce (embedding) or all-gather (LM head)."""
    tshape = cost.tensor_parallel_shape(shape, tp)
    tunits = _units(tshape, stages)
    out = []
    for unit, tunit, share in zip(units, tunits, shares):
        opts = _layer_options(tshape, tunit, tgt, config, share, sens)
        comm = 0.0
        if tp > 1 and unit.kind == "block":
            comm = cost.tp_block_comm_s(shape, tp, link, config.batch)
        elif tp > 1 and unit.kind in ("embed", "embed+head"):
            comm = cost.allreduce_time_s(config.batch * shape.hidden * cost.ACT_BYTES, tp, link)
        if tp > 1 and unit.kind in ("head", "embed+head"):
            comm += cost.allgather_time_s(config.batch * tshape.vocab * cost.LOGIT_BYTES, tp, link)
        if comm:
            opts = replace(opts, weights=tuple(replace(w, compute_s=w.compute_s + comm) for w in opts.weights))
        out.append(replace(opts, name=unit.name))
    return tuple(out)


def _stages(shape: ModelShape, cluster: Cluster, layout: _Layout, configs: list[BudgetConfig]) -> tuple[Stage, ...]:
    """Per stage: capacity (the smallest member's budget - reserve), fixed bytes (arena: logits only on the
    last stage; a receive buffer unless first, a send buffer unless last: one prefill chunk's hidden states
    each) and fixed time (sending one step's hidden states to the next stage)."""
    S, cfg = len(layout.groups), configs[0]
    tshape = cost.tensor_parallel_shape(shape, layout.tp)
    chunk = cfg.batch * (min(cfg.seq, cfg.prefill_chunk) if shape.decoder else cfg.seq) * shape.hidden * cost.ACT_BYTES
    out = []
    for s, group in enumerate(layout.groups):
        arena = cfg.arena_bytes if cfg.arena_bytes is not None else cost.arena_bytes(
            tshape, cfg.batch, cfg.seq, prefill_chunk=cfg.prefill_chunk, logits=s == S - 1)
        buffers = chunk * ((s > 0) + (s < S - 1))
        send = 0.0 if s == S - 1 else cost.send_time_s(cfg.batch * shape.hidden * cost.ACT_BYTES,
                                                       cluster.link(group[-1], layout.groups[s + 1][0]))
        cap = min(configs[d].budget_bytes - configs[d].reserve_bytes for d in group)
        names = sorted({cluster.devices[d].name for d in group})
        label = f"stage {s}: " + (f"device {group[0]}" if len(group) == 1 else f"devices {group[0]}-{group[-1]}")
        out.append(Stage(f"{label} ({'+'.join(names)})", max(cap, 0), arena + buffers, send, cfg.prefetch_buffers))
    return tuple(out)


def _problem(shape, cluster, layout, configs, sens, lam) -> SplitProblem:
    units, S = layout.units, len(layout.groups)
    total = sum(u.params for u in units)
    shares = [u.params / total for u in units]
    cache: dict = {}
    per_stage = []
    for group in layout.groups:
        key = tuple(cluster.devices[d].name for d in group)
        if key not in cache:
            tgt = _group_target([cluster.devices[d] for d in group])
            cache[key] = _stage_options(shape, units, S, tgt, layout.tp, cluster.intra_link, configs[group[0]],
                                        shares, sens)
        per_stage.append(cache[key])
    cfg = configs[0]
    return SplitProblem(_stages(shape, cluster, layout, configs), tuple(per_stage), _pin(units, S), cfg.objective,
                        lam, cfg.max_quality_loss)


def _layouts(shape: ModelShape, cluster: Cluster, degrees: list[int]) -> list[_Layout]:
    out = []
    D = len(cluster.devices)
    for tp in degrees:
        S = D // tp
        units = _units(shape, S)
        if S > len(units):
            continue  # every stage needs a layer
        out.append(_Layout(tp, tuple(tuple(range(s * tp, (s + 1) * tp)) for s in range(S)), units))
    return out


# ---------------------------------------------------------------- the plan
def plan_split(source_or_spec, *, target: str | Target | Cluster = "h100-80gb", devices: int | None = None,
               nodes: int | None = None, network: str | None = None, budget_bytes: int | str | None = None,
               batch: int = 1, seq: int | None = None, objective: str = "latency",
               max_quality_loss: float | None = None, lam: float | None = None,
               reserve_bytes: int | str | None = None, sensitivity: dict | None = None,
               arena_bytes: int | str | None = None, formats: tuple[str, ...] = FORMATS,
               kv_bits: tuple[int, ...] = KV_BITS, allow_host: bool = True, prefill_chunk: int = 2048,
               time_limit_s: float = 3.0, strict: bool = True, kv_host: bool = False,
               tensor_parallel: int | None = None) -> BudgetPlan:
    """Plan `source_or_spec` on several devices: `target` `4xh100-80gb`, `2x(rtx-4090)`,
    `1x(rtx-4090)+1x(rtx-3090)` or a device with `devices=N` (one node's devices), times `nodes`.
    `budget_bytes` and `reserve_bytes` are per device (default: each device's memory, min(1 GiB, 10%)).
    `tensor_parallel` forces a degree (default: the best of every possible one). The plan's `devices` say
    every device's stage, layer range, bytes, predicted peak and share of the step time.

    One device: exactly `plan_budget`. Raises `ValueError` (one line: the fullest device, what fills it, the
    least number of such devices that would fit and the budget per device that would) when no split fits;
    `strict=False` returns the least-overflow split with `fits=False`."""
    t0 = time.perf_counter()
    cluster = parse_cluster(target, devices=devices, nodes=nodes, network=network)
    kw = dict(budget_bytes=budget_bytes, batch=batch, seq=seq, objective=objective, max_quality_loss=max_quality_loss,
              lam=lam, reserve_bytes=reserve_bytes, sensitivity=sensitivity, arena_bytes=arena_bytes, formats=formats,
              kv_bits=kv_bits, allow_host=allow_host, prefill_chunk=prefill_chunk, strict=strict, kv_host=kv_host)
    if len(cluster.devices) == 1:
        if tensor_parallel not in (None, 1):
            raise ValueError(f"tensor_parallel {tensor_parallel} needs as many devices; target {cluster.name} has one")
        one = target if isinstance(target, (str, Target)) and devices is None and nodes is None else cluster.devices[0]
        return plan_budget(source_or_spec, target=one, time_limit_s=time_limit_s, **kw)
    shape = _shape_of(source_or_spec)
    parse = lambda v, what: None if v is None else parse_bytes(v, what=what)  # noqa: E731
    base = BudgetConfig(parse(budget_bytes, "budget"), batch, seq, objective, max_quality_loss, lam,
                        parse(reserve_bytes, "reserve"), parse(arena_bytes, "arena"), formats, kv_bits, allow_host,
                        prefill_chunk, time_limit_s=time_limit_s, kv_host=kv_host)
    configs = [_resolved(base, shape, t) for t in cluster.devices]
    sens = _sensitivity(sensitivity, cost.layer_weights(shape), shape)
    lam = base.lam if base.lam is not None else _default_lam(shape, cluster.devices[0], configs[0], sens)
    configs = [replace(c, lam=lam) for c in configs]
    layouts = _layouts(shape, cluster, _tp_degrees(shape, cluster, tensor_parallel))
    if not layouts:
        raise ValueError(f"{shape.name} has too few layers for {len(cluster.devices)} pipeline stages; "
                         "use fewer devices or allow tensor parallelism")
    tried, failures, skipped = _solve_layouts(shape, cluster, layouts, configs, sens, lam, time_limit_s)
    notes = _notes(shape, cluster, configs[0], tried, skipped)
    if tried:
        quality = objective == "quality"
        layout, prob, result = min(tried, key=lambda x: (round(x[2].quality_loss, 12) if quality else 0.0,
                                                          x[2].objective_value, x[0].tp))
    else:
        message = _infeasible_message(shape, cluster, configs, failures, lam, sens)
        if strict:
            raise ValueError(message)
        layout, prob, err = min(failures, key=lambda x: x[2].smallest.overflow_bytes)
        result = err.smallest
        notes.append(f"does not fit: {message}")
    return _plan(shape, cluster, layout, prob, result, configs, lam, tried, notes, time.perf_counter() - t0)


def _solve_layouts(shape, cluster, layouts, configs, sens, lam, time_limit_s):
    """Each layout's ILP in the order of its LP bound, sharing `time_limit_s`; a layout whose bound cannot
    beat the best plan so far is skipped. Returns (solved, infeasible, skipped)."""
    deadline = time.perf_counter() + time_limit_s
    probs = [(layout, _problem(shape, cluster, layout, configs, sens, lam)) for layout in layouts]
    bounds = [split_bound(prob) for _, prob in probs]
    order = sorted(range(len(probs)), key=lambda k: (bounds[k], probs[k][0].tp))
    tried, failures, skipped = [], [], []
    for rank, k in enumerate(order):
        layout, prob = probs[k]
        best = min((r.objective_value for _, _, r in tried), default=math.inf)
        if configs[0].objective == "latency" and math.isfinite(best) and bounds[k] >= best * (1 - 1e-9):
            skipped.append((layout, bounds[k]))
            continue
        share = max(0.25, (deadline - time.perf_counter()) / (len(order) - rank))
        try:
            tried.append((layout, prob, solve_split(prob, time_limit_s=share)))
        except SplitInfeasible as err:
            failures.append((layout, prob, err))
    return tried, failures, skipped


def _default_lam(shape: ModelShape, device: Target, config: BudgetConfig, sens: dict) -> float:
    """LAM_FACTOR x one device's decode time with every layer at its first format and first KV bits (the
    single-device planner's default), so that every layout weighs quality alike."""
    layers = cost.layer_weights(shape)
    total = sum(u.params for u in layers)
    opts = [_layer_options(shape, u, device, config, u.params / total, sens) for u in layers]
    return LAM_FACTOR * sum(o.weights[0].compute_s + (o.kv[0].compute_s if o.kv else 0.0) for o in opts)


def _notes(shape, cluster, config, tried, skipped) -> list[str]:
    notes = []
    if shape.max_positions and config.seq > shape.max_positions:
        notes.append(f"seq {config.seq} exceeds {shape.name}'s max_position_embeddings {shape.max_positions}: "
                     "planned anyway (memory and time scale as shown), but the model needs RoPE scaling to use it")
    if tried:
        notes.append("layouts tried (tensor-parallel degree x stages: objective): " + ", ".join(
            f"{lay.tp}x{len(lay.groups)}: {r.objective_value * 1e3:.3g} ms" for lay, _, r in tried) + "".join(
            f", {lay.tp}x{len(lay.groups)}: >= {b * 1e3:.3g} ms (its bound; not solved)" for lay, b in skipped))
    return notes


def _plan(shape, cluster, layout, prob, result: SplitResult, configs, lam, tried, notes, elapsed) -> BudgetPlan:
    tp, S = layout.tp, len(layout.groups)
    cfg = configs[0]
    devices = []
    total_time = sum(st.time_s for st in result.stages) or 1.0
    for s, (group, st) in enumerate(zip(layout.groups, result.stages)):
        arena = cfg.arena_bytes if cfg.arena_bytes is not None else cost.arena_bytes(
            cost.tensor_parallel_shape(shape, tp), cfg.batch, cfg.seq, prefill_chunk=cfg.prefill_chunk,
            logits=s == S - 1)
        for rank, d in enumerate(group):
            devices.append(DevicePlan(
                d, cluster.devices[d].name, cluster.node_of(d), s, rank, st.first, st.last,
                _range_label(layout.units, st.first, st.last), st.weights_bytes, st.kv_bytes, arena,
                st.fixed_bytes - arena, st.prefetch_bytes + st.kv_staging_bytes, st.peak_bytes,
                configs[d].budget_bytes, configs[d].reserve_bytes, st.time_s, st.time_s / total_time))
    ds = result.decisions
    counted = [t for t in range(S) for _ in layout.groups[t]]
    breakdown = {"weights_bytes": sum(result.stages[s].weights_bytes for s in counted),
                 "kv_bytes": sum(result.stages[s].kv_bytes for s in counted),
                 "prefetch_bytes": sum(result.stages[s].prefetch_bytes for s in counted),
                 "kv_staging_bytes": sum(result.stages[s].kv_staging_bytes for s in counted),
                 "fixed_bytes": sum(result.stages[s].fixed_bytes for s in counted)}
    prefill = _prefill_s(shape, cluster, layout, result, configs)
    decode = result.latency_s if shape.decoder else None
    solver = result.solver or SolverReport("split-ilp-cbc", "infeasible", elapsed, math.nan)
    solver = replace(solver, notes=f"{solver.notes}; tensor-parallel degree {tp} over {S} stage(s)")
    if any(d.placement == "host" or d.kv_placement == "host" for d in ds):
        notes = notes + [f"{sum(d.placement == 'host' for d in ds)} layer(s) stream their weights from host memory "
                         "over each device's own host link"]
    return BudgetPlan(shape.name, cluster.name, cfg, cfg.batch, cfg.seq, sum(c.budget_bytes for c in configs),
                      sum(c.reserve_bytes for c in configs), lam, result.fits, ds,
                      sum(d.peak_bytes for d in devices), prefill, decode, cfg.batch / decode if decode else None,
                      result.quality_loss, breakdown, solver, elapsed, tuple(notes), tuple(devices), tp,
                      cluster.to_json())


def _range_label(units: tuple[LayerWeights, ...], first: int, last: int) -> str:
    parts, blocks = [], []
    for i in range(first, last + 1):
        u = units[i]
        if u.kind == "block":
            blocks.append(int(u.name.rpartition(".")[2]))
        else:
            if blocks:
                parts.append(f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0]))
                blocks = []
            parts.append({"embed": "embed", "head": "head", "embed+head": "embed+head"}[u.kind])
    if blocks:
        parts.append(f"{blocks[0]}-{blocks[-1]}" if len(blocks) > 1 else str(blocks[0]))
    return ", ".join(parts)


def _prefill_s(shape, cluster, layout, result: SplitResult, configs) -> float:
    """Chunked prefill through the pipeline: stage s takes P_s over C chunks; chunks overlap across stages
    (stage s works on chunk k while stage s+1 works on chunk k-1): sum(P_s / C) + (C - 1) * max(P_s / C)."""
    cfg, tp, S = configs[0], layout.tp, len(layout.groups)
    tshape = cost.tensor_parallel_shape(shape, tp)
    tunits = _units(tshape, S)
    policy = KVPolicy(cfg.kv_group_size, cfg.kv_residual)
    chunk = min(cfg.seq, cfg.prefill_chunk) if shape.decoder else cfg.seq
    chunks = math.ceil(cfg.seq / chunk)
    per_stage = []
    for s, (group, st) in enumerate(zip(layout.groups, result.stages)):
        idx = range(st.first, st.last + 1)
        tgt = _group_target([cluster.devices[d] for d in group])
        choices = [cost.Choice(result.decisions[i].format, result.decisions[i].placement,
                               result.decisions[i].kv_bits or 16, result.decisions[i].kv_placement) for i in idx]
        p = cost.prefill_s(tshape, [tunits[i] for i in idx], choices, tgt, cfg.batch, cfg.seq,
                           prefill_chunk=cfg.prefill_chunk, policy=policy)
        blocks = sum(tunits[i].kind == "block" for i in idx)
        p += chunks * blocks * cost.tp_block_comm_s(shape, tp, cluster.intra_link, cfg.batch, chunk)
        if s < S - 1:
            p += chunks * cost.send_time_s(cfg.batch * chunk * shape.hidden * cost.ACT_BYTES,
                                           cluster.link(group[-1], layout.groups[s + 1][0]))
        per_stage.append(p / chunks)
    return sum(per_stage) + (chunks - 1) * max(per_stage)


# ---------------------------------------------------------------- when nothing fits
def _infeasible_message(shape, cluster, configs, failures, lam, sens) -> str:
    err = min((f[2] for f in failures), key=lambda e: e.smallest.overflow_bytes)
    over = err.smallest.overflow_bytes
    head = f"{shape.name} does not fit {cluster.name}: {err}"
    if err.dominant == "max_quality_loss":
        return head + "; raise max_quality_loss, the budget or the number of devices"
    kinds = sorted({t.name for t in cluster.devices})
    budget = max(c.budget_bytes for c in configs) + over
    smallest = min(cluster.devices, key=lambda t: t.memory_bytes)
    need = _min_devices(shape, smallest, configs[cluster.devices.index(smallest)], lam, sens, len(cluster.devices))
    fits = (f"at least {need} x {smallest.name} would fit" if need else
            f"no number of {smallest.name} up to {MAX_SEARCH_DEVICES} would fit")
    per = f"a budget of {budget / 2**30:.1f} GiB per device on these {len(cluster.devices)}"
    return (f"{head}; the binding constraint is that device's memory budget; {fits} (tensor and pipeline "
            f"parallel as the planner chooses), or {per}" + ("" if len(kinds) == 1 else
                                                                        " (the same budget raise on each)"))


def _fits_on(shape, device: Target, config: BudgetConfig, lam: float, sens: dict, count: int) -> bool:
    cluster = parse_cluster(device, devices=count)
    configs = [config] * count
    degrees = [t for t in range(1, count + 1) if count % t == 0 and shape.kv_heads % t == 0]
    for layout in _layouts(shape, cluster, degrees[::-1]):
        try:
            if smallest_split(_problem(shape, cluster, layout, configs, sens, lam),
                              time_limit_s=1.0).overflow_bytes <= 0:
                return True
        except ValueError:
            continue
    return False


def _min_devices(shape, device: Target, config: BudgetConfig, lam: float, sens: dict, have: int) -> int | None:
    """The least number of `device` (more than `have`) on which the smallest split fits, counting up from
    the bound that the smallest bytes of every layer give; None past MAX_SEARCH_DEVICES."""
    smallest = sum(min(o.bytes for o in _pair_bytes(opts)) for opts in
                   _stage_options(shape, cost.layer_weights(shape), 1, device, 1, None, config, [0.0] * len(
                       cost.layer_weights(shape)), {}))
    count = max(have + 1, math.ceil(smallest / max(config.budget_bytes - config.reserve_bytes, 1)))
    while count <= MAX_SEARCH_DEVICES:
        if _fits_on(shape, device, config, lam, sens, count):
            return count
        count += 1 if count < have + 32 else count // 4
    return None


def _pair_bytes(opts: LayerOptions):
    """Each weight option's device bytes with its layer's smallest KV option."""
    kv = min((k.bytes for k in opts.kv), default=0)
    return [_Bytes(w.device_bytes + kv) for w in opts.weights]


def is_multi_device(target, *, devices: int | None = None, nodes: int | None = None) -> bool:
    """Whether `target` (with `devices`, `nodes`) names more than one device."""
    return len(parse_cluster(target, devices=devices, nodes=nodes).devices) > 1


__all__ = ["plan_split", "is_multi_device"]
