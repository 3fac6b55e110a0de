"""The budget ILP: per layer, a weight format, a placement and KV-cache bits, so that the model fits.

Input: a `BudgetProblem` of plain numbers. Each layer lists weight options (format x placement, with
device bytes, prefetch-buffer bytes, compute and host-transfer seconds and a quality penalty) and KV
options (bits x placement, with device bytes, staging bytes, compute and host-transfer seconds, penalty);
the caller computes them (memopt/planning/cost.py does, for transformers). The solver knows only this algebra:

  layer time   = max(weight compute_s + KV compute_s, weight transfer_s + KV transfer_s)   (streamed
                 weights and a host-resident KV cache are prefetched one layer ahead over the one host
                 link, so their transfers overlap compute; FlexGen, ShadowKV)
  latency      = fixed_s + sum of layer times
  device bytes = fixed_bytes + sum(device_bytes + KV bytes) + prefetch_buffers * (max stream_bytes over
                 host-placed weights + max stream_bytes over host-placed KV caches)
                 (`buffers_per_streamed_layer`: min(prefetch_buffers, layers streamed) buffers of each kind,
                 as the offload passes allocate them; the levels below then also try one buffer, with at
                 most one layer streaming)
                                                                          <= budget - reserve
  penalty      = sum of the chosen options' penalties                     <= max_quality_loss
  objective    "latency": latency + lam * penalty;  "quality": penalty first, then latency + lam * penalty

Exact formulation: the two staging sizes (maxima over streamed weights and over host KV caches) are fixed
in turn at each candidate level pair (no streaming, or one streamed option's size), which leaves a
multiple-choice knapsack per level: identical layers form one class with an integer count per (weight, KV)
pair of options (pairs beaten on bytes, time, penalty and stream sizes are dropped). Levels are solved
with CBC (bundled with PuLP) in the order of their LP bounds; a level whose bound cannot beat the
incumbent is skipped; the reported gap is against the smallest bound left open.
Baseline (greedy): every layer starts at its own best option; while the plan does not fit, apply the
change with the smallest objective increase per byte saved. The better plan is kept.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field, replace

import pulp

from memopt.planning.plan import SolverReport
from memopt.frontend.units import fmt_bytes

WEIGHT_FORMATS = ("bf16", "int8", "int4:g64", "lossless")
PLACEMENTS = ("device", "host")
KV_BITS = (16, 8, 4, 2)
OBJECTIVES = ("latency", "quality")
GIB = 2**30
MIB = 2**20
GAP_REL = 1e-4  # CBC stops within 0.01% of its bound
# CBC 2.10 can report "optimal" for a worse plan, or "infeasible", when a plan sits within its tolerances of
# the budget (it raises its cutoff increment to the objective's granularity and discards the near-boundary plan;
# preprocessing on or off each fail on some problems). A level with at most EXACT_COMBINATIONS plans (counts
# per class of identical layers) is therefore enumerated exactly; larger ones go to CBC.
EXACT_COMBINATIONS = 20000
QUALITY_TOL = 1e-6  # absolute slack on max_quality_loss (penalties are O(1e-3); CBC's tolerance is 1e-7)


@dataclass(frozen=True)
class WeightOption:
    """A layer's weights in `format` at `placement`. A host option has device_bytes 0 and needs a
    prefetch buffer of `stream_bytes` on the device while it is in use."""

    format: str
    placement: str = "device"
    device_bytes: int = 0
    stream_bytes: int = 0
    compute_s: float = 0.0
    transfer_s: float = 0.0
    penalty: float = 0.0

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"WeightOption.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for key in ("device_bytes", "stream_bytes", "compute_s", "transfer_s", "penalty"):
            value = getattr(self, key)
            if not value >= 0 or (key != "transfer_s" and not math.isfinite(value)):
                raise ValueError(f"WeightOption.{key} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class KVOption:
    """A layer's KV cache at `bits` (16: full precision) at `placement`. `bytes` are device bytes: a host
    cache has 0 and needs a staging buffer of `stream_bytes` on the device while in use, and
    `transfer_s` of host-link time per decode step (its cache in, the new token's rows back)."""

    bits: int
    bytes: int
    compute_s: float = 0.0
    penalty: float = 0.0
    placement: str = "device"
    stream_bytes: int = 0
    transfer_s: float = 0.0

    def __post_init__(self):
        if self.bits not in KV_BITS:
            raise ValueError(f"KVOption.bits must be one of {KV_BITS}, got {self.bits!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"KVOption.placement must be one of {PLACEMENTS}, got {self.placement!r}")
        for key in ("bytes", "compute_s", "penalty", "stream_bytes", "transfer_s"):
            value = getattr(self, key)
            if not value >= 0 or (key != "transfer_s" and not math.isfinite(value)):
                raise ValueError(f"KVOption.{key} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class LayerOptions:
    """One layer's choices. `kv` empty: the layer has no KV cache (embeddings, LM head, encoders)."""

    name: str
    weights: tuple[WeightOption, ...]
    kv: tuple[KVOption, ...] = ()

    def __post_init__(self):
        if not self.weights:
            raise ValueError(f"layer {self.name!r} has no weight options; give it at least one")


@dataclass(frozen=True)
class BudgetProblem:
    """Everything the solver sees. `context` and `batch` only label error messages."""

    layers: tuple[LayerOptions, ...]
    budget_bytes: int
    reserve_bytes: int = 0
    fixed_bytes: int = 0  # always on the device: the activation arena
    fixed_s: float = 0.0
    prefetch_buffers: int = 2
    objective: str = "latency"
    lam: float = 0.0  # seconds of latency per unit of penalty
    max_quality_loss: float | None = None
    context: int = 0
    batch: int = 1
    fixed_label: str = "activation arena"
    # True: the passes allocate min(prefetch_buffers, layers streamed) buffers (passes/offload.py and
    # passes/kv_offload.py), so a plan streaming one layer holds one; False: always prefetch_buffers
    buffers_per_streamed_layer: bool = False
    fixed_hint: str = ""  # what to do when the fixed bytes dominate (default: _HINTS["fixed"])

    def __post_init__(self):
        if not self.layers:
            raise ValueError("BudgetProblem.layers is empty; give at least one layer")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for key in ("budget_bytes", "reserve_bytes", "fixed_bytes", "fixed_s", "lam"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"BudgetProblem.{key} must be a finite number >= 0, got {value!r}")
        if self.max_quality_loss is not None and not self.max_quality_loss >= 0:
            raise ValueError(f"max_quality_loss must be None or >= 0, got {self.max_quality_loss!r}")
        if not isinstance(self.prefetch_buffers, int) or self.prefetch_buffers < 1:
            raise ValueError(f"prefetch_buffers must be an int >= 1, got {self.prefetch_buffers!r}")

    @property
    def capacity_bytes(self) -> int:
        return self.budget_bytes - self.reserve_bytes


@dataclass(frozen=True)
class BudgetDecision:
    name: str
    format: str
    placement: str
    kv_bits: int | None  # None: no KV cache
    bytes: int  # device bytes: resident weights + KV cache
    weight_bytes: int
    kv_bytes: int
    stream_bytes: int
    time_s: float
    penalty: float
    kv_placement: str = "device"  # where the KV cache lives; "host": streamed into a staging buffer
    kv_stream_bytes: int = 0  # that staging buffer (one layer's cache)


@dataclass(frozen=True)
class BudgetResult:
    fits: bool
    decisions: tuple[BudgetDecision, ...]
    predicted_peak_bytes: int
    predicted_decode_s_per_token: float
    quality_loss: float
    objective_value: float
    breakdown: dict = field(default_factory=dict)  # weights / kv / prefetch / kv staging / fixed bytes on device
    solver: SolverReport | None = None


class BudgetInfeasible(ValueError):
    """No plan fits. `min_bytes`: the smallest plan; `dominant`: what is largest in it."""

    def __init__(self, message: str, *, min_bytes: int, budget_bytes: int, dominant: str, smallest: BudgetResult):
        super().__init__(message)
        self.min_bytes, self.budget_bytes, self.dominant, self.smallest = min_bytes, budget_bytes, dominant, smallest


# ---------------------------------------------------------------- classes and joint options
@dataclass(frozen=True)
class _Pair:
    w: WeightOption
    k: KVOption | None

    @property
    def bytes(self) -> int:
        return self.w.device_bytes + (self.k.bytes if self.k else 0)

    @property
    def time_s(self) -> float:
        return max(self.w.compute_s + (self.k.compute_s if self.k else 0.0),
                   self.w.transfer_s + (self.k.transfer_s if self.k else 0.0))

    @property
    def penalty(self) -> float:
        return self.w.penalty + (self.k.penalty if self.k else 0.0)

    @property
    def stream(self) -> int:
        return self.w.stream_bytes if self.w.placement == "host" else 0

    @property
    def kv_stream(self) -> int:
        return self.k.stream_bytes if self.k and self.k.placement == "host" else 0


def _pairs(layer: LayerOptions) -> list[_Pair]:
    """(weight, KV) pairs with finite time, minus those another pair beats on every count."""
    pairs = [_Pair(w, k) for w in layer.weights for k in (layer.kv or (None,))]
    pairs = [p for p in pairs if math.isfinite(p.time_s)]
    key = lambda p: (p.bytes, p.time_s, p.penalty, p.stream, p.kv_stream)  # noqa: E731
    keep = []
    for p in sorted(pairs, key=key):
        if not any(all(a <= b for a, b in zip(key(q), key(p))) for q in keep):
            keep.append(p)
    return keep


def _classes(prob: BudgetProblem) -> tuple[list[list[_Pair]], list[list[int]]]:
    """Layers with identical options (names aside) share one class: (pairs per class, members)."""
    index: dict[tuple, int] = {}
    pairs, members = [], []
    for i, layer in enumerate(prob.layers):
        sig = (layer.weights, layer.kv)
        if sig not in index:
            index[sig] = len(pairs)
            pairs.append(_pairs(layer))
            members.append([])
        members[index[sig]].append(i)
    for c, ps in enumerate(pairs):
        if not ps:
            raise ValueError(f"layer {prob.layers[members[c][0]].name!r} has no usable option: every option "
                             "streams from host with no host link (transfer_s infinite)")
    return pairs, members


def _score(prob: BudgetProblem, p: _Pair) -> tuple[float, float]:
    """Sort key of one pair: objective contribution (quality: penalty first)."""
    lat = p.time_s + prob.lam * p.penalty
    return (p.penalty, lat) if prob.objective == "quality" else (lat, 0.0)


def _result(prob: BudgetProblem, pairs, members, choice: list[int], solver: SolverReport | None) -> BudgetResult:
    """Assemble a result from `choice[layer] = pair index within its class`."""
    decisions = [None] * len(prob.layers)
    for c, mem in enumerate(members):
        for i in mem:
            p = pairs[c][choice[i]]
            decisions[i] = BudgetDecision(prob.layers[i].name, p.w.format, p.w.placement, p.k.bits if p.k else None,
                                          p.bytes, p.w.device_bytes, p.k.bytes if p.k else 0, p.stream, p.time_s,
                                          p.penalty, p.k.placement if p.k else "device", p.kv_stream)
    weights = sum(d.weight_bytes for d in decisions)
    kv = sum(d.kv_bytes for d in decisions)
    streamed = [d.stream_bytes for d in decisions if d.stream_bytes]
    kv_streamed = [d.kv_stream_bytes for d in decisions if d.kv_stream_bytes]
    prefetch = _buffers(prob, len(streamed)) * max(streamed, default=0)
    staging = _buffers(prob, len(kv_streamed)) * max(kv_streamed, default=0)
    peak = weights + kv + prefetch + staging + prob.fixed_bytes
    latency = prob.fixed_s + sum(d.time_s for d in decisions)
    penalty = sum(d.penalty for d in decisions)
    cap_ok = prob.max_quality_loss is None or penalty <= prob.max_quality_loss + QUALITY_TOL
    objective = latency + prob.lam * penalty
    return BudgetResult(peak <= prob.capacity_bytes and cap_ok, tuple(decisions), peak, latency, penalty,
                        objective, {"weights_bytes": weights, "kv_bytes": kv, "prefetch_bytes": prefetch,
                                    "kv_staging_bytes": staging, "fixed_bytes": prob.fixed_bytes}, solver)


def _key(prob: BudgetProblem, r: BudgetResult) -> tuple:
    if not r.fits:
        return (1, r.predicted_peak_bytes)
    if prob.objective == "quality":
        return (0, round(r.quality_loss, 12), r.objective_value)
    return (0, r.objective_value, 0.0)


def _buffers(prob: BudgetProblem, streamed: int) -> int:
    """Prefetch (or staging) buffers a plan streaming `streamed` layers holds."""
    return min(prob.prefetch_buffers, streamed) if prob.buffers_per_streamed_layer else prob.prefetch_buffers


# ---------------------------------------------------------------- greedy baseline
def _peak(prob, pairs, members, choice) -> int:
    total, stream, kv_stream, n, n_kv = prob.fixed_bytes, 0, 0, 0, 0
    for c, mem in enumerate(members):
        for i in mem:
            p = pairs[c][choice[i]]
            total, stream, kv_stream = total + p.bytes, max(stream, p.stream), max(kv_stream, p.kv_stream)
            n, n_kv = n + (p.stream > 0), n_kv + (p.kv_stream > 0)
    return total + _buffers(prob, n) * stream + _buffers(prob, n_kv) * kv_stream


def _greedy_choice(prob: BudgetProblem, pairs, members) -> list[int]:
    choice = [0] * len(prob.layers)
    cap = math.inf if prob.max_quality_loss is None else prob.max_quality_loss + QUALITY_TOL
    for c, mem in enumerate(members):
        best = min(range(len(pairs[c])), key=lambda j: _score(prob, pairs[c][j]))
        for i in mem:
            choice[i] = best
    pen = lambda: sum(pairs[c][choice[i]].penalty for c, m in enumerate(members) for i in m)  # noqa: E731
    if pen() > cap:  # start from the least penalty instead
        for c, mem in enumerate(members):
            best = min(range(len(pairs[c])), key=lambda j: (pairs[c][j].penalty, _score(prob, pairs[c][j])))
            for i in mem:
                choice[i] = best
    penalty = pen()
    while _peak(prob, pairs, members, choice) > prob.capacity_bytes:
        best = None
        seen = set()
        for c, mem in enumerate(members):
            for i in mem:
                if (c, choice[i]) in seen:
                    continue
                seen.add((c, choice[i]))
                cur = pairs[c][choice[i]]
                for j, p in enumerate(pairs[c]):
                    saved = cur.bytes - p.bytes
                    if saved <= 0 or penalty - cur.penalty + p.penalty > cap:
                        continue
                    a, b = _score(prob, p), _score(prob, cur)
                    ratio = ((a[0] - b[0]) / saved, (a[1] - b[1]) / saved)
                    if best is None or ratio < best[0]:
                        best = (ratio, i, j, p.penalty - cur.penalty)
        if best is None:
            break
        _, i, j, dpen = best
        choice[i], penalty = j, penalty + dpen
    return choice


def greedy_budget(prob: BudgetProblem) -> BudgetResult:
    """The baseline: each layer at its best option, then the cheapest bytes saved until the plan fits."""
    t0 = time.perf_counter()
    pairs, members = _classes(prob)
    r = _result(prob, pairs, members, _greedy_choice(prob, pairs, members), None)
    status = "feasible" if r.fits else "infeasible"
    return _with_report(r, SolverReport("budget-greedy", status, time.perf_counter() - t0, math.nan,
                                        r.objective_value, r.objective_value))


def _with_report(r: BudgetResult, report: SolverReport) -> BudgetResult:
    return replace(r, solver=report)


# ---------------------------------------------------------------- the ILP
def _ref(prob: BudgetProblem, pairs) -> float:
    """Scale for the latency objective, so that CBC sees numbers near 1."""
    return max(max((p.time_s for ps in pairs for p in ps), default=0.0), 1e-12) * len(prob.layers)


def _levels(prob: BudgetProblem, pairs) -> list[tuple[int, int, int, int]]:
    """Candidate (weight prefetch buffer, KV staging buffer) sizes: no streaming, or any streamed option's size;
    each with its number of buffers (with `buffers_per_streamed_layer`, also one buffer for one streamed layer)."""
    def counts(size: int) -> list[int]:
        if not size:
            return [0]
        return sorted({1, prob.prefetch_buffers}) if prob.buffers_per_streamed_layer else [prob.prefetch_buffers]

    weights = {0} | {p.stream for ps in pairs for p in ps}
    kv = {0} | {p.kv_stream for ps in pairs for p in ps}
    return sorted((w, k, nw, nk) for w in weights for k in kv for nw in counts(w) for nk in counts(k))


def _within(p: _Pair, level: tuple[int, int, int, int]) -> bool:
    return p.stream <= level[0] and p.kv_stream <= level[1]


def _charge(prob: BudgetProblem, level: tuple[int, int, int, int]) -> int:
    """Fixed bytes plus the level's buffers."""
    return prob.fixed_bytes + level[2] * level[0] + level[3] * level[1]


def _level_ok(prob: BudgetProblem, pairs, members, mode: str, level: tuple[int, int, int, int]) -> bool:
    """Every layer has an option streaming at most `level`, and (unless minimizing memory) the
    smallest such options fit."""
    smallest = [min((p.bytes for p in ps if _within(p, level)), default=None) for ps in pairs]
    if None in smallest:
        return False
    need = _charge(prob, level) + sum(len(m) * b for m, b in zip(members, smallest))
    return mode == "memory" or need <= prob.capacity_bytes


def _build(prob: BudgetProblem, pairs, members, mode: str, level: tuple[int, int, int, int], pen_cap: float | None = None):
    """The ILP with the staging buffers fixed at `level` bytes (only options streaming at most that).
    mode: "latency" (latency + lam * penalty), "penalty" or "memory". Returns (problem, counts) or None."""
    if not _level_ok(prob, pairs, members, mode, level):
        return None
    allowed = [[j for j, p in enumerate(ps) if _within(p, level)] for ps in pairs]
    charge = _charge(prob, level)
    lp = pulp.LpProblem("budget", pulp.LpMinimize)
    n = [{j: pulp.LpVariable(f"n{c}_{j}", 0, len(members[c]), cat="Integer") for j in allowed[c]}
         for c in range(len(pairs))]
    terms = [(pairs[c][j], v) for c in range(len(pairs)) for j, v in n[c].items()]
    for c in range(len(pairs)):
        lp += pulp.lpSum(n[c].values()) == len(members[c])
    if level[0] and level[2] < prob.prefetch_buffers:  # one buffer: at most one layer streams its weights
        lp += pulp.lpSum(v for p, v in terms if p.stream) <= level[2]
    if level[1] and level[3] < prob.prefetch_buffers:
        lp += pulp.lpSum(v for p, v in terms if p.kv_stream) <= level[3]
    memory = pulp.lpSum(p.bytes / MIB * v for p, v in terms) + charge / MIB
    penalty = pulp.lpSum(p.penalty * v for p, v in terms)
    ref = _ref(prob, pairs)
    latency = pulp.lpSum((p.time_s + prob.lam * p.penalty) / ref * v for p, v in terms)
    if mode != "memory":
        lp += memory <= (prob.capacity_bytes + 0.5) / MIB  # MiB units: CBC's 1e-7 tolerance is under a byte
    lp.memory_mib = memory  # `_solve_levels` tightens it when CBC's tolerances let a plan over by a few bytes
    cap = prob.max_quality_loss if pen_cap is None else pen_cap
    if cap is not None:
        lp += penalty <= cap
    lp += {"latency": latency, "penalty": penalty, "memory": memory}[mode]
    return lp, n


def solve_cbc(lp, time_limit_s: float, warm_start: bool, unsolved: str) -> str | None:
    """Solve `lp` with CBC within `time_limit_s` (to GAP_REL): None when it has an integer solution, else why
    not ("solver error: ...", "infeasible" or `unsolved`)."""
    try:
        lp.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=max(time_limit_s, 0.05), gapRel=GAP_REL,
                                   warmStart=warm_start))
    except pulp.PulpSolverError as err:
        return f"solver error: {err}"
    if lp.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
        infeasible = lp.status == pulp.LpStatusInfeasible or lp.sol_status == pulp.LpSolutionInfeasible
        return "infeasible" if infeasible else unsolved
    return None


def _run(lp, n, members, time_limit_s: float, warm: list[int] | None):
    """Solve; (choice per layer or None, status)."""
    if warm is not None and all(warm[i] in n[c] for c, mem in enumerate(members) for i in mem):
        for c, mem in enumerate(members):
            for j, v in n[c].items():
                v.setInitialValue(sum(warm[i] == j for i in mem))
    else:
        warm = None
    failed = solve_cbc(lp, time_limit_s, warm is not None, "no solution")
    if failed:
        return None, failed
    choice = [0] * sum(len(m) for m in members)
    for c, mem in enumerate(members):
        it = iter(mem)
        counts = {j: max(0, round(v.varValue or 0)) for j, v in n[c].items()}
        if sum(counts.values()) != len(mem):
            return None, "rounded counts do not add up"
        for j, k in counts.items():
            for _ in range(k):
                choice[next(it)] = j
    return choice, "optimal" if lp.sol_status == pulp.LpSolutionOptimal else "time_limit"


def _key_of(r: BudgetResult, mode: str) -> float:
    return {"latency": r.objective_value, "penalty": r.quality_loss, "memory": r.predicted_peak_bytes}[mode]


def _relaxed(prob: BudgetProblem, pairs, mode: str, lp) -> float | None:
    """Solve the LP relaxation of `lp` in place; its bound in the units of `_key_of`, or None if infeasible."""
    lp.solve(pulp.PULP_CBC_CMD(msg=False, mip=False))
    if lp.sol_status != pulp.LpSolutionOptimal:
        return None
    v = pulp.value(lp.objective) or 0.0
    return {"latency": prob.fixed_s + v * _ref(prob, pairs), "penalty": v, "memory": v * MIB}[mode]


def _exact(prob: BudgetProblem, pairs, members, mode: str, level: tuple[int, int, int, int],
           pen_cap: float | None) -> tuple[list[int] | None, str] | None:
    """The level's best plan by enumerating every count of each option per class (None when there are more
    than EXACT_COMBINATIONS of them): (choice or None, "optimal" or "infeasible")."""
    allowed = [[j for j, p in enumerate(ps) if _within(p, level)] for ps in pairs]
    total = 1
    for opts, mem in zip(allowed, members):
        total *= math.comb(len(mem) + len(opts) - 1, max(len(opts) - 1, 0)) if opts else 0
        if total > EXACT_COMBINATIONS:
            return None
    cap = prob.max_quality_loss if pen_cap is None else pen_cap
    best, best_key = None, math.inf
    for picks in itertools.product(*(itertools.combinations_with_replacement(opts, len(mem))
                                     for opts, mem in zip(allowed, members))):
        choice = [0] * len(prob.layers)
        for mem, js in zip(members, picks):
            for i, j in zip(mem, js):
                choice[i] = j
        chosen = [pairs[c][j] for c, js in enumerate(picks) for j in js]
        if level[0] and level[2] < prob.prefetch_buffers and sum(1 for p in chosen if p.stream) > level[2]:
            continue
        if level[1] and level[3] < prob.prefetch_buffers and sum(1 for p in chosen if p.kv_stream) > level[3]:
            continue
        r = _result(prob, pairs, members, choice, None)
        if mode != "memory" and not r.predicted_peak_bytes <= prob.capacity_bytes:
            continue
        if cap is not None and r.quality_loss > cap + QUALITY_TOL:
            continue
        if _key_of(r, mode) < best_key:
            best, best_key = choice, _key_of(r, mode)
    return (best, "optimal" if best is not None else "infeasible")


def _solve_levels(prob: BudgetProblem, pairs, members, mode: str, deadline: float, start: list[int] | None,
                  pen_cap: float | None = None):
    """One ILP per prefetch-buffer level (the max over streamed layers, made a constant). Levels are
    solved in the order of their LP bounds and skipped once a bound cannot beat the incumbent (`start`,
    if it fits, is the first incumbent). Returns (choice or None, status, lower bound)."""
    best, best_key = None, math.inf
    if start is not None:
        r = _result(prob, pairs, members, start, None)
        if r.fits or mode == "memory":
            best, best_key = start, _key_of(r, mode)
    models = []
    for level in _levels(prob, pairs):
        built = _build(prob, pairs, members, mode, level, pen_cap=pen_cap)
        if built is not None:
            bound = _relaxed(prob, pairs, mode, built[0])
            if bound is not None:
                models.append((bound, level, built))
    models.sort(key=lambda m: m[0])
    open_bounds = []
    for k, (bound, _, (lp, n)) in enumerate(models):
        if bound >= best_key - 1e-9 * abs(best_key):
            continue  # this level cannot beat the incumbent
        share = 1.0 if k == len(models) - 1 else 0.5  # the most promising level gets half of what is left
        exact = _exact(prob, pairs, members, mode, level, pen_cap)
        if exact is not None:
            choice, state = exact
            if choice is not None:
                r = _result(prob, pairs, members, choice, None)
                if _key_of(r, mode) < best_key:
                    best, best_key = choice, _key_of(r, mode)
            continue
        choice, state = _run(lp, n, members, (deadline - time.perf_counter()) * share, best)
        for margin in (64, 4096, 2**18):  # over by a few bytes (CBC's tolerances, ~1e-9 of the total): cut them off
            r = _result(prob, pairs, members, choice, None) if choice is not None else None
            over = r.predicted_peak_bytes - prob.capacity_bytes if r is not None and mode != "memory" else 0
            if not 0 < over <= MIB:
                break
            lp += lp.memory_mib <= (prob.capacity_bytes - margin) / MIB
            choice, state = _run(lp, n, members, max(deadline - time.perf_counter(), 0.05) * share, best)
        if state not in ("optimal", "infeasible"):
            open_bounds.append(bound)
        if choice is not None:
            r = _result(prob, pairs, members, choice, None)
            if (r.fits or mode == "memory") and _key_of(r, mode) < best_key:
                best, best_key = choice, _key_of(r, mode)
    lower = min(open_bounds + [best_key])
    if best is None:
        return None, "no solution within the time limit" if open_bounds else "infeasible", lower
    return best, "time_limit" if open_bounds else "optimal", lower


def solve_budget(prob: BudgetProblem, *, time_limit_s: float = 3.0) -> BudgetResult:
    """The best plan that fits, from the ILP and the greedy baseline (the better is kept).
    Raises `BudgetInfeasible` (a ValueError) with the smallest achievable plan when nothing fits."""
    t0 = time.perf_counter()
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s!r}")
    pairs, members = _classes(prob)
    start = _greedy_choice(prob, pairs, members)
    greedy = _result(prob, pairs, members, start, None)
    if not greedy.fits:  # the smallest plan may still fit (greedy can strand itself on prefetch buffers)
        start = _smallest_choice(prob, pairs, members)
    first = "penalty" if prob.objective == "quality" else "latency"
    share = 0.5 if first == "penalty" else 1.0
    choice, status, lower = _solve_levels(prob, pairs, members, first, t0 + time_limit_s * share, start)
    if choice is None:
        raise _infeasible(prob, status, time.perf_counter() - t0)
    best = _result(prob, pairs, members, choice, None)
    if first == "penalty":  # then the fastest plan among the least-penalty ones
        choice2, _, _ = _solve_levels(prob, pairs, members, "latency", t0 + time_limit_s, choice,
                                      pen_cap=best.quality_loss)
        best = _result(prob, pairs, members, choice2 or choice, None)
    if greedy.fits and _key(prob, greedy) <= _key(prob, best):
        best = greedy
    found = _key_of(best, first)
    gap = max(0.0, (found - lower) / lower) if lower > 0 else (0.0 if found <= lower else math.inf)
    kept = "ILP plan kept" if best is not greedy else (
        "greedy plan kept: the ILP proved it optimal" if status == "optimal"
        else "greedy plan kept: the ILP found nothing better")
    report = SolverReport("budget-ilp-cbc", status, time.perf_counter() - t0, gap, best.objective_value,
                          greedy.objective_value if greedy.fits else math.inf,
                          f"{len(pairs)} layer classes, {sum(map(len, pairs))} option pairs; {kept}"
                          + ("; gap on the quality penalty" if first == "penalty" else ""))
    return _with_report(best, report)


