"""Host streaming: keep *units* in host memory and stream each into one of a few device staging slots ahead of
its use. Weight blocks (passes/offload.py) and KV caches (passes/kv_offload.py) are its two kinds of units;
this module is the mechanism both use, in graph positions (indices into `gm.graph.nodes`):

  - selection: units named by module-path patterns (`matches`: a whole block name `model.model.layers.3` or a
    dotted tail of it, `layers.[1-3]`), by index, or by plan decisions placing them on "host" (`select`);
  - spans: per unit its block's first op (`block_start`), the op before which it must be resident, and its
    last read (`Span`);
  - slots and issue points: with depth d and n = min(d + 1, units) slots, unit U_j lives in slot j % n and its
    transfer is issued at the start of U_{j-d} (the graph's start for the first units), never before the last
    read of U_{j-n}, which held the slot before it (`plan_slots`);
  - the streaming calls: `memopt::offload_prefetch` / `offload_wait` for weights, `memopt::kv_offload_prefetch`
    / `kv_offload_wait` / `kv_offload_writeback` for KV caches (`call_before`, `register_slots`);
  - the transfer schedule read back from the graph, also after a re-export (`read_transfers`), and its
    verifier (`check_schedule`, `check_writebacks`).

After FlexGen (Sheng et al. 2023: weights and KV cache streamed layer by layer with overlapped I/O), LLM in a
flash (Alizadeh et al. 2023) and ShadowKV (Sun et al. 2024: host-resident state prefetched ahead of the layer
that needs it).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import fx

from memopt.names import BLOCK_NAME, HOST_PREFIX, KV_SLOT_PREFIX, SLOT_PREFIX
from memopt.runtime.offload_ops import KV_PREFETCH, KV_WAIT, KV_WRITEBACK, PREFETCH, WAIT

# the aten views a weight's slot view is made of (slice -> view(dtype) -> view(shape)), and their kin
VIEWS = frozenset({torch.ops.aten.slice.Tensor, torch.ops.aten.view.dtype, torch.ops.aten.view.default,
                   torch.ops.aten.as_strided.default, torch.ops.aten.reshape.default, torch.ops.aten.alias.default})


# ---------------------------------------------------------------- selecting units by module path
def matches(name: str, pattern: str) -> bool:
    """`pattern` (fnmatch) names `name` whole or a dotted tail of it: `layers.3` names `model.model.layers.3`."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def named_by(name: str, row: str) -> bool:
    """A plan row names `name` by a dotted tail: `model.layers.3` names `model.model.layers.3`."""
    return f".{name}".endswith(f".{row}")


def block_of(fqn: str) -> str:
    """`model.model.layers.3.mlp.up_proj.weight` -> `model.model.layers.3`; outside blocks, the owner module."""
    m = BLOCK_NAME.match(fqn)
    return m.group(1) if m else fqn.rsplit(".", 1)[0]


