"""Attention sinks + a recent window (StreamingLLM, Xiao et al., ICLR 2024).

The first few tokens absorb attention mass whatever their content ("attention sinks"); keeping them
and the last `window` tokens lets a model decode past any context length with a fixed cache. The
kept tokens keep their original RoPE rotation (keys are cached after RoPE), so nothing is re-rotated.

Storage: sinks (batch, kv_heads, sinks, head_dim) and a ring of the recent tokens
(batch, kv_heads, window, head_dim); with `KIVIConfig` the older part of the window is quantized and
evicted a group at a time (the window is then kept to within one group of `window`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memopt.kv.config import KVConfig, check_int


@dataclass(frozen=True)
class StreamingConfig(KVConfig):
    """Keep the first `sinks` tokens and the most recent `window` tokens."""

    kind: ClassVar[str] = "streaming"
    sinks: int = 4
    window: int = 1020

    def __post_init__(self):
        check_int("StreamingConfig", "sinks", self.sinks, minimum=0)
        check_int("StreamingConfig", "window", self.window, minimum=1)

    @property
    def budget_tokens(self) -> int:
        return self.sinks + self.window
