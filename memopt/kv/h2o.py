"""Heavy hitters (H2O, Zhang et al., NeurIPS 2023) and pivotal tokens (Scissorhands, Liu et al., 2023).

A token's importance is the attention it has received: H2O accumulates its attention probabilities
over all queries so far, Scissorhands counts the queries that gave it more than the uniform share
(1 / number of tokens attended). The cache keeps the `budget_tokens - recent - sinks` highest-scored
older tokens, the `recent` most recent ones and the first `sinks`, evicting the lowest score as each
new token arrives. With GQA a KV head's score sums the scores of the query heads that share it.

Scores: (batch, kv_heads, seq_len) fp32, from prompt queries (batch, q_heads, seq_len, head_dim) and keys
(batch, kv_heads, seq_len, head_dim) after RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from memopt.kv.config import KVConfig, check_choice, check_int

H2O_SCORES = ("h2o", "scissorhands")


@dataclass(frozen=True)
class H2OConfig(KVConfig):
    """Score-based eviction to `budget_tokens` tokens (sinks + recent + heavy hitters)."""

    kind: ClassVar[str] = "h2o"
    budget_tokens: int = 512
    recent: int = 64
    sinks: int = 0
    score: str = "h2o"  # h2o: accumulated attention | scissorhands: times above the uniform share

    def __post_init__(self):
        check_int("H2OConfig", "budget_tokens", self.budget_tokens, minimum=1)
        check_int("H2OConfig", "recent", self.recent, minimum=0)
        check_int("H2OConfig", "sinks", self.sinks, minimum=0)
        check_choice("H2OConfig", "score", self.score, H2O_SCORES)
        if self.budget_tokens < self.sinks + self.recent:
            raise ValueError(f"H2OConfig.budget_tokens {self.budget_tokens} < sinks {self.sinks} + recent "
                             f"{self.recent}; raise the budget to at least {self.sinks + self.recent}")


def causal_probs_chunks(q: Tensor, k: Tensor, scale: float, chunk: int = 256):
    """Yield (first_query_index, probs (batch, q_heads, c, seq_len)) for causal attention, `chunk` queries
    at a time, so a long prompt never holds the whole (seq_len x seq_len) matrix."""
    n_rep = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(n_rep, dim=1)
    t = k.shape[2]
    for start in range(0, q.shape[2], chunk):
        qc = q[:, :, start : start + chunk].float()
        logits = qc @ kk.transpose(-1, -2) * scale
        rows = torch.arange(start, start + qc.shape[2], device=q.device).unsqueeze(1) + (t - q.shape[2])
        logits.masked_fill_(torch.arange(t, device=q.device).unsqueeze(0) > rows, float("-inf"))
        yield start, logits.softmax(-1)


def group_heads(x: Tensor, kv_heads: int) -> Tensor:
    """(batch, q_heads, ...) -> (batch, kv_heads, ...) summed over the query heads sharing a KV head."""
    return x.reshape(x.shape[0], kv_heads, -1, *x.shape[2:]).sum(2)


def h2o_scores(q: Tensor, k: Tensor, scale: float, chunk: int = 256) -> Tensor:
    """Accumulated attention each key received from all (causal) prompt queries."""
    total = torch.zeros(q.shape[0], q.shape[1], k.shape[2], device=q.device)
    for _, probs in causal_probs_chunks(q, k, scale, chunk):
        total += probs.sum(2)
    return group_heads(total, k.shape[1])


def scissorhands_scores(q: Tensor, k: Tensor, scale: float, chunk: int = 256) -> Tensor:
    """How many prompt queries gave each key more than the uniform share 1 / (keys visible)."""
    total = torch.zeros(q.shape[0], q.shape[1], k.shape[2], device=q.device)
    offset = k.shape[2] - q.shape[2]
    for start, probs in causal_probs_chunks(q, k, scale, chunk):
        visible = torch.arange(start, start + probs.shape[2], device=q.device) + offset + 1
        total += (probs > 1.0 / visible.view(1, 1, -1, 1)).float().sum(2)
    return group_heads(total, k.shape[1])


def decode_score_update(probs: Tensor, kind: str) -> Tensor:
    """This step's addition to each key's score. `probs` (batch, kv_heads, n_rep, tokens) -> (batch, kv_heads, tokens)."""
    if kind == "scissorhands":
        return (probs > 1.0 / probs.shape[-1]).float().sum(2)
    return probs.sum(2)
