"""Generation with a captured decode step: prefill the prompt, then decode one token per graph call.

    gm = capture(src, phase="decode", cache_len=N).module()
    KVCompressionPass(KVCachePolicy(quant=KIVIConfig(4, 2)))(gm, None)
    new_ids = generate(gm, prompt_ids, max_new_tokens=16, model=src.model)

The prefill runs the eager `model` once over the prompt (full attention, as KIVI, SnapKV and kvpress
do) and writes each layer's keys and values into `gm`'s cache as they are computed: compressed by the
policy when `gm` went through `KVCompressionPass`, at their positions in an uncompressed static cache
otherwise. Without `model` the prompt goes through the decode graph: in one call when it takes several
tokens (captured with `dynamic=True`: `memopt::kv_attend` attends the prompt exactly and writes the state
from it as the prefill through `model` does; logits of the last position only, `memopt.runner.decode_program`),
else token by token (slower; SnapKV and ThinK then have no observation window and fall back to their
decode-time rules). Decoding then calls
`gm(input_ids=(batch, 1), cache_position=[pos])` with the true position of each token: a compressed
cache is shorter than the prefix, so the position cannot be inferred from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memopt.kv.prefill import fill_compressed, record_attention
from memopt.runner import decode_program, tokens_per_call


def reset_cache(gm) -> None:
    """Empty `gm`'s KV cache (compressed or static) before a new prompt."""
    meta = gm.meta.get("memopt_kv")
    if meta is None:
        for name, buf in gm.named_buffers():
            if name.startswith(("key_cache_", "value_cache_")):
                buf.zero_()
        return
    for layer in meta["layers"].values():
        for name in layer["buffers"]:
            getattr(gm, name).fill_(-1 if name.endswith("_channels") else 0)


def capacity_tokens(gm) -> int | None:
    """Tokens `gm`'s cache can hold before it must drop some (None: it drops by design, never full)."""
    meta = gm.meta.get("memopt_kv")
    if meta is None:
        return getattr(gm, "key_cache_0").shape[2] if hasattr(gm, "key_cache_0") else None
    from memopt.kv.layout import layouts_from_str

    bounded = [x for layer in meta["layers"].values() for x in layouts_from_str(layer["layouts"]) if not x.bounded]
    return min((x.capacity for x in bounded), default=None)


def prefill(gm, prompt_ids: Tensor, model=None) -> Tensor:
    """Fill `gm`'s cache with `prompt_ids` (batch, T); returns the logits after the last prompt token (batch, vocab)."""
    _check_length(gm, prompt_ids.shape[1])
    reset_cache(gm)
    with torch.no_grad():
        if model is None and tokens_per_call(gm) is None:  # the program takes the whole prompt in one call
            program = decode_program(gm)
            positions = torch.arange(prompt_ids.shape[1], device=prompt_ids.device)
            return program(input_ids=prompt_ids, cache_position=positions)[:, -1]
        if model is None:
            logits = None
            for t in range(prompt_ids.shape[1]):
                logits = decode_step(gm, prompt_ids[:, t : t + 1], t)
            return logits
        with record_attention(model, fill_compressed(gm)):
            out = model(prompt_ids, use_cache=False, logits_to_keep=1)
        return out.logits[:, -1]


def decode_step(gm, token_ids: Tensor, position: int) -> Tensor:
    """One graph call: token_ids (batch, 1) at `position` -> next-token logits (batch, vocab)."""
    out = decode_program(gm)(input_ids=token_ids, cache_position=torch.tensor([position], device=token_ids.device))
    return out[:, -1]


def generate(gm, prompt_ids: Tensor, max_new_tokens: int, *, model=None, eos_token_id: int | None = None,
             cached_tokens: int | None = None) -> Tensor:
    """Greedy decoding: the new token ids (batch, n), n <= max_new_tokens (stops when every row hit `eos_token_id`).

    `cached_tokens`: prefill (and compress) only the first `cached_tokens` prompt tokens and feed the rest
    through the decode step one at a time, as when a question comes after its context was cached: the
    compression cannot know the question (kvpress's question-agnostic setting)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    n_prompt = prompt_ids.shape[1]
    cached_tokens = n_prompt if cached_tokens is None else cached_tokens
    if not 1 <= cached_tokens <= n_prompt:
        raise ValueError(f"cached_tokens must be in [1, {n_prompt}] (the prompt's length), got {cached_tokens}")
    _check_length(gm, n_prompt + max_new_tokens - 1)
    out, done = [], torch.zeros(prompt_ids.shape[0], dtype=torch.bool)
    with torch.inference_mode():  # fewer checks per op; the caches (ordinary tensors) are updated in place as usual
        logits = prefill(gm, prompt_ids[:, :cached_tokens], model)
        for t in range(cached_tokens, n_prompt):
            logits = decode_step(gm, prompt_ids[:, t : t + 1], t)
        for i in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)
            out.append(token)
            if eos_token_id is not None:
                done |= token[:, 0] == eos_token_id
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = decode_step(gm, token, n_prompt + i)
    return torch.cat(out, dim=1)  # outside inference mode: an ordinary tensor


def teacher_forced_logits(gm, ids: Tensor, prefill_tokens: int, *, model=None) -> Tensor:
    """Prefill `ids[:, :prefill_tokens]`, then feed the rest one token at a time: the logits at positions
    prefill_tokens - 1 .. T - 1, (batch, T - prefill_tokens + 1, vocab), aligned with `model(ids).logits[:, prefill_tokens - 1:]`."""
    if not 1 <= prefill_tokens <= ids.shape[1]:
        raise ValueError(f"prefill_tokens must be in [1, {ids.shape[1]}], got {prefill_tokens}")
    _check_length(gm, ids.shape[1])
    out = [prefill(gm, ids[:, :prefill_tokens], model)]
    with torch.no_grad():
        for t in range(prefill_tokens, ids.shape[1]):
            out.append(decode_step(gm, ids[:, t : t + 1], t))
    return torch.stack(out, dim=1)


def _check_length(gm, tokens: int) -> None:
    capacity = capacity_tokens(gm)
    if capacity is not None and tokens > capacity:
        raise ValueError(f"{tokens} tokens exceed the cache's capacity of {capacity}; capture with a larger "
                         f"cache_len or pass context= to KVCompressionPass (or use an evicting policy)")
