"""Generation with a compiled decoder: a chunked prefill and greedy one-token steps through the
generation program (static KV cache held as buffers, dynamic number of new tokens)."""

from __future__ import annotations

import torch


def _cache_len(generator) -> int:
    for name, buf in generator.named_buffers():
        if "key_cache" in name and buf.dim() == 4:
            return int(buf.shape[2])
    return 0


def tokens_per_call(generator) -> int | None:
    """The fixed number of tokens the generation program takes per call (a static capture: 1), or None
    when that dimension is dynamic."""
    for node in generator.graph.nodes:
        if node.op == "placeholder" and "input_ids" in node.name:
            val = node.meta.get("val")
            if val is not None and val.dim() == 2 and isinstance(val.shape[1], int):
                return val.shape[1]
    return None


@torch.no_grad()
def generate(generator, input_ids: torch.Tensor, max_new_tokens: int = 32, *, eos_token_id=None,
             prefill_chunk: int = 512) -> torch.Tensor:
    """Greedy decoding. `input_ids` (batch, prompt_len) -> new token ids (batch, <= max_new_tokens).
    The cache is reset by position: `cache_position` starts at 0 for every call."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    capacity = _cache_len(generator)
    total = input_ids.shape[1] + max_new_tokens
    if capacity and total > capacity:
        raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                         f"the compiled KV cache of {capacity} tokens; recompile with a larger --max-cache")
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else
              ([eos_token_id] if eos_token_id is not None else []))
    logits = None
    prefill_chunk = tokens_per_call(generator) or prefill_chunk
    for start in range(0, input_ids.shape[1], prefill_chunk):
        chunk = input_ids[:, start:start + prefill_chunk]
        logits = generator(input_ids=chunk, cache_position=torch.arange(start, start + chunk.shape[1],
                                                                        device=input_ids.device))
    pos, out = input_ids.shape[1], []
    for _ in range(max_new_tokens):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        if eos and all(int(t) in eos for t in token[:, 0]):
            break
        logits = generator(input_ids=token, cache_position=torch.tensor([pos], device=input_ids.device))
        pos += 1
    return torch.cat(out, dim=1) if out else input_ids[:, :0]


def chat_ids(tokenizer, prompt: str) -> torch.Tensor:
    """Token ids for `prompt`, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt")["input_ids"]
