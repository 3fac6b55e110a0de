"""SnapKV: the observation window picks the prompt tokens to keep (Li et al., NeurIPS 2024).

The last `window` prompt queries already "know" what the generation will look for: each earlier token
is scored by the attention those queries give it (summed over the window and over the query heads of a
GQA group), smoothed by 1-D average pooling of width `kernel` so neighbours of a hit survive with it, and
the top `budget_tokens - window - sinks` are kept with the window itself. During decoding new tokens
enter the recent window; older ones compete with the kept prompt tokens by accumulated attention (H2O's
rule), so the cache never grows past `budget_tokens`.

Scores: (batch, kv_heads, seq_len) from queries (batch, q_heads, seq_len, head_dim) and keys
(batch, kv_heads, seq_len, head_dim) after RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from memopt.kv.config import KVConfig, check_int
from memopt.kv.h2o import causal_probs_chunks, group_heads


@dataclass(frozen=True)
class SnapKVConfig(KVConfig):
    """Keep `budget_tokens` tokens: `sinks`, the observation `window` and the best-scored prompt tokens."""

    kind: ClassVar[str] = "snapkv"
    budget_tokens: int = 512
    window: int = 32
    kernel: int = 7
    sinks: int = 0

    def __post_init__(self):
        check_int("SnapKVConfig", "budget_tokens", self.budget_tokens, minimum=1)
        check_int("SnapKVConfig", "window", self.window, minimum=1)
        check_int("SnapKVConfig", "kernel", self.kernel, minimum=1)
        check_int("SnapKVConfig", "sinks", self.sinks, minimum=0)
        if self.kernel % 2 == 0:
            raise ValueError(f"SnapKVConfig.kernel must be odd (centered pooling), got {self.kernel}")
        if self.budget_tokens < self.sinks + self.window:
            raise ValueError(f"SnapKVConfig.budget_tokens {self.budget_tokens} < sinks {self.sinks} + window "
                             f"{self.window}; raise the budget to at least {self.sinks + self.window}")


def snapkv_scores(q: Tensor, k: Tensor, scale: float, window: int, kernel: int) -> Tensor:
    """Attention of the last `window` queries to every key, pooled over `kernel` neighbouring keys."""
    window = min(window, q.shape[2])
    (_, probs), = causal_probs_chunks(q[:, :, -window:], k, scale, chunk=window)
    scores = group_heads(probs.sum(2), k.shape[1])
    if kernel > 1:
        b, h, t = scores.shape
        scores = F.avg_pool1d(scores.reshape(b * h, 1, t), kernel, stride=1, padding=kernel // 2,
                              count_include_pad=False).reshape(b, h, t)
    return scores
