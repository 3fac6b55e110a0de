"""Runtime op for compressed KV caches: `memopt::kv_attend`, one call per layer of a decode step.

    kv_attend(q, k, v, state, pos, layouts, scale) -> out
      q      (batch, q_heads, T, head_dim)   the step's queries, after RoPE (T = 1 when decoding)
      k, v   (batch, kv_heads, T, head_dim)  the step's keys (after RoPE) and values
      state  the layer's cache tensors, group by group in `Layout.buffers` order; updated in place
      pos    (T,) int64                      the tokens' positions (tokens 0..pos[0]-1 are cached)
      layouts  the JSON of the layer's `Layout`s (`memopt.kv.layout.layouts_to_str`)
      out    (batch, q_heads, T, head_dim)   attention over the kept tokens and the new ones

T > 1 at position 0 is a prompt: attended exactly and written into the state as a prefill through the
eager model writes it (`attend_chunk`), so a generation program captured for several tokens per call
prefills in one call; T > 1 later runs the decode step token by token.

Per group of KV heads: attend over sinks + store (dequantized) + residual ring + the new token, update
the eviction scores with this step's attention (H2O), then insert the new token (flushing the oldest
residual group into the store and evicting a block when full). Layouts without scores, ThinK channels or a
sliding window take `attend_fast`: the same result in one call of memopt's C kernels (`kivi_kernels.c`, built on
first use by `memopt.runtime.native`; they read the packed store without dequantizing it, except a pre-RoPE one,
dequantized a block at a time into a scratch that stays in cache, un-rotated (Hadamard) and turned to its
positions there), or in a few whole-tensor PyTorch ops where no C compiler is available.
`fill_layer` writes the state from a prefill's full-precision keys and values. A store with `pre_rope`
un-rotates a block's keys at its positions before quantizing and re-rotates them when read; with
`hadamard` it rotates keys and values by a Hadamard matrix before quantizing and back when read.
Registered with `torch.library` (a fake kernel included), so a graph calling it still exports.

`memopt::cache_attend` is the uncompressed (static) cache's attention as generation runs it
(`memopt.serve.decode_program.decode_program`): over the slots written so far, grouped-query heads read in place.
"""

from __future__ import annotations

import array
import math
import sys
import threading
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from memopt.kv import kivi
from memopt.kv.h2o import decode_score_update
from memopt.kv.layout import Layout, layouts_from_str
from memopt.runtime import native

STORE_KEY_NAMES = ("store_k", "store_kq", "store_kscale", "store_kzero")


@torch.library.custom_op("memopt::kv_attend", mutates_args=("state",))
def kv_attend(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], pos: Tensor, layouts: str, scale: float) -> Tensor:
    return attend(q, k, v, state, pos, layouts, scale)


def attend(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], pos: Tensor, layouts: str, scale: float) -> Tensor:
    """`memopt::kv_attend` as a plain function, which `memopt.serve.decode_program.decode_program` calls without the
    dispatcher's Python layers (~90 us a call with a layer's list of state tensors)."""
    n = int(pos.reshape(-1)[0])
    if q.shape[2] == 1:
        out = native_step(q, k, v, state, n, layouts, scale)
        if out is not None:
            return out
    groups = split_state(layouts, state)
    if q.shape[2] > 1:
        return attend_chunk(groups, q, k, v, n, scale)
    return attend_step(groups, q, k, v, n, scale)


@kv_attend.register_fake
def _(q, k, v, state, pos, layouts, scale):
    return q.new_empty(q.shape)  # contiguous, whatever q's strides, as the kernel's reshape returns


def attend_step(groups: list[tuple[Layout, dict[str, Tensor]]], q: Tensor, k: Tensor, v: Tensor, n: int,
                scale: float) -> Tensor:
    """One token at position `n` (shapes as the op's): attend group by group, then insert it."""
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


@torch.library.custom_op("memopt::cache_attend", mutates_args=())
def cache_attend(q: Tensor, key_cache: Tensor, value_cache: Tensor, attn_mask: Optional[Tensor], positions: Tensor,
                 scale: Optional[float] = None) -> Tensor:
    return attend_cache(q, key_cache, value_cache, attn_mask, positions, scale)


