"""OffloadPass: keep whole blocks' weights in host memory and stream each into a device staging slot one
block ahead of its use, so the transfer overlaps the compute of the blocks before it.

After FlexGen (Sheng et al. 2023, weights streamed layer by layer with overlapped I/O), LLM in a flash
(Alizadeh et al. 2023, weights kept off the accelerator and loaded just in time) and ShadowKV (Sun et al.
2024, host-resident state prefetched ahead of the layer that needs it).

`gm` comes from `torch.export.export(model, args, strict=False).module()`: weights are `get_attr` nodes
named by FQN (`model.model.layers.3.mlp.up_proj.weight`). A *block* is the `BLOCK_NAME` prefix of an FQN
(`model.model.layers.3`); a weight outside any block belongs to its owner module (`model.lm_head`).
For the selected blocks B_0..B_{n-1} (in order of first use) the pass rewrites `gm` in place:
  - the block's weights are packed at `ALIGN_BYTES` offsets into one uint8 host buffer
    `_memopt_offload_host_<block>` (block_bytes,), pinned when the weights are on CUDA, and deleted from gm;
  - `min(prefetch_depth + 1, n)` uint8 staging slots `_memopt_offload_slot<i>` (slot_bytes,) stay on the
    weights' device; B_j lives in slot j % (prefetch_depth + 1);
  - `memopt::offload_prefetch(slot, host, i)` for B_j is issued at the start of B_{j - prefetch_depth}
    (the graph's start for the first blocks), once the slot's previous block has been read for the last time;
  - `memopt::offload_wait(slot, host, i)` is placed at the start of B_j, followed by aten views
    (slice -> view(dtype) -> view(shape)) of the slot that replace every read of the block's weights.
Blocks come from `config.blocks` and from `plan.decisions` with placement "host" (a decision names a dotted
tail of the block: `model.layers.3` selects `model.model.layers.3`). `transfer_schedule(gm)` reads the schedule
back from the graph (also after a re-export) and `check_schedule` verifies it; `offloaded_device_bytes(gm)`
counts the weight bytes left on the device. Staging memory: n_slots x the largest block's packed bytes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

import torch
from memopt.passes.base import Pass, PassResult
from torch import fx

from memopt.analysis.accounting import BLOCK_NAME
from memopt.names import HOST_PREFIX, SLOT_PREFIX
from memopt.runtime.offload_ops import PREFETCH, WAIT
from memopt.frontend.units import fmt_bytes

CONFIG_VERSION = 1
ALIGN_BYTES = 256
_VIEWS = {torch.ops.aten.slice.Tensor, torch.ops.aten.view.dtype, torch.ops.aten.view.default,
          torch.ops.aten.as_strided.default, torch.ops.aten.reshape.default, torch.ops.aten.alias.default}


@dataclass(frozen=True)
class OffloadConfig:
    """`blocks`: block names or fnmatch patterns, matched against the whole block name
    (`model.model.layers.3`) or a dotted tail of it (`model.layers.3`, `layers.[1-3]`).
    `prefetch_depth`: how many blocks ahead a transfer is issued; `prefetch_depth + 1` staging slots.
    `pin_memory`: pin the host buffers when the weights are on a CUDA device (asynchronous copies need pinned
    memory; with a CPU model host and device are one memory and nothing is pinned)."""

    blocks: tuple[str, ...] = ()
    prefetch_depth: int = 1
    pin_memory: bool = True

    def __post_init__(self):
        if isinstance(self.blocks, str):
            raise ValueError(f"blocks takes a sequence of block names or patterns, got the string {self.blocks!r}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        bad = [b for b in self.blocks if not isinstance(b, str) or not b.strip()]
        if bad:
            raise ValueError(f"blocks must be non-empty names or patterns, got {bad[0]!r}")
        if isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be an int >= 1, got {self.prefetch_depth!r}")
        if not isinstance(self.pin_memory, bool):
            raise ValueError(f"pin_memory must be True or False, got {self.pin_memory!r}")

    def to_json(self) -> dict:
        return {"type": "offload", "version": CONFIG_VERSION, **asdict(self), "blocks": list(self.blocks)}

    @classmethod
    def from_json(cls, d: dict) -> "OffloadConfig":
        from memopt.jsonconfig import config_from_json

        return config_from_json(cls, d, "offload", CONFIG_VERSION)


@dataclass(frozen=True)
class Transfer:
    """One block's weights moving host -> staging slot, with graph positions (indices into gm.graph.nodes)."""

    block: str
    bytes: int
    slot: int
    slot_bytes: int
    prefetch_depth: int
    issue_op: str  # the first op after the prefetch call (the transfer is issued before it)
    wait_op: str  # the op the compute stream waits before (the block's first op)
    first_use_op: str
    last_use_op: str
    issue_index: int
    wait_index: int
    first_use_index: int
    last_use_index: int


