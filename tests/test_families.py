"""Model families beyond Llama, end to end from a Hugging Face directory: tiny random-init Mixtral,
Qwen2-MoE (with a shared expert) and OLMoE (fused 3-D expert weights run by a grouped matmul), and GPT-2
(`Conv1D` projections: `addmm` with a weight stored `[in, out]`).

Per family: `inspect` counts the state dict's bytes, the compiled module equals eager, its generation
equals transformers' greedy `generate`, and int8 / int4:g32 rewrite every matmul weight (none silently
skipped) with logits at cosine >= 0.97 of eager. Plus the analysis of multi-output ops and the quantize
pass's notes and errors on small modules.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from memopt.analysis import analyze
from memopt.capture import capture
from memopt.inspect import inspect_model
from memopt.passes.quant_config import Int4WeightConfig, Int8WeightConfig
from memopt.passes.quantize import QuantizePass, weight_sites
from memopt.pipeline import compile_model
from memopt.sources import ModelSource

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2,
                                                     moe_intermediate_size=64, shared_expert_intermediate_size=128),
    "olmoe": lambda: transformers.OlmoeConfig(**TINY, num_experts=4, num_experts_per_tok=2),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                            bos_token_id=0, eos_token_id=0),
}
FAMILIES = list(CONFIGS)
SEQ, CACHE, NEW_TOKENS = 16, 64, 10


def _hf_dir(tmp_path_factory, family: str):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "mixtral")


@pytest.fixture(scope="session")
def qwen2_moe_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "qwen2_moe")


@pytest.fixture(scope="session")
def olmoe_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "olmoe")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory, "gpt2")


@pytest.fixture(scope="session")
def family(request):
    """family name -> (HF directory, eager transformers model, compile(quantize) memoized)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            path = request.getfixturevalue(f"{name}_dir")
            eager = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
            compiled: dict = {}

            def compile_(quantize=None):
                if quantize not in compiled:
                    compiled[quantize] = compile_model(str(path), seq=SEQ, max_cache=CACHE, quantize=quantize)
                return compiled[quantize]
            cache[name] = (path, eager, compile_)
        return cache[name]
    return get


def _ids(n: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)


def _eager_logits(eager, ids) -> torch.Tensor:
    with torch.no_grad():
        return eager(ids).logits


def matmul_weights(model: torch.nn.Module) -> set[str]:
    """Every parameter a matmul reads, by its name in the compiled program (the source wraps the model as
    `model`): 2-D and 3-D (fused experts) float parameters that are not an embedding table's own name."""
    tables = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    return {f"model.{n}" for n, p in model.named_parameters(remove_duplicate=False)
            if p.dim() >= 2 and p.is_floating_point() and n not in tables}


# ---------------------------------------------------------------- per family
@pytest.mark.parametrize("name", FAMILIES)
def test_inspect_counts_the_state_dict(family, name):
    path, _, _ = family(name)
    state = load_file(str(path / "model.safetensors"))
    report = inspect_model(str(path), seq=SEQ)
    assert report.to_json()["weights_bytes"] == sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_equals_eager_and_generates_like_transformers(family, name):
    _, eager, compile_ = family(name)
    result = compile_()
    ids = _ids()
    torch.testing.assert_close(_logits(result.module(ids)), _eager_logits(eager, ids), rtol=1e-4, atol=1e-5)
    prompt = ids[:, :8]
    with torch.no_grad():
        want = eager.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[:, prompt.shape[1]:]
    got = result.module.generate(prompt, NEW_TOKENS, eos_token_id=None)
    assert got.tolist() == want.tolist()


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("fmt", ["int8", "int4:g32"])
def test_quantize_rewrites_every_matmul_weight(family, name, fmt):
    _, eager, compile_ = family(name)
    result = compile_(fmt)
    decisions = {d.name: d for d in result.plan.decisions}
    fp_bytes = {f"model.{n}": p.numel() * p.element_size() for n, p in eager.named_parameters(remove_duplicate=False)}
    wanted = matmul_weights(eager)
    tied_head = {w for w in wanted if w.endswith("lm_head.weight")} if name == "gpt2" and fmt != "int8" else set()
    for w in wanted - tied_head:
        d = decisions.get(w.removesuffix(".weight"))  # a linear is named by its module, fused experts by the weight
        assert d is not None, f"{w} was not quantized; notes: {result.notes}"
        assert d.weight_format == fmt and d.bytes < fp_bytes[w] / 3, (w, d)
    for w in tied_head:  # int4 has no embedding kernel: the tied table stays, and a note says so
        assert any(w.removesuffix(".weight") in n and "tied" in n for n in result.notes), result.notes
    params = {n for n, _ in result.module.gm.named_parameters()}
    assert not params & (wanted - tied_head), "quantized weights must not stay resident in float"
    ids = _ids()
    got, want = _logits(result.module(ids)), _eager_logits(eager, ids)
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0).item()
    assert cos >= 0.97, f"cosine {cos} too low"


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
