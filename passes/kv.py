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
`memopt.serve.generate` (prefill) and the byte accounting. Keys are cached after RoPE, so evicted caches
need no re-rotation; the decode step's position comes from `cache_position`. A KIVI store of pre-RoPE keys
(`KIVIConfig.pre_rope`) gets the model's RoPE `inv_freq` from the graph's `rotary_emb.inv_freq` buffer.

The attention may also be eager (`softmax(q @ K^T * s [soft-capped] + mask) @ V`, as Gemma-2 runs it). The
mask the rewrite drops is read first, by evaluating it at a few positions: a causal mask, or a sliding window
of W positions (Mistral, Gemma-2/3 sliding layers), which the layer's layouts then carry (`Layout.sliding`,
a store bounded to the window); anything else (an ALiBi bias, a mask that differs per row) is refused per layer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

from memopt.kv.layout import Layout, layouts_to_str
from memopt.kv.policy import AnyKVPolicy, KVCachePolicy, PerHeadKVPolicy, PerLayerKVPolicy, parse_kv_spec
from memopt.passes.base import Pass, PassResult
from memopt.passes.weight_sites import graph_fake_mode
from memopt.runtime import kv_ops  # noqa: F401  (registers memopt::kv_attend)

INDEX_COPY = torch.ops.aten.index_copy_.default
SDPA = torch.ops.aten.scaled_dot_product_attention.default
aten = torch.ops.aten
MATMULS = {aten.matmul.default, aten.bmm.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default}
_CASTS = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.alias.default, aten.contiguous.default,
          aten.type_as.default}
ALIBI = ("adds a per-position bias to its attention logits (ALiBi, as Bloom and MPT do), which memopt::kv_attend "
         "does not compute; compile this model without --kv")
CACHE_NAME = re.compile(r"^(key|value)_cache_(\d+)$")
_VIEWS = {torch.ops.aten.unsqueeze.default, torch.ops.aten.expand.default, torch.ops.aten.reshape.default,
          torch.ops.aten.view.default, torch.ops.aten.clone.default, torch.ops.aten._unsafe_view.default,
          torch.ops.aten.contiguous.default, torch.ops.aten.alias.default}


@dataclass
class CacheSite:
    """One layer's cache update and attention in the decode graph. `output`: the attention's result
    (scaled_dot_product_attention, or eager attention's `probs @ V`), read from `query` at `scale`, with
    logits soft-capped at `softcap` (0: not) and `mask` added; `window`: the mask's sliding window (0: causal)."""

    layer: int
    key_attr: torch.fx.Node
    value_attr: torch.fx.Node
    key_copy: torch.fx.Node
    value_copy: torch.fx.Node
    output: torch.fx.Node
    chain: list  # the nodes between the copies and the output (views; eager attention's logits ops)
    query: torch.fx.Node | None = None
    mask: torch.fx.Node | None = None
    scale: float | None = None
    softcap: float = 0.0
    window: int = 0


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
        # every layer's layouts before any rewrite: a layer the policy cannot serve leaves the graph untouched
        plans = [for_attention(with_rope(gm, policy.layer_layouts(s.layer, kv_heads, head_dim, context)), s)
                 for s in sites]
        for site, layouts in zip(sites, plans):
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
        notes = [f"KV cache ({spec}, {len(sites)} layers): {before:,} -> {after:,} bytes ({after / max(before, 1):.3f}x)"]
        windows = {s.layer: s.window for s in sites if s.window}
        if windows:
            notes.append(f"sliding-window attention kept (window in tokens by layer, each store bounded to it): "
                         f"{windows}")
        if any(s.softcap for s in sites):
            notes.append(f"attention logits soft-capped at {sorted({s.softcap for s in sites if s.softcap})}")
        return PassResult(gm, True, notes)

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
    """Every layer whose cache buffers are written by index_copy_ and read only by one attention, with the
    sliding window its mask gives (see `attention_window`)."""
    copies = cache_updates(gm)
    sites, programs = [], {}
    for layer in sorted(copies):
        pair = copies[layer]
        k_kind, k_end, k_chain = _attention_user(pair["key"], layer)
        v_kind, v_end, v_chain = _attention_user(pair["value"], layer)
        site = CacheSite(layer, pair["key"].args[0], pair["value"].args[0], pair["key"], pair["value"], v_end,
                         k_chain + v_chain)
        if k_kind == v_kind == "sdpa" and k_end is v_end:
            site.query, site.scale = k_end.args[0], k_end.kwargs.get("scale", k_end.args[6] if len(k_end.args) > 6
                                                                      else None)
            site.mask = k_end.args[3] if len(k_end.args) > 3 else k_end.kwargs.get("attn_mask")
        elif (k_kind, v_kind) == ("logits", "values"):
            site.query = k_end.args[0]
            site.scale, site.softcap, site.mask, between = _eager_attention(k_end, v_end, layer)
            site.chain += [k_end, *between]
        else:
            raise ValueError(f"layer {layer}: keys and values feed different attention ops")
        site.window = attention_window(gm, site, programs)
        sites.append(site)
    return sites