# ---------------------------------------------------------------- when nothing fits
def _smallest_choice(prob: BudgetProblem, pairs, members) -> list[int]:
    """Fewest device bytes, exactly: for each prefetch-buffer level, every layer takes its smallest option
    streaming at most that much; the best level wins."""
    best, best_peak = None, math.inf
    for level in _levels(prob, pairs):
        if not _level_ok(prob, pairs, members, "memory", level):
            continue
        choice = [0] * len(prob.layers)
        for c, mem in enumerate(members):
            j = min((j for j, p in enumerate(pairs[c]) if _within(p, level)),
                    key=lambda j: (pairs[c][j].bytes, pairs[c][j].penalty, pairs[c][j].time_s))
            for i in mem:
                choice[i] = j
        peak = _peak(prob, pairs, members, choice)
        if peak < best_peak:
            best, best_peak = choice, peak
    return best


def smallest_plan(prob: BudgetProblem, *, respect_quality_cap: bool = False) -> BudgetResult:
    """The plan with the fewest device bytes; with `respect_quality_cap`, the fewest within
    max_quality_loss (an ILP)."""
    pairs, members = _classes(prob)
    if respect_quality_cap and prob.max_quality_loss is not None:
        choice, _, _ = _solve_levels(prob, pairs, members, "memory", time.perf_counter() + 2.0, None)
        if choice is not None:
            return _result(prob, pairs, members, choice, None)
    return _result(prob, pairs, members, _smallest_choice(prob, pairs, members), None)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= 0.1 * GIB else fmt_bytes(n)


