"""Greedy generation with a compiled decoder's generation program: one loop for every KV cache.

    new_ids = generate(generator, prompt_ids, max_new_tokens=16)                # a compiled artifact's program
    new_ids = generate(gm, prompt_ids, max_new_tokens=16, model=src.model)      # prefill through the eager model

Prefill, then one token per graph call, all through `decode_program(generator)` (the program rewritten for
generation: attention over the written slots only, logits of the last position only; see
`memopt.serve.decode_program`). How the prompt goes in depends on the cache the program holds:
  - a static cache (an uncompressed compile): in chunks of `prefill_chunk` tokens (or the fixed number of
    tokens the program takes per call); slots are addressed by position, so nothing needs resetting;
  - a compressed cache (`KVCompressionPass`, `gm.meta["memopt_kv"]`): emptied first, then the whole prompt
    in one call when the program takes a dynamic number of tokens (`memopt::kv_attend` attends the prompt
    exactly and writes the compressed state from it), else token by token (SnapKV and ThinK then have no
    observation window and fall back to their decode-time rules);
  - with `model` (an eager model of the same weights): the prompt runs through it once (full attention, as
    KIVI, SnapKV and kvpress do) and each layer's keys and values are written into the cache as they are
    computed, compressed by the policy when there is one.
Decoding calls the program with `input_ids=(batch, 1)` and the true `cache_position` of each token: a
compressed cache is shorter than the prefix, so the position cannot be inferred from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memopt.kv.prefill import fill_compressed, record_attention
from memopt.serve.decode_program import decode_program, tokens_per_call


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
    if meta is None:  # a static cache (its buffers keep "key_cache" in their names when offloaded)
        return next((int(buf.shape[2]) for name, buf in gm.named_buffers() if "key_cache" in name and buf.dim() == 4),
                    None)
    from memopt.kv.layout import layouts_from_str

    bounded = [x for layer in meta["layers"].values() for x in layouts_from_str(layer["layouts"]) if not x.bounded]
    return min((x.capacity for x in bounded), default=None)


def prefill(gm, prompt_ids: Tensor, model=None, *, prefill_chunk: int = 512) -> Tensor:
    """Fill `gm`'s cache with `prompt_ids` (batch, T); returns the logits after the last prompt token (batch, vocab)."""
    _check_length(gm, prompt_ids.shape[1])
    compressed = "memopt_kv" in gm.meta
    if compressed:
        reset_cache(gm)
    with torch.no_grad():
        if model is not None:
            with record_attention(model, fill_compressed(gm)):
                out = model(prompt_ids, use_cache=False, logits_to_keep=1)
            return out.logits[:, -1]
        per_call = tokens_per_call(gm)
        chunk = per_call or (prompt_ids.shape[1] if compressed else prefill_chunk)
        program, logits = decode_program(gm), None
        for start in range(0, prompt_ids.shape[1], chunk):
            ids = prompt_ids[:, start:start + chunk]
            positions = torch.arange(start, start + ids.shape[1], device=prompt_ids.device)
            logits = program(input_ids=ids, cache_position=positions)
        return logits[:, -1]


def decode_step(gm, token_ids: Tensor, position: int) -> Tensor:
    """One graph call: token_ids (batch, 1) at `position` -> next-token logits (batch, vocab)."""
    out = decode_program(gm)(input_ids=token_ids, cache_position=torch.tensor([position], device=token_ids.device))
    return out[:, -1]


