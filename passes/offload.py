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
Selection, slots, issue points, the streaming calls and the schedule are passes/host_stream.py's, shared
with passes/kv_offload.py; this file packs a block's weights and views them in its slot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from memopt.passes.base import Pass, PassResult
from memopt.passes.host_stream import (WEIGHTS, Span, Transfer, block_of, block_start, call_before, check_schedule,
                                       check_stream_options, delete_attr, get_tensor, on_host, pin_host_buffers,
                                       plan_slots, read_transfers, register_slots, select)
from torch import fx

from memopt.frontend.units import fmt_bytes
from memopt.names import ARENA_PREFIX, HOST_PREFIX, OFFLOAD_PREFIX, SLOT_PREFIX

__all__ = ["ALIGN_BYTES", "HOST_PREFIX", "SLOT_PREFIX", "OffloadConfig", "OffloadPass", "Transfer", "block_of",
           "check_schedule", "offloaded_device_bytes", "pin_host_buffers", "select_blocks", "transfer_schedule",
           "weight_blocks"]

CONFIG_VERSION = 1
ALIGN_BYTES = 256


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
        check_stream_options(self.prefetch_depth, self.pin_memory)

    def to_json(self) -> dict:
        return {"type": "offload", "version": CONFIG_VERSION, **asdict(self), "blocks": list(self.blocks)}

    @classmethod
    def from_json(cls, d: dict) -> "OffloadConfig":
        from memopt.jsonconfig import config_from_json

        return config_from_json(cls, d, "offload", CONFIG_VERSION)