def _dominant(prob: BudgetProblem, r: BudgetResult) -> tuple[str, str]:
    b, ds = r.breakdown, r.decisions
    parts = {"kv": b["kv_bytes"], "weights": b["weights_bytes"],
             "prefetch": b["prefetch_bytes"] + b.get("kv_staging_bytes", 0), "fixed": b["fixed_bytes"]}
    kind = max(parts, key=parts.get)
    if kind == "kv":
        bits = min((d.kv_bits for d in ds if d.kv_bits is not None), default=16)
        where = f" at {prob.context} tokens" if prob.context else ""
        where += f" x batch {prob.batch}" if prob.batch > 1 else ""
        return kind, f"KV cache{where} needs {_gib(parts[kind])} even at {bits} bits"
    if kind == "weights":
        fmts = sorted({d.format for d in ds if d.weight_bytes})
        return kind, f"weights kept on the device need {_gib(parts[kind])} even at {'/'.join(fmts)}"
    if kind == "prefetch":
        return kind, (f"prefetch buffers for streaming from host need {_gib(parts[kind])} "
                      f"({prob.prefetch_buffers} x the largest streamed layer"
                      + (" and its KV cache)" if b.get("kv_staging_bytes") else ")"))
    return kind, f"the {prob.fixed_label} needs {_gib(parts[kind])}"


