"""The quality harness: perplexity, top-1 agreement and pass-key retrieval, seeded and reproducible.

Shared by the quality tests and the benchmarks, so that every number in a table is measured the same
way. The held-out text is Python's own help topics (`pydoc_data.topics`): English prose with some
code, shipped with every Python, never downloaded. Pass-key retrieval follows the "needle in a
haystack" test of Mohtashami & Jaggi, *Landmark Attention* (2023): a 5-digit key hidden at a random
depth of a long filler text, asked for after it; it is what KV-cache eviction loses first.

    python -m memopt.eval.evaluate --model smollm2 --tokens 1000
"""

from __future__ import annotations

import argparse
import inspect
import math
import random
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

GenerateFn = Callable[[torch.Tensor, int], torch.Tensor]  # (prompt_ids (1, T), max_new_tokens) -> (n,)

_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
# Naming the key's form matters on Python's docs: asked only "What is the pass key?", SmolLM2 answers
# "a special method ..." for most seeds; told it is a 5-digit number, it retrieves 8 of 8 at 1k tokens.
_INTRO = ("There is a pass key, a 5-digit number, hidden inside a lot of irrelevant text. "
          "Find it and memorize it. I will quiz you about the pass key.\n\n")
_QUESTION = "\n\nWhat is the 5-digit pass key?"
_ANSWER_PREFIX = "The pass key is"
_MARK = "\x00MEMOPT\x00"


def heldout_text(n_chars: int | None = None, offset: int = 0) -> str:
    """Python's help topics (`pydoc_data.topics.topics`) joined in sorted-key order (~465k chars)."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    if not 0 <= offset < len(text):
        raise ValueError(f"offset must be in [0, {len(text)}) for the held-out text, got {offset}")
    return text[offset:] if n_chars is None else text[offset : offset + n_chars]


def perplexity(model, tokenizer, text: str, *, max_tokens: int = 512, stride: int | None = None) -> float:
    """exp(mean next-token NLL) over the first `max_tokens` tokens of `text`.

    `stride=None` scores them in one forward pass. `stride=s` prefills them `s` tokens at a time
    through the model's KV cache (`past_key_values`): the same number up to rounding, with
    activations bounded by `s` — and, on a model whose cache is compressed, the perplexity under it.
    """
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    if ids.shape[1] < 2:
        raise ValueError(f"perplexity needs at least 2 tokens; the text gave {ids.shape[1]}: pass a longer text")
    if stride is not None and stride < 1:
        raise ValueError(f"stride must be a positive number of tokens or None, got {stride}")
    with torch.no_grad():
        logits = _logits(model, ids) if stride is None else _chunked_logits(model, ids, stride)
    nll = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="mean")
    return math.exp(nll.item())


def top1_agreement(model_a, model_b, input_ids: torch.Tensor, *, start: int = 0) -> float:
    """Fraction of positions `>= start` where both models' argmax next token agree (teacher-forced)."""
    with torch.no_grad():
        a = _logits(model_a, input_ids)[:, start:].argmax(-1)
        b = _logits(model_b, input_ids)[:, start:].argmax(-1)
    if a.numel() == 0:
        raise ValueError(f"start={start} leaves no positions of the {input_ids.shape[-1]} input ids to compare")
    return (a == b).float().mean().item()


