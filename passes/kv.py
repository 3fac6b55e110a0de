"""KVCompressionPass: rewrite a captured decode step to keep a compressed KV cache.

`gm` is `capture(src, phase="decode", cache_len=N).module()`: each layer `i` holds a static cache in the
buffers `key_cache_{i}` / `value_cache_{i}` (batch, kv_heads, N, head_dim) and does

    K = index_copy_(key_cache_i, 2, pos, k_new); V = index_copy_(value_cache_i, 2, pos, v_new)
    out = scaled_dot_product_attention(q, expand(K), expand(V), mask, scale=s)

The pass replaces each such group by one `memopt::kv_attend(q, k_new, v_new, [state...], pos, layouts, s)`
(`memopt.runtime.kv_ops`), registers the policy's buffers (`kv_cache_{i}_g{j}_{name}`, counted as KV cache
by the analysis), and deletes the full-size buffers, so the memory really drops. The policy comes from
the constructor (`KVCachePolicy`, `PerHeadKVPolicy` or `PerLayerKVPolicy`) or, when None, from the plan's
per-layer `kv_policy` strings (`parse_kv_spec`). `gm.meta["memopt_kv"]` records the layouts for
`memopt.generate` (prefill) and the byte accounting. Keys are cached after RoPE, so evicted caches
need no re-rotation; the decode step's position comes from `cache_position`. A KIVI store of pre-RoPE keys
(`KIVIConfig.pre_rope`) gets the model's RoPE `inv_freq` from the graph's `rotary_emb.inv_freq` buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch._guards import detect_fake_mode

from memopt.kv.layout import Layout, layouts_to_str
from memopt.kv.policy import AnyKVPolicy, KVCachePolicy, PerHeadKVPolicy, PerLayerKVPolicy, parse_kv_spec
from memopt.passes.base import Pass, PassResult
from memopt.runtime import kv_ops  # noqa: F401  (registers memopt::kv_attend)

INDEX_COPY = torch.ops.aten.index_copy_.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default
CACHE_NAME = re.compile(r"^(key|value)_cache_(\d+)$")
_VIEWS = {torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default, torch.ops.aten.reshape.default,
          torch.ops.aten.view.default, torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default,
          torch.ops.aten.contiguous.default, torch.ops.aten.alias.default}


@dataclass
class CacheSite:
    """One layer's cache update and attention in the decode graph."""

    layer: int
    key_attr: torch.fx.Node
    value_attr: torch.fx.Node
    key_copy: torch.fx.Node
    value_copy: torch.fx.Node
    sdpa: torch.fx.Node
    chain: list  # the view nodes between the copies and the attention


