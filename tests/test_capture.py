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