def scope(node: fx.Node) -> str:
    """The module path of the innermost module `node` was traced in ("" when unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def select(units: Sequence, name: Callable[[Any], str], keys: Iterable, plan, field: str,
           index: Callable[[Any], int] | None = None) -> tuple[list, list, list[str]]:
    """The units named by `keys` (module-path patterns; ints are unit indices when `index` is given) or by the
    plan's decisions whose `field` is "host", in the units' order; then the keys that name no unit and the
    names of host decisions that name none."""
    chosen, unmatched, unplaced = set(), [], []
    for key in keys:
        hit = {i for i, u in enumerate(units)
               if (index(u) == key if isinstance(key, int) and index else matches(name(u), key))}
        chosen |= hit
        if not hit:
            unmatched.append(key)
    for d in getattr(plan, "decisions", None) or ():
        if getattr(d, field, "device") != "host":
            continue
        hit = {i for i, u in enumerate(units) if named_by(name(u), d.name)}
        chosen |= hit
        if not hit:
            unplaced.append(d.name)
    return [u for i, u in enumerate(units) if i in chosen], unmatched, unplaced


# ---------------------------------------------------------------- spans, slots and issue points
@dataclass(frozen=True)
class Span:
    """A unit's graph positions: its block's first op (`start`: where the transfer `depth` units later is
    issued), the op it must be resident before (`wait`) and its last read (`last`: its slot is free after)."""

    start: int
    wait: int
    last: int


def block_start(nodes: Sequence[fx.Node], block: str, default: int) -> int:
    """The first op traced inside module `block` (or a submodule), or `default` when that comes earlier."""
    first = next((i for i, n in enumerate(nodes) if n.op == "call_function"
                  and (scope(n) == block or scope(n).startswith(block + "."))), default)
    return min(first, default)


@dataclass(frozen=True)
class SlotPlan:
    """Units in order of use, `n_slots` staging slots, each unit's slot and the position its transfer is
    issued before."""

    order: tuple
    n_slots: int
    slot: dict
    issue: dict


def plan_slots(nodes: Sequence[fx.Node], order: Sequence, spans: dict, depth: int,
               refuse: Callable[[Any, Any, int], str]) -> SlotPlan:
    """U_j's transfer is issued at the start of U_{j-depth} (the graph's start for the first units), and never
    before the last read of U_{j-n_slots}, the unit that held its slot before it. `refuse(unit, holder,
    n_slots)` words the error when the holder is still read when `unit` must be resident."""
    n_slots = min(depth + 1, len(order))
    graph_start = next(i for i, n in enumerate(nodes) if n.op == "call_function")
    issue = {}
    for j, u in enumerate(order):
        at = spans[order[j - depth]].start if j >= depth else graph_start
        if j >= n_slots:
            at = max(at, spans[order[j - n_slots]].last + 1)
        if at > spans[u].wait:
            raise ValueError(refuse(u, order[j - n_slots], n_slots))
        issue[u] = at
    return SlotPlan(tuple(order), n_slots, {u: j % n_slots for j, u in enumerate(order)}, issue)


# ---------------------------------------------------------------- buffers and streaming calls
def get_tensor(root: torch.nn.Module, target: str):
    """The tensor at dotted `target` (None when there is none)."""
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def delete_attr(gm: torch.nn.Module, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    delattr(gm.get_submodule(owner_path) if owner_path else gm, name)


def on_host(name: str) -> bool:
    """`name` (a buffer FQN) is a host buffer of the streaming passes, weights or KV cache."""
    return name.rpartition(".")[2].startswith(HOST_PREFIX)


def register_slots(gm: torch.nn.Module, prefix: str, n_slots: int, numel: int, dtype: torch.dtype,
                   device: torch.device) -> list[str]:
    """`n_slots` zeroed 1-d staging slots `<prefix><i>` (numel,) on `device`; their names."""
    names = [f"{prefix}{i}" for i in range(n_slots)]
    for name in names:
        gm.register_buffer(name, torch.zeros(numel, dtype=dtype, device=device))
    return names


def call_before(g: fx.Graph, anchor: fx.Node, op, args: tuple, scoped: bool = False) -> fx.Node:
    """Insert `op(*args)` before `anchor`, each str argument read by a new get_attr node (in order);
    `scoped`: the call takes `anchor`'s module scope. Returns the call."""
    with g.inserting_before(anchor):
        call = g.call_function(op, tuple(g.get_attr(a) if isinstance(a, str) else a for a in args))
    if scoped:
        call.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack") or {})
    return call


# ---------------------------------------------------------------- the two kinds of units
def _aliases(node: fx.Node) -> bool:
    """The op returns (a view of) an input: a view or an in-place update."""
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None)


@dataclass(frozen=True)
class Kind:
    """One kind of streamed unit as the graph shows it. `key(call)`: the unit a streaming call is for;
    `follow(op)`: ops through which a slot's readers are found; `read_through`: those ops count as reads
    too; `view(op)`: ops skipped when naming the op a transfer is issued or waited before."""

    meta_key: str
    slot_prefix: str
    prefetch: Any
    wait: Any
    writeback: Any
    key: Callable[[fx.Node], Any]
    follow: Callable[[fx.Node], bool]
    read_through: bool
    view: Callable[[fx.Node], bool]

    @property
    def ops(self) -> tuple:
        return tuple(op for op in (self.prefetch, self.wait, self.writeback) if op is not None)


# weights: calls (slot, host, slot_index); a block's weights are read through aten views of its slot
WEIGHTS = Kind("memopt_offload", SLOT_PREFIX, PREFETCH, WAIT, None, key=lambda n: n.args[1].target,
               follow=lambda n: n.target in VIEWS, read_through=False, view=lambda n: n.target in VIEWS)
