"""The pipeline-split ILP: the budget ILP over several devices, choosing each layer's stage with its options.

Input: a `SplitProblem` of plain numbers. Stages are the pipeline's devices in order (a stage may be a
tensor-parallel group: its devices hold the same layers, each a share, and the caller prices them so);
`stage_layers[s][i]` are layer i's options priced on stage s (`LayerOptions` of solvers/budget_ilp.py: a
layer's bytes and time differ by device and tensor-parallel degree). The solver picks, per layer, a stage
and one (weight, KV) pair of that stage's options:

  contiguous   every stage holds one non-empty range of consecutive layers, the ranges in stage order
               (GPipe, Huang et al. 2019; PipeDream, Narayanan et al. 2019); `pin[i]` fixes a layer's stage
               (the embedding on the first, the LM head on the last)
  memory       per stage: fixed_bytes + sum(device + KV bytes) + prefetch_buffers * (its largest streamed
               weight + its largest host KV cache) <= capacity_bytes          (each device its own budget)
  stage time   T_s = fixed_s + sum of its layers' times (a layer's time as in the budget ILP)
  objective    "latency": S * max_s T_s + lam * penalty: the step time of a balanced split (equal to the
               summed stage times when the stages are balanced; imbalance is charged as the idle time a
               filled pipeline would waste, so the faster device takes more layers); "quality": the least
               penalty, then that

Exact formulation: consecutive layers with identical options on every stage (and the same pin) form a
segment; an integer n[g,s,j] counts segment g's layers on stage s with pair j. Within a segment any counts
are one contiguous order; across segments, binaries u[g,s] (segment g touches stage s) forbid a later
segment on an earlier stage. Each stage's prefetch-buffer and KV-staging sizes are chosen among the
candidate levels (0 or a streamed option's size) by binaries. One CBC model, warm-started from the greedy
baseline: each uniform (format, KV bits) choice, layers handed to the stage whose time grows least while
memory allows; the first that fits, and the better of the two plans is kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import pulp
from memopt.solvers.budget_ilp import (
    MIB,
    OBJECTIVES,
    QUALITY_TOL,
    BudgetDecision,
    LayerOptions,
    _Pair,
    _pairs,
    solve_cbc,
)

from memopt.planning.plan import SolverReport

GIB = 2**30


@dataclass(frozen=True)
class Stage:
    """One pipeline stage. `capacity_bytes`: what one of its devices may hold (budget - reserve);
    `fixed_bytes`: always there (activation arena, pipeline send/receive buffers); `fixed_s`: per decode
    step besides its layers (sending activations to the next stage)."""

    name: str
    capacity_bytes: int
    fixed_bytes: int = 0
    fixed_s: float = 0.0
    prefetch_buffers: int = 2

    def __post_init__(self):
        for key in ("capacity_bytes", "fixed_bytes", "fixed_s"):
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Stage.{key} must be a finite number >= 0, got {value!r}")


@dataclass(frozen=True)
class SplitProblem:
    stages: tuple[Stage, ...]
    stage_layers: tuple[tuple[LayerOptions, ...], ...]  # [stage][layer]
    pin: tuple[int | None, ...] = ()  # per layer: its stage, or None (free); empty: all free
    objective: str = "latency"
    lam: float = 0.0
    max_quality_loss: float | None = None

    def __post_init__(self):
        if not self.stages or len(self.stage_layers) != len(self.stages):
            raise ValueError(f"SplitProblem needs one layer list per stage: {len(self.stages)} stages, "
                             f"{len(self.stage_layers)} lists")
        n = len(self.stage_layers[0])
        if n == 0 or any(len(x) != n for x in self.stage_layers):
            raise ValueError("SplitProblem.stage_layers must list the same, non-empty layers on every stage")
        if self.pin and (len(self.pin) != n or any(p is not None and not 0 <= p < len(self.stages)
                                                   for p in self.pin)):
            raise ValueError(f"SplitProblem.pin must give one stage in 0..{len(self.stages) - 1} or None per layer")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")

    @property
    def layers(self) -> int:
        return len(self.stage_layers[0])

    def pinned(self, i: int) -> int | None:
        return self.pin[i] if self.pin else None


@dataclass(frozen=True)
class StageResult:
    first: int  # layer indices, inclusive
    last: int
    weights_bytes: int
    kv_bytes: int
    fixed_bytes: int
    prefetch_bytes: int
    kv_staging_bytes: int
    peak_bytes: int
    capacity_bytes: int
    time_s: float

    @property
    def layers(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True)
class SplitResult:
    fits: bool
    decisions: tuple[BudgetDecision, ...]
    stage_of: tuple[int, ...]
    stages: tuple[StageResult, ...]
    latency_s: float  # sum of stage times: one batch through every stage
    bottleneck_s: float  # the slowest stage
    quality_loss: float
    objective_value: float
    overflow_bytes: int  # max over stages of peak - capacity (<= 0 when it fits)
    solver: SolverReport | None = None


class SplitInfeasible(ValueError):
    """No split fits. `smallest`: the split with the least overflow; `binding`: its busiest stage's index;
    `dominant`: what is largest there (weights, kv, fixed, prefetch) or "max_quality_loss"."""

    def __init__(self, message: str, *, smallest: SplitResult, binding: int, dominant: str):
        super().__init__(message)
        self.smallest, self.binding, self.dominant = smallest, binding, dominant


# ---------------------------------------------------------------- segments and results
@dataclass
class _Model:
    prob: SplitProblem
    segments: list[list[int]] = field(default_factory=list)  # layer indices per segment
    pairs: dict = field(default_factory=dict)  # (g, s) -> list[_Pair]; only stages a segment may use

    def stages_of(self, g: int) -> list[int]:
        return sorted(s for (h, s) in self.pairs if h == g)


def _model(prob: SplitProblem) -> _Model:
    m = _Model(prob)
    sig_prev = None
    for i in range(prob.layers):
        sig = (tuple((o.weights, o.kv) for o in (prob.stage_layers[s][i] for s in range(len(prob.stages)))),
               prob.pinned(i))
        if sig != sig_prev:
            m.segments.append([])
        m.segments[-1].append(i)
        sig_prev = sig
    for g, seg in enumerate(m.segments):
        pin = prob.pinned(seg[0])
        for s in ([pin] if pin is not None else range(len(prob.stages))):
            ps = _pairs(prob.stage_layers[s][seg[0]])
            if not ps:
                raise ValueError(f"layer {prob.stage_layers[s][seg[0]].name!r} has no usable option on stage "
                                 f"{prob.stages[s].name}")
            m.pairs[g, s] = ps
    return m


def _assemble(m: _Model, counts: dict, solver: SolverReport | None) -> SplitResult:
    """`counts[(g, s, j)]` -> a result: each segment's layers in stage order, pairs in index order."""
    prob = m.prob
    decisions: list = [None] * prob.layers
    stage_of = [0] * prob.layers
    for g, seg in enumerate(m.segments):
        it = iter(seg)
        for s in m.stages_of(g):
            for j, p in enumerate(m.pairs[g, s]):
                for _ in range(counts.get((g, s, j), 0)):
                    i = next(it)
                    stage_of[i] = s
                    decisions[i] = _decision(prob.stage_layers[s][i].name, p)
    stages = []
    for s, st in enumerate(prob.stages):
        idx = [i for i in range(prob.layers) if stage_of[i] == s]
        ds = [decisions[i] for i in idx]
        w, kv = sum(d.weight_bytes for d in ds), sum(d.kv_bytes for d in ds)
        pre = st.prefetch_buffers * max((d.stream_bytes for d in ds), default=0)
        stg = st.prefetch_buffers * max((d.kv_stream_bytes for d in ds), default=0)
        t = st.fixed_s + sum(d.time_s for d in ds)
        stages.append(StageResult(idx[0] if idx else -1, idx[-1] if idx else -2, w, kv, st.fixed_bytes, pre, stg,
                                  w + kv + st.fixed_bytes + pre + stg, st.capacity_bytes, t))
    latency = sum(x.time_s for x in stages)
    bottleneck = max(x.time_s for x in stages)
    penalty = sum(d.penalty for d in decisions)
    overflow = max(x.peak_bytes - x.capacity_bytes for x in stages)
    contiguous = all(stage_of[i] <= stage_of[i + 1] for i in range(prob.layers - 1)) and all(
        x.layers >= 1 for x in stages)
    cap_ok = prob.max_quality_loss is None or penalty <= prob.max_quality_loss + QUALITY_TOL
    return SplitResult(overflow <= 0 and cap_ok and contiguous, tuple(decisions), tuple(stage_of), tuple(stages),
                       latency, bottleneck, penalty, len(stages) * bottleneck + prob.lam * penalty, overflow, solver)


