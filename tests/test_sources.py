import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memopt.frontend.sources import SourceError, preset_names, resolve_source

HERE = Path(__file__).parent
REQUIRED_PRESETS = ["llama-3-8b", "llama-2-7b", "mistral-7b", "qwen2.5-7b", "qwen2.5-0.5b", "gpt2", "bert-base"]


def test_default_is_demo():
    src = resolve_source(None)
    assert src.name == "demo" and src.family == "causal_lm" and not src.on_meta
    assert src.model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 1024)


def test_demo_is_deterministic():
    a, b = resolve_source("demo"), resolve_source("demo")
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", REQUIRED_PRESETS)
def test_presets_build_on_meta(name):
    assert name in preset_names()
    src = resolve_source(name)
    assert src.on_meta
    assert all(p.device.type == "meta" for p in src.model.parameters())


def test_minilm_is_the_real_model(minilm_source):
    tok = minilm_source.tokenizer
    enc = tok(["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."],
              padding=True, return_tensors="pt")
    emb = minilm_source.traceable()(enc["input_ids"], enc["attention_mask"])
    sim = emb @ emb.T
    # trained weights: paraphrases are far closer than unrelated sentences
    assert sim[0, 1] > 0.5 > sim[0, 2]


def test_factory_source():
    src = resolve_source(f"{HERE / 'models.py'}:mlp_factory")
    assert src.family == "module" and src.fixed_inputs[0].shape == (8, 64)


def test_hf_directory_with_and_without_weights(tmp_path, demo_source):
    demo_source.model.save_pretrained(tmp_path / "full")
    src = resolve_source(str(tmp_path / "full"))
    assert not src.on_meta and src.family == "causal_lm"
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(src.model(x).logits, demo_source.model(x).logits)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    meta = resolve_source(str(tmp_path / "cfg"))
    assert meta.on_meta


@pytest.mark.parametrize("spec, fragment", [
    ("no-such-model", "accepted: demo, minilm, smollm2"),
    ("/no/such/file.gguf", "does not exist"),
    ("missing.py:factory", "does not exist"),
    (f"{HERE / 'models.py'}:nope", "has no function 'nope'"),
])
def test_bad_sources_are_one_line_errors(spec, fragment):
    with pytest.raises(SourceError) as info:
        resolve_source(spec)
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg


def test_cli_bad_source_exits_nonzero():
    proc = subprocess.run([sys.executable, "-m", "memopt", "inspect", "no-such-model", "--json"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "unknown model source 'no-such-model'" in proc.stderr
    assert proc.stdout == ""