def passkey_prompt(tokenizer, context_tokens: int, seed: int, depth: float | None = None) -> tuple[torch.Tensor, str]:
    """`(prompt_ids (1, context_tokens), answer)`: a 5-digit key at `depth` (0..1, seeded when None)
    of held-out filler, then the question, inside the chat template when the tokenizer has one."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    depth = rng.random() if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be a fraction of the context in [0, 1], got {depth}")
    prefix, suffix = _chat_frame(tokenizer)
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    head, needle, tail = encode(prefix + _INTRO), encode(_NEEDLE.format(key=key)), encode(_QUESTION + suffix)
    n_filler = context_tokens - len(head) - len(needle) - len(tail)
    if n_filler < 1:
        raise ValueError(f"context_tokens={context_tokens} is too short for the pass-key frame "
                         f"({context_tokens - n_filler + 1} tokens at least)")
    text = heldout_text()
    span = min(len(text), 8 * n_filler)  # 8 chars a token is ample for this text
    start = rng.randrange(len(text) - span + 1)
    filler = encode(text[start : start + span])[:n_filler]
    if len(filler) < n_filler:
        raise ValueError(f"context_tokens={context_tokens} is longer than the held-out text can fill: it gives "
                         f"{len(filler)} tokens of filler where {n_filler} are needed; ask for fewer tokens")
    cut = _nearest_line_start(tokenizer, filler, round(depth * n_filler))
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    return torch.tensor([ids]), key


def passkey_accuracy(model, tokenizer, context_tokens: int, n_samples: int = 5, seed: int = 0,
                     generate_fn: GenerateFn | None = None, max_new_tokens: int = 8) -> float:  # fmt: skip
    """Fraction of `n_samples` prompts (seeds `seed`, `seed + 1`, ...) whose greedy continuation holds the key."""
    generate_fn = generate_fn or (lambda ids, n: greedy_generate(model, ids, n, tokenizer.eos_token_id))
    hits = 0
    for i in range(n_samples):
        prompt_ids, key = passkey_prompt(tokenizer, context_tokens, seed + i)
        new_ids = generate_fn(prompt_ids, max_new_tokens)
        hits += key in tokenizer.decode(new_ids.reshape(-1), skip_special_tokens=True)
    return hits / n_samples


def greedy_generate(model, prompt_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:  # fmt: skip
    """The new token ids `(n,)` of a greedy decode: `model.generate` when there is one, else a plain loop."""
    with torch.no_grad():
        if hasattr(model, "generate"):
            out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=eos_token_id)  # fmt: skip
            return out[0, prompt_ids.shape[1] :]
        ids = prompt_ids
        for _ in range(max_new_tokens):  # no cache: quadratic, for small models only
            next_id = _logits(model, ids)[:, -1:].argmax(-1)
            ids = torch.cat([ids, next_id], dim=1)
            if eos_token_id is not None and next_id.item() == eos_token_id:
                break
        return ids[0, prompt_ids.shape[1] :]


def quality_table(rows: Sequence[dict]) -> str:
    """A markdown table of `rows` (dicts; columns in first-seen order, floats to 4 significant digits)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def _chunked_logits(model, ids: torch.Tensor, stride: int) -> torch.Tensor:
    """Prefill `stride` tokens at a time through the model's cache, with their true positions
    (a compressed cache may be shorter than the prefix, so the model cannot infer them)."""
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.24 renamed it
    if cache_arg not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"stride={stride} needs a model that takes a KV cache (cache= or past_key_values=); "
                         f"{type(model).__name__} does not: use stride=None")
    cache, chunks = None, []
    for begin in range(0, ids.shape[1], stride):
        chunk = ids[:, begin : begin + stride]
        positions = torch.arange(begin, begin + chunk.shape[1]).unsqueeze(0)
        out = model(chunk, position_ids=positions, use_cache=True, **{cache_arg: cache})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if cache is None:
            raise ValueError(f"stride={stride} needs a model that returns its KV cache; "
                             f"{type(model).__name__} returned none: use stride=None")
        chunks.append(out.logits)
    return torch.cat(chunks, dim=1)


def _nearest_line_start(tokenizer, ids: list[int], position: int) -> int:
    """The token index nearest `position` that starts a line, so the needle does not split a word."""
    starts = [i + 1 for i, t in enumerate(ids) if "\n" in tokenizer.decode([t])]
    return min(starts, key=lambda i: abs(i - position)) if starts else position


def _chat_frame(tokenizer) -> tuple[str, str]:
    """The text before and after the user's message in the chat template, the answer begun after it."""
    if getattr(tokenizer, "chat_template", None):
        framed = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                               tokenize=False)  # fmt: skip
        prefix, suffix = framed.split(_MARK)
        return prefix, suffix + _ANSWER_PREFIX
    return "", "\n" + _ANSWER_PREFIX


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m memopt.eval.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2' or the path of a .gguf file")
    parser.add_argument("--tokens", type=int, default=1000, help="context length for perplexity and pass key")
    parser.add_argument("--samples", type=int, default=5, help="pass-key prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from memopt.frontend.gguf import load_gguf_model, smollm2_path

    model, tokenizer = load_gguf_model(smollm2_path() if args.model == "smollm2" else args.model)
    text = heldout_text(n_chars=8 * args.tokens)
    row = {
        "model": args.model,
        "tokens": args.tokens,
        "perplexity": perplexity(model, tokenizer, text, max_tokens=args.tokens),
        "passkey_accuracy": passkey_accuracy(model, tokenizer, args.tokens, args.samples, args.seed),
    }
    print(quality_table([row]))


if __name__ == "__main__":
    main()