def _decision(name: str, p: _Pair) -> BudgetDecision:
    return BudgetDecision(name, p.w.format, p.w.placement, p.k.bits if p.k else None, p.bytes, p.w.device_bytes,
                          p.k.bytes if p.k else 0, p.stream, p.time_s, p.penalty,
                          p.k.placement if p.k else "device", p.kv_stream)


def _key(prob: SplitProblem, r: SplitResult) -> tuple:
    if not r.fits:
        return (1, r.overflow_bytes, 0.0)
    if prob.objective == "quality":
        return (0, round(r.quality_loss, 12), r.objective_value)
    return (0, r.objective_value, 0.0)


# ---------------------------------------------------------------- greedy baseline
def _pair_key(p: _Pair) -> tuple:
    return (p.w.format, p.w.placement, p.k.bits if p.k else None, p.k.placement if p.k else None)


def _greedy(m: _Model) -> SplitResult | None:
    """For each uniform on-device (format, KV bits) of the free layers: the linear-partition greedy (fill
    each stage in order up to a time bound and its memory; bisect the least bound that places every layer),
    pinned layers at their best or their smallest on-device option. The best plan that fits, or None."""
    prob, S = m.prob, len(m.prob.stages)
    free = [g for g in range(len(m.segments)) if prob.pinned(m.segments[g][0]) is None]
    keys = {_pair_key(p) for g in free for s in range(S) for p in m.pairs.get((g, s), ())
            if not p.stream and not p.kv_stream}
    best = None
    for key in sorted(keys, key=str):
        for pinned_by in ("objective", "bytes"):
            counts = _bisect(m, free, key, pinned_by)
            if counts is not None:
                r = _assemble(m, counts, None)
                if r.fits and (best is None or _key(prob, r) < _key(prob, best)):
                    best = r
    return best


