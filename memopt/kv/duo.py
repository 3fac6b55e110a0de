"""Retrieval heads keep everything, streaming heads keep sinks + a window (DuoAttention, Xiao et al.,
ICLR 2025; RazorAttention, Tang et al., ICLR 2025).

Only a few heads fetch information from far back; the rest attend to the sinks and the recent tokens.
Both papers find the retrieval heads once, offline: DuoAttention by optimizing a gate per head on a
synthetic pass-key task, RazorAttention by the heads' attention patterns. Here a calibration pass runs
synthetic pass-key prompts made of random letters (not the evaluation text) and scores each KV head
by the attention mass the final query (where the answer begins) puts on the needle, averaged over the
query heads sharing it and over the prompts. The top heads of the whole model become retrieval heads;
each layer then stores two groups with their own buffers (`PerHeadKVPolicy`): full (or KIVI-quantized)
for its retrieval heads and sinks + window for the others.

Scores: (layers, kv_heads) fp32.
"""

from __future__ import annotations

import random
import string

import torch

from memopt.kv.policy import HeadGroup, KVCachePolicy, PerHeadKVPolicy, PerLayerKVPolicy
from memopt.kv.prefill import record_attention
from memopt.kv.streaming import StreamingConfig

_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
_INTRO = "A pass key is hidden in the noise below. Find it.\n\n"
_QUESTION = "\n\nWhat is the pass key?"
_ANSWER = "The pass key is"


def calibration_prompt(tokenizer, context_tokens: int, seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(ids (1, T), (start, end) of the needle's tokens): a 5-digit key at a random depth of random-letter
    'words', then the question and the start of the answer (in the chat template when there is one)."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    encode = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    prefix, suffix = "", "\n" + _ANSWER
    if getattr(tokenizer, "chat_template", None):
        mark = "\x00CAL\x00"
        framed = tokenizer.apply_chat_template([{"role": "user", "content": mark}], add_generation_prompt=True,
                                               tokenize=False)
        prefix, suffix = framed.split(mark)
        suffix += _ANSWER
    head, needle, tail = encode(prefix + _INTRO), encode(_NEEDLE.format(key=key)), encode(_QUESTION + suffix)
    n_filler = context_tokens - len(head) - len(needle) - len(tail)
    if n_filler < 2:
        raise ValueError(f"context_tokens={context_tokens} is too short for the calibration prompt")
    words = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))
                     for _ in range(2 * n_filler))
    filler = encode(words)[:n_filler]
    cut = rng.randint(n_filler // 10, 9 * n_filler // 10)
    ids = head + filler[:cut] + needle + filler[cut:] + tail
    start = len(head) + cut
    return torch.tensor([ids]), (start, start + len(needle))


def retrieval_head_scores(model, tokenizer, *, n_samples: int = 4, context_tokens: int = 512,
                          seed: int = 1234) -> torch.Tensor:
    """Mean attention mass of the answer position on the needle, per layer and KV head: (layers, kv_heads)."""
    config = model.config
    scores = torch.zeros(config.num_hidden_layers, config.num_key_value_heads)
    span = (0, 0)

    def sink(layer, q, k, v, scale):
        kk = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        probs = (q[:, :, -1:].float() @ kk.transpose(-1, -2) * scale).softmax(-1)[:, :, 0]  # (batch, q_heads, T)
        mass = probs[..., span[0] : span[1]].sum(-1).mean(0)  # (q_heads,)
        scores[layer] += mass.reshape(k.shape[1], -1).mean(-1)

    with torch.no_grad(), record_attention(model, sink):
        for i in range(n_samples):
            ids, span = calibration_prompt(tokenizer, context_tokens, seed + i)
            model(ids, use_cache=False, logits_to_keep=1)
    return scores / n_samples


def duo_attention_policy(scores: torch.Tensor, *, retrieval_fraction: float = 0.5,
                         retrieval: KVCachePolicy = KVCachePolicy(),
                         streaming: KVCachePolicy = KVCachePolicy(eviction=StreamingConfig(4, 60))) -> PerLayerKVPolicy:
    """The top `retrieval_fraction` of KV heads by `scores` (layers, kv_heads) get `retrieval`, the rest
    `streaming`; a layer whose heads all fall on one side stores a single group."""
    if not 0.0 <= retrieval_fraction <= 1.0:
        raise ValueError(f"retrieval_fraction must be in [0, 1], got {retrieval_fraction}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (layers, kv_heads), got shape {tuple(scores.shape)}")
    n_layers, n_heads = scores.shape
    k = round(retrieval_fraction * scores.numel())
    chosen = set(scores.flatten().topk(k).indices.tolist()) if k else set()
    layers = {}
    for layer in range(n_layers):
        keep = tuple(h for h in range(n_heads) if layer * n_heads + h in chosen)
        rest = tuple(h for h in range(n_heads) if h not in keep)
        groups = tuple(HeadGroup(heads, policy) for heads, policy in ((keep, retrieval), (rest, streaming)) if heads)
        layers[layer] = groups[0].policy if len(groups) == 1 else PerHeadKVPolicy(groups)
    return PerLayerKVPolicy(streaming, layers)
