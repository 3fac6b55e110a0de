"""Lossless bf16 weights, DFloat11-style (Zhang et al., 2025, "70% Size, 100% Accuracy: Lossless LLM
Compression for Efficient GPU Inference via Dynamic-Length Float").

A bf16 value is sign(1) | exponent(8) | mantissa(7). Trained weights use few exponents, so the exponent
byte carries ~2.6 bits of information: it is Huffman-coded (canonical code, lengths capped at
`max_code_bits` <= 16), while sign and mantissa are stored raw as one byte. Storage for a tensor of n values:
- `sign_mantissa` uint8, the tensor's shape: (sign << 7) | mantissa
- `stream` uint8 `[ceil(bits / 8)]`: the exponent codes, MSB first, one after another
- `block_offsets` int32 (int64 if large) `[ceil(n / block_size)]`: bit offset where each block of
  `block_size` values starts, so blocks decode independently
- `code_lengths` uint8 `[256]`: the canonical code is rebuilt from these

Decoding runs all blocks in parallel, one symbol per step per block: it reads the next
`L = max(code_lengths)` bits at each block's cursor, looks them up in a `2**L` table that gives symbol
and length, and advances. The result is bit-identical to the input.
"""

from __future__ import annotations

import heapq
from functools import lru_cache
from typing import Optional

import numpy as np
import torch
from torch import Tensor

_ENCODE_CHUNK = 1 << 20  # values encoded per numpy pass (bounds temporary memory)