def _bisect(m: _Model, free: list[int], key: tuple, pinned_by: str) -> dict | None:
    hi = sum(st.fixed_s for st in m.prob.stages) + sum(
        max(p.time_s for ps in (m.pairs[g, s] for s in m.stages_of(g)) for p in ps) * len(seg)
        for g, seg in enumerate(m.segments))
    best = _fill(m, free, key, pinned_by, hi)
    if best is None:
        return None
    lo = 0.0
    for _ in range(40):
        mid = (lo + hi) / 2
        counts = _fill(m, free, key, pinned_by, mid)
        if counts is None:
            lo = mid
        else:
            best, hi = counts, mid
    return best


def _fill(m: _Model, free: list[int], key: tuple, pinned_by: str, bound: float) -> dict | None:
    """Layers in order onto stages in order: stay while the stage's time stays under `bound` and its memory
    under capacity (and enough layers remain for the stages still empty), else move on."""
    prob, S = m.prob, len(m.prob.stages)
    counts: dict = {}
    used = [st.fixed_bytes for st in prob.stages]
    busy = [st.fixed_s for st in prob.stages]
    has = [False] * S
    for g, seg in enumerate(m.segments):
        if g in free:
            continue
        s = prob.pinned(seg[0])
        ps = m.pairs[g, s]
        rank = (lambda p: (p.time_s + prob.lam * p.penalty, p.bytes)) if pinned_by == "objective" else (
            lambda p: (p.bytes, p.time_s + prob.lam * p.penalty))
        j = min((j for j, p in enumerate(ps) if not p.stream and not p.kv_stream), key=lambda j: rank(ps[j]),
                default=None)
        if j is None:
            return None
        counts[g, s, j] = len(seg)
        used[s] += len(seg) * ps[j].bytes
        busy[s] += len(seg) * ps[j].time_s
        has[s] = True
    left = sum(len(m.segments[g]) for g in free)
    s = 0
    for g, seg in enumerate(m.segments):
        if g not in free:
            s = max(s, prob.pinned(seg[0]))
            continue
        js = {t: next((j for j, p in enumerate(m.pairs[g, t]) if _pair_key(p) == key), None) for t in range(S)}
        for _ in seg:
            while s < S:
                j = js[s]
                empty_after = sum(not has[t] for t in range(s + 1, S))
                if j is not None and not (has[s] and left <= empty_after):
                    p = m.pairs[g, s][j]
                    if used[s] + p.bytes <= prob.stages[s].capacity_bytes and (
                            busy[s] + p.time_s <= bound or not has[s]):
                        counts[g, s, j] = counts.get((g, s, j), 0) + 1
                        used[s], busy[s], has[s], left = used[s] + p.bytes, busy[s] + p.time_s, True, left - 1
                        break
                s += 1
            else:
                return None
    return counts if all(has) and max(busy) <= bound * (1 + 1e-9) + 1e-12 else None


