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
`kv_transfer_schedule(gm)` reads the schedule back and `check_kv_schedule` verifies it (what weights are
checked for, plus the write-backs); `kv_device_bytes(gm)` counts the KV bytes left on the device (caches kept
there plus staging slots). Selection, slots, issue points, the streaming calls and the schedule are
passes/host_stream.py's, shared with passes/offload.py; this file lays a cache out on the host and reroutes
its updates to the slot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from memopt.passes.base import Pass, PassResult
from memopt.passes.host_stream import (KV_CACHE, Span, Transfer, block_start, call_before, check_schedule,
                                       check_stream_options, check_writebacks, delete_attr, on_host, plan_slots,
                                       read_transfers, reads, register_slots, scope, select)
from memopt.passes.kv import cache_updates
from torch import fx

from memopt.frontend.units import fmt_bytes
from memopt.names import BLOCK_NAME, KV_HOST_PREFIX, KV_NAME, KV_SLOT_PREFIX

__all__ = ["KV_HOST_PREFIX", "KV_SLOT_PREFIX", "KVOffloadConfig", "KVOffloadPass", "KVSite", "KVTransfer",
           "check_kv_schedule", "find_kv_sites", "kv_device_bytes", "kv_transfer_schedule", "select_layers"]

CONFIG_VERSION = 1


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
        check_stream_options(self.prefetch_depth, self.pin_memory)

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
        m = BLOCK_NAME.match(scope(pair["key"]))
        sites.append(KVSite(layer, m.group(1) if m else f"layer.{layer}", (pair["key"], pair["value"])))
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(sites, key=lambda s: min(pos[c] for c in s.copies))


def select_layers(sites: list[KVSite], config: KVOffloadConfig, plan) -> tuple[list[KVSite], list[str]]:
    """Sites named by the config (index or pattern) or by plan decisions with kv_placement "host"."""
    chosen, unmatched, unplaced = select(sites, lambda s: s.block, config.layers, plan, "kv_placement",
                                         index=lambda s: s.layer)
    if unmatched:
        raise ValueError(f"KV offload layer {unmatched[0]!r} matches no cached layer of this graph; layers: "
                         f"{', '.join(f'{s.layer} ({s.block})' for s in sites)}")
    return chosen, [f"plan places {name}'s KV cache on host, but no cached layer is named {name}; kept on device"
                    for name in unplaced]


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
        if KV_CACHE.meta_key in gm.meta:
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


def _spans(nodes: list[fx.Node], sites: list[KVSite]) -> dict[int, Span]:
    """Per layer: its block's start, its first cache update (the cache is resident before it) and attention's
    last read of the cache."""
    pos = {n: i for i, n in enumerate(nodes)}
    spans = {}
    for s in sites:
        first = min(pos[c] for c in s.copies)
        last = max(pos[u] for c in s.copies for u in reads(c, KV_CACHE))
        spans[s.layer] = Span(block_start(nodes, s.block, first), first, last)
    return spans


def _refuse(layer: int, holder: int, n_slots: int) -> str:
    return (f"cannot offload layer {layer}'s KV cache: layer {holder} still reads it when layer {layer} starts and "
            f"both need one of {n_slots} staging slots; raise prefetch_depth or offload fewer layers")


