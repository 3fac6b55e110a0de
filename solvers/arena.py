"""Arena planning: one offset per activation inside a single shared buffer (dynamic storage allocation).

Baseline: the greedy-by-size planner of TFLite's arena (largest tensor first, best-fit gap), run beside a
first-fit variant; the smaller plan wins. Exact: the DSA ILP of OLLA (Steiner et al., 2022) and MODeL
(Steiner et al., 2023): an integer offset per tensor in units of `alignment`, a binary per pair of tensors
whose lifetimes overlap, big-M non-overlap rows, minimize the arena (bytes, so the topmost tensor's padding
does not count). The live-set bound is a cut; the greedy plan is the warm start.

Scale (LLM graphs have thousands of tensors): the timeline is cut where no tensor is live across, and, in
stretches over `max_segment_tensors` tensors, at block boundaries (or the least-crossed op). Tensors that
span a cut are pinned first (greedy among themselves) and become fixed obstacles; any op boundary that
only pinned tensors cross is then a free cut too. Each segment is solved from offset 0; identical segments
(same relative (start, end, size) list and obstacles) are solved once and copied; segments that cannot
raise the arena above the bound stay greedy; the rest share the time limit, trying an iterated greedy
(local search) first and the ILP after. Every plan is verified; greedy is the fallback.
Sizes: `size_bytes` bytes; offsets in bytes, multiples of `alignment`.
"""

from __future__ import annotations

import bisect
import math
import random
import time
from dataclasses import dataclass, field
from itertools import accumulate

import pulp

from memopt.planning.plan import ArenaPlan
from memopt.solvers.arena_greedy import (DEFAULT_KINDS, _best_greedy, _fixed_top, _greedy_offsets, _Items, _items,
                                         _lower_bound, _plan, _top_bytes, greedy_arena, no_reuse_bytes,
                                         verify_arena)
from memopt.solvers.memgraph import MemGraph
from memopt.solvers.milp import SOLVERS, check_highs, run_milp

MIN_ILP_TIME_S = 0.02  # below this a CBC start costs more than it can win
MAX_PAIRS = 20_000  # overlapping pairs per segment ILP; above it the segment stays greedy



# ---------------------------------------------------------------- the ILP for one segment
def _overlap_pairs(starts, ends, units, limit: int) -> list[tuple[int, int]] | None:
    """Pairs (i, j) of nonzero items whose lifetimes overlap; None once there are more than `limit`."""
    pairs, active = [], []
    for i in sorted((i for i in range(len(starts)) if units[i]), key=lambda i: starts[i]):
        active = [j for j in active if ends[j] >= starts[i]]
        pairs.extend((j, i) for j in active)
        if len(pairs) > limit:
            return None
        active.append(i)
    return pairs


@dataclass
class _Segment:
    """One unique segment: items in canonical order, times relative to its first op, pinned obstacles."""

    starts: list[int]
    ends: list[int]
    sizes: list[int]
    units: list[int]
    fixed: list[tuple[int, int, int, int, int]]
    members: list[list[int]]  # item indices of every occurrence, in canonical order
    offs: list[int] = field(default_factory=list)
    top: int = 0
    lb: int = 0