# ---------------------------------------------------------------- blocks and their weights
def block_of(fqn: str) -> str:
    """`model.model.layers.3.mlp.up_proj.weight` -> `model.model.layers.3`; outside blocks, the owner module."""
    m = BLOCK_NAME.match(fqn)
    return m.group(1) if m else fqn.rsplit(".", 1)[0]


def _getattr(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj


def weight_blocks(gm: fx.GraphModule) -> dict[str, dict[str, list[fx.Node]]]:
    """block -> {weight FQN -> its get_attr nodes}, blocks in graph order (tensors the graph never reads stay)."""
    out: dict[str, dict[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users and isinstance(_getattr(gm, node.target), torch.Tensor) \
                and not node.target.rpartition(".")[2].startswith(("_memopt_offload", "_memopt_arena")):
            out.setdefault(block_of(node.target), {}).setdefault(node.target, []).append(node)
    return out


def _matches(block: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(block, pattern) or fnmatch.fnmatchcase(block, "*." + pattern)


def select_blocks(blocks, config: OffloadConfig, plan) -> tuple[list[str], list[str]]:
    """Blocks named by the config's patterns or by the plan's host placements; notes on what was left out."""
    chosen, notes = set(), []
    for pattern in config.blocks:
        hit = [b for b in blocks if _matches(b, pattern)]
        if not hit:
            raise ValueError(f"offload block {pattern!r} matches no block of this graph; blocks: "
                             f"{', '.join(blocks)}")
        chosen.update(hit)
    for d in getattr(plan, "decisions", None) or ():
        if getattr(d, "placement", "device") != "host":
            continue
        hit = [b for b in blocks if f".{b}".endswith(f".{d.name}")]
        chosen.update(hit)
        if not hit:
            notes.append(f"plan places {d.name} on host, but no block of this graph is named {d.name}; kept on device")
    return [b for b in blocks if b in chosen], notes


def _mutated(weights: dict[str, list[fx.Node]]) -> str | None:
    """Why a block cannot leave the device: one of its tensors (or a view of it) is written by the graph."""
    for fqn, nodes in weights.items():
        todo = list(nodes)
        while todo:
            for user in todo.pop().users:
                schema = getattr(user.target, "_schema", None)
                if schema is None:
                    continue
                if schema.is_mutable:
                    return f"{fqn} is written by {user.target}"
                if schema.returns and schema.returns[0].alias_info is not None:  # a view: follow it
                    todo.append(user)
    return None


# ---------------------------------------------------------------- the pass
class OffloadPass(Pass):
    """Offload the blocks selected by `config.blocks` or by `plan.decisions` with placement "host"."""

    name = "offload"

    def __init__(self, config: OffloadConfig | None = None):
        if config is not None and not isinstance(config, OffloadConfig):
            raise ValueError(f"config must be an OffloadConfig, got {config!r}")
        self.config = config or OffloadConfig()

    def __call__(self, gm: fx.GraphModule, plan=None) -> PassResult:
        if "memopt_offload" in gm.meta:
            raise ValueError("this graph's weights are already offloaded; apply OffloadPass once")
        blocks = weight_blocks(gm)
        selected, notes = select_blocks(list(blocks), self.config, plan)
        storages = {}
        for b, weights in blocks.items():
            for fqn in weights:
                storages.setdefault(_getattr(gm, fqn).untyped_storage().data_ptr(), set()).add(b)
        todo = []
        for b in selected:
            shared = [f for f in blocks[b] if len(storages[_getattr(gm, f).untyped_storage().data_ptr()]) > 1]
            why = f"{shared[0]} shares memory with another block" if shared else _mutated(blocks[b])
            if why:
                notes.append(f"kept {b} on device: {why}")
            else:
                todo.append(b)
        if not todo:
            return PassResult(gm, False, notes)
        tables = [b for b in todo if all(u.target is torch.ops.aten.embedding.default
                                         for n in _nodes(blocks[b]) for u in n.users)]
        before = offloaded_device_bytes(gm)
        record = _rewrite(gm, {b: blocks[b] for b in todo}, self.config)
        schedule = transfer_schedule(gm)
        check_schedule(schedule)
        after = offloaded_device_bytes(gm)
        moved, staging, host = record["moved_bytes"], record["staging_bytes"], record["host_bytes"]
        pinned = " (pinned)" if record["pinned"] else ""
        notes.insert(0, f"offloaded {len(todo)} blocks to host{pinned}, {self.config.prefetch_depth} ahead: "
                        f"{fmt_bytes(moved)} moved per forward; staging {len(record['slots'])} x "
                        f"{fmt_bytes(record['slot_bytes'])} = {fmt_bytes(staging)} on the device; "
                        f"{fmt_bytes(host)} on the host; device weights {fmt_bytes(before)} -> {fmt_bytes(after)}")
        notes += [f"{b}: the whole embedding table is streamed each forward, not only the rows looked up"
                  for b in tables]
        return PassResult(gm, True, notes)


def _nodes(weights: dict[str, list[fx.Node]]) -> list[fx.Node]:
    return [n for nodes in weights.values() for n in nodes]


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _spans(gm, todo: dict[str, dict[str, list[fx.Node]]]) -> tuple[list[fx.Node], dict[str, tuple[int, int]]]:
    """Graph nodes and, per block, (start, last use): start is its first op (by module scope) or first weight read."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    spans = {}
    for b, weights in todo.items():
        uses = [pos[u] for n in _nodes(weights) for u in n.users]
        scoped = [i for i, n in enumerate(nodes) if n.op == "call_function"
                  and (_scope(n) == b or _scope(n).startswith(b + "."))]
        spans[b] = (min(uses + scoped[:1]), max(uses))
    return nodes, spans


def _issue_points(order: list[str], spans: dict[str, tuple[int, int]], n_slots: int, depth: int,
                  graph_start: int) -> dict[str, int]:
    """B_j's transfer is issued at the start of B_{j-depth} (the graph's start for the first blocks), and never
    before the last read of B_{j-n_slots}, the block that held its slot before it."""
    issue = {}
    for j, b in enumerate(order):
        at = spans[order[j - depth]][0] if j >= depth else graph_start
        if j >= n_slots:
            at = max(at, spans[order[j - n_slots]][1] + 1)
        if at > spans[b][0]:
            raise ValueError(f"cannot offload {b}: {order[j - n_slots]} is still read when {b} starts and both need "
                             f"one of {n_slots} staging slots; raise prefetch_depth or offload fewer blocks")
        issue[b] = at
    return issue


def _rewrite(gm, todo: dict[str, dict[str, list[fx.Node]]], config: OffloadConfig) -> dict:
    nodes, spans = _spans(gm, todo)
    order = sorted(todo, key=lambda b: spans[b][0])
    n_slots = min(config.prefetch_depth + 1, len(order))
    graph_start = next(i for i, n in enumerate(nodes) if n.op == "call_function")
    issue = _issue_points(order, spans, n_slots, config.prefetch_depth, graph_start)
    devices = {_getattr(gm, f).device for b in order for f in todo[b]}
    if len(devices) > 1:
        raise ValueError(f"offloaded blocks' weights sit on several devices {sorted(map(str, devices))}; move the "
                         "model to one device first")
    device = devices.pop()
    pin = config.pin_memory and device.type == "cuda"  # copies cross the host link only from a CUDA model
    packed = {b: _pack(gm, todo[b], pin) for b in order}
    slot_bytes = max(host.numel() for host, _ in packed.values())
    slots = [f"{SLOT_PREFIX}{i}" for i in range(n_slots)]
    for name in slots:
        gm.register_buffer(name, torch.zeros(slot_bytes, dtype=torch.uint8, device=device))
    record = {"prefetch_depth": config.prefetch_depth, "slot_bytes": slot_bytes, "slots": slots, "pinned": pin,
              "blocks": {}}
    g = gm.graph
    for j, b in enumerate(order):  # prefetches first, so a wait at the same anchor lands after them
        host_attr, i = HOST_PREFIX + b.replace(".", "_"), j % n_slots
        gm.register_buffer(host_attr, packed[b][0])
        _call_at(g, nodes[issue[b]], PREFETCH, slots[i], host_attr, i)
        record["blocks"][b] = {"host": host_attr, "bytes": packed[b][0].numel(), "slot": i,
                               "weight_bytes": sum(_getattr(gm, f).nbytes for f in todo[b]),
                               "weights": {f: [o, list(s), str(d)] for f, (o, s, d) in packed[b][1].items()}}
    for j, b in enumerate(order):
        anchor = nodes[spans[b][0]]
        slot = _call_at(g, anchor, WAIT, slots[j % n_slots], record["blocks"][b]["host"], j % n_slots)
        for fqn, layout in packed[b][1].items():
            view = _slot_view(g, anchor, slot, *layout)
            for old in todo[b][fqn]:
                old.replace_all_uses_with(view)
                g.erase_node(old)
            _delete_attr(gm, fqn)
    g.lint()
    gm.recompile()
    host_bytes = sum(u["bytes"] for u in record["blocks"].values())
    record.update(moved_bytes=host_bytes, staging_bytes=slot_bytes * n_slots, host_bytes=host_bytes)
    gm.meta["memopt_offload"] = record
    return record


def _call_at(g: fx.Graph, anchor: fx.Node, op, slot_attr: str, host_attr: str, slot_index: int) -> fx.Node:
    """Insert `op(slot, host, slot_index)` before `anchor`; return its slot get_attr node."""
    with g.inserting_before(anchor):
        slot = g.get_attr(slot_attr)
        call = g.call_function(op, (slot, g.get_attr(host_attr), slot_index))
    call.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack") or {})
    return slot


def _slot_view(g: fx.Graph, anchor: fx.Node, slot: fx.Node, offset: int, shape: torch.Size, dtype) -> fx.Node:
    """aten views only, so the graph stays exportable: slot[offset:end] -> view(dtype) -> view(shape)."""
    with g.inserting_before(anchor):
        view = g.call_function(torch.ops.aten.slice.Tensor, (slot, 0, offset, offset + shape.numel() * dtype.itemsize))
        view = g.call_function(torch.ops.aten.view.dtype, (view, dtype))
        view = g.call_function(torch.ops.aten.view.default, (view, list(shape)))
    view.meta["nn_module_stack"] = dict(anchor.meta.get("nn_module_stack") or {})
    return view


def _pack(gm, weights: dict[str, list[fx.Node]], pin: bool) -> tuple[torch.Tensor, dict]:
    """The block's weights, contiguous, at ALIGN_BYTES offsets in one uint8 host tensor (block_bytes,);
    and per weight its (offset, shape, dtype)."""
    layout, offset = {}, 0
    for fqn in weights:
        t = _getattr(gm, fqn)
        layout[fqn] = (offset, t.shape, t.dtype)
        offset += -(-t.nbytes // ALIGN_BYTES) * ALIGN_BYTES
    host = torch.empty(max(offset, 1), dtype=torch.uint8, pin_memory=pin)
    for fqn, (o, shape, dtype) in layout.items():
        if shape.numel():
            host[o : o + shape.numel() * dtype.itemsize].view(dtype).view(shape).copy_(_getattr(gm, fqn).detach())
    return host, layout


def _delete_attr(gm, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    delattr(gm.get_submodule(owner_path) if owner_path else gm, name)


# ---------------------------------------------------------------- bytes, schedule and its verifier
def offloaded_device_bytes(gm: torch.nn.Module) -> int:
    """Bytes of gm's parameters and buffers that live on the device: everything but the host buffers
    (staging slots included). On a CPU-only machine host and device are one memory; this counts by role."""
    seen, total = set(), 0
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        if name.rpartition(".")[2].startswith(HOST_PREFIX) or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.nbytes
    return total


def pin_host_buffers(module: torch.nn.Module) -> int:
    """Pin the offloaded blocks' host buffers in place (e.g. after loading a saved program, whose tensors come
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


def transfer_schedule(gm: fx.GraphModule) -> list[Transfer]:
    """The transfers the graph performs per forward, read from its prefetch / wait calls and slot views."""
    nodes = list(gm.graph.nodes)
    record = gm.meta.get("memopt_offload", {})
    names = {u["host"]: b for b, u in record.get("blocks", {}).items()}
    depth = record.get("prefetch_depth", len({n.args[2] for n in nodes if n.target is PREFETCH}) - 1)
    slot_bytes = max((_getattr(gm, n.target).numel() for n in nodes if n.op == "get_attr"
                      and n.target.startswith(SLOT_PREFIX)), default=0)
    found: dict[str, dict] = {}
    for i, n in enumerate(nodes):
        if n.target in (PREFETCH, WAIT):
            block = names.get(n.args[1].target, n.args[1].target)
            host_bytes = _getattr(gm, n.args[1].target).numel()
            t = found.setdefault(block, {"slot": n.args[2], "bytes": host_bytes, "uses": []})
            t["issue" if n.target is PREFETCH else "wait"] = i
    waits = sorted((t["wait"], t["slot"], b) for b, t in found.items() if "wait" in t)
    pos = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        if n.op == "get_attr" and n.target.startswith(SLOT_PREFIX):
            slot = int(n.target[len(SLOT_PREFIX):])
            for use in _reads(n):
                j = pos[use]
                owner = [b for w, s, b in waits if s == slot and w <= j]
                owner = owner[-1] if owner else next((b for _, s, b in waits if s == slot), None)
                if owner is not None:
                    found[owner]["uses"].append(j)
    out = []
    for b, t in found.items():
        first, last = (min(t["uses"]), max(t["uses"])) if t["uses"] else (t.get("wait", -1), t.get("wait", -1))
        issue, wait = t.get("issue", -1), t.get("wait", -1)
        out.append(Transfer(b, t["bytes"], t["slot"], slot_bytes, depth, _next_op(nodes, issue),
                            _next_op(nodes, wait), _name(nodes, first), _name(nodes, last), issue, wait, first, last))
    return sorted(out, key=lambda t: t.issue_index)


def _name(nodes: list[fx.Node], i: int) -> str:
    return nodes[i].name if 0 <= i < len(nodes) else "<missing>"


def _next_op(nodes: list[fx.Node], i: int) -> str:
    """The first compute op after position i (skipping the offload calls and slot views)."""
    if i < 0:
        return "<missing>"
    return next((n.name for n in nodes[i + 1:] if n.op in ("call_function", "call_module", "output")
                 and n.target not in _VIEWS | {PREFETCH, WAIT}), "<end>")


def _reads(node: fx.Node) -> list[fx.Node]:
    """The ops reading a slot's data through chains of views (not the prefetch / wait calls themselves)."""
    out = []
    for user in node.users:
        if user.target in (PREFETCH, WAIT):
            continue
        out += _reads(user) if user.target in _VIEWS else [user]
    return out


def check_schedule(schedule: list[Transfer], prefetch_depth: int | None = None) -> None:
    """Raise ValueError at the first violation: a block read before its transfer was issued and waited for,
    a slot overwritten while its block is still read, a block larger than its slot, or more than
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
