"""Lossless bf16 (DFloat11-style): bit-exact codec, Huffman code properties, the pass, MiniLM size ratio."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_llama

import memopt.runtime.dfloat11 as df11
from memopt.passes.lossless import LosslessPass, decompress_lossless, lossless_ratio
from memopt.passes.quant_config import LosslessConfig
from memopt.passes.quantize import QuantizePass, quantized_weight_bytes
from memopt.frontend.sources import EncoderOutput


def roundtrip(w: torch.Tensor, block_size: int = 512, max_code_bits: int = 16) -> tuple[torch.Tensor, dict]:
    parts = df11.encode_bf16(w, block_size, max_code_bits)
    return df11.decode_bf16(parts["sign_mantissa"], parts["stream"], parts["block_offsets"],
                            parts["code_lengths"], block_size), parts


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def special_values() -> torch.Tensor:
    torch.manual_seed(0)
    w = (torch.randn(300, 70) * 0.02).to(torch.bfloat16)
    flat = w.view(-1)
    flat[:8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -1e-40, 3e38])
    return w


CODEC_CASES = [  # (name, tensor, block_size, max_code_bits)
    ("gaussian", (torch.randn(256, 384) * 0.05).to(torch.bfloat16), 512, 16),
    ("special values", special_values(), 64, 12),
    ("single exponent", torch.full((33, 7), 1.5, dtype=torch.bfloat16), 32, 16),
    ("smaller than a block", torch.randn(5, 3).to(torch.bfloat16), 1024, 16),
    ("wide exponent range", (torch.randn(64, 64) * torch.logspace(-30, 30, 64)[:, None]).to(torch.bfloat16), 128, 8),
    ("1-d", torch.randn(1000).to(torch.bfloat16), 100, 16),
]


@pytest.mark.parametrize("name,w,block_size,max_bits", CODEC_CASES, ids=[c[0] for c in CODEC_CASES])
def test_codec_is_bit_exact(name, w, block_size, max_bits):
    out, parts = roundtrip(w, block_size, max_bits)
    assert bits_equal(out, w)
    assert int(parts["code_lengths"].max()) <= max_bits
    assert parts["sign_mantissa"].shape == w.shape and parts["sign_mantissa"].dtype == torch.uint8


@pytest.mark.parametrize("max_bits", [8, 12, 16])
def test_huffman_lengths_form_a_prefix_code(max_bits):
    rng = np.random.default_rng(0)
    counts = np.zeros(256, dtype=np.int64)
    counts[rng.choice(256, 60, replace=False)] = (rng.pareto(0.7, 60) * 10 + 1).astype(np.int64)
    lengths = df11.huffman_code_lengths(counts, max_bits).astype(np.int64)
    used = counts > 0
    assert (lengths[used] >= 1).all() and (lengths[~used] == 0).all() and lengths.max() <= max_bits
    assert sum(2.0 ** -lengths[used]) <= 1.0  # Kraft: a prefix code exists
    codes = df11.canonical_codes(lengths)
    words = sorted(format(int(codes[s]), f"0{lengths[s]}b") for s in np.nonzero(used)[0])
    assert not any(b.startswith(a) for a, b in zip(words, words[1:])), "canonical codes must be prefix-free"


def test_partial_row_decode():
    torch.manual_seed(0)
    table = (torch.randn(97, 40) * 0.1).to(torch.bfloat16)
    parts = df11.encode_bf16(table, 64, 16)
    rows = torch.tensor([96, 0, 13, 13, 50])
    got = df11.decode_bf16_rows(parts["sign_mantissa"], parts["stream"], parts["block_offsets"],
                                parts["code_lengths"], 64, rows)
    assert bits_equal(got, table[rows])


def test_encode_rejects_non_bf16():
    with pytest.raises(ValueError, match="bfloat16 tensor, got torch.float32"):
        df11.encode_bf16(torch.zeros(4, 4))




def test_pass_on_bf16_llama_is_exact_and_reexports():
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 16))
    gm = torch.export.export(model, (ids,), strict=False).module()
    with torch.no_grad():
        ref = gm(ids)
    result = QuantizePass(LosslessConfig(block_size=256))(gm, None)  # the CLI's route: parse_quantize_spec("lossless")
    assert result.modified and "bit-exact" in result.notes[0]
    assert not [n for n, _ in gm.named_parameters() if n.endswith("proj.weight")]
    with torch.no_grad():
        assert torch.equal(gm(ids), ref)
    ep = torch.export.export(gm, (ids,), strict=False)
    assert any("memopt.linear_dfloat11" in str(n.target) for n in ep.graph.nodes)
    assert any("memopt.embedding_dfloat11" in str(n.target) for n in ep.graph.nodes)
    with torch.no_grad():
        assert torch.equal(ep.module()(ids), ref)
    assert lossless_ratio(gm) < 0.8
    assert quantized_weight_bytes(gm) == sum(r["bytes"] for r in gm.meta["memopt_weights"].values())
    decompress_lossless(gm)  # decode once, e.g. at load: plain aten ops on bf16 weights again
    assert quantized_weight_bytes(gm) == 0
    assert not any("memopt" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        assert torch.equal(gm(ids), ref)


def test_pass_keeps_fp32_weights_with_a_note():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    gm = torch.export.export(model, (torch.randn(2, 16),), strict=False).module()
    result = LosslessPass(LosslessConfig())(gm, None)
    assert not result.modified
    assert any("float32" in n and "cast the model to bf16" in n for n in result.notes)


@pytest.mark.parametrize("bad", [dict(block_size=16), dict(block_size=True), dict(max_code_bits=17),
                                 dict(embeddings=1)])
def test_lossless_config_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LosslessConfig(**bad)
    assert LosslessConfig.from_json(LosslessConfig(block_size=256).to_json()) == LosslessConfig(block_size=256)


@pytest.mark.slow
def test_minilm_bf16_is_bit_exact_and_small(minilm_source):
    tok = minilm_source.tokenizer
    model = copy.deepcopy(minilm_source.model).to(torch.bfloat16)  # a copy: the session's MiniLM stays fp32
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    enc = tok(["Lossless compression keeps every bit.", "The exponent byte of a weight is predictable.",
               "Huffman codes give frequent symbols short codes."], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    gm = torch.export.export(EncoderOutput(model), args, strict=False).module()
    with torch.no_grad():
        ref = gm(*args)
    LosslessPass(LosslessConfig())(gm, None)
    record = gm.meta["memopt_weights"]
    assert len(record) == len(weights) == 40  # 36 encoder linears, pooler, 3 embedding tables
    for layer, r in record.items():  # every stored weight decodes to the original, bit for bit
        owner = gm.get_submodule(r["weight"].rsplit(".", 1)[0])
        sm, stream, offsets, codes = (getattr(owner, f"weight_{s}") for s in ("sm", "stream", "offsets", "codes"))
        decoded = df11.decode_bf16(sm, stream, offsets, codes, LosslessConfig().block_size)
        assert bits_equal(decoded, weights[r["weight"].removeprefix("model.")]), layer
    ratio = lossless_ratio(gm)
    assert ratio <= 0.72, f"compressed to {ratio:.4f} x bf16"
    with torch.no_grad():
        assert torch.equal(gm(*args), ref)
