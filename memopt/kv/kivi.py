"""KIVI: tuning-free asymmetric 2-bit quantization of the KV cache (Liu et al., ICML 2024).

Keys carry outlier channels, so they are quantized per channel over a group of `group_size` tokens;
values per token over groups of `group_size` channels. Each group keeps an fp16 scale and zero (its
minimum): x ~= q * scale + zero, q in [0, 2**bits - 1]. The most recent `residual` tokens stay in full
precision and are flushed into the quantized store one group at a time. Keys and values may take
different bits (keys are the more sensitive: K4/V2 keeps retrieval where K2/V2 loses it, as KVTuner,
Li et al. 2025, finds). Two rotations make low-bit keys and values much more accurate at the same bytes:

- `pre_rope` (KVQuant, Hooper et al., NeurIPS 2024): keys are quantized *before* the rotary embedding.
  RoPE turns each channel pair by a position-dependent angle, which smears the per-channel structure
  that per-channel groups rely on; the store inverts RoPE on a flushed block (the model's `inv_freq`,
  the block's positions), quantizes, and re-applies RoPE to the dequantized keys at attention time.
- `hadamard` (QuaRot, Ashkboos et al., 2024): keys and values are multiplied by an orthonormal
  Hadamard matrix of the head dimension before quantizing and by its transpose after, which spreads
  outlier channels over all channels.

Both change only the quantized store (the bytes stay the same); a tensor kept at 16 bits is stored as is.
Packed storage: four 2-bit or two 4-bit values a byte, element i of a byte in bits
[bits * i, bits * (i + 1)).

Shapes: a block of keys (batch, heads, blocks, group_size, channels) -> packed along its tokens, channel by
channel (the codes that share a scale together: a decode step reads a channel's block in one vector)
(batch, heads, blocks, channels, group_size * bits / 8) uint8 + scale and zero (batch, heads, blocks, channels);
values (batch, heads, blocks, group_size, head_dim) -> packed (..., head_dim * bits / 8) + scale and zero
(batch, heads, blocks, group_size, head_dim / value_group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch
from torch import Tensor

from memopt.kv.config import KVConfig, check_int

KIVI_BITS = (2, 4, 8, 16)  # 16: that tensor stays in full precision
KIVI_GROUPS = (16, 32, 64, 128)


@dataclass(frozen=True)
class KIVIConfig(KVConfig):
    """Quantized KV (KIVI). `key_bits` / `value_bits` in 2, 4, 8 (16 leaves that tensor unquantized);
    `group_size` tokens per key group and channels per value group; `residual` full-precision recent
    tokens, a multiple of `group_size`; `sinks`: the first tokens kept in full precision too (they draw
    most of the attention and carry outliers: IntactKV, Liu et al. 2024); `pre_rope`: quantize keys
    before RoPE (KVQuant); `hadamard`: rotate keys and values by a Hadamard matrix before quantizing
    (QuaRot)."""

    kind: ClassVar[str] = "kivi"
    key_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual: int = 128
    sinks: int = 0
    pre_rope: bool = False
    hadamard: bool = False

    def __post_init__(self):
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if bits not in KIVI_BITS or isinstance(bits, bool):
                raise ValueError(f"KIVIConfig.{name} must be 2, 4, 8 or 16 (unquantized), got {bits!r}")
        if self.group_size not in KIVI_GROUPS:
            raise ValueError(f"KIVIConfig.group_size must be one of {KIVI_GROUPS}, got {self.group_size!r}")
        check_int("KIVIConfig", "residual", self.residual, minimum=self.group_size)
        check_int("KIVIConfig", "sinks", self.sinks, minimum=0)
        for name in ("pre_rope", "hadamard"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"KIVIConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.residual % self.group_size:
            raise ValueError(f"KIVIConfig.residual must be a multiple of group_size {self.group_size}, "
                             f"got {self.residual}")

    @property
    def spec(self) -> str:
        sinks = f":s{self.sinks}" if self.sinks else ""
        flags = (":pre" if self.pre_rope else "") + (":had" if self.hadamard else "")
        return f"kivi:k{self.key_bits}v{self.value_bits}:g{self.group_size}:r{self.residual}{sinks}{flags}"


# ---------------------------------------------------------------- numerics
def pack_bits(q: Tensor, bits: int) -> Tensor:
    """uint8 `q` (..., n) with values < 2**bits -> (..., n * bits / 8), element i of a byte at bit bits * i."""
    if bits == 8:
        return q.to(torch.uint8)
    per = 8 // bits
    q = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)
    out = q[..., 0].clone()
    for i in range(1, per):
        out |= q[..., i] << (bits * i)
    return out


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_bits`: (..., m) uint8 -> (..., m * 8 / bits) uint8."""
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    q = torch.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], dim=-1)  # scalar shifts: vectorized
    return q.reshape(*packed.shape[:-1], -1)