def _rewrite(gm, sites: list[KVSite], config: KVOffloadConfig) -> dict:
    nodes = list(gm.graph.nodes)
    spans = _spans(nodes, sites)
    caches = {s.layer: [gm.get_buffer(c.args[0].target) for c in s.copies] for s in sites}
    kinds = {(k.dtype, k.device) for pair in caches.values() for k in pair}
    if len(kinds) > 1 or any(k.shape != v.shape for k, v in caches.values()):
        raise ValueError(f"offloaded KV caches must share one dtype and device, and keys and values one shape; "
                         f"got {sorted(map(str, kinds))}; offload fewer layers")
    dtype, device = kinds.pop()
    slots = plan_slots(nodes, [s.layer for s in sites], spans, config.prefetch_depth, _refuse)
    pin = config.pin_memory and device.type == "cuda"
    hosts = {layer: _to_host(k, v, pin) for layer, (k, v) in caches.items()}
    slot_numel = max(h.numel() for h in hosts.values())
    names = register_slots(gm, KV_SLOT_PREFIX, slots.n_slots, slot_numel, dtype, device)
    g = gm.graph
    record = {"prefetch_depth": config.prefetch_depth, "slots": names, "slot_bytes": slot_numel * dtype.itemsize,
              "pinned": pin, "layers": {}}
    for s in sites:  # prefetches first, so a wait at the same anchor lands after them
        host_attr, i = f"{KV_HOST_PREFIX}{s.layer}", slots.slot[s.layer]
        gm.register_buffer(host_attr, hosts[s.layer])
        call_before(g, nodes[slots.issue[s.layer]], KV_CACHE.prefetch, (names[i], host_attr, s.layer))
        record["layers"][s.layer] = {"block": s.block, "host": host_attr, "slot": i,
                                     "bytes": hosts[s.layer].nbytes,
                                     "row_bytes": hosts[s.layer][:, 0].nbytes}
    for s in sites:
        _reroute(gm, s, names[slots.slot[s.layer]], record["layers"][s.layer]["host"], hosts[s.layer].shape)
    g.lint()
    gm.recompile()
    record["host_bytes"] = sum(u["bytes"] for u in record["layers"].values())
    record["row_bytes"] = sum(u["row_bytes"] for u in record["layers"].values())
    record["staging_bytes"] = record["slot_bytes"] * slots.n_slots
    gm.meta[KV_CACHE.meta_key] = record
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
    slot = call_before(g, first, KV_CACHE.wait, (slot_attr, host_attr, s.layer)).args[0]
    for kv, copy in enumerate(s.copies):
        with g.inserting_before(copy):
            flat = g.call_function(torch.ops.aten.slice.Tensor, (slot, 0, 0, shape.numel()))
            cache = g.call_function(torch.ops.aten.view.default, (flat, list(shape)))
            view = g.call_function(torch.ops.aten.permute.default,
                                   (g.call_function(torch.ops.aten.select.int, (cache, 0, kv)), [1, 2, 0, 3]))
        old = copy.args[0]
        copy.args = (view, *copy.args[1:])
        g.erase_node(old)
        delete_attr(gm, old.target)
    call_before(g, second.next, KV_CACHE.writeback, (host_attr, slot, pos, s.layer))


# ---------------------------------------------------------------- bytes, schedule and its verifier
def kv_device_bytes(gm: torch.nn.Module) -> int:
    """Bytes of KV cache on the device: caches kept there (`key_cache_i`, compressed `kv_cache_*`) and the
    staging slots; host caches are not counted. On a CPU-only machine this counts by role."""
    return sum(t.nbytes for name, t in gm.named_buffers()
               if KV_NAME.search(name.rpartition(".")[2]) and not on_host(name))


def kv_transfer_schedule(gm: fx.GraphModule) -> list[KVTransfer]:
    """The KV transfers the graph performs per step, read from its prefetch / wait / write-back calls and
    the slot's readers (passes/host_stream.py)."""
    blocks = {layer: u["block"] for layer, u in gm.meta.get(KV_CACHE.meta_key, {}).get("layers", {}).items()}
    return read_transfers(gm, KV_CACHE, lambda layer, **fields: KVTransfer(blocks.get(layer, f"layer {layer}"),
                                                                              layer=layer, **fields))


def check_kv_schedule(schedule: list[KVTransfer], prefetch_depth: int | None = None) -> None:
    """Raise ValueError at the first violation: everything `check_schedule` checks for weights (resident
    before first use, no slot overwritten while read, fits its slot, at most prefetch_depth + 1 slots), plus
    a layer whose new rows are never written back, or written back before its last cache update."""
    check_schedule(list(schedule), prefetch_depth)
    check_writebacks(schedule, lambda t: f"layer {t.layer} ({t.block})")