_HINTS = {"kv": "shorten the context or the batch, or raise the budget",
          "weights": "allow host offload or raise the budget", "prefetch": "raise the budget",
          "fixed": "shrink the activation arena (a shorter prefill chunk) or raise the budget",
          "max_quality_loss": "raise max_quality_loss or the budget"}


def _infeasible(prob: BudgetProblem, status: str, elapsed: float) -> BudgetInfeasible:
    small = smallest_plan(prob)
    budget = f"budget {_gib(prob.budget_bytes)}" + (f" minus {_gib(prob.reserve_bytes)} reserve"
                                                    if prob.reserve_bytes else "")
    if small.predicted_peak_bytes <= prob.capacity_bytes and prob.max_quality_loss is not None:
        capped = smallest_plan(prob, respect_quality_cap=True)
        msg = (f"max_quality_loss {prob.max_quality_loss:g} is binding: the smallest plan within it needs "
               f"{_gib(capped.predicted_peak_bytes)}, {budget}; without the cap the smallest plan needs "
               f"{_gib(small.predicted_peak_bytes)} (quality loss {small.quality_loss:.3g})")
        dominant = "max_quality_loss"
        small = capped
    else:
        dominant, what = _dominant(prob, small)
        msg = f"{what}; the smallest plan needs {_gib(small.predicted_peak_bytes)}, {budget}"
    msg += ": " + (prob.fixed_hint if dominant == "fixed" and prob.fixed_hint else _HINTS[dominant])
    if status != "infeasible":
        msg += f" (the ILP stopped early: {status}; a longer time_limit_s may find a plan)"
    report = SolverReport("budget-ilp-cbc", "infeasible", elapsed, math.nan, small.objective_value, math.inf,
                          f"no plan fits (ILP: {status}); this is the smallest plan")
    return BudgetInfeasible(msg, min_bytes=small.predicted_peak_bytes, budget_bytes=prob.budget_bytes,
                            dominant=dominant, smallest=_with_report(small, report))


__all__ = ["WEIGHT_FORMATS", "PLACEMENTS", "KV_BITS", "OBJECTIVES", "WeightOption", "KVOption", "LayerOptions",
           "BudgetProblem", "BudgetDecision", "BudgetResult", "BudgetInfeasible", "greedy_budget", "solve_budget",
           "smallest_plan"]
