"""Runtime op for compressed KV caches: `memopt::kv_attend`, one call per layer of a decode step.

    kv_attend(q, k, v, state, pos, layouts, scale) -> out
      q      (batch, q_heads, 1, head_dim)   the step's query, after RoPE
      k, v   (batch, kv_heads, 1, head_dim)  the step's key (after RoPE) and value
      state  the layer's cache tensors, group by group in `Layout.buffers` order; updated in place
      pos    (1,) int64                      the token's position (tokens 0..pos-1 are cached)
      layouts  the JSON of the layer's `Layout`s (`memopt.kv.layout.layouts_to_str`)
      out    (batch, q_heads, 1, head_dim)   attention over the kept tokens and the new one

Per group of KV heads: attend over sinks + store (dequantized) + residual ring + the new token, update
the eviction scores with this step's attention (H2O), then insert the new token (flushing the oldest
residual group into the store and evicting a block when full). `fill_layer` writes the state from a
prefill's full-precision keys and values. A store with `pre_rope` un-rotates a block's keys at its
positions before quantizing and re-rotates them when read; with `hadamard` it rotates keys and values by
a Hadamard matrix before quantizing and back when read. Registered with `torch.library` (a fake kernel included), so a
graph calling it still exports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memopt.kv import kivi
from memopt.kv.h2o import decode_score_update
from memopt.kv.layout import Layout, layouts_from_str

STORE_KEY_NAMES = ("store_k", "store_kq", "store_kscale", "store_kzero")


@torch.library.custom_op("memopt::kv_attend", mutates_args=("state",))
def kv_attend(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], pos: Tensor, layouts: str, scale: float) -> Tensor:
    n = int(pos.reshape(-1)[0])
    groups = split_state(layouts, state)
    n_rep = q.shape[1] // k.shape[1]
    b, d = q.shape[0], q.shape[-1]
    qg = q.reshape(b, k.shape[1], n_rep, d)
    if len(groups) == 1:
        out = attend_group(groups[0][0], groups[0][1], qg, k, v, n, scale)
    else:
        out = torch.empty_like(qg, dtype=torch.float32)
        for layout, bufs in groups:
            idx = torch.tensor(layout.heads, device=q.device)
            out[:, idx] = attend_group(layout, bufs, qg[:, idx], k[:, idx], v[:, idx], n, scale)
    return out.reshape(q.shape).to(q.dtype)


@kv_attend.register_fake
def _(q, k, v, state, pos, layouts, scale):
    return torch.empty_like(q)


def split_state(layouts: str, state: list[Tensor]) -> list[tuple[Layout, dict[str, Tensor]]]:
    out, offset = [], 0
    for layout in layouts_from_str(layouts):
        names = layout.buffer_names()
        out.append((layout, dict(zip(names, state[offset : offset + len(names)]))))
        offset += len(names)
    if offset != len(state):
        raise ValueError(f"kv_attend got {len(state)} state tensors, its layouts name {offset}")
    return out


# ---------------------------------------------------------------- one decode step
CHUNK_TOKENS = 512  # store tokens dequantized at a time: the step's transient is a chunk, not the layer's cache


def attend_group(L: Layout, bufs: dict[str, Tensor], q: Tensor, k: Tensor, v: Tensor, n: int, scale: float) -> Tensor:
    """q (batch, heads, n_rep, head_dim); k, v (batch, heads, 1, head_dim) -> (batch, heads, n_rep, head_dim) fp32.

    The store is read `CHUNK_TOKENS` at a time, twice: keys to logits (a row of scores per token, small), then,
    after one softmax over every kept token, values into the output. Only a chunk is ever dequantized, so the
    step's memory beyond the compressed cache stays a chunk's fp32 keys or values, whatever the context."""
    q = q.float()
    logits, segments, spans = [], [], {}  # segments: (length, values for those tokens, on demand)
    ns = min(n, L.sinks)
    if ns:
        logits.append(q @ bufs["sink_k"][:, :, :ns].float().transpose(-1, -2))
        segments.append((ns, lambda: bufs["sink_v"][:, :, :ns].float()))
    f = L.flushed(n)
    nb = min(f, L.blocks)
    if nb:
        qs = q if L.kept_channels == L.head_dim else q.gather(-1, _channel_index(bufs, q.shape[2]))
        spans["store"] = (sum(x.shape[-1] for x in logits), nb * L.group)
        step = max(1, CHUNK_TOKENS // L.group)
        for lo in range(0, nb, step):
            hi = min(nb, lo + step)
            logits.append(qs @ read_keys(L, bufs, lo, hi, f).transpose(-1, -2))
            segments.append(((hi - lo) * L.group, lambda lo=lo, hi=hi: read_values(L, bufs, lo, hi)))
    m = max(0, n - L.sinks)
    first = L.group * f if L.residual else m
    slots = torch.arange(first, m, device=q.device) % max(L.residual, 1)
    if m > first:
        spans["res"] = (sum(x.shape[-1] for x in logits), m - first)
        logits.append(q @ bufs["res_k"][:, :, slots].float().transpose(-1, -2))
        segments.append((m - first, lambda: bufs["res_v"][:, :, slots].float()))
    logits.append(q @ k.float().transpose(-1, -2))
    segments.append((1, lambda: v.float()))
    probs = (torch.cat(logits, -1) * scale).softmax(-1)
    out, start = None, 0
    for length, values in segments:
        part = probs[..., start : start + length] @ values()
        out = part if out is None else out.add_(part)
        start += length
    new_score = None
    if L.scored:
        gain = decode_score_update(probs, L.score)
        if "store" in spans:
            start, length = spans["store"]
            bufs["store_score"][:, :, :nb] += gain[..., start : start + length].reshape(*gain.shape[:2], nb, -1).sum(-1)
        if "res" in spans:
            start, length = spans["res"]
            bufs["res_score"][:, :, slots] += gain[..., start : start + length]
        new_score = gain[..., -1]
    insert(L, bufs, k, v, n, new_score)
    return out


def insert(L: Layout, bufs: dict[str, Tensor], k: Tensor, v: Tensor, n: int, score: Tensor | None) -> None:
    """Store the token at position `n` (k, v (batch, heads, 1, head_dim); score (batch, heads) or None)."""
    if n < L.sinks:
        bufs["sink_k"][:, :, n] = k[:, :, 0]
        bufs["sink_v"][:, :, n] = v[:, :, 0]
        return
    j = n - L.sinks
    if L.residual == 0:  # full-precision store of single tokens
        put_blocks(L, bufs, k.unsqueeze(2), v.unsqueeze(2), None if score is None else score.unsqueeze(-1), j)
        return
    f = L.flushed(n)
    if j - L.group * f == L.residual:  # ring full: flush its oldest group into the store
        slots = torch.arange(L.group * f, L.group * (f + 1), device=k.device) % L.residual
        group_score = bufs["res_score"][:, :, slots].sum(-1, keepdim=True) if L.scored else None
        put_blocks(L, bufs, bufs["res_k"][:, :, slots].unsqueeze(2), bufs["res_v"][:, :, slots].unsqueeze(2),
                   group_score, f)
    slot = j % L.residual
    bufs["res_k"][:, :, slot] = k[:, :, 0]
    bufs["res_v"][:, :, slot] = v[:, :, 0]
    if L.scored:
        bufs["res_score"][:, :, slot] = score


def put_blocks(L: Layout, bufs: dict[str, Tensor], keys: Tensor, vals: Tensor, scores: Tensor | None, first: int) -> None:
    """Offer blocks `first, first + 1, ...` (keys, vals (batch, heads, k, group, head_dim); scores
    (batch, heads, k)) to the store, one at a time when it must evict."""
    if L.blocks == 0:
        return
    for i in range(keys.shape[2]):
        g = first + i
        block = encode_blocks(L, bufs, keys[:, :, i : i + 1], vals[:, :, i : i + 1], torch.tensor([g], device=keys.device))
        score = None if scores is None else scores[:, :, i : i + 1]
        if not L.scored or g < L.blocks:
            slot = g % L.blocks
            for name, x in block.items():
                bufs[name][:, :, slot : slot + 1] = x
            if L.scored:
                bufs["store_score"][:, :, slot : slot + 1] = score
            continue
        low, victim = bufs["store_score"].min(-1, keepdim=True)  # (batch, heads, 1)
        take = score > low
        for name, x in block.items():
            target = bufs[name]
            index = victim.view(*victim.shape, *([1] * (target.dim() - 3))).expand(*x.shape)
            target.scatter_(2, index, torch.where(_bcast(take, x), x, target.gather(2, index)))
        bufs["store_score"].scatter_(2, victim, torch.where(take, score, low))


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(*mask.shape, *([1] * (like.dim() - 3)))


def encode_blocks(L: Layout, bufs: dict[str, Tensor], keys: Tensor, vals: Tensor, blocks: Tensor) -> dict[str, Tensor]:
    """keys (after RoPE), vals (batch, heads, k, group, head_dim) full precision of store blocks `blocks` (k,)
    (flush order, for their positions) -> the store's tensors for the k blocks."""
    out = {}
    if L.kept_channels != L.head_dim:
        if int(bufs["channels"][0, 0, 0]) < 0:  # no prefill chose them: keep the largest keys' channels
            top = keys.float().abs().mean((2, 3)).topk(L.kept_channels, dim=-1).indices.sort(-1).values
            bufs["channels"].copy_(top.to(torch.int16))
        idx = bufs["channels"].long()[:, :, None, None, :].expand(*keys.shape[:4], -1)
        keys = keys.gather(-1, idx)
    if L.key_bits == 16:
        out["store_k"] = keys.to(bufs["store_k"].dtype)
    else:
        if L.pre_rope:
            keys = kivi.rope(keys, _positions(L, blocks.to(keys.device)), _inv_freq(L, keys.device), inverse=True)
        if L.hadamard:
            keys = keys.float() @ kivi.hadamard_matrix(L.head_dim).to(keys.device)
        out.update(kivi.quantize_keys(keys, L.key_bits))
    if L.value_bits == 16:
        out["store_v"] = vals.to(bufs["store_v"].dtype)
    else:
        if L.hadamard:
            vals = vals.float() @ kivi.hadamard_matrix(L.head_dim).to(vals.device)
        out.update(kivi.quantize_values(vals, L.value_bits, L.value_channels_per_group))
    return out