def _attention_user(copy: torch.fx.Node, layer: int) -> tuple[str, torch.fx.Node, list]:
    """Follow the views from a cache update to its attention: ("sdpa", the op), ("logits", eager `q @ K^T`) or
    ("values", eager `probs @ V`), with the views passed on the way."""
    chain, node = [], copy
    if len(copy.args[0].users) != 1:
        raise ValueError(f"layer {layer}: {copy.args[0].target} has readers besides its index_copy_; "
                         "KVCompressionPass expects transformers' static-cache decode graph")
    while True:
        users = list(node.users)
        if len(users) != 1:
            raise ValueError(f"layer {layer}: the updated {copy.args[0].target} has {len(users)} readers; "
                             "expected one path to the attention")
        prev, node = node, users[0]
        if node.op == "call_function" and node.target is SDPA:
            return "sdpa", node, chain
        if node.op == "call_function" and node.target is aten.baddbmm.default:
            raise ValueError(f"layer {layer}: {ALIBI}")
        if node.op == "call_function" and node.target in MATMULS and node.args[1] is prev:
            return "values", node, chain
        if node.op == "call_function" and node.target is aten.transpose.int and len(node.users) == 1:
            user, nd = next(iter(node.users)), len(node.meta["val"].shape)
            if user.target is aten.baddbmm.default:
                raise ValueError(f"layer {layer}: {ALIBI}")
            if user.target in MATMULS and user.args[1] is node and {a % nd for a in node.args[1:3]} == {nd - 2, nd - 1}:
                return "logits", user, chain + [node]
        if node.op != "call_function" or node.target not in _VIEWS:
            raise ValueError(f"layer {layer}: {copy.args[0].target} reaches {node.target} before attention; "
                             "expected only views (unsqueeze/expand/reshape) in between")
        chain.append(node)


def _eager_attention(logits: torch.fx.Node, out: torch.fx.Node, layer: int) -> tuple[float, float, object, list]:
    """Read eager attention between `logits` (q @ K^T) and `out` (probs @ V): `* s` or `/ s` (scale),
    `/ c, tanh, * c` (soft-capping), `+ mask`, softmax over keys, casts and a no-op dropout, in that order.
    Returns (scale, softcap, mask, the nodes in between)."""
    scale, cap, mask, softmaxed, chain, node = 1.0, 0.0, None, False, [], logits
    while True:
        users = [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]
        chain += [u for u in node.users if u not in users]  # export's dtype checks of what is rewritten away
        if len(users) != 1:
            raise ValueError(f"layer {layer}: the attention logits have {len(users)} readers; expected one path "
                             "to the softmax")
        nxt, t = users[0], users[0].target
        if nxt is out and softmaxed:
            return scale, cap, mask, chain
        c = _scalar(nxt, node)
        early = not softmaxed and mask is None
        if t is aten.div.Tensor and c and early and not cap and _softcap(nxt, c):
            cap = c
            chain += [nxt, next(iter(nxt.users))]
            nxt = next(iter(chain[-1].users))
        elif t in (aten.mul.Tensor, aten.div.Tensor) and c and early and not cap:
            scale = scale * c if t is aten.mul.Tensor else scale / c
        elif t is aten.add.Tensor and early and nxt.args[0] is node and isinstance(nxt.args[1], torch.fx.Node):
            mask = nxt.args[1]
        elif t in SOFTMAX and not softmaxed and nxt.args[1] in (-1, 3):
            softmaxed = True
        elif not (t in _CASTS or t is aten.dropout.default and (nxt.args[1] == 0 or nxt.args[2] is False)):
            raise ValueError(f"layer {layer}: its attention computes {t} between the logits and the values; "
                             "memopt::kv_attend computes a scale, soft-capping, a causal or sliding-window mask and "
                             "softmax only; compile this model without --kv")
        chain.append(nxt)
        node = nxt


def _scalar(node: torch.fx.Node, prev: torch.fx.Node) -> float | None:
    """The number `node` multiplies or divides `prev` by, if it is one."""
    if node.target not in (aten.mul.Tensor, aten.div.Tensor) or node.args[0] is not prev:
        return None
    c = node.args[1]
    return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else None