# ---------------------------------------------------------------- the ILP
def _ref(m: _Model) -> float:
    return max(max((p.time_s for ps in m.pairs.values() for p in ps), default=0.0), 1e-12) * m.prob.layers


def _build(m: _Model, mode: str, pen_cap: float | None = None):
    """mode "latency" | "penalty" | "memory" (the least overflow over capacities). Returns (lp, n)."""
    prob, S = m.prob, len(m.prob.stages)
    lp = pulp.LpProblem("split", pulp.LpMinimize)
    n = {(g, s, j): pulp.LpVariable(f"n{g}_{s}_{j}", 0, len(m.segments[g]), cat="Integer")
         for (g, s), ps in m.pairs.items() for j in range(len(ps))}
    for g, seg in enumerate(m.segments):
        lp += pulp.lpSum(v for (h, _, _), v in n.items() if h == g) == len(seg)
    on = {s: pulp.lpSum(v for (_, t, _), v in n.items() if t == s) for s in range(S)}
    for s in range(S):
        lp += on[s] >= 1
    movable = [g for g in range(len(m.segments)) if len(m.stages_of(g)) > 1]
    u = {(g, s): pulp.LpVariable(f"u{g}_{s}", cat="Binary") for g in movable for s in m.stages_of(g)}
    for (g, s), var in u.items():
        lp += pulp.lpSum(v for (h, t, _), v in n.items() if (h, t) == (g, s)) <= len(m.segments[g]) * var
    touch = lambda g, s: u.get((g, s), 1 if s in m.stages_of(g) else 0)  # noqa: E731
    for g in range(len(m.segments)):
        for h in range(g + 1, len(m.segments)):
            if g in movable or h in movable:
                for s in m.stages_of(g):
                    for t in m.stages_of(h):
                        if t < s:
                            lp += touch(g, s) + touch(h, t) <= 1
    if len(movable) == 1:  # identical middle stages are interchangeable: order them by their layer counts
        g = movable[0]
        for s in range(1, S - 2):
            if _same_stage(m, s, s + 1):
                lp += (pulp.lpSum(v for (h, t, _), v in n.items() if (h, t) == (g, s))
                       >= pulp.lpSum(v for (h, t, _), v in n.items() if (h, t) == (g, s + 1)))
    mem = {s: pulp.lpSum(m.pairs[g, t][j].bytes / MIB * v for (g, t, j), v in n.items() if t == s)
           + prob.stages[s].fixed_bytes / MIB + _levels(m, lp, n, s) for s in range(S)}
    ref = _ref(m)
    times = {s: pulp.lpSum(m.pairs[g, t][j].time_s / ref * v for (g, t, j), v in n.items() if t == s)
             + prob.stages[s].fixed_s / ref for s in range(S)}
    penalty = pulp.lpSum(m.pairs[g, s][j].penalty * v for (g, s, j), v in n.items())
    slowest = pulp.LpVariable("slowest", 0)
    for s in range(S):
        lp += times[s] <= slowest
    if mode == "memory":
        over = pulp.LpVariable("overflow")
        for s in range(S):
            lp += mem[s] - prob.stages[s].capacity_bytes / MIB <= over
        lp += over
    else:
        for s in range(S):
            lp += mem[s] <= (prob.stages[s].capacity_bytes + 0.5) / MIB
        lp += (S * slowest + prob.lam / ref * penalty) if mode == "latency" else penalty
    cap = prob.max_quality_loss if pen_cap is None else pen_cap
    if cap is not None and mode != "memory":
        lp += penalty <= cap + QUALITY_TOL / 2
    return lp, n