def attend_cache(q: Tensor, key_cache: Tensor, value_cache: Tensor, attn_mask: Tensor | None, positions: Tensor,
                 scale: float | None = None) -> Tensor:
    """`memopt::cache_attend`, as a plain function too (see `attend`).

    Attention over the slots of a static cache written so far, grouped-query heads read in place.

    q (batch, q_heads, T, head_dim); key_cache, value_cache (batch, kv_heads, slots, head_dim), already
    updated at `positions` (T,); attn_mask broadcastable to (batch, q_heads, T, slots) or None. Equals
    `scaled_dot_product_attention(q, repeat_kv(key_cache), repeat_kv(value_cache), attn_mask, scale=scale)`
    and reads only slots 0..max(positions): slots after it are attended to only when the mask lets a query
    see one (then every slot is read, as the full op does). A one-token step whose mask lets it see every
    slot read is computed without the mask (SDPA's faster unmasked path)."""
    n = min(int(positions.max()) + 1, key_cache.shape[2]) if positions.numel() else key_cache.shape[2]
    mask = attn_mask
    if mask is not None and mask.shape[-1] > 1:
        boolean = mask.dtype == torch.bool
        rest = mask[..., n:]
        if rest.numel() and bool(rest.any() if boolean else (rest > float("-inf")).any()):
            n = key_cache.shape[2]
        mask = mask[..., :n]
        if q.shape[2] == 1 and bool(mask.all() if boolean else (mask == 0).all()):
            mask = None
    k, v = key_cache[:, :, :n], value_cache[:, :, :n]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


@cache_attend.register_fake
def _(q, key_cache, value_cache, attn_mask, positions, scale=None):
    return q.new_empty((*q.shape[:-1], value_cache.shape[-1]))


def split_state(layouts: str, state: list[Tensor]) -> list[tuple[Layout, dict[str, Tensor]]]:
    """The layer's state tensors, group by group: [(layout, {buffer name: tensor})]."""
    groups, count = _state_names(layouts)
    if count != len(state):
        raise ValueError(f"kv_attend got {len(state)} state tensors, its layouts name {count}")
    out, offset = [], 0
    for layout, names in groups:
        out.append((layout, dict(zip(names, state[offset : offset + len(names)]))))
        offset += len(names)
    return out


@lru_cache(maxsize=1024)
def _state_names(layouts: str) -> tuple[tuple[tuple[Layout, tuple[str, ...]], ...], int]:
    """Each layout of `layouts` with its buffer names, and the number of state tensors they name: parsed once
    per layer, not per step."""
    groups = tuple((layout, layout.buffer_names()) for layout in layouts_from_str(layouts))
    return groups, sum(len(names) for _, names in groups)


# ---------------------------------------------------------------- several tokens in one call
def attend_chunk(groups: list[tuple[Layout, dict[str, Tensor]]], q: Tensor, k: Tensor, v: Tensor, n: int,
                 scale: float) -> Tensor:
    """T > 1 tokens at positions n..n+T-1: q (batch, q_heads, T, head_dim), k, v (batch, kv_heads, T, head_dim).

    A prompt (n == 0) is attended exactly (causal, full precision, the layer's sliding window and soft-capping)
    and then written into the state as a prefill through the eager model writes it (`fill_state`); a chunk
    after cached tokens goes through the decode step one token at a time."""
    if n == 0:
        L = groups[0][0]
        out = prompt_attention(q, k, v, scale, getattr(L, "sliding", 0), getattr(L, "softcap", 0.0))
        fill_state(groups, q, k, v, scale)
        return out
    steps = [attend_step(groups, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], n + t, scale)
             for t in range(q.shape[2])]
    return torch.cat(steps, dim=2)


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int = 0, softcap: float = 0.0,
                     query_chunk: int = 256) -> Tensor:
    """Causal attention of a prompt over itself (grouped-query heads read in place), with a sliding `window`
    (0: none) and logit `softcap` (0: none). q (batch, q_heads, T, d), k, v (batch, kv_heads, T, d)."""
    t = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if not window and not softcap:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    i = torch.arange(t, device=q.device)
    allowed = i[None, :] <= i[:, None]
    if window:
        allowed &= i[None, :] > i[:, None] - window
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    b, hq, _, d = q.shape
    hk = k.shape[1]
    qg = q.float().reshape(b, hk, hq // hk, t, d)
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]
    outs = []
    for lo in range(0, t, query_chunk):  # (chunk, T) logits at a time
        hi = min(t, lo + query_chunk)
        logits = qg[:, :, :, lo:hi] @ kf.transpose(-1, -2) * scale
        logits = (logits / softcap).tanh() * softcap
        probs = logits.masked_fill(~allowed[lo:hi], float("-inf")).softmax(-1)
        outs.append(probs @ vf)
    return torch.cat(outs, dim=3).reshape(b, hq, t, d).to(q.dtype)


