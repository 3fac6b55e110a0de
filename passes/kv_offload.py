"""KVOffloadPass: keep selected layers' KV caches in host memory and stream each into a device staging slot
one layer ahead of its attention; only the step's new rows travel back.

After FlexGen (Sheng et al. 2023: the KV cache on the host in a token-major (seq, batch * heads, head_dim)
layout, loaded layer by layer with overlapped I/O) and ShadowKV (Sun et al. 2024: host-resident cache
prefetched ahead of the layer that needs it).

`gm` is `capture(src, phase="decode", cache_len=N).module()`: layer `i` does
    K = index_copy_(key_cache_i, 2, pos, k_new); V = index_copy_(value_cache_i, 2, pos, v_new)
    out = scaled_dot_product_attention(q, expand(K), expand(V), ...)
with key_cache_i / value_cache_i (batch, kv_heads, N, head_dim) buffers. For the selected layers
L_0..L_{n-1} (graph order) the pass rewrites `gm` in place:
  - keys and values move to one host buffer `_memopt_offload_host_kv<i>` (2, N, batch, kv_heads, head_dim),
    token-major so one step's new rows are contiguous, pinned when the cache is on CUDA; the cache
    buffers are deleted;
  - `min(prefetch_depth + 1, n)` 1-d staging slots `_memopt_offload_kv_cache_slot<j>` stay on the device;
    L_j lives in slot j % (prefetch_depth + 1);
  - `memopt::kv_offload_prefetch(slot, host, i)` is issued at the start of block L_{j - prefetch_depth}
    (the graph's start for the first layers), after the slot's previous layer was last read;
  - `memopt::kv_offload_wait` goes just before the layer's first cache update, followed by aten views
    slot[:numel] -> view(2, N, B, H, D) -> select -> permute(1, 2, 0, 3) that the index_copy_ now
    writes (attention reads them unchanged);
  - `memopt::kv_offload_writeback(host, slot, pos, i)` follows the layer's second update: rows `pos` only.
`kv_transfer_schedule(gm)` reads the schedule back and `check_kv_schedule` verifies it (with
passes/offload.py's `check_schedule`, plus the write-backs); `kv_device_bytes(gm)` counts the KV bytes
left on the device (caches kept there plus staging slots).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from memopt.passes.base import Pass, PassResult
from memopt.passes.kv import cache_updates
from memopt.passes.offload import (
    HOST_PREFIX,
    Transfer,
    _matches,
    _name,
    _scope,
    check_schedule,
)
from torch import fx

from memopt.analysis.accounting import BLOCK_NAME
from memopt.names import KV_NAME
from memopt.runtime.offload_ops import KV_PREFETCH, KV_WAIT, KV_WRITEBACK
from memopt.frontend.units import fmt_bytes

CONFIG_VERSION = 1
KV_HOST_PREFIX = HOST_PREFIX + "kv"
KV_SLOT_PREFIX = "_memopt_offload_kv_cache_slot"
_KV_OPS = (KV_PREFETCH, KV_WAIT, KV_WRITEBACK)


@dataclass(frozen=True)
class KVOffloadConfig:
    """`layers`: layer indices (3) or fnmatch patterns of the layer's block name, whole or a dotted tail
    (`model.layers.3`, `layers.[1-3]`). `prefetch_depth`: how many layers ahead a transfer is issued;
    `prefetch_depth + 1` staging slots. `pin_memory`: pin the host caches when the cache is on CUDA."""

    layers: tuple[int | str, ...] = ()
    prefetch_depth: int = 1
    pin_memory: bool = True

    def __post_init__(self):
        if isinstance(self.layers, (str, int)):
            raise ValueError(f"layers takes a sequence of layer indices or patterns, got {self.layers!r}")
        object.__setattr__(self, "layers", tuple(self.layers))
        bad = [x for x in self.layers if isinstance(x, bool) or not (isinstance(x, int) and x >= 0
                                                                    or isinstance(x, str) and x.strip())]
        if bad:
            raise ValueError(f"layers must be indices >= 0 or non-empty patterns, got {bad[0]!r}")
        if isinstance(self.prefetch_depth, bool) or not isinstance(self.prefetch_depth, int) or self.prefetch_depth < 1:
            raise ValueError(f"prefetch_depth must be an int >= 1, got {self.prefetch_depth!r}")
        if not isinstance(self.pin_memory, bool):
            raise ValueError(f"pin_memory must be True or False, got {self.pin_memory!r}")

    def to_json(self) -> dict:
        return {"type": "kv_offload", "version": CONFIG_VERSION, **asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_json(cls, d: dict) -> "KVOffloadConfig":
        from memopt.jsonconfig import config_from_json

        return config_from_json(cls, d, "kv_offload", CONFIG_VERSION)


@dataclass(frozen=True)
class KVTransfer(Transfer):
    """One layer's cache host -> slot (`bytes` per step) and its new rows slot -> host (`writeback_index`).
    `block` is the layer's block name; `last_write_index` the last cache update before the write-back."""

    layer: int
    writeback_op: str
    writeback_index: int
    last_write_index: int