def _softcap(div: torch.fx.Node, c: float) -> bool:
    """`div` by c is the start of `c * tanh(x / c)`."""
    users = list(div.users)
    if len(users) != 1 or users[0].target is not aten.tanh.default or len(users[0].users) != 1:
        return False
    return _scalar(next(iter(users[0].users)), users[0]) == c


# ---------------------------------------------------------------- what the dropped mask said
def attention_window(gm, site: CacheSite, programs: dict) -> int:
    """The sliding window `site`'s mask gives a decode step (0: causal over the whole cache), read by evaluating
    the mask at a few positions; a mask that is neither (a bias, a per-row mask) is a ValueError naming the layer."""
    if site.mask is None:
        return 0
    cache = _tensor(gm, site.key_attr.target)
    if site.mask not in programs:
        programs[site.mask] = _mask_program(gm, site.mask, site.layer, cache)
    slots = cache.shape[2]
    seen = {p: _allowed(programs[site.mask](p), site.layer, slots) for p in sorted({0, 1, slots // 2, slots - 1})
            if p < slots}
    row = seen[slots - 1]
    first = int(row.int().argmax())
    window = slots - first if first > 0 else 0
    for p, row in seen.items():
        want = torch.zeros(slots, dtype=torch.bool)
        want[max(0, p - window + 1) if window else 0 : p + 1] = True
        if not torch.equal(row.cpu(), want):
            raise ValueError(f"layer {site.layer}: its attention mask lets the token at position {p} see "
                             f"{_spans(row)}, neither causal nor a sliding window; memopt::kv_attend cannot drop "
                             "it; compile this model without --kv")
    return window


def _mask_program(gm, mask: torch.fx.Node, layer: int, cache: torch.Tensor):
    """position -> the mask a one-token decode step at that position gets: the graph's nodes that compute it,
    run on copies of the buffers they read."""
    needed, stack = set(), [mask]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    graph, env, feeds = torch.fx.Graph(), {}, []
    for node in gm.graph.nodes:
        if node not in needed:
            continue
        if node.op in ("placeholder", "get_attr"):
            env[node] = graph.placeholder(f"in_{len(feeds)}")
            feeds.append(node)
        elif node.op == "call_function":
            env[node] = graph.node_copy(node, env.__getitem__)
        else:
            raise ValueError(f"layer {layer}: its attention mask is computed by {node.op} {node.target}, which "
                             "KVCompressionPass cannot evaluate to find its window")
    graph.output(env[mask])
    program = torch.fx.GraphModule(torch.nn.Module(), graph)
    device, batch = cache.device, cache.shape[0]

    def run(position: int) -> torch.Tensor:
        args = []
        for node in feeds:
            if node.op == "get_attr":
                args.append(_tensor(gm, node.target).clone())
            elif "cache_position" in node.name:
                args.append(torch.tensor([position], dtype=torch.long, device=device))
            elif "input_ids" in node.name:
                args.append(torch.zeros((batch, 1), dtype=torch.long, device=device))
            elif "inputs_embeds" in node.name:  # a pipeline stage's hidden states (memopt.emit.stages)
                val = node.meta["val"]
                args.append(torch.zeros((batch, 1, int(val.shape[-1])), dtype=val.dtype, device=device))
            else:
                raise ValueError(f"layer {layer}: its attention mask depends on the input {node.name!r}; "
                                 "KVCompressionPass reads masks that depend on the position only")
        try:
            with torch.no_grad():
                return program(*args)
        except Exception as exc:  # any op of the model's mask code: told in one line
            raise ValueError(f"layer {layer}: evaluating its attention mask at position {position} failed "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                             "KVCompressionPass cannot tell which positions it attends") from None
    return run


def _allowed(mask: torch.Tensor, layer: int, slots: int) -> torch.Tensor:
    """A boolean or additive mask (..., 1, slots) -> the slots attended (slots,), the same for every row."""
    if mask.shape[-1] != slots:
        raise ValueError(f"layer {layer}: its attention mask spans {mask.shape[-1]} positions, its cache {slots}; "
                         "KVCompressionPass expects transformers' static-cache decode graph")
    if mask.dtype == torch.bool:
        seen = mask
    else:
        seen = mask == 0
        blocked = (mask <= torch.finfo(mask.dtype).min / 2) | mask.isneginf()
        if not bool((seen | blocked).all()):
            raise ValueError(f"layer {layer}: {ALIBI}")
    rows = seen.reshape(-1, seen.shape[-1])
    if not bool((rows == rows[:1]).all()):
        raise ValueError(f"layer {layer}: its attention mask differs between batch rows or heads (padding?); "
                         "memopt::kv_attend attends every row alike")
    return rows[0]


def _spans(row: torch.Tensor) -> str:
    idx = row.nonzero().flatten().tolist()
    if not idx:
        return "no position"
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}..{a}" if a > start else f"{a}")
            start = b
    return "positions " + ", ".join(runs)


def _rewrite(gm, site: CacheSite, layouts: tuple[Layout, ...], batch: int) -> list[str]:
    graph, out_node = gm.graph, site.output
    q, k_new, v_new, pos = site.query, site.key_copy.args[3], site.value_copy.args[3], site.key_copy.args[2]
    if out_node.target is SDPA and (len(out_node.args) > 4 and out_node.args[4] or out_node.kwargs.get("dropout_p")
                                    or out_node.kwargs.get("is_causal")):
        raise ValueError(f"layer {site.layer}: attention uses dropout or is_causal; not a decode step")
    head_dim = _tensor(gm, site.key_attr.target).shape[-1]
    scale = site.scale or head_dim ** -0.5
    device = _tensor(gm, site.key_attr.target).device
    fake_mode = graph_fake_mode(graph)
    names, state = [], []
    with graph.inserting_before(out_node):
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
    out.meta = dict(out_node.meta)
    out_node.replace_all_uses_with(out)
    graph.erase_node(out_node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(site.chain, key=order.__getitem__, reverse=True):
        graph.erase_node(node)
    for node in (site.key_copy, site.value_copy, site.key_attr, site.value_attr):
        graph.erase_node(node)
    for attr in (site.key_attr.target, site.value_attr.target):
        delattr(gm, attr)
    return names


def for_attention(layouts: tuple[Layout, ...], site: CacheSite) -> tuple[Layout, ...]:
    """The layouts for `site`'s attention: its sliding window and soft-capping (a ValueError naming the layer
    when the policy cannot honour the window)."""
    try:
        return tuple(x.for_attention(site.window, site.softcap) for x in layouts)
    except ValueError as exc:
        raise ValueError(f"layer {site.layer}: sliding-window attention ({site.window} tokens): {exc}") from None


def with_rope(gm, layouts: tuple[Layout, ...]) -> tuple[Layout, ...]:
    """Layouts whose keys are stored before RoPE get the model's `inv_freq` (the graph's rotary_emb buffer)."""
    if not any(x.pre_rope for x in layouts):
        return layouts
    found = [b for n, b in gm.named_buffers() if n.endswith("rotary_emb.inv_freq")]
    if not found:
        others = [n for n, _ in gm.named_buffers() if n.endswith("inv_freq") and "original" not in n]
        why = f"it has {', '.join(others)} (RoPE per layer type)" if others else "it has no RoPE"
        raise ValueError(f"KIVIConfig.pre_rope needs the model's one RoPE inv_freq ('...rotary_emb.inv_freq'), but "
                         f"{why}; drop :pre / set pre_rope=False")
    inv_freq = tuple(float(x) for x in found[0].float().tolist())
    if len(inv_freq) * 2 != layouts[0].head_dim:
        raise ValueError(f"rotary_emb.inv_freq has {len(inv_freq)} values; pre-RoPE keys of head_dim "
                         f"{layouts[0].head_dim} need {layouts[0].head_dim // 2} (partial rotary is not supported)")
    return tuple(replace(x, rope_inv_freq=inv_freq) if x.pre_rope else x for x in layouts)


def _tensor(gm, target: str) -> torch.Tensor:
    return getattr(gm, target)


def planned_cache_bytes(gm, policy: AnyKVPolicy, context: int | None = None) -> dict[int, int]:
    """layer -> the bytes its cache holds once this pass rewrites `gm` under `policy` (the very layouts the
    pass would register, sliding windows included), without rewriting anything; what the budget planner charges
    for a compressed cache. A layer the pass would refuse raises the pass's ValueError."""
    sites = find_cache_sites(gm)
    if not sites:
        return {}
    batch, kv_heads, cache_len, head_dim = tuple(_tensor(gm, sites[0].key_attr.target).shape)
    out = {}
    for s in sites:
        layouts = for_attention(with_rope(gm, policy.layer_layouts(s.layer, kv_heads, head_dim, context or cache_len)),
                                s)
        out[s.layer] = sum(math.prod(shape) * dtype.itemsize for x in layouts for _, shape, dtype in x.buffers(batch))
    return out


def kv_buffer_bytes(gm) -> int:
    """Bytes of the compressed cache as registered on `gm` (the sum the accounting must equal)."""
    meta = gm.meta.get("memopt_kv")
    if meta is None:
        return sum(b.nbytes for n, b in gm.named_buffers() if CACHE_NAME.match(n))
    return sum(_tensor(gm, n).nbytes for layer in meta["layers"].values() for n in layer["buffers"])