def generate(gm, prompt_ids: Tensor, max_new_tokens: int = 32, *, model=None, eos_token_id=None,
             cached_tokens: int | None = None, prefill_chunk: int = 512) -> Tensor:
    """Greedy decoding: the new token ids (batch, n), n <= max_new_tokens (stops once every row has produced
    an id in `eos_token_id`, an int or a collection of ints).

    `cached_tokens`: prefill (and compress) only the first `cached_tokens` prompt tokens and feed the rest
    through the decode step one at a time, as when a question comes after its context was cached: the
    compression cannot know the question (kvpress's question-agnostic setting)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if prompt_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(prompt_ids.shape)}")
    n_prompt = prompt_ids.shape[1]
    cached_tokens = n_prompt if cached_tokens is None else cached_tokens
    if not 1 <= cached_tokens <= n_prompt:
        raise ValueError(f"cached_tokens must be in [1, {n_prompt}] (the prompt's length), got {cached_tokens}")
    _check_length(gm, n_prompt + max_new_tokens - 1)
    eos = torch.tensor(sorted(eos_token_id if isinstance(eos_token_id, (list, tuple, set, frozenset)) else
                              ([] if eos_token_id is None else [eos_token_id])), dtype=torch.long)
    out, done = [], torch.zeros(prompt_ids.shape[0], dtype=torch.bool)
    with torch.inference_mode():  # fewer checks per op; the caches (ordinary tensors) are updated in place as usual
        logits = prefill(gm, prompt_ids[:, :cached_tokens], model, prefill_chunk=prefill_chunk)
        for t in range(cached_tokens, n_prompt):
            logits = decode_step(gm, prompt_ids[:, t : t + 1], t)
        for i in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)
            out.append(token)
            if len(eos):
                done |= torch.isin(token[:, 0].cpu(), eos)
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = decode_step(gm, token, n_prompt + i)
    return torch.cat(out, dim=1)  # outside inference mode: an ordinary tensor


def teacher_forced_logits(gm, ids: Tensor, prefill_tokens: int, *, model=None, chunk: int = 64) -> Tensor:
    """Prefill `ids[:, :prefill_tokens]`, then feed the rest: the logits at positions prefill_tokens - 1 .. T - 1,
    (batch, T - prefill_tokens + 1, vocab), aligned with `model(ids).logits[:, prefill_tokens - 1:]`.

    A program captured for one token per call is fed one token at a time. One that takes a dynamic number of
    tokens (`capture(..., phase="decode", dynamic=True)`, a generation program) is fed `chunk` tokens a call and
    returns every position's logits: the weights are read once a chunk instead of once a token (SmolLM2, 128
    tokens after a 512-token prompt with a KIVI cache: 13.1 s -> 2.4 s). The cache sees the same tokens in the
    same order (`memopt::kv_attend` steps through a chunk token by token, a static cache masks the chunk
    causally), so the logits are those of one-token calls up to the rounding of a product over several rows."""
    if not 1 <= prefill_tokens <= ids.shape[1]:
        raise ValueError(f"prefill_tokens must be in [1, {ids.shape[1]}], got {prefill_tokens}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int (tokens per call), got {chunk!r}")
    _check_length(gm, ids.shape[1])
    out = [prefill(gm, ids[:, :prefill_tokens], model)[:, None]]
    step = chunk if tokens_per_call(gm) is None else 1
    program = decode_program(gm, every_position=True) if step > 1 else None
    with torch.no_grad():
        for t in range(prefill_tokens, ids.shape[1], step):
            if program is None:
                out.append(decode_step(gm, ids[:, t : t + 1], t)[:, None])
                continue
            part = ids[:, t : t + step]
            out.append(program(input_ids=part, cache_position=torch.arange(t, t + part.shape[1], device=ids.device)))
    return torch.cat(out, dim=1)


def _check_length(gm, tokens: int) -> None:
    capacity = capacity_tokens(gm)
    if capacity is not None and tokens > capacity:
        hint = ("capture with a larger cache_len or pass context= to KVCompressionPass (or use an evicting policy)"
                if "memopt_kv" in gm.meta else "recompile with a larger --max-cache")
        raise ValueError(f"{tokens} tokens exceed the cache's capacity of {capacity}; {hint}")


def chat_ids(tokenizer, prompt: str) -> Tensor:
    """Token ids for `prompt`, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        if not isinstance(ids, Tensor):
            ids = ids["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt")["input_ids"]