def _same_stage(m: _Model, s: int, t: int) -> bool:
    """Stages s and t hold the same kind of device with the same fixed bytes and time and no pinned layer."""
    prob = m.prob
    a, b = prob.stages[s], prob.stages[t]
    return ((a.capacity_bytes, a.fixed_bytes, a.fixed_s, a.prefetch_buffers)
            == (b.capacity_bytes, b.fixed_bytes, b.fixed_s, b.prefetch_buffers)
            and all((x.weights, x.kv) == (y.weights, y.kv) for x, y in zip(prob.stage_layers[s], prob.stage_layers[t]))
            and s not in prob.pin and t not in prob.pin)


def _levels(m: _Model, lp, n: dict, s: int):
    """Stage s's prefetch and KV staging buffers in MiB: one candidate level each, chosen by binaries;
    a streamed option is allowed only under a level at least its size."""
    prob, total = m.prob, 0
    for attr in ("stream", "kv_stream"):
        sizes = sorted({getattr(p, attr) for (g, t), ps in m.pairs.items() if t == s for p in ps} - {0})
        if not sizes:
            continue
        z = {lv: pulp.LpVariable(f"z{attr}{s}_{k}", cat="Binary") for k, lv in enumerate([0] + sizes)}
        lp += pulp.lpSum(z.values()) == 1
        for (g, t, j), v in n.items():
            need = getattr(m.pairs[g, t][j], attr)
            if t == s and need:
                lp += v <= len(m.segments[g]) * pulp.lpSum(var for lv, var in z.items() if lv >= need)
        total = total + prob.stages[s].prefetch_buffers * pulp.lpSum(lv / MIB * var for lv, var in z.items())
    return total


def _solve(m: _Model, lp, n: dict, time_limit_s: float, warm: SplitResult | None):
    if warm is not None:
        counts = _counts_of(m, warm)
        for key, v in n.items():
            v.setInitialValue(counts.get(key, 0))
    failed = solve_cbc(lp, time_limit_s, warm is not None, "no solution within the time limit")
    if failed:
        return None, failed
    counts = {k: max(0, round(v.varValue or 0)) for k, v in n.items()}
    if any(sum(c for (h, _, _), c in counts.items() if h == g) != len(seg) for g, seg in enumerate(m.segments)):
        return None, "rounded counts do not add up"
    return counts, "optimal" if lp.sol_status == pulp.LpSolutionOptimal else "time_limit"


def _counts_of(m: _Model, r: SplitResult) -> dict:
    counts: dict = {}
    for g, seg in enumerate(m.segments):
        for i in seg:
            s = r.stage_of[i]
            d = r.decisions[i]
            j = next(j for j, p in enumerate(m.pairs[g, s]) if _decision(d.name, p) == d)
            counts[g, s, j] = counts.get((g, s, j), 0) + 1
    return counts


def split_bound(prob: SplitProblem) -> float:
    """A lower bound on the objective of any split that fits (the LP relaxation, in seconds; objective
    "latency" only: "quality" returns 0); inf when even the relaxation cannot fit."""
    m = _model(prob)
    lp, _ = _build(m, "latency")
    lp.solve(pulp.PULP_CBC_CMD(msg=False, mip=False))
    if lp.sol_status != pulp.LpSolutionOptimal:
        return math.inf
    return 0.0 if prob.objective == "quality" else (pulp.value(lp.objective) or 0.0) * _ref(m)