def _ilp_segment(sg: _Segment, floor_bytes: int, a: int, time_limit_s: float, solver: str):
    """Solve one segment's DSA ILP warm-started from `sg.offs`. Returns (offsets in units or None, state)."""
    s, e, u, warm = sg.starts, sg.ends, sg.units, sg.offs
    pairs = _overlap_pairs(s, e, u, MAX_PAIRS)
    touch = [(i, f) for i in range(len(s)) if u[i] for f in sg.fixed if f[0] <= e[i] and s[i] <= f[1]]
    if pairs is None or len(pairs) + len(touch) > MAX_PAIRS:
        return None, f"over {MAX_PAIRS} overlapping pairs"
    gcd = math.gcd(*u, *warm, *(v for f in sg.fixed for v in f[2:4])) or 1
    big = max([w + v for w, v in zip(warm, u)] + [f[2] + f[3] for f in sg.fixed]) // gcd
    us = [v // gcd for v in u]
    prob = pulp.LpProblem("arena", pulp.LpMinimize)
    x = [pulp.LpVariable(f"x{i}", 0, big - us[i], cat="Integer") if us[i] else None for i in range(len(s))]
    low = max(floor_bytes, _fixed_top(sg.fixed, a)) / (a * gcd)
    arena = pulp.LpVariable("arena", lowBound=low)
    prob += arena
    for i, xi in enumerate(x):
        if xi is not None:
            prob += arena >= xi + sg.sizes[i] / (a * gcd)
            xi.setInitialValue(warm[i] // gcd)
    for i, j in pairs:
        y = pulp.LpVariable(f"y{i}_{j}", cat="Binary")  # 1: i lies below j
        prob += x[i] + us[i] - x[j] <= big * (1 - y)
        prob += x[j] + us[j] - x[i] <= big * y
        y.setInitialValue(int(warm[i] < warm[j]))
    for k, (i, (_, _, fo, fu, _)) in enumerate(touch):
        lo, hi = fo // gcd, (fo + fu) // gcd
        if lo < us[i]:
            prob += x[i] >= hi
        elif hi > big - us[i]:
            prob += x[i] + us[i] <= lo
        else:
            y = pulp.LpVariable(f"z{k}", cat="Binary")  # 1: i lies below the obstacle
            prob += x[i] + us[i] - lo <= big * (1 - y)
            prob += hi - x[i] <= big * y
            y.setInitialValue(int(warm[i] < fo))
    arena.setInitialValue(max(low, max((w + b / a) / gcd for w, b in zip(warm, sg.sizes))))
    state = run_milp(prob, solver, time_limit_s)
    if state not in ("optimal", "time_limit") or any(xi is not None and xi.varValue is None for xi in x):
        return None, state if state != "optimal" else "no solution"
    offs = [round(xi.varValue) * gcd if xi is not None else 0 for xi in x]
    bad = [p for p in pairs if offs[p[0]] + u[p[0]] > offs[p[1]] and offs[p[1]] + u[p[1]] > offs[p[0]]]
    bad += [t for t in touch if offs[t[0]] + u[t[0]] > t[1][2] and t[1][2] + t[1][3] > offs[t[0]]]
    if bad:
        return None, f"rounded ILP offsets overlap ({len(bad)} pairs)"
    return offs, state


# ---------------------------------------------------------------- segmentation
def _crossings(it: _Items, n: int, skip=frozenset()) -> list[int]:
    """crossings[i]: nonzero planned tensors (not in `skip`) live across the cut between op i and op i + 1."""
    d = [0] * (n + 1)
    for i, (s, e, b) in enumerate(zip(it.starts, it.ends, it.sizes)):
        lo, hi = max(s, 0), min(e - 1, n - 2)
        if b > 0 and lo <= hi and i not in skip:
            d[lo] += 1
            d[hi + 1] -= 1
    return list(accumulate(d[: max(n - 1, 0)]))


def _choose_cuts(g: MemGraph, it: _Items, max_tensors: int, max_crossing: int = 16) -> list[int]:
    """Cut after op i: always where nothing crosses; in segments over `max_tensors` tensors, at block
    boundaries crossed by <= max_crossing tensors, else at the least-crossed op near the middle."""
    n = len(g.ops)
    cross = _crossings(it, n)
    first = sorted(min(max(s, 0), n - 1) for s, b in zip(it.starts, it.sizes) if b > 0)
    block_cuts = {i for i in range(n - 1) if g.ops[i].block != g.ops[i + 1].block and cross[i] <= max_crossing}
    cuts = {i for i, c in enumerate(cross) if c == 0}
    todo = _ranges(cuts, n)
    while todo:
        lo, hi = todo.pop()
        if hi <= lo or bisect.bisect_right(first, hi) - bisect.bisect_left(first, lo) <= max_tensors:
            continue
        inner = {c for c in block_cuts if lo <= c < hi}
        if not inner:
            q, mid = (hi - lo) // 4, (lo + hi) / 2
            inner = {min(range(lo + q, hi - q), key=lambda i: (cross[i], abs(i - mid)))}
        cuts |= inner
        todo.extend(_ranges(inner, hi + 1, lo))
    return sorted(cuts)


def _ranges(cuts, n: int, lo: int = 0) -> list[tuple[int, int]]:
    """Op ranges [lo, hi] between cut points (cut c ends a range at op c), up to op n - 1."""
    out = []
    for c in sorted(cuts):
        out.append((lo, c))
        lo = c + 1
    return out + [(lo, n - 1)]


def _segments(g: MemGraph, it: _Items, max_tensors: int):
    """Cut the timeline, pin the tensors crossing a cut (greedy among themselves), then group the rest
    into segments keyed by their relative (start, end, size) list and obstacles."""
    n, a = len(g.ops), it.alignment
    cuts = _choose_cuts(g, it, max_tensors) if n > 1 else []
    nz = [i for i in range(len(it.names)) if it.sizes[i] > 0]

    def crosses(i):
        k = bisect.bisect_left(cuts, it.starts[i])
        return k < len(cuts) and cuts[k] < it.ends[i]

    pinned = [i for i in nz if crosses(i)]
    if pinned:  # a gap crossed only by pinned tensors separates two independent subproblems: cut it too
        free = _crossings(it, n, skip=set(pinned))
        cuts = sorted(set(cuts) | {i for i, c in enumerate(free) if c == 0})
    sub = [[getattr(it, f)[i] for i in pinned] for f in ("starts", "ends", "sizes", "units")]
    pin_offs = dict(zip(pinned, _best_greedy(*sub, a)[0]))
    groups: dict[int, list[int]] = {}
    for i in nz:
        if i not in pin_offs:
            groups.setdefault(bisect.bisect_left(cuts, min(max(it.starts[i], 0), max(n - 1, 0))), []).append(i)
    unique: dict[tuple, _Segment] = {}
    for k, (lo, hi) in enumerate(_ranges(cuts, n)):
        if k not in groups:
            continue
        items = sorted(groups[k], key=lambda i: (it.starts[i] - lo, it.ends[i] - lo, it.sizes[i], i))
        fixed = sorted((max(it.starts[j], lo - 1) - lo, min(it.ends[j], hi + 1) - lo, pin_offs[j], it.units[j],
                        it.sizes[j]) for j in pinned if it.starts[j] <= hi + 1 and it.ends[j] >= lo - 1)
        rel = [(it.starts[i] - lo, it.ends[i] - lo, it.sizes[i], it.units[i]) for i in items]
        key = (tuple(rel), tuple(fixed))
        if key not in unique:
            unique[key] = _Segment(*(list(c) for c in zip(*rel)), fixed=fixed, members=[])
        unique[key].members.append(items)
    return cuts, pin_offs, list(unique.values())


# ---------------------------------------------------------------- improving one segment
def _local_search(sg: _Segment, a: int, target: int, deadline: float, max_iters: int) -> None:
    """Iterated greedy: swap a few nearby entries of the best placement order, keep any order whose
    best-fit plan is no larger (plateau moves allowed). Seeded, so runs are repeatable."""
    rng, idx, ft = random.Random(0), range(len(sg.starts)), _fixed_top(sg.fixed, a)
    s, e, u, b = sg.starts, sg.ends, sg.units, sg.sizes
    order = sorted(idx, key=lambda i: (-u[i], -b[i], s[i] - e[i], s[i], i))
    best = _top_bytes(idx, _greedy_offsets(s, e, u, order, sg.fixed), b, a, ft)
    for _ in range(max_iters):
        if best <= target or time.perf_counter() > deadline or len(order) < 2:
            break
        cand = list(order)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(cand))
            j = min(len(cand) - 1, max(0, i + rng.randint(-10, 10)))
            cand[i], cand[j] = cand[j], cand[i]
        offs = _greedy_offsets(s, e, u, cand, sg.fixed)
        top = _top_bytes(idx, offs, b, a, ft)
        if top <= best:
            order, best = cand, top
            if top < sg.top:
                sg.offs, sg.top = offs, top


def _improve(sg: _Segment, floor: int, a: int, deadline: float, solver: str, local_search: bool) -> str:
    """Local search for a third of the time left to this segment, then the ILP. Returns the ILP state."""
    target = max(floor, sg.lb)
    now = time.perf_counter()
    if local_search:
        _local_search(sg, a, target, now + (deadline - now) / 3, max_iters=20 * len(sg.starts))
    if sg.top <= target:
        return "local search"
    budget = deadline - time.perf_counter()
    if budget < MIN_ILP_TIME_S:
        return "skipped"
    offs, state = _ilp_segment(sg, target, a, budget, solver)
    if offs is not None:
        top = _top_bytes(range(len(offs)), offs, sg.sizes, a, _fixed_top(sg.fixed, a))
        if top < sg.top:
            sg.offs, sg.top = offs, top
    return state


def _solve_segments(g: MemGraph, it: _Items, lb: int, deadline: float, solver: str, max_tensors: int,
                    local_search: bool):
    """Offsets (units) from the segmented search, a status and notes for the report."""
    a = it.alignment
    cuts, pin_offs, segs = _segments(g, it, max_tensors)
    for sg in segs:
        fs, fe, fb, fu = ([f[c] for f in sg.fixed] for c in (0, 1, 4, 3))
        sg.offs, sg.top, _ = _best_greedy(sg.starts, sg.ends, sg.sizes, sg.units, a, sg.fixed)
        sg.lb = _lower_bound(sg.starts + fs, sg.ends + fe, sg.sizes + fb, sg.units + fu, a)
    floor, states = lb, []
    segs.sort(key=lambda sg: -sg.top)
    for k, sg in enumerate(segs):  # largest first: a segment that cannot raise the arena is left greedy
        if sg.top > max(floor, sg.lb):
            left = sum(1 for c in segs[k:] if c.top > max(floor, c.lb))
            now = time.perf_counter()
            states.append(_improve(sg, floor, a, now + (deadline - now) / left, solver, local_search))
        floor = max(floor, sg.top)
    offs = [0] * len(it.names)
    for i, o in pin_offs.items():
        offs[i] = o
    for sg in segs:
        for items in sg.members:
            for r, i in enumerate(items):
                offs[i] = sg.offs[r]
    return offs, _status(states, pin_offs, segs), _notes(states, cuts, pin_offs, segs)


def _status(states: list[str], pin_offs: dict, segs: list[_Segment]) -> str:
    if "time_limit" in states or "skipped" in states:
        return "time_limit"
    if states == ["optimal"] and not pin_offs and len(segs) == 1 and len(segs[0].members) == 1:
        return "optimal"
    return "feasible" if "optimal" in states else "greedy"


def _notes(states: list[str], cuts: list[int], pin_offs: dict, segs: list[_Segment]) -> str:
    n_occ = sum(len(sg.members) for sg in segs)
    ilp = [s for s in states if s not in ("local search", "skipped")]
    notes = (f"{n_occ} segments ({len(segs)} unique, {n_occ - len(segs)} reused), {len(pin_offs)} tensors "
             f"pinned across {len(cuts)} cuts; {states.count('local search')} segments closed by local search; "
             f"ILP on {len(ilp)} segments ({ilp.count('optimal')} optimal, {ilp.count('time_limit')} at time "
             f"limit), {states.count('skipped')} skipped for time")
    other = sorted({s for s in ilp if s not in ("optimal", "time_limit")})
    return notes + ("; ILP kept greedy: " + ", ".join(other) if other else "")


def solve_arena(g: MemGraph, *, kinds: tuple[str, ...] = DEFAULT_KINDS, alignment: int = 64,
                time_limit_s: float = 10.0, solver: str = "cbc", max_segment_tensors: int = 256,
                local_search: bool = True) -> ArenaPlan:
    """Smallest arena found by greedy and the segmented DSA ILP within `time_limit_s`; always valid.

    Segments hold at most about `max_segment_tensors` tensors; `local_search` runs iterated greedy on a
    segment (a third of its time) before its ILP.

    Status: "optimal (greedy = bound)" (no search needed), "optimal" (size equals the bound, or one ILP over
    the whole graph proved it), "time_limit" (an ILP stopped or was skipped on time; best incumbent kept),
    "feasible" (segment ILPs finished but pinning across cuts leaves the optimum unproven), "greedy".
    """
    t0 = time.perf_counter()
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver == "highs":
        check_highs()
    if not time_limit_s >= 0:
        raise ValueError(f"time_limit_s must be >= 0, got {time_limit_s!r}")
    if max_segment_tensors < 2:
        raise ValueError(f"max_segment_tensors must be >= 2, got {max_segment_tensors!r}")
    it, a = _items(g, kinds, alignment), alignment
    g_offs, g_top, how = _best_greedy(it.starts, it.ends, it.sizes, it.units, a)
    lb = _lower_bound(it.starts, it.ends, it.sizes, it.units, a)
    name = f"arena-ilp-{solver}"
    if g_top <= lb:
        return _plan(it, g_offs, lb, g_top, name, "optimal (greedy = bound)", t0, f"greedy {how} meets the bound")
    offs, status, notes = _solve_segments(g, it, lb, t0 + time_limit_s, solver, max_segment_tensors, local_search)
    if _top_bytes(range(len(offs)), offs, it.sizes, a) >= g_top:
        offs, notes = g_offs, f"{notes}; greedy {how} kept (nothing smaller found)"
        status = status if status in ("optimal", "time_limit") else "greedy"
    plan = _plan(it, offs, lb, g_top, name, status, t0, notes)
    if plan.size_bytes <= lb:
        plan = _plan(it, offs, lb, g_top, name, "optimal", t0, notes)
    try:
        verify_arena(g, plan, kinds)
    except ValueError as err:  # never hand out an invalid plan
        return _plan(it, g_offs, lb, g_top, name, "greedy", t0, f"ILP plan rejected ({err}); greedy {how} kept")
    return plan


__all__ = ["greedy_arena", "solve_arena", "verify_arena", "no_reuse_bytes", "run_milp", "DEFAULT_KINDS"]
