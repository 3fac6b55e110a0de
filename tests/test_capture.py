import pytest
import torch
from torch import nn

from memopt.capture import CaptureError, capture
from memopt.frontend.sources import ModelSource


def test_prefill_graph_matches_eager(demo_source):
    c = capture(demo_source, seq=24)
    ids = c.example_inputs[0]
    torch.testing.assert_close(c.module()(ids), demo_source.traceable()(ids))
    assert all("val" in n.meta for n in c.graph.nodes if n.op in ("placeholder", "call_function")
               and n.target is not torch.ops.aten._assert_tensor_metadata.default)


def test_dynamic_sequence_length(demo_source):
    c = capture(demo_source, seq=16, dynamic=True)
    assert c.dynamic
    gm = c.module()
    for seq in (5, 33):
        ids = torch.randint(3, 1000, (1, seq))
        torch.testing.assert_close(gm(ids), demo_source.traceable()(ids))


def test_decode_steps_match_full_forward(demo_source):
    """Token-by-token decoding through the captured static-cache graph reproduces a full forward."""
    c = capture(demo_source, phase="decode", cache_len=32)
    gm = c.module()
    tokens = [5, 9, 11, 300, 7]
    full = demo_source.model(torch.tensor([tokens]), use_cache=False).logits[0]
    for pos, tok in enumerate(tokens):
        step = gm(input_ids=torch.tensor([[tok]]), cache_position=torch.tensor([pos]))
        torch.testing.assert_close(step[0, -1], full[pos], atol=1e-4, rtol=1e-4)


def test_minilm_forward_matches_eager(minilm_source):
    c = capture(minilm_source, seq=20, dynamic=True)
    enc = minilm_source.tokenizer(["memory is the bottleneck", "hello"], padding=True, return_tensors="pt")
    args = (enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(c.module()(*args), minilm_source.traceable()(*args))


class Inner(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not exportable
            return x * 2
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Inner()

    def forward(self, x):
        return self.block(x + 1)


def test_export_failure_names_the_module():
    src = ModelSource("broken", Outer(), "module", fixed_inputs=(torch.randn(3),))
    with pytest.raises(CaptureError) as info:
        capture(src)
    msg = str(info.value)
    assert "module block (Inner" in msg and "Try:" in msg


def test_bad_phase(demo_source, minilm_source):
    with pytest.raises(ValueError, match="phase 'decode' needs a decoder LM"):
        capture(minilm_source, phase="decode")
    with pytest.raises(ValueError, match="'train'"):
        capture(demo_source, phase="train")


def _tiny_llamas(*seeds, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = []
    for seed in seeds:
        cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **overrides)
        torch.manual_seed(seed)
        out.append(ModelSource(f"llama-{seed}", LlamaForCausalLM(cfg).eval(), "causal_lm", cfg))
    return out


def test_a_kept_trace_computes_with_the_next_models_own_tensors(monkeypatch):
    """A second model of the same architecture and shapes takes the first one's trace without exporting, bound to
    its own weights (its outputs, not the first model's) and, for a decode program, its own KV cache; a weight
    changed in place is read where it lies; another config or `clear_captures` exports again."""
    import memopt.capture as cap

    a, b = _tiny_llamas(0, 1)
    cap.clear_captures()
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    kept = capture(a, seq=8), capture(a, phase="decode", cache_len=16)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(cap, "_export", no_export)
    mine = capture(b, seq=8)
    assert mine.source is b and mine.module is not None
    want = b.model(ids, use_cache=False).logits
    assert torch.equal(mine.module()(ids), want) and not torch.allclose(want, a.model(ids, use_cache=False).logits)
    steps = [capture(m, phase="decode", cache_len=16).module() for m in (a, b)]
    assert steps[0] is not steps[1]
    full = [m.model(ids, use_cache=False).logits[0] for m in (a, b)]
    for pos in range(ids.shape[1]):  # interleaved: each program reads and writes only its own cache
        for step, ref in zip(steps, full):
            out = step(input_ids=ids[:, pos:pos + 1], cache_position=torch.tensor([pos]))
            torch.testing.assert_close(out[0, -1], ref[pos], atol=1e-5, rtol=1e-5)
    assert kept[1].exported.constants["key_cache_0"].abs().sum() == 0  # the first capture's cache is untouched
    with torch.no_grad():
        b.model.lm_head.weight.mul_(2)
    torch.testing.assert_close(capture(b, seq=8).module()(ids), b.model(ids, use_cache=False).logits)
    other, = _tiny_llamas(2, rms_norm_eps=1e-3)
    with pytest.raises(AssertionError, match="exported again"):
        capture(other, seq=8)
    cap.clear_captures()
    with pytest.raises(AssertionError, match="exported again"):
        capture(b, seq=8)


def test_a_rewritten_program_is_exported_once_and_bound_to_the_next_models_tensors(monkeypatch):
    """A second compile of a model of the same architecture with the same options exports none of its programs
    after the passes: it takes the first compile's exports, bound to its own (quantized) weights and caches and
    carrying its own graph metadata, and equals a compile that exported afresh; a program that reads a tensor
    attribute which is neither a parameter nor a buffer is never kept (its value would come from the trace)."""
    import memopt.capture as cap
    from memopt.pipeline import compile_model

    a, b = _tiny_llamas(3, 4)
    opts = dict(quantize="int8", offload=["model.layers.1"], kv="kivi:k4v4:g16:r16", seq=8, max_cache=48, passes=())
    cap.clear_captures()
    first = compile_model(a, **opts)
    exports, real = [], cap._export_again
    monkeypatch.setattr(cap, "_export_again", lambda *args, **kw: exports.append(1) or real(*args, **kw))
    second = compile_model(b, **opts)
    assert exports == []
    cap.clear_captures()
    fresh = compile_model(b, **opts)
    assert len(exports) == 2  # the forward and generation programs, exported afresh
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, other = second.module(ids), fresh.module(ids), first.module(ids)
    assert torch.equal(got, want) and not torch.allclose(got, other)
    assert torch.equal(second.module.generate(ids[:, :5], 6), fresh.module.generate(ids[:, :5], 6))
    for name, ep in second.programs.items():
        ref = fresh.programs[name]
        assert list(ep.state_dict) == list(ref.state_dict) and list(ep.constants) == list(ref.constants)
        assert all(torch.equal(t, ref.state_dict[k]) for k, t in ep.state_dict.items()), name
        assert ep.graph_module is not first.programs[name].graph_module
        assert ep.graph_module.meta.keys() == ref.graph_module.meta.keys()
    meta = second.captured.exported.graph_module.meta["memopt_offload"]
    assert meta == fresh.captured.exported.graph_module.meta["memopt_offload"] and meta["blocks"]

    gm = capture(a, seq=8).module()
    assert cap._program_key(gm, (ids,), {}, None) is not None
    gm.scale = torch.ones(1)  # an attribute, not a buffer
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_before(node), pytest.warns(UserWarning, match="no underlying reference"):
        gm.graph.get_attr("scale")
    gm.recompile()
    assert cap._program_key(gm, (ids,), {}, None) is None
