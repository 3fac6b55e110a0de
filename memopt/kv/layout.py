"""`Layout`: the resolved storage of one group of KV heads in one layer, in plain numbers.

A policy (`memopt.kv.policy`) resolves to one `Layout` per group of heads once the model's shapes are
known; the runtime op (`memopt.runtime.kv_ops`) reads nothing else. Every layout is the same four
regions, any of which may be empty, for a token stream at positions 0, 1, 2, ...:

    sinks     the first `sinks` tokens, full precision                (batch, heads, sinks, head_dim)
    store     `blocks` blocks of `group` tokens: packed low-bit data    (batch, heads, blocks, ...)
              (KIVI: keys per channel over the block's tokens, packed along the tokens; values per token
              over `value_group` channels) or full precision; `key_channels` < head_dim keeps only ThinK's
              chosen channels
    residual  a ring of the most recent `residual` tokens, full precision (batch, heads, residual, head_dim)
    scores    per residual token and per store block, fp32, when eviction is score-based (H2O)

A quantized store may hold keys before RoPE (`pre_rope`, re-rotated when read) and keys and values
Hadamard-rotated (`hadamard`); neither adds a byte.

Tokens enter the residual ring; when it is full the oldest `group` tokens are flushed into one store
block. When the store is full a block is evicted: the oldest (`evict="fifo"`, StreamingLLM's ring) or
the lowest-scored (`evict="score"`, H2O), or the flushed block itself if it scores lower still. With
`residual=0` (full-precision store, `group=1`) tokens go straight to the store. Placement depends only on
the number of tokens seen, so the decode step needs no bookkeeping besides the scores.

Two fields come from the model's attention, not the policy (`for_attention`): `sliding`, a sliding window
(Mistral, Gemma): a step attends only to the last `sliding` positions (`attended_positions` says where each
kept token sits), and the store is a FIFO ring of just the blocks the window reaches; `softcap`, Gemma-2's
`cap * tanh(logits / cap)`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

import torch

FP_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
QUANT_BITS = (2, 4, 8)
SCORES = ("", "h2o", "scissorhands")
PREFILL_SCORES = ("", "h2o", "scissorhands", "snapkv")


@dataclass(frozen=True)
class Layout:
    heads: tuple[int, ...]
    head_dim: int
    sinks: int = 0
    residual: int = 0
    group: int = 1
    blocks: int = 0
    key_bits: int = 16
    value_bits: int = 16
    value_group: int = 0  # channels per value scale group (quantized values); 0: head_dim
    key_channels: int = 0  # ThinK: key channels kept in the store; 0: head_dim
    evict: str = "fifo"  # fifo | score
    score: str = ""  # decode-time score update: "" | h2o | scissorhands
    prefill_score: str = ""  # "" | h2o | scissorhands | snapkv
    window: int = 0  # SnapKV's observation window: the last `window` prompt queries
    kernel: int = 1  # SnapKV pooling kernel
    channel_window: int = 0  # ThinK's observation window
    dtype: str = "float16"
    bounded: bool = False  # True: drops tokens beyond `capacity` by design; False: sized for a context
    pre_rope: bool = False  # quantized keys stored before RoPE (KVQuant); needs rope_inv_freq at run time
    rope_inv_freq: tuple[float, ...] = ()  # the model's RoPE inv_freq (head_dim / 2), filled by KVCompressionPass
    hadamard: bool = False  # quantized keys / values stored Hadamard-rotated (QuaRot)
    sliding: int = 0  # the model's sliding window: a step attends to the last `sliding` positions (0: all kept)
    softcap: float = 0.0  # the model's logit soft-capping, cap * tanh(logits / cap) (Gemma-2); 0: none

    def __post_init__(self):
        object.__setattr__(self, "rope_inv_freq", tuple(self.rope_inv_freq))
        if self.sliding and self.evict != "fifo":
            raise ValueError("a sliding window needs each cached token's position, which "
                             "score-based eviction (H2O / SnapKV) does not keep; use kivi, streaming or full")
        if self.pre_rope and self.evict != "fifo":
            raise ValueError("pre-RoPE keys need the positions of the stored blocks, which score-based eviction "
                             "reorders; use pre_rope=False with H2O / SnapKV")
        if (self.pre_rope or self.hadamard) and self.key_channels:
            raise ValueError("pre-RoPE and Hadamard keys rotate channel pairs that ThinK would prune; "
                             "drop channels= or set pre_rope=False, hadamard=False")
        if self.residual and self.residual % self.group:
            raise ValueError(f"residual {self.residual} must be a multiple of group {self.group}")
        if self.key_bits < 16 and (self.group * self.key_bits) % 8:
            raise ValueError(f"{self.key_bits}-bit keys are packed along a block's {self.group} tokens, which must "
                             f"fill whole bytes; use a group that is a multiple of {8 // self.key_bits}")
        if self.residual == 0 and self.group != 1 and self.blocks:
            raise ValueError(f"a store of {self.group}-token blocks needs a residual ring to collect them")

    @property
    def n_heads(self) -> int:
        return len(self.heads)

    @property
    def kept_channels(self) -> int:
        return self.key_channels or self.head_dim

    @property
    def value_channels_per_group(self) -> int:
        return self.value_group or self.head_dim

    @property
    def capacity(self) -> int:
        """Most tokens held at once (the attention span of a decode step, minus the new token)."""
        return self.sinks + self.residual + self.blocks * self.group

    @property
    def scored(self) -> bool:
        return self.evict == "score"

    def flushed(self, n_tokens: int) -> int:
        """Blocks flushed from the residual ring into the store after `n_tokens` tokens."""
        m = max(0, n_tokens - self.sinks)
        if self.residual == 0:
            return m
        return max(0, -(-(m - self.residual) // self.group))

    def for_attention(self, window: int = 0, softcap: float = 0.0) -> Layout:
        """This storage for a layer whose attention has a sliding `window` (0: none) and logit `softcap`: the
        store keeps only the blocks the window can still reach (a FIFO ring), so it never fills."""
        if not window:
            return replace(self, softcap=float(softcap))
        # before a step, the ring holds >= residual - group + 1 tokens; the store covers the rest of window - 1
        ring = self.residual - self.group + 1 if self.residual else 0
        blocks = min(self.blocks, -(-max(0, window - 1 - ring) // self.group))
        return replace(self, sliding=int(window), softcap=float(softcap), blocks=blocks, bounded=True)

    def attended_positions(self, n: int, device=None) -> torch.Tensor:
        """The position of each token a decode step at position `n` attends to, (kept tokens + 1,) int64, in
        `kv_attend`'s order: sinks, store slots 0.. (a FIFO ring of `group`-token blocks), the residual ring
        oldest first, the new token."""
        ns, f = min(n, self.sinks), self.flushed(n)
        parts = [torch.arange(ns, device=device)]
        nb = min(f, self.blocks)
        if nb:
            slots = torch.arange(nb, device=device)
            blocks = slots + self.blocks * torch.div(f - 1 - slots, self.blocks, rounding_mode="floor")
            parts.append((self.sinks + blocks[:, None] * self.group + torch.arange(self.group, device=device)).flatten())
        m = max(0, n - self.sinks)
        parts.append(self.sinks + torch.arange(self.group * f if self.residual else m, m, device=device))
        parts.append(torch.tensor([n], device=device))
        return torch.cat(parts)

    def buffers(self, batch: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of every tensor this layout stores, in the op's argument order."""
        b, h, d, g, nb = batch, self.n_heads, self.head_dim, self.group, self.blocks
        fp, dk = FP_DTYPES[self.dtype], self.kept_channels
        out = []
        if self.sinks:
            out += [("sink_k", (b, h, self.sinks, d), fp), ("sink_v", (b, h, self.sinks, d), fp)]
        if self.residual:
            out += [("res_k", (b, h, self.residual, d), fp), ("res_v", (b, h, self.residual, d), fp)]
            if self.scored:
                out.append(("res_score", (b, h, self.residual), torch.float32))
        if nb:
            if self.key_bits == 16:
                out.append(("store_k", (b, h, nb, g, dk), fp))
            else:
                out += [("store_kq", (b, h, nb, dk, g * self.key_bits // 8), torch.uint8),  # packed along tokens
                        ("store_kscale", (b, h, nb, dk), torch.float16), ("store_kzero", (b, h, nb, dk), torch.float16)]
            if self.value_bits == 16:
                out.append(("store_v", (b, h, nb, g, d), fp))
            else:
                ng = d // self.value_channels_per_group
                out += [("store_vq", (b, h, nb, g, d * self.value_bits // 8), torch.uint8),
                        ("store_vscale", (b, h, nb, g, ng), torch.float16),
                        ("store_vzero", (b, h, nb, g, ng), torch.float16)]
            if self.scored:
                out.append(("store_score", (b, h, nb), torch.float32))
            if dk != d:
                out.append(("channels", (b, h, dk), torch.int16))
        return out

    def buffer_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.buffers(1))

    def nbytes(self, batch: int) -> int:
        """True bytes of every stored tensor: packed data, scales and zeros, residual, sinks, scores."""
        return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for _, shape, dt in self.buffers(batch))

    def allocate(self, batch: int, device=None) -> dict[str, torch.Tensor]:
        out = {name: torch.zeros(shape, dtype=dt, device=device) for name, shape, dt in self.buffers(batch)}
        if "channels" in out:
            out["channels"].fill_(-1)  # chosen at prefill (ThinK) or at the first flush
        return out

    def to_json(self) -> dict:
        d = asdict(self)
        d["heads"] = list(self.heads)
        d["rope_inv_freq"] = list(self.rope_inv_freq)
        return d


def layouts_to_str(layouts: tuple[Layout, ...]) -> str:
    """The op's `layouts` argument: a compact JSON list."""
    return json.dumps([x.to_json() for x in layouts], separators=(",", ":"))


@lru_cache(maxsize=1024)
def layouts_from_str(text: str) -> tuple[Layout, ...]:
    return tuple(Layout(**{**d, "heads": tuple(d["heads"]), "rope_inv_freq": tuple(d.get("rope_inv_freq", ()))})
                 for d in json.loads(text))
