"""Operator order for a lower memory peak.

Baselines: the original order and greedy list scheduling (among ready ops, the one that frees most /
allocates least). Exact: a DP over sets of executed ops in the style of Serenity (Ahn et al., 2020), which
turns into a beam search when the sets outgrow a cap; and, when that is not exact on a small graph, a
time-indexed ILP in the style of Checkmate (Jain et al., 2020) and OLLA (Steiner et al., 2022): binary
done[i, t] says op i ran by step t, a tensor is live at t when its writer ran by t and some reader runs at or
after t, and the peak bounds the live bytes at every step. A new order is returned only when it lowers
the peak; every order is checked to be topological.

Dependencies are read from the ops: for every storage name, each writer comes after every earlier access
and before every later one (read-after-write, write-after-read, write-after-write); a tensor's `start` op
counts as a writer and its `end` op as a reader, so lifetimes stretched by folded views are kept.
Op inputs/outputs must name storages (MemTensor names) or other names the same way on both sides.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pulp

from memopt.planning.plan import SolverReport
from memopt.solvers.milp import run_milp
from memopt.solvers.memgraph import KINDS, MemGraph, MemTensor

DEFAULT_KINDS = ("activation", "output")
ILP_SECONDS_PER_OP2 = 0.005  # measured: building and solving the root LP of a 40-op ILP takes 3-7 s


@dataclass(frozen=True)
class ScheduleResult:
    """`order[k]` is the index (in `g.ops`) of the op run at step k."""

    order: tuple[int, ...]
    peak_bytes: int
    original_peak_bytes: int
    solver: SolverReport


# ---------------------------------------------------------------- dependencies and reordering
def _accesses(g: MemGraph) -> dict[str, dict[int, bool]]:
    """name -> {op index: writes?} over op inputs/outputs plus each tensor's start (write) and end (read)."""
    acc: dict[str, dict[int, bool]] = {}
    for j, op in enumerate(g.ops):
        for name in op.inputs:
            acc.setdefault(name, {}).setdefault(j, False)
        for name in op.outputs:
            acc.setdefault(name, {})[j] = True
    n = len(g.ops)
    for t in g.tensors:
        if 0 <= t.start < n:
            acc.setdefault(t.name, {})[t.start] = True
        if 0 <= t.end < n:
            acc.setdefault(t.name, {}).setdefault(t.end, False)
    return acc


def dependencies(g: MemGraph) -> list[set[int]]:
    """preds[j]: ops that must run before op j. Every edge goes from a lower to a higher index."""
    preds: list[set[int]] = [set() for _ in g.ops]
    for ops in _accesses(g).values():
        seq = sorted(ops)
        for k, w in enumerate(seq):
            if ops[w]:
                for j in seq[:k]:
                    preds[w].add(j)
                for j in seq[k + 1:]:
                    preds[j].add(w)
    return preds


def _check_permutation(g: MemGraph, order) -> None:
    n = len(g.ops)
    if sorted(order) != list(range(n)):
        missing = sorted(set(range(n)) - set(order))
        twice = sorted({i for i in order if list(order).count(i) > 1})
        raise ValueError(f"order must be a permutation of range({n}); got {len(order)} entries, "
                         f"missing {missing[:5]}, duplicates {twice[:5]}")


def _violation(g: MemGraph, order, preds=None) -> tuple[int, int] | None:
    """The first (pred, op) pair that `order` runs the wrong way round, or None."""
    preds = dependencies(g) if preds is None else preds
    pos = {op: k for k, op in enumerate(order)}
    for j in order:
        for p in preds[j]:
            if pos[p] > pos[j]:
                return p, j
    return None


def is_topological(g: MemGraph, order) -> bool:
    """True when `order` is a permutation of the ops that runs every op after all it depends on."""
    return sorted(order) == list(range(len(g.ops))) and _violation(g, order) is None


def reorder(g: MemGraph, order) -> MemGraph:
    """A new MemGraph with ops permuted by `order` and lifetimes recomputed: start = the writer's new
    position, end = the last access's new position; the sentinels start -1 and end len(ops) are kept."""
    _check_permutation(g, order)
    bad = _violation(g, order)
    if bad is not None:
        p, j = bad
        raise ValueError(f"order is not topological: op {g.ops[j].name!r} (index {j}) runs before "
                         f"op {g.ops[p].name!r} (index {p}) it depends on")
    n, acc = len(g.ops), _accesses(g)
    pos = {op: k for k, op in enumerate(order)}
    tensors = []
    for t in g.tensors:
        where = [pos[j] for j in acc.get(t.name, {})]
        writes = [pos[j] for j, w in acc.get(t.name, {}).items() if w]
        start = t.start if t.start < 0 or not writes else min(writes)
        end = t.end if t.end >= n or not where else max(where + [start])
        tensors.append(MemTensor(t.name, t.size_bytes, t.kind, start, end, t.dtype, t.shape))
    return MemGraph(tuple(g.ops[j] for j in order), tuple(tensors), dict(g.meta))


