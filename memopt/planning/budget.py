"""`memopt compile --budget`: one plan that makes a model fit, from the roofline cost model and the budget ILP.

    plan = plan_budget("llama-3-8b", target="rtx-4090", seq=32768)
    print(format_budget_table(plan))

Per layer the planner picks a weight format (bf16, int8, int4:g64, lossless), a placement (device, or
host: streamed one block ahead into one of two prefetch buffers) and KV-cache bits (16, 8, 4, 2; KIVI)
and, with `kv_host`, the KV cache's placement (device, or host at 16 bits: streamed one layer ahead into
one of two staging buffers; passes/kv_offload.py), so that weights on device + KV cache on device +
activation arena + prefetch and staging buffers <= budget - reserve.
Objective "latency": predicted decode seconds per step + lam * quality penalty; "quality": the least
penalty, then the least latency. Works from a config alone (presets are never instantiated).

Default quality penalties (units: roughly the relative perplexity increase; a sensitivity dict
overrides them per layer): weights bf16 0, lossless 0 (bit-exact), int8 0.002, int4:g64 0.03, each
times the layer's share of the model's parameters (the LM head counts double: quantizing it hurts
more); KV cache 16 bits 0, 8 bits 0.001, 4 bits 0.005, 2 bits 0.03, each divided by the number of
layers. So all-int4 weights cost about 0.03 and a 2-bit cache everywhere 0.03. Default lam: 10 x the
decode time of the all-bf16, 16-bit-KV plan per unit of penalty (1% quality is worth 10% latency).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import resources

from memopt.planning import cost
from memopt.planning.captured import CapturedModel
from memopt.planning.cost import FORMATS, KV_BITS, KVPolicy, LayerWeights, ModelShape
from memopt.names import BLOCK_INDEX as _BLOCK_INDEX
from memopt.planning.plan import LayerDecision, Plan, SolverReport
from memopt.solvers.budget_ilp import (
    OBJECTIVES,
    BudgetDecision,
    BudgetInfeasible,
    BudgetProblem,
    KVOption,
    LayerOptions,
    WeightOption,
    solve_budget,
)
from memopt.frontend.targets import Target, get_target
from memopt.frontend.units import fmt_bytes, parse_bytes

CONFIG_VERSION = 1
WEIGHT_PENALTY = {"bf16": 0.0, "lossless": 0.0, "int8": 0.002, "int4:g64": 0.03}
KV_PENALTY = {16: 0.0, 8: 0.001, 4: 0.005, 2: 0.03}
HEAD_SENSITIVITY = 2.0
LAM_FACTOR = 10.0


@dataclass(frozen=True)
class BudgetConfig:
    """The budget planner's knobs. None: budget = the target's memory, reserve = min(1 GiB, budget / 10),
    seq = min(4096, the model's context), lam = LAM_FACTOR x the 16-bit plan's latency, arena from the
    cost model."""

    budget_bytes: int | None = None
    batch: int = 1
    seq: int | None = None
    objective: str = "latency"
    max_quality_loss: float | None = None
    lam: float | None = None
    reserve_bytes: int | None = None
    arena_bytes: int | None = None
    formats: tuple[str, ...] = FORMATS
    kv_bits: tuple[int, ...] = KV_BITS
    allow_host: bool = True
    prefill_chunk: int = 2048
    prefetch_buffers: int = 2
    kv_group_size: int = 32
    kv_residual: int = 128
    time_limit_s: float = 3.0
    kv_host: bool = False  # offer host-resident 16-bit KV caches (needs a host link)

    def __post_init__(self):
        object.__setattr__(self, "formats", tuple(self.formats))
        object.__setattr__(self, "kv_bits", tuple(self.kv_bits))
        for key in ("budget_bytes", "reserve_bytes", "arena_bytes"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{key} must be None or an int >= 0 (bytes), got {value!r}")
        for key in ("batch", "prefill_chunk", "prefetch_buffers", "kv_group_size"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if self.seq is not None and (not isinstance(self.seq, int) or self.seq < 1):
            raise ValueError(f"seq must be None or a positive int, got {self.seq!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for key in ("max_quality_loss", "lam"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value < math.inf):
                raise ValueError(f"{key} must be None or a finite number >= 0, got {value!r}")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {self.formats!r}")
        bad = [b for b in self.kv_bits if b not in KV_BITS]
        if bad or not self.kv_bits:
            raise ValueError(f"kv_bits must be a non-empty subset of {KV_BITS}, got {self.kv_bits!r}")
        for key in ("allow_host", "kv_host"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")
        if not isinstance(self.kv_residual, int) or self.kv_residual < 0:
            raise ValueError(f"kv_residual must be an int >= 0, got {self.kv_residual!r}")
        if not self.time_limit_s > 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s!r}")

    def to_json(self) -> dict:
        return {"type": "budget", "version": CONFIG_VERSION, **asdict(self), "formats": list(self.formats),
                "kv_bits": list(self.kv_bits)}

    @classmethod
    def from_json(cls, d: dict) -> "BudgetConfig":
        from memopt.jsonconfig import config_from_json

        return config_from_json(cls, d, "budget", CONFIG_VERSION)


@dataclass(frozen=True)
class DevicePlan:
    """One device of a multi-device plan (memopt/planning/split.py): its pipeline stage, its rank in the stage's
    tensor-parallel group, its contiguous range of planned layers (indices into the plan's decisions,
    inclusive) and what it holds. Bytes are this device's own (a tensor-parallel share)."""

    index: int
    device: str
    node: int
    stage: int
    tp_rank: int
    first: int
    last: int
    layers: str  # the range in words: "embed, 0-39", "40-79, head"
    weights_bytes: int
    kv_bytes: int
    arena_bytes: int
    pipeline_buffer_bytes: int  # activations received from the previous stage and sent to the next
    prefetch_bytes: int  # host-streamed weights' prefetch buffers and host-KV staging buffers
    peak_bytes: int
    budget_bytes: int
    reserve_bytes: int
    time_s: float  # its stage's share of one decode step (its layers, its all-reduces, its send)
    time_share: float

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.budget_bytes - self.reserve_bytes


@dataclass(frozen=True)
class BudgetPlan:
    model: str
    target: str
    config: BudgetConfig
    batch: int
    seq: int
    budget_bytes: int
    reserve_bytes: int
    lam: float
    fits: bool
    decisions: tuple[BudgetDecision, ...]
    predicted_peak_bytes: int
    predicted_prefill_s: float
    predicted_decode_s_per_token: float | None  # one decode step (batch tokens); None for encoders
    predicted_tokens_per_s: float | None
    quality_loss: float
    breakdown: dict
    solver: SolverReport
    planning_s: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    # several devices (memopt/planning/split.py); empty for one device, whose JSON has none of these keys
    devices: tuple[DevicePlan, ...] = ()
    tensor_parallel: int = 1
    cluster: dict | None = None

    def to_json(self) -> dict:
        s = self.solver
        multi = {"cluster": self.cluster, "tensor_parallel": self.tensor_parallel,
                 "pipeline_stages": len({d.stage for d in self.devices}),
                 "devices": [{**asdict(d), "fits": d.fits} for d in self.devices]} if self.devices else {}
        return {
            "model": self.model, "target": self.target, "batch": self.batch, "seq": self.seq, "fits": self.fits,
            "budget_bytes": self.budget_bytes, "reserve_bytes": self.reserve_bytes,
            "objective": self.config.objective, "lam": self.lam, "max_quality_loss": self.config.max_quality_loss,
            "predicted_peak_bytes": self.predicted_peak_bytes, "predicted_prefill_s": self.predicted_prefill_s,
            "predicted_decode_s_per_token": self.predicted_decode_s_per_token,
            "predicted_tokens_per_s": self.predicted_tokens_per_s, "quality_loss": self.quality_loss,
            "breakdown": dict(self.breakdown), "decisions": [asdict(d) for d in self.decisions],
            "solver": {"name": s.name, "status": s.status, "time_s": round(s.time_s, 4), "gap": _finite(s.gap),
                       "objective": _finite(s.objective), "baseline_objective": _finite(s.baseline_objective),
                       "notes": s.notes},
            "planning_s": round(self.planning_s, 4), "config": self.config.to_json(), "notes": list(self.notes),
            **multi,
        }

    def to_plan(self) -> Plan:
        """The decisions as a `Plan` for the passes: weight_format "native" for bf16; kv_policy the full
        `parse_kv_spec` string of the cache the planner priced, "kivi:k<bits>v<bits>:g<group>:r<residual>"
        (the config's `kv_group_size` and `kv_residual`), or "full" at 16 bits."""
        group, residual = self.config.kv_group_size, self.config.kv_residual
        decisions = tuple(LayerDecision(d.name, "native" if d.format == "bf16" else d.format, d.placement,
                                        "full" if d.kv_bits in (None, 16)
                                        else f"kivi:k{d.kv_bits}v{d.kv_bits}:g{group}:r{residual}", d.bytes,
                                        d.kv_placement)
                          for d in self.decisions)
        keys = ("predicted_peak_bytes", "predicted_prefill_s", "predicted_decode_s_per_token", "quality_loss", "fits")
        keys += ("cluster", "tensor_parallel", "pipeline_stages", "devices") if self.devices else ()
        j = self.to_json()
        return Plan(model=self.model, target=self.target, batch=self.batch, seq=self.seq, decisions=decisions,
                    predictions={k: j[k] for k in keys}, pass_configs={"budget": self.config.to_json()})


def _finite(x: float) -> float | None:
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


# ---------------------------------------------------------------- model and sensitivity
def _shape_of(source) -> ModelShape:
    """ModelShape from a preset name, an HF directory / GGUF path / builtin, a ModelSource, a config or its dict."""
    if isinstance(source, ModelShape):
        return source
    if isinstance(source, dict):
        return cost.model_shape(source)
    if isinstance(source, str):
        key = source.strip().lower()
        preset = resources.files("memopt").joinpath(f"data/presets/{key}.json")
        if "/" not in key and preset.is_file():  # the config is all we need: no torch, no model on meta
            return cost.model_shape(json.loads(preset.read_text()), name=key)
        from memopt.frontend.sources import resolve_source

        source = resolve_source(source, load_weights=False)
    config = getattr(source, "config", source)
    name = getattr(source, "name", "")
    if config is None or not hasattr(config, "__dict__"):
        raise ValueError(f"budget planning needs a transformers config; model {name or source!r} has none "
                         "(a file.py:factory module); plan a preset, an HF directory or a GGUF file")
    return cost.model_shape(config, name=name)


def _kv_key(key) -> int | None:
    if isinstance(key, int) and key in KV_BITS:
        return key
    if isinstance(key, str) and key.lower().startswith("kv") and key[2:].isdigit() and int(key[2:]) in KV_BITS:
        return int(key[2:])
    return None


def _sensitivity(sens: dict | None, layers: tuple[LayerWeights, ...], shape: ModelShape) -> dict:
    """{layer name: {format or KV bits: penalty}}; layer keys may be names or block indices."""
    if not sens:
        return {}
    names = {l.name: l.name for l in layers}
    out: dict[str, dict] = {}
    for key, table in sens.items():
        name = f"{shape.block_prefix}.{key}" if isinstance(key, int) else names.get(key)
        if isinstance(key, int) and not 0 <= key < shape.layers:
            name = None
        if name is None:
            raise ValueError(f"sensitivity names layer {key!r}, which this model lacks; use a block index "
                             f"0..{shape.layers - 1} or one of {', '.join(list(names)[:3])}, ..., {layers[-1].name}")
        entry = {}
        for k, v in dict(table).items():
            bits = _kv_key(k)
            if bits is None and k not in FORMATS:
                raise ValueError(f"sensitivity[{key!r}] has key {k!r}; use a format ({', '.join(FORMATS)}) "
                                 "or KV bits (kv16, kv8, kv4, kv2)")
            if not (isinstance(v, (int, float)) and 0 <= v < math.inf):
                raise ValueError(f"sensitivity[{key!r}][{k!r}] must be a finite number >= 0, got {v!r}")
            entry[bits if bits is not None else k] = float(v)
        out[name] = entry
    return out


def _weight_penalty(layer: LayerWeights, fmt: str, share: float, sens: dict) -> float:
    if fmt in sens.get(layer.name, {}):
        return sens[layer.name][fmt]
    factor = HEAD_SENSITIVITY if layer.kind in ("head", "embed+head") else 1.0
    return WEIGHT_PENALTY[fmt] * share * factor




def penalties_from_sqnr(table: dict, source_or_shape) -> dict:
    """Planner penalties `{block name: {format: penalty}}` from a measured `{linear: {format: sqnr_db}}`
    table (memopt.analysis.sensitivity.layer_sensitivity). A block's noise-to-signal ratio 10^(-SQNR/10), averaged
    over its linears, relative to the mean over all blocks for that format, scales the default penalty:
    a block k times noisier than average costs k times the default. Keeps the defaults' scale (all-int4
    ~0.03) and the measured ranking. Linears outside numbered blocks (the LM head) map to "lm_head";
    formats the planner does not choose (int4:g32, ...) are dropped."""
    shape = _shape_of(source_or_shape)
    layers = {l.name: l for l in cost.layer_weights(shape)}
    total = sum(l.params for l in layers.values())
    nsr: dict[str, dict[str, list[float]]] = {}
    for name, entry in table.items():
        m = _BLOCK_INDEX.search(str(name))
        block = f"{shape.block_prefix}.{m.group(1)}" if m else ("lm_head" if str(name).endswith("lm_head") else None)
        if block not in layers:
            continue
        for fmt, db in dict(entry).items():
            if fmt in WEIGHT_PENALTY and isinstance(db, (int, float)) and math.isfinite(db):
                nsr.setdefault(block, {}).setdefault(fmt, []).append(10 ** (-db / 10))
    means = {b: {f: sum(v) / len(v) for f, v in d.items()} for b, d in nsr.items()}
    out: dict[str, dict[str, float]] = {}
    for fmt in WEIGHT_PENALTY:
        vals = [d[fmt] for d in means.values() if fmt in d]
        avg = sum(vals) / len(vals) if vals else 0.0
        for block, d in means.items():
            if fmt in d and avg > 0:
                out.setdefault(block, {})[fmt] = _weight_penalty(layers[block], fmt, layers[block].params / total,
                                                                 {}) * d[fmt] / avg
    return out


# ---------------------------------------------------------------- problem
def _resolved(config: BudgetConfig, shape: ModelShape, target: Target) -> BudgetConfig:
    """Fill the defaults that depend on the model and target: budget, reserve, seq."""
    budget = target.memory_bytes if config.budget_bytes is None else config.budget_bytes
    reserve = min(2**30, budget // 10) if config.reserve_bytes is None else config.reserve_bytes
    if reserve >= budget:
        raise ValueError(f"reserve {fmt_bytes(reserve)} leaves nothing of budget {fmt_bytes(budget)}; "
                         "pass a smaller reserve_bytes or a larger budget")
    seq = config.seq or min(4096, shape.max_positions or 4096)
    return replace(config, budget_bytes=budget, reserve_bytes=reserve, seq=seq)


def _layer_options(shape: ModelShape, layer: LayerWeights, target: Target, config: BudgetConfig, share: float,
                   sens: dict) -> LayerOptions:
    """Weight options (format x placement) and KV options (bits) of one layer, priced by the cost model.
    Decoders: one decode step at context = seq. Encoders: one forward pass, attention included.
    With `config.kv_host` a block's 16-bit cache may also live on the host: no device bytes, a staging
    buffer of one layer's cache, and the cache's host-link time per step."""
    batch, seq, policy = config.batch, config.seq, KVPolicy(config.kv_group_size, config.kv_residual)
    tokens = 1 if shape.decoder else seq
    extra = cost.attention_time_s(shape, target, batch, seq, 0) if not shape.decoder and layer.kind == "block" else 0.0
    weights = []
    for fmt in (f for f in config.formats if layer.offers(f)):
        pen = _weight_penalty(layer, fmt, share, sens)
        compute = cost.weights_time_s(shape, layer, fmt, target, batch, tokens) + extra
        weights.append(WeightOption(fmt, "device", layer.bytes(fmt), 0, compute, 0.0, pen))
        if config.allow_host and target.host_link > 0:
            stream = cost.stream_bytes(shape, layer, fmt, batch, tokens)
            weights.append(WeightOption(fmt, "host", 0, stream, compute, cost.transfer_time_s(stream, target), pen))
    kv = ()
    exact = dict(layer.kv)  # a captured layer's caches, as the passes hold them (none: no generation program)
    if shape.decoder and layer.kind == "block" and (exact or not layer.stored):
        kv = tuple(KVOption(b, exact[b] if exact else cost.kv_layer_bytes(shape, batch, seq, b, policy),
                            cost.kv_decode_time_s(shape, target, batch, seq, b, policy),
                            sens.get(layer.name, {}).get(b, KV_PENALTY[b] / shape.layers))
                   for b in config.kv_bits if not exact or b in exact)
        if config.kv_host and target.host_link > 0 and any(k.bits == 16 for k in kv):  # the offload pass streams 16 bits
            full = next(k for k in kv if k.bits == 16)
            kv += (KVOption(16, 0, full.compute_s, full.penalty, "host", full.bytes,
                            cost.kv_transfer_time_s(shape, target, batch, seq, 16, policy)),)
    return LayerOptions(layer.name, tuple(weights), kv)


def _layers(shape: ModelShape, captured: CapturedModel | None) -> tuple[LayerWeights, ...]:
    """The planned units: the captured programs' (exact bytes) or the cost model's from the config."""
    if captured is None:
        return cost.layer_weights(shape)
    return tuple(replace(l, experts_per_token=min(shape.experts_per_token or 1, l.experts)) if l.experts else l
                 for l in captured.layers)


def budget_problem(shape: ModelShape, target: Target, config: BudgetConfig, *,
                   sensitivity: dict | None = None, captured: CapturedModel | None = None) -> BudgetProblem:
    """The solver's plain `BudgetProblem`: per-layer options from the cost model, the arena as fixed
    bytes, lam resolved (None: LAM_FACTOR x the first format's on-device latency with the first KV bits).
    `captured` (memopt/planning/captured.py): plan the captured programs' units, their exact bytes, the
    offload and KV passes' real staging slots, the planned arena and the tensors no unit holds."""
    config = _resolved(config, shape, target)
    layers = _layers(shape, captured)
    sens = _sensitivity(sensitivity, layers, shape)
    total = sum(l.params for l in layers)
    opts = tuple(_layer_options(shape, l, target, config, l.params / total, sens) for l in layers)
    lam = config.lam
    if lam is None:
        lam = LAM_FACTOR * sum(o.weights[0].compute_s + (o.kv[0].compute_s if o.kv else 0.0) for o in opts)
    arena = config.arena_bytes if config.arena_bytes is not None else (
        captured.arena_bytes if captured is not None else cost.arena_bytes(
            shape, config.batch, config.seq, prefill_chunk=config.prefill_chunk))
    if captured is not None:
        return BudgetProblem(opts, config.budget_bytes, config.reserve_bytes, arena + captured.fixed_bytes, 0.0,
                             config.prefetch_buffers, config.objective, lam, config.max_quality_loss,
                             config.seq if shape.decoder else 0, config.batch,
                             "activation arena and the tensors no layer holds", buffers_per_streamed_layer=True,
                             fixed_hint="compile a shorter --seq or a smaller --batch (the arena grows with them) "
                                        "or raise the budget")
    return BudgetProblem(opts, config.budget_bytes, config.reserve_bytes, arena, 0.0, config.prefetch_buffers,
                         config.objective, lam, config.max_quality_loss, config.seq if shape.decoder else 0,
                         config.batch)


def plan_budget(source_or_spec, *, target: str | Target = "h100-80gb", budget_bytes: int | str | None = None,
                batch: int = 1, seq: int | None = None, objective: str = "latency",
                max_quality_loss: float | None = None, lam: float | None = None,
                reserve_bytes: int | str | None = None, sensitivity: dict | None = None,
                arena_bytes: int | str | None = None, formats: tuple[str, ...] = FORMATS,
                kv_bits: tuple[int, ...] = KV_BITS, allow_host: bool = True, prefill_chunk: int = 2048,
                time_limit_s: float = 3.0, strict: bool = True, kv_host: bool = False,
                captured: CapturedModel | None = None) -> BudgetPlan:
    """Choose per layer a weight format, placement and KV bits so that `source_or_spec` (a preset, HF
    directory, GGUF file, ModelSource, transformers config or ModelShape) at (batch, seq) fits
    `budget_bytes` (default: the target's memory) minus `reserve_bytes` on `target`. `kv_host`: a block's
    KV cache may also be kept on the host and streamed one layer ahead (decision.kv_placement "host").
    `captured` (`memopt.planning.captured.captured_model`, what `memopt compile --budget` passes): plan the
    captured programs' tensors, so that the predicted bytes are the compiled artifact's.

    Raises `BudgetInfeasible` (a ValueError; one line naming the smallest achievable plan, the budget and
    what dominates) when nothing fits; with `strict=False` returns that smallest plan with `fits=False`.
    Byte arguments accept ints or strings such as "24GiB"."""
    t0 = time.perf_counter()
    tgt = get_target(target)
    shape = _shape_of(source_or_spec)
    parse = lambda v, what: None if v is None else parse_bytes(v, what=what)  # noqa: E731
    config = _resolved(BudgetConfig(parse(budget_bytes, "budget"), batch, seq, objective, max_quality_loss, lam,
                                    parse(reserve_bytes, "reserve"), parse(arena_bytes, "arena"), formats, kv_bits,
                                    allow_host, prefill_chunk, time_limit_s=time_limit_s, kv_host=kv_host),
                      shape, tgt)
    notes = []
    if shape.max_positions and config.seq > shape.max_positions:
        notes.append(f"seq {config.seq} exceeds {shape.name}'s max_position_embeddings {shape.max_positions}: "
                     "planned anyway (memory and time scale as shown), but the model needs RoPE scaling to use it")
    if (allow_host or kv_host) and not tgt.host_link > 0:
        notes.append(f"{tgt.name} has no host link: host placement disabled")
    if not shape.decoder:
        notes.append("encoder: latency is one forward pass at (batch, seq); there is no KV cache")
    problem = budget_problem(shape, tgt, config, sensitivity=sensitivity, captured=captured)
    try:
        result = solve_budget(problem, time_limit_s=time_limit_s)
    except BudgetInfeasible as err:
        if strict:
            raise
        result = err.smallest
        notes.append(f"does not fit: {err}")
    choices = [cost.Choice(d.format, d.placement, d.kv_bits or 16, d.kv_placement) for d in result.decisions]
    prefill = cost.prefill_s(shape, _layers(shape, captured), choices, tgt, batch, config.seq,
                             prefill_chunk=prefill_chunk, policy=KVPolicy(config.kv_group_size, config.kv_residual))
    decode = result.predicted_decode_s_per_token if shape.decoder else None
    breakdown = dict(result.breakdown)
    if captured is not None:  # the fixed bytes, apart: what the arena and the tensors outside every layer hold
        breakdown.update(arena_bytes=breakdown["fixed_bytes"] - captured.fixed_bytes, other_bytes=captured.fixed_bytes)
        notes += list(captured.notes)
    return BudgetPlan(shape.name, tgt.name, config, batch, config.seq, config.budget_bytes, config.reserve_bytes,
                      problem.lam, result.fits, result.decisions, result.predicted_peak_bytes, prefill, decode,
                      batch / decode if decode else None, result.quality_loss, breakdown,
                      result.solver, time.perf_counter() - t0, tuple(notes))


# ---------------------------------------------------------------- printing
def _runs(decisions) -> list[tuple[str, BudgetDecision, int]]:
    """Consecutive layers with the same decision, as (label, decision, count)."""
    runs: list[list] = []
    for d in decisions:
        key = (d.format, d.placement, d.kv_bits, d.kv_placement, d.bytes, d.stream_bytes)
        head, _, idx = d.name.rpartition(".")
        if runs and runs[-1][3] == key and idx.isdigit() and runs[-1][4] == head:
            runs[-1][2] += 1
            runs[-1][0] = f"{runs[-1][5]}-{idx}"
        else:
            runs.append([d.name, d, 1, key, head if idx.isdigit() else None, d.name])
    return [(r[0], r[1], r[2]) for r in runs]


def format_budget_table(plan: BudgetPlan, *, group: bool = True) -> str:
    """Per layer (consecutive identical layers on one line when `group`): format, placement, KV bits and
    KV placement, device bytes; then the predicted peak against the budget, prefill time and decode speed.
    A multi-device plan (memopt/planning/split.py) prints one row per device first, then each stage's layers."""
    if plan.devices:
        return _format_devices(plan, group=group)
    lines = [f"model    {plan.model}, batch {plan.batch}, seq {plan.seq}, objective {plan.config.objective}",
             f"target   {plan.target}: budget {fmt_bytes(plan.budget_bytes)}, reserve {fmt_bytes(plan.reserve_bytes)}",
             "", f"  {'layer':<34}{'format':<10}{'place':<8}{'KV bits':>8}{'KV at':>7}{'device bytes':>14}"
                 f"{'layers':>8}"]
    rows = _runs(plan.decisions) if group else [(x.name, x, 1) for x in plan.decisions]
    for label, x, n in rows:
        kv, at = ("-", "-") if x.kv_bits is None else (str(x.kv_bits), x.kv_placement)
        lines.append(f"  {label[:33]:<34}{x.format:<10}{x.placement:<8}{kv:>8}{at:>7}{fmt_bytes(x.bytes):>14}{n:>8}")
    b = plan.breakdown
    lines += ["", f"  {'weights on device':<34}{fmt_bytes(b['weights_bytes']):>14}",
              f"  {'KV cache':<34}{fmt_bytes(b['kv_bytes']):>14}",
              f"  {'activation arena':<34}{fmt_bytes(b.get('arena_bytes', b['fixed_bytes'])):>14}",
              *([f"  {'tensors outside every layer':<34}{fmt_bytes(b['other_bytes']):>14}"] if "other_bytes" in b
                else []),
              f"  {'prefetch buffers':<34}{fmt_bytes(b['prefetch_bytes']):>14}",
              *([f"  {'KV staging buffers (host KV)':<34}{fmt_bytes(b['kv_staging_bytes']):>14}"]
                if b.get("kv_staging_bytes") else []),
              f"  {'predicted peak':<34}{fmt_bytes(plan.predicted_peak_bytes):>14}   of "
              f"{fmt_bytes(plan.budget_bytes - plan.reserve_bytes)} usable "
              f"({'fits' if plan.fits else 'does NOT fit'})", ""]
    lines.append(f"prefill  {plan.predicted_prefill_s:.3g} s for {plan.batch} x {plan.seq} tokens")
    if plan.predicted_decode_s_per_token is not None:
        lines.append(f"decode   {plan.predicted_decode_s_per_token * 1e3:.3g} ms per step "
                     f"({plan.predicted_tokens_per_s:.3g} tokens/s at batch {plan.batch}, context {plan.seq})")
    return "\n".join(lines + _footer(plan))


def _footer(plan: BudgetPlan) -> list[str]:
    lines = [f"quality  penalty {plan.quality_loss:.3g} (lam {plan.lam:.3g} s per unit)"]
    s = plan.to_json()["solver"]
    gap = "n/a" if s["gap"] is None else f"{s['gap']:.2%}"
    lines.append(f"solver   {s['name']}: {s['status']}, {s['time_s']:.2f} s, gap {gap}; {s['notes']}")
    return lines + [f"note: {n}" for n in plan.notes]


def _format_devices(plan: BudgetPlan, *, group: bool = True) -> str:
    """One row per device (node, stage, layer range, weights, KV, arena + buffers, peak, usable budget,
    share of the step time), then each stage's layers as in the one-device table."""
    c = plan.cluster or {}
    link = c.get("intra_link") or {}
    net = c.get("network")
    stages = sorted({d.stage for d in plan.devices})
    lines = [f"model    {plan.model}, batch {plan.batch}, seq {plan.seq}, objective {plan.config.objective}",
             f"target   {plan.target}: {len(plan.devices)} devices in {c.get('nodes', 1)} node(s), "
             f"tensor parallel {plan.tensor_parallel} x {len(stages)} pipeline stage(s)",
             f"links    in a node {link.get('name', '-')} ({link.get('bandwidth', 0) / 1e9:.3g} GB/s, "
             f"{link.get('latency_s', 0) * 1e6:.3g} us)" + (
                 f"; between nodes {net['name']} ({net['bandwidth'] / 1e9:.3g} GB/s, {net['latency_s'] * 1e6:.3g} us)"
                 if net else ""),
             f"budget   per device: its memory or --budget, less a reserve of "
             f"{fmt_bytes(plan.devices[0].reserve_bytes)} (CUDA context, NCCL buffers); share: of a decode step",
             "",
             f"  {'device':<16}{'node':>5}{'stage':>6}  {'layers':<18}{'weights':>11}{'KV':>11}{'arena+bufs':>12}"
             f"{'peak':>11}{'budget':>11}{'share':>7}"]
    for d in plan.devices:
        lines.append(f"  {f'{d.index} {d.device}'[:15]:<16}{d.node:>5}{d.stage:>6}  {d.layers[:17]:<18}"
                     f"{fmt_bytes(d.weights_bytes):>11}{fmt_bytes(d.kv_bytes):>11}"
                     f"{fmt_bytes(d.arena_bytes + d.pipeline_buffer_bytes + d.prefetch_bytes):>12}"
                     f"{fmt_bytes(d.peak_bytes):>11}{fmt_bytes(d.budget_bytes):>11}"
                     f"{d.time_share:>7.0%}" + ("" if d.fits else "  over"))
    lines += ["", f"  {'layer (bytes per device)':<34}{'format':<10}{'place':<8}{'KV bits':>8}{'KV at':>7}"
                  f"{'device bytes':>14}{'layers':>8}"]
    for s in stages:
        first = next(d for d in plan.devices if d.stage == s)
        ids = [d.index for d in plan.devices if d.stage == s]
        lines.append(f"  stage {s} (device{'s' if len(ids) > 1 else ''} "
                     f"{ids[0] if len(ids) == 1 else f'{ids[0]}-{ids[-1]}'})")
        chosen = plan.decisions[first.first:first.last + 1]
        rows = _runs(chosen) if group else [(x.name, x, 1) for x in chosen]
        for label, x, n in rows:
            kv, at = ("-", "-") if x.kv_bits is None else (str(x.kv_bits), x.kv_placement)
            lines.append(f"    {label[:31]:<32}{x.format:<10}{x.placement:<8}{kv:>8}{at:>7}{fmt_bytes(x.bytes):>14}"
                         f"{n:>8}")
    worst = max(plan.devices, key=lambda d: d.peak_bytes / max(d.budget_bytes - d.reserve_bytes, 1))
    lines += ["", f"fits     {'yes' if plan.fits else 'NO'}: the fullest device ({worst.index}) at "
                  f"{fmt_bytes(worst.peak_bytes)} of {fmt_bytes(worst.budget_bytes - worst.reserve_bytes)} usable",
              f"prefill  {plan.predicted_prefill_s:.3g} s for {plan.batch} x {plan.seq} tokens"]
    if plan.predicted_decode_s_per_token is not None:
        lines.append(f"decode   {plan.predicted_decode_s_per_token * 1e3:.3g} ms per step "
                     f"({plan.predicted_tokens_per_s:.3g} tokens/s at batch {plan.batch}, context {plan.seq})")
    return "\n".join(lines + _footer(plan))


__all__ = ["BudgetConfig", "BudgetPlan", "BudgetInfeasible", "plan_budget", "budget_problem", "format_budget_table",
           "penalties_from_sqnr", "WEIGHT_PENALTY", "KV_PENALTY"]
