import warnings

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
    attribute which is neither a parameter nor a buffer is never kept (its value would come from the trace).
    (Programs that `memopt.lift` cannot lift back are the ones exported again: lifting is turned off here.)"""
    import memopt.capture as cap
    from memopt.pipeline import compile_model

    monkeypatch.setattr(cap, "lift", lambda gm, like: None)
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


LIFT_CASES = {
    "int8": dict(quantize="int8"),
    "int4+kivi+arena": dict(quantize="int4:g32", kv="kivi:k4v4:g16:r16", passes=("arena",)),
    "int8+offload+kv-offload+kivi": dict(quantize="int8", offload=["model.layers.1"], offload_kv=[0],
                                         kv="kivi:4:g16:r16"),
}


def _aliased(node) -> tuple:
    """Which of a node's tensor inputs its fake value shares storage with (a view's base, an in-place op's target):
    what memory planning reads from the values."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def storages(val):
        return {StorageWeakRef(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves(val)
                if isinstance(t, torch.Tensor)}

    out = storages(node.meta.get("val"))
    return tuple(bool(out & storages(i.meta.get("val"))) for i in node.all_input_nodes)


def _described(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{tuple(val.shape)} {tuple(val.stride())} {val.dtype}"
    if isinstance(val, (tuple, list)):
        return str([_described(v) for v in val])
    return str(val)


@pytest.mark.parametrize("opts", LIFT_CASES.values(), ids=LIFT_CASES.keys())
def test_a_lifted_program_is_the_one_export_traces(monkeypatch, opts):
    """`memopt.lift` gives a rewritten program as torch.export gives it: the same signature (kinds, placeholder
    names, targets, persistence) and placeholder values, the same ops each with the same fake value (shape, stride,
    dtype) sharing storage with the same inputs (counted per op and value: export may hoist a size read among
    independent nodes, and names the nodes it traces its own way), the same state and constants, the same graph
    metadata, the same logits and tokens."""
    from collections import Counter

    import memopt.capture as cap
    from memopt.lift import _same_meta
    from memopt.pipeline import compile_model

    a, = _tiny_llamas(7)
    kw = dict(seq=8, max_cache=48, **opts)
    lifted = compile_model(a, **kw)
    cap.clear_captures()
    monkeypatch.setattr(cap, "lift", lambda gm, like: None)  # what export gives
    exported = compile_model(a, **kw)
    for name, ep in lifted.programs.items():
        ref = exported.programs[name]
        spec = lambda s: (s.kind, s.arg.name, s.target, s.persistent)  # noqa: E731
        assert [spec(s) for s in ep.graph_signature.input_specs] == [spec(s) for s in ref.graph_signature.input_specs]
        assert [s.kind for s in ep.graph_signature.output_specs] == [s.kind for s in ref.graph_signature.output_specs]
        ops = lambda p: Counter((str(n.target), _described(n.meta.get("val")), _aliased(n))  # noqa: E731
                                for n in p.graph.nodes if n.op == "call_function")
        assert ops(ep) == ops(ref) and len(ep.graph.nodes) == len(ref.graph.nodes), name
        theirs = {n.name: n.meta["val"] for n in ref.graph.nodes if n.op == "placeholder"}
        assert all(_same_meta(n.meta["val"], theirs[n.name]) for n in ep.graph.find_nodes(op="placeholder")), name
        assert list(ep.state_dict) == list(ref.state_dict) and list(ep.constants) == list(ref.constants)
        for key, t in ep.state_dict.items():  # (an offloaded block's alignment padding is uninitialized memory)
            want = ref.state_dict[key]
            assert t.shape == want.shape if "offload_host" in key else torch.equal(t, want)
        assert ep.graph_module.meta.keys() == ref.graph_module.meta.keys()
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(lifted.module(ids), exported.module(ids))
    assert torch.equal(lifted.module.generate(ids[:, :5], 6), exported.module.generate(ids[:, :5], 6))


@pytest.mark.parametrize("opts", LIFT_CASES.values(), ids=LIFT_CASES.keys())
def test_a_lifted_programs_module_is_the_module_it_was_lifted_from(monkeypatch, opts):
    """After its passes a program keeps the rewritten module as its module (`memopt.lift.adopt`) instead of
    unlifting the lifted program again: it is what `ExportedProgram.module()` gives, node for node (names, ops,
    arguments, the program's fake values themselves; no input-guards call), holding the same tensors; the compile
    emits those very modules and computes what a compile with the unlifted modules does."""
    import memopt.capture as cap
    import memopt.pipeline as pipeline
    from memopt.lift import adopt
    from memopt.pipeline import compile_model

    seen = []

    def checking(gm, ep):
        ref = ep.module()
        ok = adopt(gm, ep)
        seen.append((gm, ok))
        nodes = lambda m: [n for n in m.graph.nodes if n.op != "get_attr"]  # noqa: E731
        mine, theirs = nodes(gm), nodes(ref)
        assert [(n.op, n.name, str(n.target)) for n in mine] == [(n.op, n.name, str(n.target)) for n in theirs]
        by_name = lambda n: n.name if n.op != "get_attr" else ("attr", n.target)  # noqa: E731
        for a, b in zip(mine, theirs):
            assert torch.fx.node.map_arg(a.args, by_name) == torch.fx.node.map_arg(b.args, by_name), a.name
            assert a.op == "output" or a.meta["val"] is b.meta["val"], a.name
        used = lambda m: {n.target for n in m.graph.find_nodes(op="get_attr") if n.users}  # noqa: E731
        assert used(gm) == used(ref)  # (unlifting also reads the tensors nothing uses, each once)
        assert not gm.graph.find_nodes(op="call_module") and not hasattr(gm, "_guards_fn")
        state, want = gm.state_dict(keep_vars=True), ref.state_dict(keep_vars=True)
        assert state.keys() == want.keys() and all(state[k] is want[k] for k in state)
        assert dict(gm.named_buffers()).keys() == dict(ref.named_buffers()).keys()  # persistence kept
        return ok

    a, = _tiny_llamas(7)
    kw = dict(seq=8, max_cache=48, **opts)
    monkeypatch.setattr(pipeline, "adopt", checking)
    kept = compile_model(a, **kw)
    assert [ok for _, ok in seen] == [True, True]
    assert seen[1][0] is kept.module.generator  # the emitted generation program is the rewritten module
    cap.clear_captures()
    monkeypatch.setattr(pipeline, "adopt", lambda gm, ep: False)  # each module unlifted from its program
    unlifted = compile_model(a, **kw)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(kept.module(ids), unlifted.module(ids))
    assert torch.equal(kept.module.generate(ids[:, :5], 6), unlifted.module.generate(ids[:, :5], 6))


def test_a_module_that_is_not_its_programs_graph_is_not_adopted():
    """`adopt` refuses, leaving the module as it was, when the program's graph is not the module's node for node
    (a node the module has and the program has not; an argument changed since) or is an export's (which unlifts
    with input guards of its own)."""
    from memopt.lift import adopt, lift

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(3, 8)
    ep = torch.export.export(model, (x,))
    gm = ep.module()
    lifted = lift(gm, ep)
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    with gm.graph.inserting_after(relu):
        extra = gm.graph.call_function(torch.ops.aten.neg.default, (relu,))
    relu.replace_all_uses_with(extra, delete_user_cb=lambda user: user is not extra)
    gm.recompile()
    code, vals = gm.code, {n.name: n.meta.get("val") for n in gm.graph.nodes}
    assert not adopt(gm, lifted)
    assert gm.code == code and {n.name: n.meta.get("val") for n in gm.graph.nodes} == vals
    assert hasattr(gm, "_guards_fn")
    extra.args = (relu.args[0],)  # neg of relu's input: an argument the program's node does not have
    gm.recompile()
    again = lift(gm, ep)
    extra.args = (relu,)
    gm.recompile()
    code = gm.code
    assert not adopt(gm, again) and gm.code == code
    class Net(nn.Module):  # (an input named as an export names it again)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x):
            return self.lin(x).relu()

    plain = torch.export.export(Net().eval(), (x,)).module()
    exported = torch.export.export(plain, (x,))  # an export: its module would check inputs by guards of its own
    assert [n.name for n in exported.graph.find_nodes(op="placeholder")][-1] == \
        [n.name for n in plain.graph.find_nodes(op="placeholder")][-1]  # (so only that tells them apart)
    plain_code = plain.code
    assert not adopt(plain, exported) and plain.code == plain_code and hasattr(plain, "_guards_fn")
    again = lift(gm, ep)  # lifted from the module as it is: adopted
    assert adopt(gm, again) and not hasattr(gm, "_guards_fn")
    theirs = {n.name: n for n in again.graph.nodes}
    assert all(n.meta["val"] is theirs[n.name].meta["val"] for n in gm.graph.nodes if n.op == "call_function")
    torch.testing.assert_close(gm(x), model[2](-torch.relu(model[0](x))))


def test_a_module_that_cannot_be_lifted_is_exported():
    """A graph calling a Python function (not an op overload) or reading a plain tensor attribute is not lifted
    (`lift` -> None); `export_again` then traces it, and the program computes what the module does."""
    from memopt.capture import export_again
    from memopt.lift import lift

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), torch.randn(3, 8)
    ep = torch.export.export(model, (x,))
    gm = ep.module()
    assert lift(gm, ep) is not None
    relu = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)
    relu.target = torch.relu
    gm.recompile()
    assert lift(gm, ep) is None
    again = export_again(gm, (x,), {}, None, ep)
    assert torch.ops.aten.relu.default in {n.target for n in again.graph.nodes}
    torch.testing.assert_close(again.module()(x), model(x))
    relu.target = torch.ops.aten.relu.default
    gm.plain = torch.ones(4)  # a tensor attribute, neither parameter nor buffer
    out = gm.graph.output_node()
    with gm.graph.inserting_before(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fx: "a get_attr Node with no underlying reference" (not a buffer)
        added = gm.graph.call_function(torch.ops.aten.add.Tensor, (out.args[0][0], gm.graph.get_attr("plain")))
    out.args = ((added,),)
    gm.recompile()
    assert lift(gm, ep) is None