def _peak(g: MemGraph, order, kinds) -> int:
    return reorder(g, order).lower_bound_bytes(kinds)


# ---------------------------------------------------------------- greedy list scheduling
@dataclass(frozen=True)
class _Mem:
    """Per planned tensor: size, writer op (-1: live from the start), accesses, kept to the end?"""

    size: list[int]
    writer: list[int]
    uses: list[list[int]]
    to_end: list[bool]
    by_op: list[list[int]]  # tensors each op touches


def _memory_model(g: MemGraph, kinds) -> _Mem:
    n, acc = len(g.ops), _accesses(g)
    size, writer, uses, to_end, by_op = [], [], [], [], [[] for _ in g.ops]
    for t in g.tensors:
        ops = acc.get(t.name, {})
        if t.kind not in kinds or t.size_bytes == 0 or (not ops and t.end < n):
            continue
        k = len(size)
        size.append(t.size_bytes)
        writes = sorted(j for j, w in ops.items() if w)
        writer.append(writes[0] if writes and t.start >= 0 else -1)
        uses.append(sorted(ops))
        to_end.append(t.end >= n)
        for j in ops:
            by_op[j].append(k)
    return _Mem(size, writer, uses, to_end, by_op)


def _list_schedule(g: MemGraph, preds: list[set[int]], mem: _Mem, rule: str) -> list[int]:
    """Greedy list schedule; `rule` "free" prefers the op with the smallest net allocation, "peak" the one
    with the smallest live bytes while it runs; ties go to the original order."""
    n = len(g.ops)
    succs = [[] for _ in range(n)]
    for j, ps in enumerate(preds):
        for p in ps:
            succs[p].append(j)
    indeg = [len(ps) for ps in preds]
    left = [len(u) for u in mem.uses]
    ready, order = {j for j in range(n) if indeg[j] == 0}, []
    while ready:
        def key(j):
            alloc = sum(mem.size[k] for k in mem.by_op[j] if mem.writer[k] == j)
            free = sum(mem.size[k] for k in mem.by_op[j] if left[k] == 1 and not mem.to_end[k])
            return (alloc - free, alloc, j) if rule == "free" else (alloc, alloc - free, j)
        j = min(ready, key=key)
        ready.remove(j)
        order.append(j)
        for k in mem.by_op[j]:
            left[k] -= 1
        for s in succs[j]:
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.add(s)
    return order


# ---------------------------------------------------------------- dynamic programming over executed sets
def _dp_schedule(preds: list[set[int]], mem: _Mem, bound: int, deadline: float, max_states: int):
    """Search in the style of Serenity (Ahn et al., 2020): the live bytes after a set S of executed ops
    depend on S only, so the lowest peak to reach each S is a DP over sets, level by level, dropping paths
    whose peak reaches `bound`. A level over `max_states` sets (or over what the time left allows) keeps
    only its lowest-peak sets: a beam search from then on, no longer exact (out of time, a beam of one).
    Returns (order, peak, exact) with peak < bound, or (None, "none below bound", exact); with exact=True
    the latter proves that no order beats `bound`."""
    n, t_start = len(preds), time.perf_counter()
    pred_mask = [sum(1 << p for p in ps) for ps in preds]
    succs: list[list[int]] = [[] for _ in range(n)]
    for j, ps in enumerate(preds):
        for p in ps:
            succs[p].append(j)
    alloc = [0] * n
    for k, w in enumerate(mem.writer):
        if w >= 0:
            alloc[w] += mem.size[k]
    use_mask = [sum(1 << c for c in uses) for uses in mem.uses]
    live0 = sum(sz for sz, w in zip(mem.size, mem.writer) if w < 0)
    level = {0: (live0, 0, frozenset(j for j in range(n) if not preds[j]))}
    parents: list[dict[int, tuple[int, int]]] = []
    exact, expanded = True, 0
    for step in range(n):
        nxt, back = {}, {}
        for done, (live, peak, ready) in level.items():
            for j in ready:
                new_peak = max(peak, live + alloc[j])
                after = done | (1 << j)
                if new_peak >= bound or (after in nxt and nxt[after][1] <= new_peak):
                    continue
                freed = sum(mem.size[k] for k in mem.by_op[j] if not mem.to_end[k] and not use_mask[k] & ~after)
                woken = [s for s in succs[j] if pred_mask[s] & ~after == 0]
                nxt[after] = (live + alloc[j] - freed, new_peak, ready.difference((j,)).union(woken))
                back[after] = (done, j)
        expanded += len(level)
        if not nxt:
            return None, "none below bound", exact
        now = time.perf_counter()
        per_state = (now - t_start) / expanded  # out of time: width 1 finishes greedily
        width = min(max_states, int(0.7 * max(deadline - now, 0) / (n - step) / max(per_state, 1e-7)))
        if len(nxt) > width:
            exact = False
            keep = sorted(nxt, key=lambda d: (nxt[d][1], nxt[d][0]))[: max(width, 1)]
            nxt = {d: nxt[d] for d in keep}
        level, parents = nxt, parents + [back]
    (done, (_, peak, _)), = level.items()
    order = []
    for back in reversed(parents):
        done, j = back[done]
        order.append(j)
    return order[::-1], peak, exact