# KV caches: calls (slot, host, layer) and write-back (host, slot, pos, layer); the cache updates in place
KV_CACHE = Kind("memopt_kv_offload", KV_SLOT_PREFIX, KV_PREFETCH, KV_WAIT, KV_WRITEBACK, key=lambda n: n.args[-1],
                follow=_aliases, read_through=True,
                view=lambda n: _aliases(n) and not n.target._schema.is_mutable)


def reads(node: fx.Node, kind: Kind) -> list[fx.Node]:
    """The ops reading `node`'s data through `kind.follow` ops (not the prefetch / wait calls)."""
    out = []
    for user in node.users:
        if user.target in (kind.prefetch, kind.wait):
            continue
        if kind.follow(user):
            out += ([user] if kind.read_through else []) + reads(user, kind)
        else:
            out.append(user)
    return out


def _name(nodes: Sequence[fx.Node], i: int) -> str:
    return nodes[i].name if 0 <= i < len(nodes) else "<missing>"


def next_op(nodes: Sequence[fx.Node], i: int, kind: Kind) -> str:
    """The first compute op after position i (skipping the streaming calls and slot views)."""
    if i < 0:
        return "<missing>"
    return next((n.name for n in nodes[i + 1:] if n.op in ("call_function", "call_module", "output")
                 and n.target not in kind.ops and not kind.view(n)), "<end>")


# ---------------------------------------------------------------- the schedule and its verifier
@dataclass(frozen=True)
class Transfer:
    """One unit moving host -> staging slot, with graph positions (indices into gm.graph.nodes)."""

    block: str
    bytes: int
    slot: int
    slot_bytes: int
    prefetch_depth: int
    issue_op: str  # the first op after the prefetch call (the transfer is issued before it)
    wait_op: str  # the op the compute stream waits before
    first_use_op: str
    last_use_op: str
    issue_index: int
    wait_index: int
    first_use_index: int
    last_use_index: int