def read_keys(L: Layout, bufs: dict[str, Tensor], lo: int, hi: int, flushed: int) -> Tensor:
    """Store slots `lo..hi-1` (of `flushed` blocks so far) as fp32 keys (batch, heads, (hi - lo) * group,
    kept_channels), after RoPE."""
    if L.key_bits == 16:
        keys = bufs["store_k"][:, :, lo:hi].float()
    else:
        keys = kivi.dequantize_keys(bufs["store_kq"][:, :, lo:hi], bufs["store_kscale"][:, :, lo:hi],
                                    bufs["store_kzero"][:, :, lo:hi], L.key_bits)
        if L.hadamard:
            keys = keys @ kivi.hadamard_matrix(L.head_dim).to(keys.device)
        if L.pre_rope:
            slots = torch.arange(lo, hi, device=keys.device)
            blocks = slots + L.blocks * torch.div(flushed - 1 - slots, L.blocks, rounding_mode="floor")
            keys = kivi.rope(keys, _positions(L, blocks), _inv_freq(L, keys.device))
    return keys.flatten(2, 3)


def read_values(L: Layout, bufs: dict[str, Tensor], lo: int, hi: int) -> Tensor:
    """Store slots `lo..hi-1` as fp32 values (batch, heads, (hi - lo) * group, head_dim)."""
    if L.value_bits == 16:
        vals = bufs["store_v"][:, :, lo:hi].float()
    else:
        vals = kivi.dequantize_values(bufs["store_vq"][:, :, lo:hi], bufs["store_vscale"][:, :, lo:hi],
                                      bufs["store_vzero"][:, :, lo:hi], L.value_bits)
        if L.hadamard:
            vals = vals @ kivi.hadamard_matrix(L.head_dim).to(vals.device)
    return vals.flatten(2, 3)