# ---------------------------------------------------------------- the time-indexed ILP
def _windows(preds: list[set[int]]) -> list[range]:
    """Steps op i can take: at least its ancestor count, at most n - 1 - its descendant count."""
    n = len(preds)
    anc = [0] * n
    for j in range(n):  # edges go low -> high, so index order is topological
        for p in preds[j]:
            anc[j] |= anc[p] | (1 << p)
    desc = [0] * n
    for j in range(n):
        for i in range(n):
            if anc[j] >> i & 1:
                desc[i] += 1
    return [range(bin(anc[i]).count("1"), n - desc[i]) for i in range(n)]


def _ilp_schedule(g, preds, mem: _Mem, warm: list[int], time_limit_s: float):
    """Time-indexed ILP on done[i, t] = "op i has run by step t" (monotone in t, t + 1 ops done by step t).
    Returns (order or None, state)."""
    n = len(g.ops)
    win = _windows(preds)
    pos = {op: k for k, op in enumerate(warm)}
    prob = pulp.LpProblem("schedule", pulp.LpMinimize)
    done = [[0 if t < win[i].start else 1 if t >= win[i].stop - 1 else
             pulp.LpVariable(f"d{i}_{t}", cat="Binary") for t in range(n)] for i in range(n)]
    for i in range(n):
        for t in win[i][1:-1]:
            prob += done[i][t - 1] <= done[i][t]
            done[i][t].setInitialValue(int(pos[i] <= t))
        if len(win[i]) > 1:
            done[i][win[i].start].setInitialValue(int(pos[i] <= win[i].start))

    def before(i, t):  # done by step t - 1
        return done[i][t - 1] if t > 0 else 0

    for t in range(n - 1):
        prob += pulp.lpSum(done[i][t] for i in range(n)) == t + 1
    for j, ps in enumerate(preds):
        for p in ps:
            for t in win[j][:-1]:
                prob += done[j][t] <= before(p, t)
    gcd = math.gcd(*mem.size) or 1
    peak = pulp.LpVariable("peak", lowBound=0)
    prob += peak
    load, warm_load = [[] for _ in range(n)], [0] * n
    for k, w in enumerate(mem.writer):
        made = [done[w][t] if w >= 0 else 1 for t in range(n)]
        first, last = (pos[w] if w >= 0 else -1), (n if mem.to_end[k] else max(pos[c] for c in mem.uses[k]))
        for t in range(n):
            x = pulp.LpVariable(f"live{k}_{t}", 0, 1)
            rows = [made[t]] if mem.to_end[k] else [made[t] - before(c, t) for c in mem.uses[k] if c != w]
            rows += [done[w][t] - before(w, t)] if w >= 0 else []
            for r in rows:
                if not isinstance(r, (int, float)) or r > 0:
                    prob += x >= r
            x.setInitialValue(int(first <= t <= last))
            warm_load[t] += mem.size[k] // gcd * int(first <= t <= last)
            load[t].append(mem.size[k] // gcd * x)
    for t in range(n):
        prob += peak >= pulp.lpSum(load[t])
    peak.setInitialValue(max(warm_load))
    state = run_milp(prob, "cbc", time_limit_s)
    if state not in ("optimal", "time_limit"):
        return None, state
    def step(i):  # steps before op i ran = its position
        return sum(1 - round(d if isinstance(d, int) else d.varValue or 0) for d in done[i])

    return sorted(range(n), key=lambda i: (step(i), i)), state


# ---------------------------------------------------------------- the solver
def _op_bound(mem: _Mem, n: int) -> int:
    """Every tensor an op touches is live while it runs: no order has a lower peak."""
    const = sum(s for s, w, e in zip(mem.size, mem.writer, mem.to_end) if w < 0 and e)
    return max([const + sum(mem.size[k] for k in mem.by_op[j] if not (mem.writer[k] < 0 and mem.to_end[k]))
                for j in range(n)], default=const)


def solve_schedule(g: MemGraph, *, kinds: tuple[str, ...] = DEFAULT_KINDS, time_limit_s: float = 10.0,
                   max_ilp_ops: int = 40, max_dp_states: int = 20_000) -> ScheduleResult:
    """Op order with the lowest peak of `kinds` bytes found in `time_limit_s`; the original order unless
    another one is strictly lower. Always a topological order.

    Baselines: the original order and two greedy list schedules. Exact: the DP over executed sets while
    no level holds more than `max_dp_states` sets (0: no DP), a beam search past that; when it is not
    exact and the graph has at most `max_ilp_ops` ops, the time-indexed ILP warm-started from the best
    order so far.
    Status: "optimal" (proved), "time_limit" (an exact method stopped), "heuristic"."""
    t0 = time.perf_counter()
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds must be drawn from {KINDS}, got {bad!r}")
    if not time_limit_s >= 0:
        raise ValueError(f"time_limit_s must be >= 0, got {time_limit_s!r}")
    if max_ilp_ops < 0:
        raise ValueError(f"max_ilp_ops must be >= 0, got {max_ilp_ops!r}")
    if max_dp_states < 0:
        raise ValueError(f"max_dp_states must be >= 0, got {max_dp_states!r}")
    n, preds, mem = len(g.ops), dependencies(g), _memory_model(g, kinds)
    original = list(range(n))
    base = _peak(g, original, kinds)
    best, best_peak, how = original, base, "original"
    for rule in ("free", "peak"):
        order = _list_schedule(g, preds, mem, rule)
        peak = _peak(g, order, kinds)
        if peak < best_peak:
            best, best_peak, how = order, peak, f"list scheduling ({rule})"
    lb, state, name, notes = _op_bound(mem, n), "heuristic", "schedule-list", ""
    if best_peak > lb and n and max_dp_states > 0:
        share = 0.5 if n <= max_ilp_ops else 1.0  # leave the ILP half the time when it may run
        order, dp, exact = _dp_schedule(preds, mem, best_peak, t0 + share * time_limit_s, max_dp_states)
        name = "schedule-dp" if exact else "schedule-beam"
        peak = _peak(g, order, kinds) if order is not None and _violation(g, order, preds) is None else None
        if peak is not None and peak < best_peak:
            best, best_peak, how = order, peak, "DP" if exact else "beam search"
        if exact and (peak is not None or dp == "none below bound"):
            state = "optimal"
        else:
            state, notes = "heuristic", "; DP narrowed to a beam (too many sets for the state cap or time)"
    left = time_limit_s - (time.perf_counter() - t0)
    if state != "optimal" and 0 < n <= max_ilp_ops and best_peak > lb:
        name = "schedule-ilp-cbc"  # CBC cannot stop inside its root LP, which grows like n^2 rows
        enough = left >= max(0.02, ILP_SECONDS_PER_OP2 * n * n)
        order, ilp_state = _ilp_schedule(g, preds, mem, best, left) if enough else (None, "too little time left")
        if order is not None and _violation(g, order, preds) is None:
            peak = _peak(g, order, kinds)
            if peak < best_peak:
                best, best_peak, how = order, peak, "ILP"
            state = ilp_state
        else:
            state, notes = "time_limit", f"{notes}; ILP gave no order ({ilp_state})"
    if state == "optimal" or best_peak <= lb:
        state, lb = "optimal", best_peak
    report = SolverReport(name=name, status=state,
                          time_s=time.perf_counter() - t0, gap=(best_peak - lb) / lb if lb else 0.0,
                          objective=float(best_peak), baseline_objective=float(base),
                          notes=f"{how} kept; peak {best_peak} vs original {base} bytes, bound {lb}{notes}")
    return ScheduleResult(order=tuple(best), peak_bytes=best_peak, original_peak_bytes=base, solver=report)


__all__ = ["ScheduleResult", "dependencies", "is_topological", "reorder", "solve_schedule"]