@dataclass
class KVSite:
    """One layer's two cache updates (`copies`: key, value) and the block that owns them."""

    layer: int
    block: str
    copies: tuple[fx.Node, fx.Node]


# ---------------------------------------------------------------- finding and selecting layers
def find_kv_sites(gm: fx.GraphModule) -> list[KVSite]:
    """Layers whose `key_cache_i` / `value_cache_i` buffers are updated by index_copy_, in graph order."""
    sites = []
    for layer, pair in cache_updates(gm).items():
        m = BLOCK_NAME.match(_scope(pair["key"]))
        sites.append(KVSite(layer, m.group(1) if m else f"layer.{layer}", (pair["key"], pair["value"])))
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(sites, key=lambda s: min(pos[c] for c in s.copies))


def select_layers(sites: list[KVSite], config: KVOffloadConfig, plan) -> tuple[list[KVSite], list[str]]:
    """Sites named by the config (index or pattern) or by plan decisions with kv_placement "host"."""
    chosen, notes = set(), []
    for key in config.layers:
        hit = [s.layer for s in sites if (s.layer == key if isinstance(key, int) else _matches(s.block, key))]
        if not hit:
            raise ValueError(f"KV offload layer {key!r} matches no cached layer of this graph; layers: "
                             f"{', '.join(f'{s.layer} ({s.block})' for s in sites)}")
        chosen.update(hit)
    for d in getattr(plan, "decisions", None) or ():
        if getattr(d, "kv_placement", "device") != "host":
            continue
        hit = [s.layer for s in sites if f".{s.block}".endswith(f".{d.name}")]
        chosen.update(hit)
        if not hit:
            notes.append(f"plan places {d.name}'s KV cache on host, but no cached layer is named {d.name}; "
                         "kept on device")
    return [s for s in sites if s.layer in chosen], notes


# ---------------------------------------------------------------- the pass
class KVOffloadPass(Pass):
    """Offload the KV caches of the layers selected by `config.layers` or by `plan.decisions` with
    kv_placement "host"."""

    name = "kv_offload"

    def __init__(self, config: KVOffloadConfig | None = None):
        if config is not None and not isinstance(config, KVOffloadConfig):
            raise ValueError(f"config must be a KVOffloadConfig, got {config!r}")
        self.config = config or KVOffloadConfig()

    def __call__(self, gm: fx.GraphModule, plan=None) -> PassResult:
        if "memopt_kv_offload" in gm.meta:
            raise ValueError("this graph's KV cache is already offloaded; apply KVOffloadPass once")
        sites = find_kv_sites(gm)
        if not sites and (self.config.layers or plan is None):
            raise ValueError("KVOffloadPass found no key_cache_{i}/value_cache_{i} index_copy_ update; pass "
                             "capture(src, phase='decode', ...).module() (before KV compression)")
        selected, notes = select_layers(sites, self.config, plan)
        if not selected:
            return PassResult(gm, False, notes)
        before = kv_device_bytes(gm)
        record = _rewrite(gm, selected, self.config)
        check_kv_schedule(kv_transfer_schedule(gm))
        after = kv_device_bytes(gm)
        pinned = " (pinned)" if record["pinned"] else ""
        layers = f"{len(selected)} layer{'s' * (len(selected) != 1)}"
        notes.insert(0, f"offloaded the KV cache of {layers} to host{pinned}, "
                        f"{self.config.prefetch_depth} ahead: {fmt_bytes(record['host_bytes'])} read per step, "
                        f"{fmt_bytes(record['row_bytes'])} written back per new token; staging "
                        f"{len(record['slots'])} x {fmt_bytes(record['slot_bytes'])} on the device; "
                        f"device KV {fmt_bytes(before)} -> {fmt_bytes(after)}")
        return PassResult(gm, True, notes)