def _positions(L: Layout, blocks: Tensor) -> Tensor:
    """Token positions (k, group) of store blocks `blocks` (k,) in flush order."""
    return L.sinks + blocks.unsqueeze(-1) * L.group + torch.arange(L.group, device=blocks.device)


def _inv_freq(L: Layout, device) -> Tensor:
    if len(L.rope_inv_freq) * 2 != L.head_dim:
        raise ValueError(f"a pre-RoPE key store needs the model's RoPE inv_freq ({L.head_dim // 2} values), got "
                         f"{len(L.rope_inv_freq)}; KVCompressionPass fills it from the graph's rotary_emb.inv_freq")
    return torch.tensor(L.rope_inv_freq, dtype=torch.float32, device=device)


def _channel_index(bufs: dict[str, Tensor], n_rep: int) -> Tensor:
    idx = bufs["channels"].long().unsqueeze(2)  # (batch, heads, 1, kept)
    return idx.expand(-1, -1, n_rep, -1)


# ---------------------------------------------------------------- prefill
def fill_group(L: Layout, bufs: dict[str, Tensor], keys: Tensor, vals: Tensor, scores: Tensor | None = None,
               channel_scores: Tensor | None = None) -> None:
    """Write the state after a prefill of T tokens: keys, vals (batch, heads, T, head_dim) after RoPE;
    `scores` (batch, heads, T) for score-based eviction; `channel_scores` (batch, heads, head_dim) for ThinK."""
    for name, x in bufs.items():
        x.fill_(-1 if name == "channels" else 0)
    t = keys.shape[2]
    ns = min(t, L.sinks)
    if ns:
        bufs["sink_k"][:, :, :ns] = keys[:, :, :ns]
        bufs["sink_v"][:, :, :ns] = vals[:, :, :ns]
    m, f = max(0, t - L.sinks), L.flushed(t)
    if L.scored and scores is None:
        raise ValueError("a score-based layout needs prefill scores")
    first = L.group * f if L.residual else m
    if m > first:
        slots = torch.arange(first, m, device=keys.device) % L.residual
        bufs["res_k"][:, :, slots] = keys[:, :, L.sinks + first : t].to(bufs["res_k"].dtype)
        bufs["res_v"][:, :, slots] = vals[:, :, L.sinks + first : t].to(bufs["res_v"].dtype)
        if L.scored:
            bufs["res_score"][:, :, slots] = scores[:, :, L.sinks + first : t].float()
    if f == 0 or L.blocks == 0:
        return
    if channel_scores is not None and L.kept_channels != L.head_dim:
        top = channel_scores.topk(L.kept_channels, dim=-1).indices.sort(-1).values
        bufs["channels"].copy_(top.to(torch.int16))
    b, h, g, d = keys.shape[0], keys.shape[1], L.group, L.head_dim
    mid_k = keys[:, :, L.sinks : L.sinks + g * f].reshape(b, h, f, g, d)
    mid_v = vals[:, :, L.sinks : L.sinks + g * f].reshape(b, h, f, g, d)
    kept = min(f, L.blocks)
    if L.scored:
        block_scores = scores[:, :, L.sinks : L.sinks + g * f].float().reshape(b, h, f, g).sum(-1)
        chosen = block_scores.topk(kept, dim=-1).indices.sort(-1).values  # (batch, heads, kept)
        index = chosen[..., None, None].expand(b, h, kept, g, d)
        block = encode_blocks(L, bufs, mid_k.gather(2, index), mid_v.gather(2, index), chosen[0, 0])
        slots = torch.arange(kept, device=keys.device)
        bufs["store_score"][:, :, :kept] = block_scores.gather(2, chosen)
    else:  # the newest `kept` blocks, each in its ring slot
        block = encode_blocks(L, bufs, mid_k[:, :, f - kept :], mid_v[:, :, f - kept :],
                              torch.arange(f - kept, f, device=keys.device))
        slots = torch.arange(f - kept, f, device=keys.device) % L.blocks
    for name, x in block.items():
        bufs[name][:, :, slots] = x
