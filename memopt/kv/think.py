"""ThinK: query-driven pruning of key channels (Xu et al., ICLR 2025).

A few key channels carry most of q . k. Each KV head keeps the `keep_ratio` fraction of its key
channels with the largest ||Q_w[:, c]|| * ||K[:, c]||, Q_w being the last `window` prompt queries of the
heads sharing it; the stored keys hold only those channels (values are untouched), and a decode
query is multiplied on the same channels. The most recent tokens (the residual window) and the sinks
keep every channel. The chosen channels (batch, kv_heads, kept) are stored with the cache (int16).

Shapes: queries (batch, q_heads, seq_len, head_dim), keys (batch, kv_heads, seq_len, head_dim) ->
channel scores (batch, kv_heads, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from memopt.kv.config import KVConfig, check_int
from memopt.kv.h2o import group_heads


@dataclass(frozen=True)
class ThinKConfig(KVConfig):
    """Keep `keep_ratio` of each head's key channels, chosen by the last `window` prompt queries."""

    kind: ClassVar[str] = "think"
    keep_ratio: float = 0.5
    window: int = 32

    def __post_init__(self):
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) \
                or not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"ThinKConfig.keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        check_int("ThinKConfig", "window", self.window, minimum=1)

    def kept_channels(self, head_dim: int, multiple: int = 1) -> int:
        """Channels kept of `head_dim`, rounded up to a `multiple` (so packed bytes stay whole)."""
        kept = max(1, round(head_dim * self.keep_ratio))
        return min(head_dim, -(-kept // multiple) * multiple)


def think_channel_scores(q: Tensor, k: Tensor, window: int) -> Tensor:
    """||Q_w[:, c]|| * ||K[:, c]|| per KV head and channel: (batch, kv_heads, head_dim)."""
    qn = q[:, :, -window:].float().pow(2).sum(2)  # (batch, q_heads, head_dim)
    qn = group_heads(qn, k.shape[1]).sqrt()
    return qn * k.float().pow(2).sum(2).sqrt()