class KVCompressionPass(Pass):
    """Compress every layer's KV cache under `policy`. `context`: the tokens a non-evicting cache holds
    (default: the captured cache length)."""

    name = "kv"

    def __init__(self, policy: AnyKVPolicy | None = None, context: int | None = None):
        if policy is not None and not isinstance(policy, (KVCachePolicy, PerHeadKVPolicy, PerLayerKVPolicy)):
            raise ValueError(f"policy must be a KVCachePolicy, PerHeadKVPolicy or PerLayerKVPolicy, got {policy!r}")
        if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
            raise ValueError(f"context must be a positive number of tokens or None, got {context!r}")
        self.policy, self.context = policy, context

    def __call__(self, gm, plan=None) -> PassResult:
        sites = find_cache_sites(gm)
        if not sites:
            raise ValueError("KVCompressionPass found no key_cache_{i}/value_cache_{i} update feeding "
                             "scaled_dot_product_attention; pass capture(src, phase='decode', ...).module()")
        if "memopt_kv" in gm.meta:
            raise ValueError("this graph's KV cache is already compressed; apply KVCompressionPass once")
        policy = self._policy(plan, len(sites))
        batch, kv_heads, cache_len, head_dim = tuple(_tensor(gm, sites[0].key_attr.target).shape)
        context = self.context or cache_len
        before = after = 0
        meta = {"policy": policy.to_json(), "context": context, "batch": batch, "kv_heads": kv_heads,
                "head_dim": head_dim, "layers": {}}
        for site in sites:
            layouts = with_rope(gm, policy.layer_layouts(site.layer, kv_heads, head_dim, context))
            before += _tensor(gm, site.key_attr.target).nbytes + _tensor(gm, site.value_attr.target).nbytes
            names = _rewrite(gm, site, layouts, batch)
            after += sum(_tensor(gm, n).nbytes for n in names)
            meta["layers"][site.layer] = {"layouts": layouts_to_str(layouts), "buffers": names}
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
        meta["cache_bytes"], meta["full_cache_bytes"] = after, before
        gm.meta["memopt_kv"] = meta
        spec = policy.to_json()["type"]
        return PassResult(gm, True, [f"KV cache ({spec}, {len(sites)} layers): {before:,} -> {after:,} bytes "
                                     f"({after / max(before, 1):.3f}x)"])

    def _policy(self, plan, n_layers: int) -> AnyKVPolicy:
        if self.policy is not None:
            if isinstance(self.policy, PerLayerKVPolicy):
                self.policy.check_layers(n_layers)
            return self.policy
        decisions = getattr(plan, "decisions", ()) or ()
        layers = {}
        for d in decisions:
            match = re.search(r"(?:^|\.)(?:layers|h|blocks?)\.(\d+)$", d.name) or re.fullmatch(r"(\d+)", d.name)
            if match and d.kv_policy not in ("", None):
                layers[int(match.group(1))] = parse_kv_spec(d.kv_policy)
        if not layers:
            raise ValueError("KVCompressionPass needs a policy, or a plan whose decisions give per-layer kv_policy "
                             "(e.g. 'kivi:4' for 'model.layers.3')")
        return PerLayerKVPolicy(KVCachePolicy(), layers)