def _positions(gm, sites: list[KVSite]) -> tuple[list[fx.Node], dict[int, tuple[int, int, int]]]:
    """Graph nodes and per layer (block start, first cache update, attention's last read of the cache)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    spans = {}
    for s in sites:
        scoped = [i for i, n in enumerate(nodes) if n.op == "call_function"
                  and (_scope(n) == s.block or _scope(n).startswith(s.block + "."))]
        first = min(pos[c] for c in s.copies)
        last = max(pos[u] for c in s.copies for u in _terminal_reads(c))
        spans[s.layer] = (min(scoped[:1] + [first]), first, last)
    return nodes, spans


def _issue_points(order: list[int], spans: dict, n_slots: int, depth: int, graph_start: int) -> dict[int, int]:
    """L_j's transfer is issued at the start of block L_{j-depth} (the graph's start for the first layers),
    never before the last read of L_{j-n_slots}, which held its slot before it."""
    issue = {}
    for j, layer in enumerate(order):
        at = spans[order[j - depth]][0] if j >= depth else graph_start
        if j >= n_slots:
            at = max(at, spans[order[j - n_slots]][2] + 1)
        if at > spans[layer][1]:
            raise ValueError(f"cannot offload layer {layer}'s KV cache: layer {order[j - n_slots]} still reads "
                             f"it when layer {layer} starts and both need one of {n_slots} staging slots; raise "
                             "prefetch_depth or offload fewer layers")
        issue[layer] = at
    return issue


def _rewrite(gm, sites: list[KVSite], config: KVOffloadConfig) -> dict:
    nodes, spans = _positions(gm, sites)
    order = [s.layer for s in sites]
    caches = {s.layer: [gm.get_buffer(c.args[0].target) for c in s.copies] for s in sites}
    kinds = {(k.dtype, k.device) for pair in caches.values() for k in pair}
    if len(kinds) > 1 or any(k.shape != v.shape for k, v in caches.values()):
        raise ValueError(f"offloaded KV caches must share one dtype and device, and keys and values one shape; "
                         f"got {sorted(map(str, kinds))}; offload fewer layers")
    dtype, device = kinds.pop()
    n_slots = min(config.prefetch_depth + 1, len(order))
    graph_start = next(i for i, n in enumerate(nodes) if n.op == "call_function")
    issue = _issue_points(order, spans, n_slots, config.prefetch_depth, graph_start)
    pin = config.pin_memory and device.type == "cuda"
    hosts = {layer: _to_host(k, v, pin) for layer, (k, v) in caches.items()}
    slot_numel = max(h.numel() for h in hosts.values())
    slots = [f"{KV_SLOT_PREFIX}{j}" for j in range(n_slots)]
    for name in slots:
        gm.register_buffer(name, torch.zeros(slot_numel, dtype=dtype, device=device))
    g = gm.graph
    record = {"prefetch_depth": config.prefetch_depth, "slots": slots, "slot_bytes": slot_numel * dtype.itemsize,
              "pinned": pin, "layers": {}}
    for j, s in enumerate(sites):  # prefetches first, so a wait at the same anchor lands after them
        host_attr = f"{KV_HOST_PREFIX}{s.layer}"
        gm.register_buffer(host_attr, hosts[s.layer])
        with g.inserting_before(nodes[issue[s.layer]]):
            g.call_function(KV_PREFETCH, (g.get_attr(slots[j % n_slots]), g.get_attr(host_attr), s.layer))
        record["layers"][s.layer] = {"block": s.block, "host": host_attr, "slot": j % n_slots,
                                     "bytes": hosts[s.layer].nbytes,
                                     "row_bytes": hosts[s.layer][:, 0].nbytes}
    for j, s in enumerate(sites):
        _reroute(gm, s, slots[j % n_slots], record["layers"][s.layer]["host"], hosts[s.layer].shape)
    g.lint()
    gm.recompile()
    record["host_bytes"] = sum(u["bytes"] for u in record["layers"].values())
    record["row_bytes"] = sum(u["row_bytes"] for u in record["layers"].values())
    record["staging_bytes"] = record["slot_bytes"] * n_slots
    gm.meta["memopt_kv_offload"] = record
    return record


def _to_host(key: torch.Tensor, value: torch.Tensor, pin: bool) -> torch.Tensor:
    """(batch, kv_heads, N, head_dim) keys and values -> one token-major (2, N, batch, kv_heads, head_dim)."""
    b, h, n, d = key.shape
    host = torch.empty((2, n, b, h, d), dtype=key.dtype, pin_memory=pin)
    host[0].copy_(key.detach().permute(2, 0, 1, 3))
    host[1].copy_(value.detach().permute(2, 0, 1, 3))
    return host


def _reroute(gm, s: KVSite, slot_attr: str, host_attr: str, shape: torch.Size) -> None:
    """Wait before the first update, point each update at a permuted slot view made just before it (a view
    made before the other update would be stale for autograd), write back after the second."""
    g = gm.graph
    order = {n: i for i, n in enumerate(g.nodes)}
    first, second = sorted(s.copies, key=order.get)
    pos = s.copies[0].args[2]
    if s.copies[1].args[2] is not pos:
        raise ValueError(f"layer {s.layer}: keys and values are written at different positions")
    with g.inserting_before(first):
        slot = g.get_attr(slot_attr)
        g.call_function(KV_WAIT, (slot, g.get_attr(host_attr), s.layer))
    for kv, copy in enumerate(s.copies):
        with g.inserting_before(copy):
            flat = g.call_function(torch.ops.aten.slice.Tensor, (slot, 0, 0, shape.numel()))
            cache = g.call_function(torch.ops.aten.view.default, (flat, list(shape)))
            view = g.call_function(torch.ops.aten.permute.default,
                                   (g.call_function(torch.ops.aten.select.int, (cache, 0, kv)), [1, 2, 0, 3]))
        old = copy.args[0]
        copy.args = (view, *copy.args[1:])
        g.erase_node(old)
        owner, _, name = old.target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, name)
    with g.inserting_before(second.next):
        g.call_function(KV_WRITEBACK, (g.get_attr(host_attr), slot, pos, s.layer))


# ---------------------------------------------------------------- bytes, schedule and its verifier
def kv_device_bytes(gm: torch.nn.Module) -> int:
    """Bytes of KV cache on the device: caches kept there (`key_cache_i`, compressed `kv_cache_*`) and the
    staging slots; host caches are not counted. On a CPU-only machine this counts by role."""
    return sum(t.nbytes for name, t in gm.named_buffers()
               if KV_NAME.search(name.rpartition(".")[2]) and not name.rpartition(".")[2].startswith(HOST_PREFIX))


def _aliases(node: fx.Node) -> bool:
    """The op returns (a view of) an input: a view or an in-place update."""
    schema = getattr(node.target, "_schema", None)
    return bool(schema and schema.returns and schema.returns[0].alias_info is not None)


def _terminal_reads(node: fx.Node) -> list[fx.Node]:
    """Ops reading `node`'s data, following views and in-place updates (which are reads too)."""
    out = []
    for user in node.users:
        if user.target in _KV_OPS:
            out.append(user)
        elif _aliases(user):
            out += [user] + _terminal_reads(user)
        else:
            out.append(user)
    return out


