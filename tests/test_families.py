"""Model families end to end from a Hugging Face directory: a table of tiny random-init configs (one session
fixture each, built once) x what memopt promises for them.

Decoders: Llama, Mistral (sliding window 8), Qwen2, Qwen3, Phi-3, Gemma-2 (soft-capped eager attention, sliding
layer 0), Gemma-3 text (sliding layer 0), GPT-2 (`Conv1D`: `addmm` with a weight stored `[in, out]`), GPT-NeoX,
OPT (positions from the cache's length), Falcon (multi-query), Mixtral, Qwen2-MoE (shared expert), OLMoE (fused
3-D experts run by a grouped matmul). Encoders: BERT, RoBERTa, DistilBERT.

Per family: `inspect` counts the state dict's bytes; the compiled module equals eager; int8 / int4:g32 rewrite
every matmul weight (none silently skipped) with outputs at cosine >= 0.97 of eager; decoders generate what
transformers' greedy `generate` does, and so does a KIVI-compressed cache (`kivi:4:g16:r32`), sliding windows
included. Plus: the sliding window and soft-capping in `memopt::kv_attend` against a reference, ALiBi and
score-based eviction on sliding layers refused per layer, a generation program that cannot be captured is a
note, unsupported architectures are one line, the analysis of multi-output ops, and the quantize pass's notes
and errors on small modules.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from memopt.analysis.accounting import analyze
from memopt.capture import CaptureError, capture
from memopt.analysis.inspect import inspect_model
from memopt.kv import parse_kv_spec
from memopt.kv.layout import Layout, layouts_to_str
from memopt.passes.kv import KVCompressionPass
from memopt.passes.quant_config import Int4WeightConfig, Int8WeightConfig
from memopt.passes.quantize import QuantizePass, weight_sites
from memopt.pipeline import compile_model
from memopt.runtime import kv_ops
from memopt.frontend.sources import ModelSource, SourceError, resolve_source

transformers = pytest.importorskip("transformers")

WINDOW = 8  # Mistral's and Gemma's sliding window: shorter than prompt + generated tokens
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
SLIDING_FIRST = dict(head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
DECODERS = {
    "llama": lambda: transformers.LlamaConfig(**TINY),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=WINDOW),
    "qwen2": lambda: transformers.Qwen2Config(**TINY),
    "qwen3": lambda: transformers.Qwen3Config(**TINY, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**TINY, pad_token_id=0),
    "gemma2": lambda: transformers.Gemma2Config(**TINY, **SLIDING_FIRST),
    "gemma3": lambda: transformers.Gemma3TextConfig(**TINY, **SLIDING_FIRST),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=0, eos_token_id=0),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                                   num_hidden_layers=2, num_attention_heads=4,
                                                   max_position_embeddings=128),
    "opt": lambda: transformers.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64),
    "falcon": lambda: transformers.FalconConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, max_position_embeddings=128),
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "olmoe": lambda: transformers.OlmoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, eos_token_id=0),
}
ENCODERS = {
    "bert": lambda: transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=128, max_position_embeddings=128),
    "roberta": lambda: transformers.RobertaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, intermediate_size=128,
                                                  max_position_embeddings=130, pad_token_id=1),
    "distilbert": lambda: transformers.DistilBertConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                        max_position_embeddings=128),
    "deberta_v2": lambda: transformers.DebertaV2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, intermediate_size=128,
                                                       max_position_embeddings=128),
}
CONFIGS = {**DECODERS, **ENCODERS}
FAST = ("llama", "mistral", "gpt2", "bert")  # the quick loop's share of the table; the rest is marked slow
SEQ, CACHE, PROMPT, NEW_TOKENS = 16, 64, 8, 12
KV_SPEC = "kivi:4:g16:r32"  # prompt + new tokens stay in the residual: compressed, yet token-exact


def _table(names, quick=FAST) -> list:
    return [pytest.param(n, marks=() if n in quick else pytest.mark.slow) for n in names]


def _hf_dir(tmp_path_factory, family: str):
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if family in DECODERS else transformers.AutoModel
    model = auto.from_config(CONFIGS[family]()).eval()
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    return path


def _dir_fixture(family: str):
    @pytest.fixture(scope="session", name=f"{family}_dir")
    def build(tmp_path_factory):
        return _hf_dir(tmp_path_factory, family)
    return build


for _family in CONFIGS:  # one session fixture per family: `llama_dir`, `mistral_dir`, ...
    globals()[f"{_family}_dir"] = _dir_fixture(_family)


@pytest.fixture(scope="session")
def family(request):
    """family name -> (HF directory, eager transformers model, compile(quantize=, kv=) memoized)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            path = request.getfixturevalue(f"{name}_dir")
            auto = transformers.AutoModelForCausalLM if name in DECODERS else transformers.AutoModel
            eager = auto.from_pretrained(path).eval()
            compiled: dict = {}

            def compile_(quantize=None, kv=None):
                if (quantize, kv) not in compiled:
                    compiled[quantize, kv] = compile_model(str(path), seq=SEQ, max_cache=CACHE, quantize=quantize,
                                                           kv=kv)
                return compiled[quantize, kv]
            cache[name] = (path, eager, compile_)
        return cache[name]
    return get