def quantize_groups(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric min-max over `dim`: (q uint8 like x, scale fp16, zero fp16), `dim` reduced (kept in q)."""
    x = x.float()
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).to(torch.float16)
    zero = lo.to(torch.float16)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((x - zero.float()) / s).clamp_(0, 2**bits - 1).to(torch.uint8)
    return q, scale.squeeze(dim), zero.squeeze(dim)


def quantize_keys(k: Tensor, bits: int) -> dict[str, Tensor]:
    """Keys (batch, heads, blocks, group, channels) -> per-channel groups over the block's tokens, packed along
    the tokens: store_kq (batch, heads, blocks, channels, group * bits / 8)."""
    q, scale, zero = quantize_groups(k, bits, dim=-2)
    return {"store_kq": pack_bits(q.transpose(-1, -2), bits), "store_kscale": scale, "store_kzero": zero}


def dequantize_keys(packed: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """store_kq (batch, heads, blocks, channels, group * bits / 8) -> keys (batch, heads, blocks, group, channels)."""
    q = unpack_bits(packed, bits).transpose(-1, -2).float()
    return q * scale.float().unsqueeze(-2) + zero.float().unsqueeze(-2)


def quantize_values(v: Tensor, bits: int, value_group: int) -> dict[str, Tensor]:
    """Values (batch, heads, blocks, group, head_dim) -> per-token groups of `value_group` channels."""
    grouped = v.reshape(*v.shape[:-1], v.shape[-1] // value_group, value_group)
    q, scale, zero = quantize_groups(grouped, bits, dim=-1)
    return {"store_vq": pack_bits(q.reshape(v.shape), bits), "store_vscale": scale, "store_vzero": zero}


def dequantize_values(packed: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    q = unpack_bits(packed, bits).float()
    n_groups = scale.shape[-1]
    q = q.reshape(*q.shape[:-1], n_groups, -1)
    return (q * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2)


# ---------------------------------------------------------------- rotations
@lru_cache(maxsize=8)
def hadamard_matrix(n: int) -> Tensor:
    """The orthonormal Sylvester-Hadamard matrix (n, n), n a power of two: symmetric, H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}; set hadamard=False")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def rope_angles(positions: Tensor, inv_freq: Tensor) -> Tensor:
    """RoPE's angles (..., tokens, head_dim / 2) fp32: each position times each inverse frequency."""
    return positions.float().unsqueeze(-1) * inv_freq.float()


def rope(x: Tensor, positions: Tensor, inv_freq: Tensor, inverse: bool = False) -> Tensor:
    """Rotate x (..., tokens, head_dim) by RoPE at `positions` (..., tokens), broadcasting, as transformers'
    Llama does (channel i paired with i + head_dim / 2); `inverse` undoes it. fp32."""
    freqs = rope_angles(positions, inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos(), emb.sin()
    x = x.float()
    a, b = x.chunk(2, -1)
    half = torch.cat([-b, a], -1)
    return x * cos - half * sin if inverse else x * cos + half * sin