def kv_transfer_schedule(gm: fx.GraphModule) -> list[KVTransfer]:
    """The KV transfers the graph performs per step, read from its prefetch / wait / write-back calls and
    the slot's readers."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    record = gm.meta.get("memopt_kv_offload", {})
    depth = record.get("prefetch_depth", len({n.args[0].target for n in nodes if n.target is KV_PREFETCH}) - 1)
    slot_bytes = max((gm.get_buffer(n.target).nbytes for n in nodes
                      if n.op == "get_attr" and n.target.startswith(KV_SLOT_PREFIX)), default=0)
    found: dict[int, dict] = {}
    for i, n in enumerate(nodes):
        if n.target in _KV_OPS:
            host_arg, slot_arg = (n.args[0], n.args[1]) if n.target is KV_WRITEBACK else (n.args[1], n.args[0])
            t = found.setdefault(n.args[-1], {"slot": int(slot_arg.target[len(KV_SLOT_PREFIX):]),
                                              "host": gm.get_buffer(host_arg.target), "uses": [], "writes": []})
            t[{KV_PREFETCH: "issue", KV_WAIT: "wait", KV_WRITEBACK: "writeback"}[n.target]] = i
    waits = sorted((t["wait"], t["slot"], layer) for layer, t in found.items() if "wait" in t)
    for n in nodes:
        if n.op == "get_attr" and n.target.startswith(KV_SLOT_PREFIX):
            slot = int(n.target[len(KV_SLOT_PREFIX):])
            for use in _terminal_reads(n):
                if use.target in (KV_PREFETCH, KV_WAIT):
                    continue
                j = pos[use]
                owner = [layer for w, s, layer in waits if s == slot and w <= j]
                owner = owner[-1] if owner else next((layer for _, s, layer in waits if s == slot), None)
                if owner is not None:
                    found[owner]["uses"].append(j)
                    schema = getattr(use.target, "_schema", None)
                    if use.target is not KV_WRITEBACK and schema is not None and schema.is_mutable:
                        found[owner]["writes"].append(j)
    blocks = {layer: u["block"] for layer, u in record.get("layers", {}).items()}
    out = []
    for layer, t in found.items():
        wait = t.get("wait", -1)
        first, last = (min(t["uses"]), max(t["uses"])) if t["uses"] else (wait, wait)
        issue, wb = t.get("issue", -1), t.get("writeback", -1)
        host = t["host"]
        out.append(KVTransfer(blocks.get(layer, f"layer {layer}"), host.nbytes, t["slot"], slot_bytes, depth,
                              _next_op(nodes, issue), _next_op(nodes, wait), _name(nodes, first), _name(nodes, last),
                              issue, wait, first, last, layer, _name(nodes, wb), wb, max(t["writes"], default=-1)))
    return sorted(out, key=lambda t: t.issue_index)


def _next_op(nodes: list[fx.Node], i: int) -> str:
    """The first compute op after position i (skipping the KV offload calls and views)."""
    if i < 0:
        return "<missing>"
    return next((n.name for n in nodes[i + 1:] if n.op == "output" or n.op == "call_function"
                 and n.target not in _KV_OPS and not (_aliases(n) and not n.target._schema.is_mutable)), "<end>")


def check_kv_schedule(schedule: list[KVTransfer], prefetch_depth: int | None = None) -> None:
    """Raise ValueError at the first violation: everything `check_schedule` checks for weights (resident
    before first use, no slot overwritten while read, fits its slot, at most prefetch_depth + 1 slots), plus
    a layer whose new rows are never written back, or written back before its last cache update."""
    check_schedule(list(schedule), prefetch_depth)
    for t in schedule:
        if t.writeback_index < 0:
            raise ValueError(f"layer {t.layer} ({t.block}): its new rows are never written back to the host cache")
        if not t.wait_index < t.writeback_index <= t.last_use_index or t.writeback_index < t.last_write_index:
            raise ValueError(f"layer {t.layer} ({t.block}): written back at {t.writeback_index} "
                             f"({t.writeback_op}), outside its residency {t.wait_index}..{t.last_use_index} or "
                             f"before its last cache update at {t.last_write_index}")