def _ids(n: int = SEQ) -> torch.Tensor:
    return torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(1))


def _run(name: str, module, ids: torch.Tensor) -> torch.Tensor:
    """Decoders: logits (batch, seq, vocab); encoders: the last hidden state (batch, seq, hidden)."""
    with torch.no_grad():
        out = module(ids) if name in DECODERS else module(ids, torch.ones_like(ids))
    if name in DECODERS:
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    return getattr(out, "last_hidden_state", out)


def _greedy(eager, prompt: torch.Tensor, n: int = NEW_TOKENS) -> list:
    with torch.no_grad():
        out = eager.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, prompt.shape[1]:].tolist()


def matmul_weights(model: torch.nn.Module) -> set[str]:
    """Every parameter a matmul reads, by its name in the compiled program (the source wraps the model as
    `model`): 2-D and 3-D (fused experts) float parameters that are not an embedding table's own name."""
    tables = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    return {f"model.{n}" for n, p in model.named_parameters(remove_duplicate=False)
            if p.dim() >= 2 and p.is_floating_point() and n not in tables}


def _tied_head(model: torch.nn.Module) -> set[str]:
    """The output head's weight when it is the input embedding table itself (tied)."""
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or head.weight is not table.weight:
        return set()
    return {f"model.{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is head}


# ---------------------------------------------------------------- per family
@pytest.mark.parametrize("name", _table(CONFIGS, quick=FAST + ("opt", "falcon", "gemma2")))
def test_inspect_counts_the_state_dict(family, name):
    path, _, _ = family(name)
    state = load_file(str(path / "model.safetensors"))
    report = inspect_model(str(path), seq=SEQ)
    assert report.to_json()["weights_bytes"] == sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("name", _table(DECODERS))
def test_compiled_equals_eager_and_generates_like_transformers(family, name):
    _, eager, compile_ = family(name)
    result = compile_()
    ids = _ids()
    torch.testing.assert_close(_run(name, result.module, ids), _run(name, eager, ids), rtol=1e-4, atol=1e-5)
    prompt = ids[:, :PROMPT]
    got = result.module.generate(prompt, NEW_TOKENS, eos_token_id=None)
    assert got.tolist() == _greedy(eager, prompt)


@pytest.mark.parametrize("name", _table(ENCODERS))
def test_compiled_encoder_equals_eager(family, name):
    _, eager, compile_ = family(name)
    ids = _ids()
    torch.testing.assert_close(_run(name, compile_().module, ids), _run(name, eager, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", _table(DECODERS, quick=("mistral",)))
def test_compressed_kv_generates_like_transformers(family, name):
    """`kivi:4:g16:r32` compiles for every decoder and, while the tokens fit its full-precision residual,
    generates transformers' greedy tokens: from a prompt longer than Mistral's and Gemma's sliding windows and
    past them (the window is kept)."""
    _, eager, compile_ = family(name)
    result = compile_(kv=KV_SPEC)
    assert "memopt_kv" in result.module.generator.meta
    prompt = _ids()[:, :PROMPT + 4]
    assert result.module.generate(prompt, NEW_TOKENS, eos_token_id=None).tolist() == _greedy(eager, prompt)
    sliding = {layer for layer, entry in result.module.generator.meta["memopt_kv"]["layers"].items()
               if '"sliding":8' in entry["layouts"]}
    want = {"mistral": {0, 1}, "gemma2": {0}, "gemma3": {0}}.get(name, set())
    assert {int(x) for x in sliding} == want, result.notes


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("fmt", ["int8", "int4:g32"])
def test_quantize_rewrites_every_matmul_weight(family, name, fmt):
    _, eager, compile_ = family(name)
    result = compile_(fmt)
    decisions = {d.name: d for d in result.plan.decisions}
    fp_bytes = {f"model.{n}": p.numel() * p.element_size() for n, p in eager.named_parameters(remove_duplicate=False)}
    wanted = matmul_weights(eager)
    tied_head = _tied_head(eager) & wanted if fmt != "int8" else set()
    for w in wanted - tied_head:
        d = decisions.get(w.removesuffix(".weight"))  # a linear is named by its module, fused experts by the weight
        assert d is not None, f"{w} was not quantized; notes: {result.notes}"
        assert d.weight_format == fmt and d.bytes < fp_bytes[w] / 3, (w, d)
    for w in tied_head:  # int4 has no embedding kernel: the tied table stays, and a note says so
        assert any(w.removesuffix(".weight") in n and "tied" in n for n in result.notes), result.notes
    params = {n for n, _ in result.module.gm.named_parameters()}
    assert not params & (wanted - tied_head), "quantized weights must not stay resident in float"
    ids = _ids()
    got, want = _run(name, result.module, ids), _run(name, eager, ids)
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0).item()
    assert cos >= 0.97, f"cosine {cos} too low"


# ---------------------------------------------------------------- what kv_attend keeps of the model's attention
def _reference(q, keys, values, scale, window, softcap):
    """Plain attention of q (batch, q_heads, 1, d) over keys/values (batch, kv_heads, n + 1, d) at position n."""
    n_rep, n = q.shape[1] // keys.shape[1], keys.shape[2] - 1
    k, v = keys.repeat_interleave(n_rep, 1), values.repeat_interleave(n_rep, 1)
    logits = q @ k.transpose(-1, -2) * scale
    if softcap:
        logits = (logits / softcap).tanh() * softcap
    if window:
        logits[..., : max(0, n - window + 1)] = float("-inf")
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("layout, window, softcap", [
    (Layout(heads=(0, 1), head_dim=16, blocks=64, dtype="float32"), 8, 0.0),  # full cache: a ring of window - 1
    (Layout(heads=(0, 1), head_dim=16, sinks=2, residual=8, group=4, blocks=64, dtype="float32"), 13, 0.0),
    (Layout(heads=(0, 1), head_dim=16, sinks=2, residual=8, group=4, blocks=64, dtype="float32"), 0, 5.0),
    (Layout(heads=(0, 1), head_dim=16, residual=4, group=4, blocks=64, dtype="float32"), 10, 3.0),
])
def test_kv_attend_keeps_the_sliding_window_and_soft_cap(layout, window, softcap):
    torch.manual_seed(0)
    layout = layout.for_attention(window, softcap)
    if window:
        assert layout.bounded and layout.capacity < 2 * window, layout  # the store holds the window, not the context
    state = list(layout.allocate(1).values())
    keys, values = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    for n in range(40):
        q = torch.randn(1, 4, 1, 16)
        got = kv_ops.kv_attend(q, keys[:, :, n : n + 1], values[:, :, n : n + 1], state, torch.tensor([n]),
                               layouts_to_str((layout,)), 0.25)
        want = _reference(q, keys[:, :, : n + 1], values[:, :, : n + 1], 0.25, window, softcap)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"position {n}")


def test_compressed_prefill_through_the_eager_model_keeps_window_and_soft_cap(family):
    """`memopt.serve.generate.generate(..., model=)` prefills through the eager model's own attention (Gemma-2's
    soft-capped eager function, its sliding-window mask) over a prompt longer than the window."""
    from memopt.serve.generate import generate

    _, eager, compile_ = family("gemma2")
    gm = compile_(kv=KV_SPEC).module.generator
    prompt = _ids()[:, :PROMPT + 4]
    assert generate(gm, prompt, NEW_TOKENS, model=eager).tolist() == _greedy(eager, prompt)


def _decode_graph(family, name: str):
    path, _, _ = family(name)
    return capture(resolve_source(str(path)), phase="decode", cache_len=32).module()


def test_alibi_attention_is_refused_in_one_line(tmp_path):
    torch.manual_seed(0)
    transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)) \
        .save_pretrained(tmp_path)
    gm = capture(resolve_source(str(tmp_path)), phase="decode", cache_len=32).module()
    with pytest.raises(ValueError, match=r"^layer 0: .*ALiBi.*compile this model without --kv$") as info:
        KVCompressionPass(parse_kv_spec("kivi:4:g16:r16"))(gm, None)
    assert "\n" not in str(info.value)