def read_transfers(gm: fx.GraphModule, kind: Kind, make: Callable[..., Transfer]) -> list:
    """The transfers of `kind` the graph performs per run, read from its streaming calls and the slots' readers:
    `make(key, **fields)` per unit (the `Transfer` fields but `block`, plus `writeback_op`, `writeback_index`
    and `last_write_index` for a kind with a write-back), sorted by issue position."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    slot_of = lambda n: int(n.target[len(kind.slot_prefix):])  # noqa: E731
    depth = gm.meta.get(kind.meta_key, {}).get(
        "prefetch_depth", len({n.args[0].target for n in nodes if n.target is kind.prefetch}) - 1)
    slot_bytes = max((get_tensor(gm, n.target).nbytes for n in nodes
                      if n.op == "get_attr" and n.target.startswith(kind.slot_prefix)), default=0)
    found: dict[Any, dict] = {}
    for i, n in enumerate(nodes):
        if n.op == "call_function" and n.target in kind.ops:
            host_arg, slot_arg = (n.args[0], n.args[1]) if n.target is kind.writeback else (n.args[1], n.args[0])
            t = found.setdefault(kind.key(n), {"slot": slot_of(slot_arg), "uses": [], "writes": [],
                                               "bytes": get_tensor(gm, host_arg.target).nbytes})
            t[{kind.prefetch: "issue", kind.wait: "wait", kind.writeback: "writeback"}[n.target]] = i
    waits = sorted((t["wait"], t["slot"], key) for key, t in found.items() if "wait" in t)
    for n in nodes:
        if n.op != "get_attr" or not n.target.startswith(kind.slot_prefix):
            continue
        slot = slot_of(n)
        for use in reads(n, kind):
            j = pos[use]
            owner = [key for w, s, key in waits if s == slot and w <= j]
            owner = owner[-1] if owner else next((key for _, s, key in waits if s == slot), None)
            if owner is None:
                continue
            found[owner]["uses"].append(j)
            schema = getattr(use.target, "_schema", None)
            if use.target is not kind.writeback and schema is not None and schema.is_mutable:
                found[owner]["writes"].append(j)
    out = []
    for key, t in found.items():
        issue, wait = t.get("issue", -1), t.get("wait", -1)
        first, last = (min(t["uses"]), max(t["uses"])) if t["uses"] else (wait, wait)
        fields = dict(bytes=t["bytes"], slot=t["slot"], slot_bytes=slot_bytes, prefetch_depth=depth,
                      issue_op=next_op(nodes, issue, kind), wait_op=next_op(nodes, wait, kind),
                      first_use_op=_name(nodes, first), last_use_op=_name(nodes, last), issue_index=issue,
                      wait_index=wait, first_use_index=first, last_use_index=last)
        if kind.writeback is not None:
            wb = t.get("writeback", -1)
            fields.update(writeback_op=_name(nodes, wb), writeback_index=wb, last_write_index=max(t["writes"],
                                                                                                   default=-1))
        out.append(make(key, **fields))
    return sorted(out, key=lambda t: t.issue_index)


def check_schedule(schedule: Sequence[Transfer], prefetch_depth: int | None = None) -> None:
    """Raise ValueError at the first violation: a unit read before its transfer was issued and waited for,
    a slot overwritten while its unit is still read, a unit larger than its slot, or more than
    prefetch_depth + 1 slots (default: the depth the schedule was built with)."""
    if not schedule:
        return
    depth = prefetch_depth if prefetch_depth is not None else schedule[0].prefetch_depth
    for t in schedule:
        if not 0 <= t.issue_index < t.wait_index <= t.first_use_index:
            raise ValueError(f"{t.block} is not resident before its first use: issued at {t.issue_index} "
                             f"({t.issue_op}), waited at {t.wait_index} ({t.wait_op}), first read at "
                             f"{t.first_use_index} ({t.first_use_op})")
        if t.bytes > t.slot_bytes:
            raise ValueError(f"{t.block} needs {t.bytes} bytes, its slot {t.slot} holds {t.slot_bytes}")
        if not 0 <= t.slot <= depth:
            raise ValueError(f"{t.block} uses slot {t.slot}; prefetch_depth {depth} allows slots 0..{depth}")
    for slot in {t.slot for t in schedule}:
        same = sorted((t for t in schedule if t.slot == slot), key=lambda t: t.issue_index)
        for prev, nxt in zip(same, same[1:]):
            if prev.last_use_index >= nxt.issue_index:
                raise ValueError(f"slot {slot} is overwritten by {nxt.block} (issued at {nxt.issue_index}, "
                                 f"{nxt.issue_op}) while {prev.block} is still read (last at {prev.last_use_index}, "
                                 f"{prev.last_use_op})")


def check_writebacks(schedule: Sequence, label: Callable[[Any], str] = lambda t: t.block) -> None:
    """Raise ValueError for a unit whose new rows are never written back to its host copy, or written back
    outside its residency or before its last in-place update (`label(t)` names the unit)."""
    for t in schedule:
        if t.writeback_index < 0:
            raise ValueError(f"{label(t)}: its new rows are never written back to the host cache")
        if not t.wait_index < t.writeback_index <= t.last_use_index or t.writeback_index < t.last_write_index:
            raise ValueError(f"{label(t)}: written back at {t.writeback_index} ({t.writeback_op}), outside its "
                             f"residency {t.wait_index}..{t.last_use_index} or before its last cache update at "
                             f"{t.last_write_index}")


def check_stream_options(prefetch_depth, pin_memory) -> None:
    """The options every streaming config shares: depth >= 1 (depth + 1 slots) and a pin_memory flag."""
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise ValueError(f"prefetch_depth must be an int >= 1, got {prefetch_depth!r}")
    if not isinstance(pin_memory, bool):
        raise ValueError(f"pin_memory must be True or False, got {pin_memory!r}")


def pin_host_buffers(module: torch.nn.Module) -> int:
    """Pin the host buffers of streamed units in place (e.g. after loading a saved program, whose tensors come
    back pageable, which makes every transfer synchronous); returns how many were pinned. Needs CUDA."""
    pinned = 0
    if not torch.cuda.is_available():
        return 0
    for name, buf in list(module.named_buffers()):
        owner_path, _, attr = name.rpartition(".")
        if attr.startswith(HOST_PREFIX) and buf.device.type == "cpu" and not buf.is_pinned():
            owner = module.get_submodule(owner_path) if owner_path else module
            owner.register_buffer(attr, buf.pin_memory())
            pinned += 1
    return pinned