def fill_state(groups: list[tuple[Layout, dict[str, Tensor]]], q: Tensor, k: Tensor, v: Tensor, scale: float) -> None:
    """Write a layer's state from a prompt's queries, keys and values (after RoPE; shapes as `attend_chunk`):
    each group scored as its layout says (H2O, Scissorhands, SnapKV, ThinK's channels), then `fill_group`."""
    from memopt.kv.h2o import h2o_scores, scissorhands_scores
    from memopt.kv.snapkv import snapkv_scores
    from memopt.kv.think import think_channel_scores

    n_rep = q.shape[1] // k.shape[1]
    for layout, bufs in groups:
        heads = torch.tensor(layout.heads, device=k.device)
        q_heads = (heads[:, None] * n_rep + torch.arange(n_rep, device=k.device)).flatten()
        qg, kg, vg = q[:, q_heads], k[:, heads], v[:, heads]
        scores = channel_scores = None
        if layout.prefill_score == "h2o":
            scores = h2o_scores(qg, kg, scale)
        elif layout.prefill_score == "scissorhands":
            scores = scissorhands_scores(qg, kg, scale)
        elif layout.prefill_score == "snapkv":
            scores = snapkv_scores(qg, kg, scale, layout.window, layout.kernel)
        if layout.kept_channels != layout.head_dim:
            channel_scores = think_channel_scores(qg, kg, layout.channel_window)
        fill_group(layout, bufs, kg, vg, scores, channel_scores)


# ---------------------------------------------------------------- one decode step
CHUNK_TOKENS = 512  # store tokens dequantized at a time: the step's transient is a chunk, not the layer's cache


def attend_group(L: Layout, bufs: dict[str, Tensor], q: Tensor, k: Tensor, v: Tensor, n: int, scale: float) -> Tensor:
    """q (batch, heads, n_rep, head_dim); k, v (batch, heads, 1, head_dim) -> (batch, heads, n_rep, head_dim) fp32.

    The store is read `CHUNK_TOKENS` at a time, twice: keys to logits (a row of scores per token, small), then,
    after one softmax over every kept token, values into the output. Only a chunk is ever dequantized, so the
    step's memory beyond the compressed cache stays a chunk's fp32 keys or values, whatever the context."""
    if fast_path(L):
        return attend_fast(L, bufs, q, k, v, n, scale)
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
    scores = torch.cat(logits, -1) * scale
    if L.softcap:  # the model's logit soft-capping (Gemma-2)
        scores = (scores / L.softcap).tanh() * L.softcap
    if L.sliding and n >= L.sliding:  # the model's sliding window: positions n - sliding + 1 .. n
        scores = scores.masked_fill(L.attended_positions(n, q.device) <= n - L.sliding, float("-inf"))
    probs = scores.softmax(-1)
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


def fast_path(L: Layout) -> bool:
    """Whether `attend_fast` serves `L`: no eviction scores, every key channel kept, and no sliding window (its
    order of tokens is not `Layout.attended_positions`')."""
    return not L.scored and L.kept_channels == L.head_dim and not getattr(L, "sliding", 0)


def attend_fast(L: Layout, bufs: dict[str, Tensor], q: Tensor, k: Tensor, v: Tensor, n: int, scale: float) -> Tensor:
    """`attend_group` for layouts `fast_path` accepts (same shapes and result), then the new token's insertion.

    One score row per query over [store | sinks, residual ring, new token] and one softmax. The sinks, the ring
    (read in place in slot order: softmax does not care about order; a wrapped ring's empty slots are masked)
    and the new token are full-precision segments, read where they lie. A KIVI store is read from its packed
    codes without dequantizing a key or a value: the scales and zeros are factored out of the products, so
    keys (per channel c over block b): q . k_t = sum_c (q_c s_bc) u_tc + sum_c q_c z_bc, and values (per token
    t over channel group j): sum_t p_t (u_tc s_tj + z_tj) = sum_t (p_t s_tj) u_tc + sum_t p_t z_tj. A Hadamard-
    rotated store is read by rotating the query and the output instead of every key and value. On the CPU this
    runs in C (`memopt.runtime.native`: codes unpacked in registers, no temporaries, no concatenation); where
    those kernels cannot be built, in PyTorch ops (`_attend_torch`)."""
    keys, vals, dead, nb = _exact_segments(L, bufs, n)
    keys.append(k)
    vals.append(v)
    qf = q.float() * scale
    lib = _native(L, bufs, qf, keys + vals)
    out = _attend_torch(L, bufs, qf, keys, vals, nb, dead, L.flushed(n)) if lib is None else \
        _attend_native(lib, L, bufs, qf, keys, vals, nb, dead, L.flushed(n))
    insert(L, bufs, k, v, n, None)
    return out