def solve_split(prob: SplitProblem, *, time_limit_s: float = 3.0) -> SplitResult:
    """The best contiguous split with its formats and KV bits, from the ILP and the greedy baseline (the
    better is kept). Raises `SplitInfeasible` (a ValueError) with the least-overflow split when none fits.
    The gap is against the LP relaxation when the time limit stops the ILP."""
    t0 = time.perf_counter()
    if not time_limit_s > 0:
        raise ValueError(f"time_limit_s must be > 0, got {time_limit_s!r}")
    m = _model(prob)
    greedy = _greedy(m)
    first = "penalty" if prob.objective == "quality" else "latency"
    lp, n = _build(m, first)
    share = 0.5 if first == "penalty" else 1.0
    counts, status = _solve(m, lp, n, time_limit_s * share, greedy if first == "latency" else None)
    best = greedy
    if counts is not None:
        r = _assemble(m, counts, None)
        if first == "penalty":
            lp2, n2 = _build(m, "latency", pen_cap=r.quality_loss)
            counts2, _ = _solve(m, lp2, n2, max(time_limit_s - (time.perf_counter() - t0), 0.05), r)
            r = _assemble(m, counts2, None) if counts2 is not None else r
        if r.fits and (best is None or _key(prob, r) < _key(prob, best)):
            best = r
    if best is None:
        raise _infeasible(m, status, time.perf_counter() - t0)
    kept = "ILP plan kept" if best is not greedy else "greedy plan kept" + (
        ": the ILP proved it optimal" if status == "optimal" else ": the ILP found nothing better")
    gap = 0.0
    if status != "optimal":
        bound = split_bound(prob) if first == "latency" else math.nan
        gap = max(0.0, best.objective_value / bound - 1.0) if bound > 0 and math.isfinite(bound) else math.nan
    report = SolverReport("split-ilp-cbc", status, time.perf_counter() - t0, gap, best.objective_value,
                          greedy.objective_value if greedy is not None else math.inf,
                          f"{len(prob.stages)} stages, {len(m.segments)} layer segments, "
                          f"{sum(map(len, m.pairs.values()))} option pairs; {kept}")
    return replace(best, solver=report)


# ---------------------------------------------------------------- when nothing fits
def smallest_split(prob: SplitProblem, *, respect_quality_cap: bool = False,
                   time_limit_s: float = 2.0) -> SplitResult:
    """The split whose fullest stage overflows its capacity least (an ILP), without or within max_quality_loss."""
    m = _model(prob)
    lp, n = _build(m, "memory")
    if respect_quality_cap and prob.max_quality_loss is not None:
        penalty = pulp.lpSum(m.pairs[g, s][j].penalty * v for (g, s, j), v in n.items())
        lp += penalty <= prob.max_quality_loss + QUALITY_TOL / 2
    counts, status = _solve(m, lp, n, time_limit_s, None)
    if counts is None:
        raise ValueError(f"no contiguous split exists ({status}): every one of the {len(prob.stages)} stages "
                         f"needs at least one of the {prob.layers} layers")
    return _assemble(m, counts, None)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def _dominant(r: StageResult) -> tuple[str, str]:
    parts = {"weights": r.weights_bytes, "kv": r.kv_bytes, "fixed": r.fixed_bytes,
             "prefetch": r.prefetch_bytes + r.kv_staging_bytes}
    kind = max(parts, key=parts.get)
    what = {"weights": "weights", "kv": "KV cache", "fixed": "activation arena and pipeline buffers",
            "prefetch": "prefetch buffers"}[kind]
    return kind, f"{what} {_gib(parts[kind])}"


def _infeasible(m: _Model, status: str, elapsed: float) -> SplitInfeasible:
    prob = m.prob
    small = smallest_split(prob)
    if small.overflow_bytes <= 0 and prob.max_quality_loss is not None:
        capped = smallest_split(prob, respect_quality_cap=True)
        if capped.overflow_bytes > 0:
            small = capped
        s = max(range(len(small.stages)), key=lambda s: small.stages[s].peak_bytes - small.stages[s].capacity_bytes)
        msg = (f"max_quality_loss {prob.max_quality_loss:g} is binding: within it the fullest device "
               f"({prob.stages[s].name}) needs {_gib(small.stages[s].peak_bytes)} of "
               f"{_gib(small.stages[s].capacity_bytes)} usable")
        dominant = "max_quality_loss"
    else:
        s = max(range(len(small.stages)), key=lambda s: small.stages[s].peak_bytes - small.stages[s].capacity_bytes)
        dominant, what = _dominant(small.stages[s])
        st = small.stages[s]
        msg = (f"the fullest device ({prob.stages[s].name}) needs {_gib(st.peak_bytes)} of "
               f"{_gib(st.capacity_bytes)} usable even in the smallest split (most of it: {what})")
    if status not in ("infeasible",):
        msg += f" (the ILP stopped early: {status})"
    report = SolverReport("split-ilp-cbc", "infeasible", elapsed, math.nan, small.objective_value, math.inf,
                          f"no split fits (ILP: {status}); this is the least-overflow split")
    small = replace(small, fits=False, solver=report)
    return SplitInfeasible(msg, smallest=small, binding=s, dominant=dominant)


__all__ = ["Stage", "SplitProblem", "StageResult", "SplitResult", "SplitInfeasible", "solve_split", "split_bound",
           "smallest_split"]