def test_score_based_eviction_on_a_sliding_layer_is_refused_in_one_line(family):
    with pytest.raises(ValueError, match=r"^layer 0: sliding-window attention \(8 tokens\): .*H2O") as info:
        KVCompressionPass(parse_kv_spec("h2o:64"))(_decode_graph(family, "mistral"), None)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- what cannot be compiled says so
def test_a_generation_program_that_cannot_be_captured_is_a_note(family, monkeypatch):
    import memopt.pipeline

    path, eager, _ = family("llama")

    def no_decode(src, *, phase=None, **kwargs):
        if phase == "decode":
            raise CaptureError("torch.export failed for llama: stub")
        return capture(src, phase=phase, **kwargs)
    monkeypatch.setattr(memopt.pipeline, "capture", no_decode)
    result = compile_model(str(path), seq=SEQ, max_cache=CACHE, passes=())
    assert result.module.generator is None
    assert any("no generation program" in n and "stub" in n for n in result.notes), result.notes
    ids = _ids()
    torch.testing.assert_close(_run("llama", result.module, ids), _run("llama", eager, ids), rtol=1e-4, atol=1e-5)
    with pytest.raises(CaptureError, match="stub"):  # --kv rewrites the generation program: its failure is the error
        compile_model(str(path), seq=SEQ, max_cache=CACHE, passes=(), kv=KV_SPEC)