def cache_updates(gm) -> dict[int, dict[str, torch.fx.Node]]:
    """layer -> {"key": node, "value": node}: the index_copy_ nodes that write each layer's static-cache
    buffers (`key_cache_<i>`, `value_cache_<i>`); a layer with only one of the two is an error."""
    copies: dict[int, dict[str, torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is INDEX_COPY and node.args[0].op == "get_attr":
            match = CACHE_NAME.match(node.args[0].target)
            if match:
                copies.setdefault(int(match.group(2)), {})[match.group(1)] = node
    for layer, pair in copies.items():
        if set(pair) != {"key", "value"}:
            raise ValueError(f"layer {layer}: found only the {sorted(pair)} cache update; memopt expects "
                             "transformers' static-cache decode graph")
    return copies


def find_cache_sites(gm) -> list[CacheSite]:
    """Every layer whose cache buffers are written by index_copy_ and read only by one attention."""
    copies = cache_updates(gm)
    sites = []
    for layer in sorted(copies):
        pair = copies[layer]
        k_sdpa, k_chain = _attention_user(pair["key"], layer)
        v_sdpa, v_chain = _attention_user(pair["value"], layer)
        if k_sdpa is not v_sdpa:
            raise ValueError(f"layer {layer}: keys and values feed different attention ops")
        sites.append(CacheSite(layer, pair["key"].args[0], pair["value"].args[0], pair["key"], pair["value"],
                               k_sdpa, k_chain + v_chain))
    return sites


def _attention_user(copy: torch.fx.Node, layer: int) -> tuple[torch.fx.Node, list]:
    chain, node = [], copy
    if len(copy.args[0].users) != 1:
        raise ValueError(f"layer {layer}: {copy.args[0].target} has readers besides its index_copy_; "
                         "KVCompressionPass expects transformers' static-cache decode graph")
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise ValueError(f"layer {layer}: the updated {copy.args[0].target} has {len(users)} readers; "
                             "expected one path to scaled_dot_product_attention")
        node = users[0]
        if node.op == "call_function" and node.target is SDPA:
            return node, chain
        if node.op != "call_function" or node.target not in _VIEWS:
            raise ValueError(f"layer {layer}: {copy.args[0].target} reaches {node.target} before attention; "
                             "expected only views (unsqueeze/expand/reshape) in between")
        chain.append(node)


def _rewrite(gm, site: CacheSite, layouts: tuple[Layout, ...], batch: int) -> list[str]:
    graph, sdpa = gm.graph, site.sdpa
    q, k_new, v_new, pos = sdpa.args[0], site.key_copy.args[3], site.value_copy.args[3], site.key_copy.args[2]
    if len(sdpa.args) > 4 and sdpa.args[4] or sdpa.kwargs.get("dropout_p") or sdpa.kwargs.get("is_causal"):
        raise ValueError(f"layer {site.layer}: attention uses dropout or is_causal; not a decode step")
    head_dim = _tensor(gm, site.key_attr.target).shape[-1]
    scale = sdpa.kwargs.get("scale", sdpa.args[6] if len(sdpa.args) > 6 else None) or head_dim ** -0.5
    device = _tensor(gm, site.key_attr.target).device
    fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
    names, state = [], []
    with graph.inserting_before(sdpa):
        for j, layout in enumerate(layouts):
            for name, value in layout.allocate(batch, device).items():
                target = f"kv_cache_{site.layer}_g{j}_{name}"
                gm.register_buffer(target, value)
                node = graph.get_attr(target)
                if fake_mode is not None:
                    with fake_mode:
                        node.meta["val"] = torch.empty_like(value)
                names.append(target)
                state.append(node)
        out = graph.call_function(torch.ops.memopt.kv_attend.default,
                                  (q, k_new, v_new, state, pos, layouts_to_str(layouts), float(scale)))
    out.meta = dict(sdpa.meta)
    sdpa.replace_all_uses_with(out)
    graph.erase_node(sdpa)
    for node in reversed(site.chain):
        graph.erase_node(node)
    for node in (site.key_copy, site.value_copy, site.key_attr, site.value_attr):
        graph.erase_node(node)
    for attr in (site.key_attr.target, site.value_attr.target):
        delattr(gm, attr)
    return names


def with_rope(gm, layouts: tuple[Layout, ...]) -> tuple[Layout, ...]:
    """Layouts whose keys are stored before RoPE get the model's `inv_freq` (the graph's rotary_emb buffer)."""
    if not any(x.pre_rope for x in layouts):
        return layouts
    found = [b for n, b in gm.named_buffers() if n.endswith("rotary_emb.inv_freq")]
    if not found:
        raise ValueError("KIVIConfig.pre_rope needs the model's RoPE inv_freq, but the graph has no "
                         "'...rotary_emb.inv_freq' buffer; set pre_rope=False")
    inv_freq = tuple(float(x) for x in found[0].float().tolist())
    if len(inv_freq) * 2 != layouts[0].head_dim:
        raise ValueError(f"rotary_emb.inv_freq has {len(inv_freq)} values; pre-RoPE keys of head_dim "
                         f"{layouts[0].head_dim} need {layouts[0].head_dim // 2} (partial rotary is not supported)")
    return tuple(replace(x, rope_inv_freq=inv_freq) if x.pre_rope else x for x in layouts)


def _tensor(gm, target: str) -> torch.Tensor:
    return getattr(gm, target)


def kv_buffer_bytes(gm) -> int:
    """Bytes of the compressed cache as registered on `gm` (the sum the accounting must equal)."""
    meta = gm.meta.get("memopt_kv")
    if meta is None:
        return sum(b.nbytes for n, b in gm.named_buffers() if CACHE_NAME.match(n))
    return sum(_tensor(gm, n).nbytes for layer in meta["layers"].values() for n in layer["buffers"])