# ---------------------------------------------------------------- blocks and their weights
def weight_blocks(gm: fx.GraphModule) -> dict[str, dict[str, list[fx.Node]]]:
    """block -> {weight FQN -> its get_attr nodes}, blocks in graph order (tensors the graph never reads stay)."""
    out: dict[str, dict[str, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users and isinstance(get_tensor(gm, node.target), torch.Tensor) \
                and not node.target.rpartition(".")[2].startswith((OFFLOAD_PREFIX, ARENA_PREFIX)):
            out.setdefault(block_of(node.target), {}).setdefault(node.target, []).append(node)
    return out


def select_blocks(blocks, config: OffloadConfig, plan) -> tuple[list[str], list[str]]:
    """Blocks named by the config's patterns or by the plan's host placements; notes on what was left out."""
    chosen, unmatched, unplaced = select(blocks, str, config.blocks, plan, "placement")
    if unmatched:
        raise ValueError(f"offload block {unmatched[0]!r} matches no block of this graph; blocks: "
                         f"{', '.join(blocks)}")
    return chosen, [f"plan places {name} on host, but no block of this graph is named {name}; kept on device"
                    for name in unplaced]


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
        if WEIGHTS.meta_key in gm.meta:
            raise ValueError("this graph's weights are already offloaded; apply OffloadPass once")
        blocks = weight_blocks(gm)
        selected, notes = select_blocks(list(blocks), self.config, plan)
        storages = {}
        for b, weights in blocks.items():
            for fqn in weights:
                storages.setdefault(get_tensor(gm, fqn).untyped_storage().data_ptr(), set()).add(b)
        todo = []
        for b in selected:
            shared = [f for f in blocks[b] if len(storages[get_tensor(gm, f).untyped_storage().data_ptr()]) > 1]
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


def _spans(nodes: list[fx.Node], todo: dict[str, dict[str, list[fx.Node]]]) -> dict[str, Span]:
    """Per block: it starts (and must be resident) at its first op (by module scope) or first weight read,
    and is last read at its last weight read."""
    pos = {n: i for i, n in enumerate(nodes)}
    spans = {}
    for b, weights in todo.items():
        uses = [pos[u] for n in _nodes(weights) for u in n.users]
        start = block_start(nodes, b, min(uses))
        spans[b] = Span(start, start, max(uses))
    return spans


def _refuse(block: str, holder: str, n_slots: int) -> str:
    return (f"cannot offload {block}: {holder} is still read when {block} starts and both need one of {n_slots} "
            "staging slots; raise prefetch_depth or offload fewer blocks")


def _rewrite(gm, todo: dict[str, dict[str, list[fx.Node]]], config: OffloadConfig) -> dict:
    nodes = list(gm.graph.nodes)
    spans = _spans(nodes, todo)
    order = sorted(todo, key=lambda b: spans[b].start)
    slots = plan_slots(nodes, order, spans, config.prefetch_depth, _refuse)
    devices = {get_tensor(gm, f).device for b in order for f in todo[b]}
    if len(devices) > 1:
        raise ValueError(f"offloaded blocks' weights sit on several devices {sorted(map(str, devices))}; move the "
                         "model to one device first")
    device = devices.pop()
    pin = config.pin_memory and device.type == "cuda"  # copies cross the host link only from a CUDA model
    packed = {b: _pack(gm, todo[b], pin) for b in order}
    slot_bytes = max(host.numel() for host, _ in packed.values())
    names = register_slots(gm, SLOT_PREFIX, slots.n_slots, slot_bytes, torch.uint8, device)
    record = {"prefetch_depth": config.prefetch_depth, "slot_bytes": slot_bytes, "slots": names, "pinned": pin,
              "blocks": {}}
    g = gm.graph
    for b in order:  # prefetches first, so a wait at the same anchor lands after them
        host_attr, i = HOST_PREFIX + b.replace(".", "_"), slots.slot[b]
        gm.register_buffer(host_attr, packed[b][0])
        call_before(g, nodes[slots.issue[b]], WEIGHTS.prefetch, (names[i], host_attr, i), scoped=True)
        record["blocks"][b] = {"host": host_attr, "bytes": packed[b][0].numel(), "slot": i,
                               "weight_bytes": sum(get_tensor(gm, f).nbytes for f in todo[b]),
                               "weights": {f: [o, list(s), str(d)] for f, (o, s, d) in packed[b][1].items()}}
    for b in order:
        anchor, i = nodes[spans[b].wait], slots.slot[b]
        slot = call_before(g, anchor, WEIGHTS.wait, (names[i], record["blocks"][b]["host"], i), scoped=True).args[0]
        for fqn, layout in packed[b][1].items():
            view = _slot_view(g, anchor, slot, *layout)
            for old in todo[b][fqn]:
                old.replace_all_uses_with(view)
                g.erase_node(old)
            delete_attr(gm, fqn)
    g.lint()
    gm.recompile()
    host_bytes = sum(u["bytes"] for u in record["blocks"].values())
    record.update(moved_bytes=host_bytes, staging_bytes=slot_bytes * slots.n_slots, host_bytes=host_bytes)
    gm.meta[WEIGHTS.meta_key] = record
    return record


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
        t = get_tensor(gm, fqn)
        layout[fqn] = (offset, t.shape, t.dtype)
        offset += -(-t.nbytes // ALIGN_BYTES) * ALIGN_BYTES
    host = torch.zeros(max(offset, 1), dtype=torch.uint8, pin_memory=pin)  # padding too: an artifact holds no stray heap bytes
    for fqn, (o, shape, dtype) in layout.items():
        if shape.numel():
            host[o : o + shape.numel() * dtype.itemsize].view(dtype).view(shape).copy_(get_tensor(gm, fqn).detach())
    return host, layout


# ---------------------------------------------------------------- bytes and schedule
def offloaded_device_bytes(gm: torch.nn.Module) -> int:
    """Bytes of gm's parameters and buffers that live on the device: everything but the host buffers
    (staging slots included). On a CPU-only machine host and device are one memory; this counts by role."""
    seen, total = set(), 0
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        if on_host(name) or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.nbytes
    return total


def transfer_schedule(gm: fx.GraphModule) -> list[Transfer]:
    """The weight transfers the graph performs per forward, read from its prefetch / wait calls and slot views
    (passes/host_stream.py); verify it with `check_schedule`."""
    names = {u["host"]: b for b, u in gm.meta.get(WEIGHTS.meta_key, {}).get("blocks", {}).items()}
    return read_transfers(gm, WEIGHTS, lambda host, **fields: Transfer(names.get(host, host), **fields))