UNSUPPORTED = [
    (lambda: transformers.T5Config(vocab_size=256, d_model=64, num_layers=2),
     r"T5ForConditionalGeneration is an encoder-decoder model \(t5\), which is not supported"),
    (lambda: transformers.ViTConfig(hidden_size=64, num_hidden_layers=2), r"\(vit\) takes no token ids"),
    (lambda: transformers.Gemma3Config(), r"is a multimodal model \(gemma3\).*model_type gemma3_text"),
]


@pytest.mark.parametrize("make, message", UNSUPPORTED)
def test_an_unsupported_architecture_is_one_line(tmp_path, make, message):
    config = make()
    config.architectures = config.architectures or ({"t5": ["T5ForConditionalGeneration"]}).get(config.model_type)
    config.save_pretrained(tmp_path)  # config only: refused before anything is built
    with pytest.raises(SourceError, match=message) as info:
        resolve_source(str(tmp_path))
    assert "\n" not in str(info.value)


def test_an_unknown_model_type_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "florbnet", "hidden_size": 64}')
    with pytest.raises(SourceError, match=r"model_type 'florbnet' is an architecture transformers .* does not know"):
        resolve_source(str(tmp_path))


# ---------------------------------------------------------------- the analysis of multi-output ops
class MultiOut(torch.nn.Module):
    """topk, sort, max.dim and native_layer_norm: each returns several tensors, reached through getitem."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32))

    def forward(self, x):
        vals, idx = torch.topk(x, 4, dim=-1)
        s, order = torch.sort(x, dim=-1)
        m, arg = torch.max(x, dim=-1)
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, [32], self.w, None, 1e-5)
        return vals * idx + s[..., :4] + order[..., :4] + (m + arg)[..., None] + y[..., :4] + mean + rstd


def test_analysis_accounts_each_output_of_multi_output_ops():
    x = torch.randn(8, 32)
    a = analyze(capture(ModelSource("multi", MultiOut().eval(), "module", fixed_inputs=(x,))))
    by_name = {t.name: t for t in a.tensors}
    producers = {t.producer: [] for t in a.storages}
    for t in a.storages:
        producers[t.producer].append(t)
    for target, want in [("topk", [8 * 4 * 4, 8 * 4 * 8]), ("sort", [8 * 32 * 4, 8 * 32 * 8]),
                         ("max", [8 * 4, 8 * 8]), ("native_layer_norm", [8 * 32 * 4, 8 * 4, 8 * 4])]:
        op = next(n for n, t in zip(a.op_names, a.op_targets) if target in t)
        assert [t.bytes for t in sorted(producers[op], key=lambda t: t.name)] == want, (target, producers[op])
        assert all(t.consumers for t in producers[op]), "each output's readers are its consumers"
    assert "getitem" not in " ".join(by_name), "a getitem names its element's storage, it has none of its own"
    g = a.to_memgraph()
    assert g.lower_bound_bytes() == a.activation_lower_bound_bytes


# ---------------------------------------------------------------- the quantize pass on small modules
class ConvOnly(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x)


def test_a_format_that_quantizes_nothing_is_an_error_naming_what_was_kept():
    gm = torch.export.export(ConvOnly().eval(), (torch.randn(1, 3, 8, 8),), strict=False).module()
    with pytest.raises(ValueError, match=r"quantize int4:g64: no weight .* conv\.weight"):
        QuantizePass(Int4WeightConfig())(gm, None)


class Conv1DNet(torch.nn.Module):
    """GPT-2's projections: transformers' Conv1D, `addmm(b, x, W)` with W `[in, out]`."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.a, self.b = Conv1D(128, 64), Conv1D(64, 128)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("cfg", [Int8WeightConfig(), Int4WeightConfig(group_size=32)])
def test_conv1d_matmuls_are_quantized(cfg):
    torch.manual_seed(0)
    model, x = Conv1DNet().eval(), torch.randn(2, 5, 64)
    gm = torch.export.export(model, (x,), strict=False).module()
    with torch.no_grad():
        ref = gm(x)
    result = QuantizePass(cfg)(gm, None)
    assert set(gm.meta["memopt_weights"]) == {"a", "b"}, result.notes
    assert not any(str(n.target) == "aten.addmm.default" for n in gm.graph.nodes)
    with torch.no_grad():
        got = gm(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) >= 0.99


def test_weight_sites_name_weights_read_by_unhandled_ops():
    class Bmm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.Parameter(torch.randn(4, 16, 16))
            self.proj = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.proj(torch.bmm(x, self.experts))

    gm = torch.export.export(Bmm().eval(), (torch.randn(4, 3, 16),), strict=False).module()
    sites, notes = weight_sites(gm)
    assert [s.layer for s in sites] == ["proj"]
    assert any("aten.bmm.default" in n and "experts" in n for n in notes), notes