def native_step(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], n: int, layouts: str,
                scale: float) -> Tensor | None:
    """A one-token step of a layer whose heads are one `fast_path` group, attention and the new token's insertion
    in one call of the C kernels (shapes as the op's); None when that does not apply (no kernels, several groups,
    another layout or tensors they cannot read), and the caller takes `attend_step`. A token that fills the
    residual ring is inserted by `insert` (the flush quantizes a block)."""
    groups, count = _state_names(layouts)
    if len(groups) != 1 or count != len(state) or not fast_path(groups[0][0]):
        return None
    (L, names), = groups
    bufs = dict(zip(names, state))
    b, h, _, d = k.shape
    qf = q.reshape(b, h, q.shape[1] // h, d).float() * scale
    keys, vals, dead, nb = _exact_segments(L, bufs, n)
    keys.append(k)
    vals.append(v)
    lib = _native(L, bufs, qf, keys + vals)
    if lib is None:
        return None
    j, slots = n - L.sinks, None
    if n < L.sinks:
        slots = (bufs["sink_k"].narrow(2, n, 1), bufs["sink_v"].narrow(2, n, 1))
    elif L.residual and j - L.group * L.flushed(n) != L.residual:
        slots = (bufs["res_k"].narrow(2, j % L.residual, 1), bufs["res_v"].narrow(2, j % L.residual, 1))
    out = _attend_native(lib, L, bufs, qf, keys, vals, nb, dead, L.flushed(n),
                         None if slots is None else (k, v, *slots))
    if slots is None:
        insert(L, bufs, k, v, n, None)
    return out.reshape(q.shape).to(q.dtype)


def _exact_segments(L: Layout, bufs: dict[str, Tensor], n: int) -> tuple[list[Tensor], list[Tensor], tuple | None, int]:
    """The full-precision keys and values a step at position `n` attends to before the new token (the sinks, the
    residual ring in slot order), the ring's empty slots among them ((first, last + 1) or None) and the number
    of store blocks filled."""
    ns, m, f = min(n, L.sinks), max(0, n - L.sinks), L.flushed(n)
    keys, vals, dead = [], [], None
    if ns:
        keys.append(bufs["sink_k"][:, :, :ns])
        vals.append(bufs["sink_v"][:, :, :ns])
    first = L.group * f if L.residual else m
    if m > first:
        count, start = m - first, first % max(L.residual, 1)
        ring = slice(None) if start + count > L.residual else slice(start, start + count)
        keys.append(bufs["res_k"][:, :, ring])
        vals.append(bufs["res_v"][:, :, ring])
        if ring.start is None and count < L.residual:  # wrapped: slots (start + count) % R .. start - 1 are empty
            dead = (ns + start + count - L.residual, ns + start)
    return keys, vals, dead, min(f, L.blocks)


def _probs(L: Layout, scores: Tensor, stored: int, dead: tuple[int, int] | None) -> Tensor:
    """Softmax of the score rows (batch, heads, n_rep, stored + exact) after masking the ring's empty slots
    (`dead`, among the exact columns) and the model's soft-capping."""
    if dead is not None:
        scores[..., stored + dead[0]:stored + dead[1]] = float("-inf")
    if getattr(L, "softcap", 0.0):  # empty ring slots stay -inf (tanh would make them -softcap, attended)
        scores = torch.where(scores.isneginf(), scores, (scores / L.softcap).tanh() * L.softcap)
    return scores.softmax(-1)


def _attend_torch(L: Layout, bufs: dict[str, Tensor], qf: Tensor, keys: list[Tensor], vals: list[Tensor], nb: int,
                  dead: tuple[int, int] | None, flushed: int) -> Tensor:
    """`attend_fast`'s attention in PyTorch ops: qf (batch, heads, n_rep, head_dim) fp32, already scaled;
    `flushed`: the blocks flushed so far (a pre-RoPE store's positions)."""
    exact_k = torch.cat(keys, 2) if len(keys) > 1 else keys[0]
    exact_v = torch.cat(vals, 2) if len(vals) > 1 else vals[0]
    stored = nb * L.group
    scores = torch.empty((*qf.shape[:3], stored + exact_k.shape[2]), dtype=torch.float32, device=qf.device)
    scores[..., stored:] = qf @ exact_k.float().transpose(-1, -2)  # (matmul's out= into a strided view is slow)
    if nb:
        _store_logits(L, bufs, qf, nb, scores[..., :stored], flushed)
    probs = _probs(L, scores, stored, dead)
    out = probs[..., stored:] @ exact_v.float()
    if nb:
        _add_store_output(L, bufs, probs[..., :stored], nb, out)
    return out


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # kivi_kernels.c's segment dtypes


def _native(L: Layout, bufs: dict[str, Tensor], qf: Tensor, segments: list[Tensor]):
    """The C kernels (`memopt.runtime.native`) when they can read this step's tensors in place, else None: on the
    CPU, full-precision rows of a kernel dtype with the channels contiguous and batch folding into heads (every
    tensor's batch stride `heads` times its head stride), the state contiguous, head_dim <= 1024, n_rep <= 64,
    a value group whole bytes per plane."""
    b, h, r, d = qf.shape
    if qf.device.type != "cpu" or d > 1024 or r > 64:
        return None
    for x in segments:
        if x.dtype not in _DTYPE_CODES or x.stride(-1) != 1 or (b > 1 and x.stride(0) != h * x.stride(1)):
            return None
    for x in bufs.values():  # the layer's state, as Layout.allocate makes it
        if not x.is_contiguous() or (x.dtype.is_floating_point and x.dtype not in _DTYPE_CODES):
            return None
    width = L.value_channels_per_group
    if L.value_bits < 16 and (d % width or width % (8 // L.value_bits)):
        return None
    return native.kernels()


def _rows(x: Tensor) -> list[int]:
    """kivi_kernels.c's description of full-precision rows x (batch, heads, rows, head_dim): address, dtype, rows,
    head stride, row stride (elements)."""
    return [x.data_ptr(), _DTYPE_CODES[x.dtype], x.shape[2], x.stride(1), x.stride(2)]


def _attend_native(lib, L: Layout, bufs: dict[str, Tensor], qf: Tensor, keys: list[Tensor], vals: list[Tensor],
                   nb: int, dead: tuple[int, int] | None, flushed: int,
                   insert_rows: tuple[Tensor, ...] | None = None) -> Tensor:
    """`_attend_torch` in one call of the C kernels (`kivi_step`): columns [packed store | full-precision
    segments], a 16-bit store being the first full-precision segment; a pre-RoPE store read with its blocks'
    RoPE tables (`_rope_tables`), its Hadamard rotation (if any) undone in the kernel a block at a time.
    `insert_rows` (k, v, key slot, value slot, each (batch, heads, 1, head_dim)): the new token's rows, copied
    into their slots after the attention."""
    b, h, r, d = qf.shape
    stored = nb * L.group
    packed_k, packed_v = bool(nb) and L.key_bits < 16, bool(nb) and L.value_bits < 16
    if nb and not packed_k:
        keys = [bufs["store_k"][:, :, :nb].flatten(2, 3), *keys]
    if nb and not packed_v:
        vals = [bufs["store_v"][:, :, :nb].flatten(2, 3), *vals]
    n = stored + sum(x.shape[2] for x in vals[1 if nb and not packed_v else 0:])
    qs = qf @ kivi.hadamard_matrix(d).to(qf.device) if packed_k and L.hadamard and not L.pre_rope else qf
    out = torch.empty((b, h, r, d), dtype=torch.float32, device=qf.device)  # zeroed by the kernel
    store_out = torch.empty_like(out) if packed_v and L.hadamard else out
    kq, ks, kz = (bufs["store_kq"], bufs["store_kscale"], bufs["store_kzero"]) if packed_k else _NO_STORE
    vq, vs, vz = (bufs["store_vq"], bufs["store_vscale"], bufs["store_vzero"]) if packed_v else _NO_STORE
    lo, hi = (stored + dead[0], stored + dead[1]) if dead is not None else (0, 0)
    scores = _scratch("scores", (b * h * r * n,), torch.float32, qf.device)
    table = [b * h, r, d, qf.data_ptr(), qs.data_ptr(), L.group, lo, hi,
             L.key_bits, nb if packed_k else 0, kq.data_ptr(), kq.stride(1), kq.stride(2), ks.data_ptr(), kz.data_ptr(),
             ks.stride(1), ks.stride(2), L.value_bits, vs.shape[-1], nb if packed_v else 0, vq.data_ptr(), vq.stride(1),
             vs.data_ptr(), vz.data_ptr(), vs.stride(1), scores.data_ptr(), out.data_ptr(), store_out.data_ptr(),
             len(keys), len(vals), int(insert_rows is not None)]
    for x in insert_rows or (None,) * 4:
        table += [0, 0, 0] if x is None else [x.data_ptr(), _DTYPE_CODES[x.dtype], x.stride(1)]
    for x in (*keys, *vals):
        table += _rows(x)
    args = array.array("q", table)
    rope = offsets = None
    if packed_k and L.pre_rope:
        tables, offsets = _rope_tables(L, nb, flushed, qf.device)
        rope, offsets = tables.data_ptr(), array.array("q", offsets)
    if lib.kivi_step(args.buffer_info()[0], float(getattr(L, "softcap", 0.0)), rope,
                     None if offsets is None else offsets.buffer_info()[0], int(rope is not None and L.hadamard)):
        raise RuntimeError(f"memopt's C KV kernels refused a layout they were given ({L}); "
                           "set MEMOPT_NATIVE=0 to read the cache with PyTorch ops and report this")
    if store_out is not out:
        out.add_(store_out @ kivi.hadamard_matrix(d).to(out.device))
    return out


_NO_STORE = (torch.zeros(1, 1, 1, 1, dtype=torch.uint8),) * 3  # stand-ins for an absent packed store (not read)
_ROPE: dict = {}


def _rope_tables(L: Layout, nb: int, flushed: int, device) -> tuple[Tensor, list[int]]:
    """A pre-RoPE store's RoPE tables for kivi_kernels.c (`key_logits_rope`): per block of the flush order, cos then
    sin (head_dim / 2, group) fp32 of its tokens' positions times inv_freq (as `kivi.rope` computes them), tokens in
    the packed codes' plane order; kept per layout and grown with the context. And for each of the first `nb` store
    slots, the offset (floats) of the table of the block it holds."""
    per, half = 8 // L.key_bits, L.head_dim // 2
    key = (L.rope_inv_freq, L.group, L.sinks, per, str(device))
    tables = _ROPE.get(key)
    if tables is None or tables.shape[0] < flushed:
        count = max(flushed, 0 if tables is None else tables.shape[0] * 3 // 2)
        freqs = kivi.rope_angles(_positions(L, torch.arange(count, device=device)), _inv_freq(L, device))
        cb = L.group // per
        order = torch.tensor([per * j + i for i in range(per) for j in range(cb)], device=device)
        freqs = freqs[:, order].transpose(1, 2)  # (blocks, half, group): a channel's tokens in plane order
        tables = _ROPE[key] = torch.cat([freqs.cos(), freqs.sin()], 1).contiguous()
    size = 2 * half * L.group
    return tables, [_slot_blocks(L, b, flushed) * size for b in range(nb)]


def _store_logits(L: Layout, bufs: dict[str, Tensor], q: Tensor, nb: int, out: Tensor, flushed: int) -> None:
    """q (batch, heads, n_rep, head_dim) fp32 against the first `nb` store blocks (of `flushed` so far): logits into
    `out` (batch, heads, n_rep, nb * group), which may be a strided view."""
    if L.key_bits == 16:
        out.copy_(q @ bufs["store_k"][:, :, :nb].flatten(2, 3).float().transpose(-1, -2))
        return
    if L.pre_rope:  # keys turned back from a Hadamard rotation and forward to their positions
        out.copy_(q @ read_keys(L, bufs, 0, nb, flushed).transpose(-1, -2))
        return
    if L.hadamard:
        q = q @ kivi.hadamard_matrix(L.head_dim).to(q.device)
    scale = bufs["store_kscale"][:, :, :nb].float().unsqueeze(-2)  # (batch, heads, nb, 1, head_dim): per channel
    zero = bufs["store_kzero"][:, :, :nb].float().unsqueeze(-2)
    levels = _unpack(bufs["store_kq"][:, :, :nb], L.key_bits, "keys").transpose(-1, -2)  # (.., nb, group, head_dim)
    keys = _scratch("keys", levels.shape, torch.float32, q.device).copy_(levels).mul_(scale).add_(zero)
    out.copy_(q @ keys.flatten(2, 3).transpose(-1, -2))


def _unpack(packed: Tensor, bits: int, key: str) -> Tensor:
    """`kivi.unpack_bits`: (..., m) uint8 -> (..., m * 8 / bits) uint8, into scratch memory `key`. 4-bit data
    without an interleaving copy (2.5x faster on CPU): each byte widened to 16 bits, its high nibble moved to
    the high byte, both masked, read back as two little-endian bytes."""
    if bits != 4 or sys.byteorder != "little":
        return kivi.unpack_bits(packed, bits)
    x = _scratch(key + "_lo", packed.shape, torch.int16, packed.device).copy_(packed)
    y = torch.bitwise_left_shift(x, 4, out=_scratch(key + "_hi", packed.shape, torch.int16, packed.device))
    return y.bitwise_or_(x).bitwise_and_(0x0F0F).view(torch.uint8)


_SCRATCH = threading.local()


def _scratch(key: str, shape, dtype: torch.dtype, device) -> Tensor:
    """Memory a decode step reuses for its large temporaries (per thread and `key`, grown as needed): fresh
    CPU allocations above glibc's mmap threshold (128 KiB) page-fault every 4 KiB on each step, which costs
    more than the arithmetic on them. The result is overwritten by the next step: never return it."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = buffers.get((key, dtype, str(device)))
    if buf is None or buf.numel() < numel:  # grown by half again: a context growing a token a step reallocates rarely
        size = max(numel, 0 if buf is None else buf.numel() * 3 // 2)
        with torch.inference_mode(False):  # an ordinary tensor: writable in and out of inference mode
            buf = buffers[key, dtype, str(device)] = torch.empty(size, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def _add_store_output(L: Layout, bufs: dict[str, Tensor], p: Tensor, nb: int, out: Tensor) -> None:
    """Attention weights p (batch, heads, n_rep, nb * group) over the first `nb` store blocks' values, added
    into out (batch, heads, n_rep, head_dim) fp32 contiguous."""
    if L.value_bits == 16:
        out.add_(p @ bufs["store_v"][:, :, :nb].flatten(2, 3).float())
        return
    vq, vs, vz = bufs["store_vq"], bufs["store_vscale"], bufs["store_vzero"]
    scale = vs[:, :, :nb].flatten(2, 3).float()  # (batch, heads, tokens, groups)
    zero = vz[:, :, :nb].flatten(2, 3).float()
    levels = _unpack(vq[:, :, :nb], L.value_bits, "values").flatten(2, 3)  # (.., tokens, head_dim)
    levels = _scratch("values", levels.shape, torch.float32, p.device).copy_(levels)
    groups = scale.shape[-1]
    width = L.head_dim // groups
    if groups == 1:
        part = (p * scale[..., 0].unsqueeze(-2)) @ levels
    else:
        part = torch.cat([(p * scale[..., j].unsqueeze(-2)) @ levels[..., j * width:(j + 1) * width]
                          for j in range(groups)], -1)
    part = part.add_((p @ zero).repeat_interleave(width, -1))
    if L.hadamard:
        part = part @ kivi.hadamard_matrix(L.head_dim).to(part.device)
    out.add_(part)


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
    bufs["res_k"].narrow(2, slot, 1).copy_(k)  # (narrow + copy_: half the cost of an indexed assignment)
    bufs["res_v"].narrow(2, slot, 1).copy_(v)
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
            blocks = _slot_blocks(L, torch.arange(lo, hi, device=keys.device), flushed)
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


def _slot_blocks(L: Layout, slots, flushed: int):
    """The flush-order index of the block each store slot holds (`slots`: an int or a tensor) once `flushed` blocks
    have been flushed into the ring of `L.blocks` slots."""
    return slots + L.blocks * ((flushed - 1 - slots) // L.blocks)


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