# ---------------------------------------------------------------- the code
def huffman_code_lengths(counts: np.ndarray, max_bits: int) -> np.ndarray:
    """Code length per symbol (0 for unused symbols), Huffman, then limited to `max_bits` (Kraft-fixed)."""
    counts = np.asarray(counts, dtype=np.int64)
    used = [int(s) for s in np.nonzero(counts)[0]]
    lengths = np.zeros(len(counts), dtype=np.int64)
    if len(used) == 1:
        lengths[used[0]] = 1
        return lengths.astype(np.uint8)
    heap = [(int(counts[s]), s, [s]) for s in used]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    if lengths.max() > max_bits:
        lengths[lengths > max_bits] = max_bits
        cap = 1 << max_bits
        kraft = int(sum(1 << (max_bits - lengths[s]) for s in used))
        by_rarity = sorted(used, key=lambda s: (counts[s], -lengths[s]))
        while kraft > cap:  # lengthen the longest code below the cap (rarest first) until it is a prefix code
            s = max((s for s in by_rarity if lengths[s] < max_bits), key=lambda s: (lengths[s], -counts[s]))
            kraft -= 1 << (max_bits - lengths[s] - 1)
            lengths[s] += 1
        for s in sorted(used, key=lambda s: -counts[s]):  # spend any slack on the most frequent codes
            while lengths[s] > 1 and kraft + (1 << (max_bits - lengths[s])) <= cap:
                kraft += 1 << (max_bits - lengths[s])
                lengths[s] -= 1
    return lengths.astype(np.uint8)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes (int64) for the given lengths: shorter first, then by symbol."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, prev = 0, 0
    for s in sorted((s for s in range(len(lengths)) if lengths[s]), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev
        codes[s], prev = code, int(lengths[s])
        code += 1
    return codes


@lru_cache(maxsize=64)
def _lut(lengths_bytes: bytes) -> tuple[np.ndarray, int]:
    """Decode table: entry for the next L bits = symbol | (code length << 8)."""
    lengths = np.frombuffer(lengths_bytes, dtype=np.uint8).astype(np.int64)
    width = int(lengths.max())
    codes = canonical_codes(lengths)
    lut = np.zeros(1 << width, dtype=np.int32)
    for s in np.nonzero(lengths)[0]:
        span = width - int(lengths[s])
        lut[codes[s] << span:(codes[s] + 1) << span] = int(s) | (int(lengths[s]) << 8)
    return lut, width


def decode_table(code_lengths: Tensor, device: torch.device) -> tuple[Tensor, int]:
    lut, width = _lut(code_lengths.cpu().numpy().astype(np.uint8).tobytes())
    return torch.from_numpy(lut).to(device), width


# ---------------------------------------------------------------- encode
def encode_bf16(w: Tensor, block_size: int = 512, max_code_bits: int = 16) -> dict[str, Tensor]:
    """Compress a bf16 tensor; returns the four storage tensors described in the module docstring."""
    if w.dtype != torch.bfloat16:
        raise ValueError(f"encode_bf16 takes a bfloat16 tensor, got {w.dtype}")
    u = w.detach().cpu().contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1)
    exps = ((u >> 7) & 0xFF).astype(np.int64)
    sign_mantissa = (((u >> 8) & 0x80) | (u & 0x7F)).astype(np.uint8).reshape(tuple(w.shape))
    lengths = huffman_code_lengths(np.bincount(exps, minlength=256), max_code_bits)
    codes = canonical_codes(lengths)
    ends = np.cumsum(lengths.astype(np.int64)[exps])
    total_bits = int(ends[-1]) if len(ends) else 0
    words = np.zeros(total_bits // 32 + 2, dtype=np.uint64)
    for a in range(0, len(exps), _ENCODE_CHUNK):
        ln = lengths.astype(np.int64)[exps[a:a + _ENCODE_CHUNK]]
        c = codes[exps[a:a + _ENCODE_CHUNK]]
        start = ends[a:a + _ENCODE_CHUNK] - ln
        word, off = start >> 5, start & 31
        fits = off + ln <= 32
        first = np.where(fits, c << np.maximum(32 - off - ln, 0), c >> np.maximum(off + ln - 32, 0))
        spill = np.where(fits, 0, (c << np.maximum(64 - off - ln, 0)) & 0xFFFFFFFF)
        w0 = int(word[0])
        span = int(word[-1]) - w0 + 2
        # codes occupy disjoint bits, so summing the fields of one word is OR-ing them (exact in float64)
        part = np.bincount(word - w0, weights=first, minlength=span) + np.bincount(word - w0 + 1, weights=spill,
                                                                                     minlength=span)
        words[w0:w0 + span] += part.astype(np.uint64)
    stream = bytearray(words.astype(">u4").tobytes()[: (total_bits + 7) // 8])
    offsets = np.concatenate([[0], ends[:-1]])[::block_size]
    off_dtype = np.int32 if total_bits < 2**31 else np.int64
    return {
        "sign_mantissa": torch.from_numpy(sign_mantissa),
        "stream": torch.frombuffer(stream, dtype=torch.uint8) if stream else torch.zeros(0, dtype=torch.uint8),
        "block_offsets": torch.from_numpy(offsets.astype(off_dtype)),
        "code_lengths": torch.from_numpy(lengths),
    }


# ---------------------------------------------------------------- decode
def _decode_blocks(stream: Tensor, starts: Tensor, steps: int, code_lengths: Tensor) -> Tensor:
    """Exponent symbols `[len(starts), steps]` uint8, decoding from each bit offset in `starts` at once."""
    if stream.device.type == "cpu":  # numpy: a third of torch's per-op overhead, and ops write in place
        return torch.from_numpy(_decode_blocks_numpy(stream.numpy(), starts.numpy(), steps, code_lengths))
    lut, width = decode_table(code_lengths, stream.device)
    b = torch.cat([stream, stream.new_zeros(steps * width // 8 + 4)]).to(torch.int32)
    window24 = (b[:-2] << 16) | (b[1:-1] << 8) | b[2:]  # 24 bits from every byte: any 16-bit window fits
    pos = starts.to(torch.int64).clone()
    out = torch.empty(steps, len(starts), dtype=torch.int32, device=stream.device)
    base, mask = 24 - width, (1 << width) - 1
    for t in range(steps):
        entry = lut[(window24[pos >> 3] >> (base - (pos & 7))) & mask]
        out[t] = entry
        pos += entry >> 8
    return (out.t() & 0xFF).to(torch.uint8)


def _decode_blocks_numpy(stream: np.ndarray, starts: np.ndarray, steps: int, code_lengths: Tensor) -> np.ndarray:
    lut, width = _lut(code_lengths.numpy().astype(np.uint8).tobytes())
    b = np.concatenate([stream, np.zeros(steps * width // 8 + 4, np.uint8)]).astype(np.int32)
    window24 = (b[:-2] << 16) | (b[1:-1] << 8) | b[2:]
    idx = np.int32 if len(b) < 2**28 else np.int64
    pos = starts.astype(idx)
    out = np.empty((steps, len(pos)), dtype=np.int32)
    byte, win, shift = np.empty_like(pos), np.empty(len(pos), np.int32), np.empty_like(pos)
    base, mask = 24 - width, (1 << width) - 1
    for t in range(steps):
        np.right_shift(pos, 3, out=byte)
        np.take(window24, byte, out=win)
        np.bitwise_and(pos, 7, out=shift)
        np.subtract(base, shift, out=shift)
        np.right_shift(win, shift, out=win, casting="unsafe")
        np.bitwise_and(win, mask, out=win)
        np.take(lut, win, out=out[t])
        np.right_shift(out[t], 8, out=win)
        pos += win
    return (out.T & 0xFF).astype(np.uint8)


def _assemble(sign_mantissa: Tensor, exps: Tensor) -> Tensor:
    sm = sign_mantissa.to(torch.int32)
    bits = ((sm & 0x80) << 8) | (exps.to(torch.int32) << 7) | (sm & 0x7F)
    return bits.to(torch.int16).view(torch.bfloat16)


def decode_bf16(sign_mantissa: Tensor, stream: Tensor, block_offsets: Tensor, code_lengths: Tensor,
                block_size: int) -> Tensor:
    """The original bf16 tensor, bit for bit (shape of `sign_mantissa`)."""
    n = sign_mantissa.numel()
    exps = _decode_blocks(stream, block_offsets, block_size, code_lengths).reshape(-1)[:n]
    return _assemble(sign_mantissa.reshape(-1), exps).reshape(sign_mantissa.shape)


def decode_bf16_rows(sign_mantissa: Tensor, stream: Tensor, block_offsets: Tensor, code_lengths: Tensor,
                     block_size: int, rows: Tensor) -> Tensor:
    """Rows `rows` of a 2-D compressed table, decoding only the blocks that hold them -> `[len(rows), D]`."""
    d = sign_mantissa.shape[1]
    elems = (rows.to(torch.int64)[:, None] * d + torch.arange(d, device=rows.device)).reshape(-1)
    blocks, where = torch.unique(elems // block_size, return_inverse=True)
    exps = _decode_blocks(stream, block_offsets[blocks], block_size, code_lengths)
    e = exps[where, elems % block_size]
    return _assemble(sign_mantissa.reshape(-1)[elems], e).reshape(len(rows), d)


def compressed_bytes(parts: dict[str, Tensor]) -> int:
    return sum(t.nbytes for t in parts.values())


# ---------------------------------------------------------------- ops
@torch.library.custom_op("memopt::linear_dfloat11", mutates_args=())
def linear_dfloat11(x: Tensor, sign_mantissa: Tensor, stream: Tensor, block_offsets: Tensor,
                    code_lengths: Tensor, block_size: int, bias: Optional[Tensor] = None) -> Tensor:
    """y = x @ W.T + bias with W `[N, K]` bf16 decoded (bit-exact) just before the matmul."""
    w = decode_bf16(sign_mantissa, stream, block_offsets, code_lengths, block_size)
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


@linear_dfloat11.register_fake
def _(x, sign_mantissa, stream, block_offsets, code_lengths, block_size, bias=None):
    return x.new_empty((*x.shape[:-1], sign_mantissa.shape[0]))


@torch.library.custom_op("memopt::embedding_dfloat11", mutates_args=())
def embedding_dfloat11(sign_mantissa: Tensor, stream: Tensor, block_offsets: Tensor, code_lengths: Tensor,
                       block_size: int, indices: Tensor) -> Tensor:
    """Rows `indices` of a compressed `[V, D]` bf16 table, decoding only the blocks they live in."""
    rows, inverse = torch.unique(indices.reshape(-1), return_inverse=True)
    table = decode_bf16_rows(sign_mantissa, stream, block_offsets, code_lengths, block_size, rows)
    return table.index_select(0, inverse).reshape(*indices.shape, sign_mantissa.shape[1])


@embedding_dfloat11.register_fake
def _(sign_mantissa, stream, block_offsets, code_lengths, block_size, indices):
    return indices.new_empty((*indices.shape, sign_mantissa.shape[1]), dtype=torch.bfloat16)


__all__ = ["encode_bf16", "decode_bf16", "decode_bf16_rows", "huffman_code_lengths", "canonical_codes",
           "compressed_bytes", "linear_dfloat11", "embedding_dfloat11"]
