"""Every bad input is one clean line, checked before any capture, with nothing written (issue #17).

One table of CLI cases x one parametrized test: exit code 2, exactly one stderr line `memopt: error: ...`
naming the bad value, no traceback, no output directory. `capture` is replaced by a tripwire, so a case
that reached the expensive part fails loudly instead of passing late.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import memopt.analysis.inspect
import memopt.pipeline
from memopt.cli import main

FACTORIES = '''import torch

def boom():
    return 1 / 0

def wrong():
    return 42

def linear():
    return torch.nn.Linear(4, 4), (torch.randn(1, 4),)
'''
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}


def _gguf(path: Path, head_count=4, alignment=None) -> None:
    """A tiny llama GGUF header (one 100 x 64 embedding) with the given head count and alignment."""
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2), w.add_context_length(64), w.add_embedding_length(64), w.add_feed_forward_length(128)
    w.add_head_count_kv(2)
    if isinstance(head_count, str):
        w.add_string("llama.attention.head_count", head_count)
    else:
        w.add_head_count(head_count)
    if alignment is not None:
        w.add_uint32("general.alignment", alignment)
    w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def _config_dir(root: Path, name: str, text: str) -> None:
    (root / name).mkdir()
    (root / name / "config.json").write_text(text)


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    """One folder of bad inputs: factory files, model directories, GGUF files."""
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("bad")
    (root / "models.py").write_text(FACTORIES)
    (root / "syntax.py").write_text("def make(:\n    pass\n")
    _config_dir(root, "notjson", '{"model_type": "llama", ')
    _config_dir(root, "layers", json.dumps({**LLAMA, "num_hidden_layers": 10**6}))
    _config_dir(root, "wide", json.dumps({**LLAMA, "hidden_size": 2**21, "num_attention_heads": 8}))
    _config_dir(root, "strsize", json.dumps({**LLAMA, "hidden_size": "big"}))
    _gguf(root / "align0.gguf", alignment=0)
    _gguf(root / "heads0.gguf", head_count=0)
    _gguf(root / "headsstr.gguf", head_count="four")
    return root


@pytest.fixture(autouse=True)
def no_capture(monkeypatch):
    def tripwire(*args, **kwargs):
        raise AssertionError("capture ran: this bad input was not refused up front")

    monkeypatch.setattr(memopt.pipeline, "capture", tripwire)
    monkeypatch.setattr(memopt.analysis.inspect, "capture", tripwire)


# (id, argv with {d} = the bad-inputs folder, text the one line must contain)
CASES = [
    ("budget-overflow", ["compile", "--budget", "1e400"], "'1e400' is out of range"),
    ("budget-zero", ["compile", "--budget", "0"], "--budget must be a positive byte count, got '0'"),
    ("budget-zero-plan-only", ["compile", "--budget", "0", "--plan-only"], "got '0'"),
    ("target-mem-overflow", ["compile", "--target", "custom:mem=1e400GiB,bw=1TB/s"], "mem '1e400GiB' is out of range"),
    ("target-bw-overflow", ["compile", "--target", "custom:mem=24GiB,bw=1e400TB/s"], "bw '1e400TB/s' is out of range"),
    ("target-zero-flops", ["compile", "--target", "custom:mem=24GiB,bw=1TB/s,bf16=0"],
     "bf16 must be a positive rate, got '0'"),
    ("target-zero-bw", ["inspect", "--target", "custom:mem=24GiB,bw=0"], "bw must be a positive rate, got '0'"),
    ("factory-raises", ["compile", "{d}/models.py:boom"],
     "raised ZeroDivisionError: division by zero (models.py line 4)"),
    ("factory-syntax", ["compile", "{d}/syntax.py:make"], "SyntaxError: invalid syntax (syntax.py line 1)"),
    ("factory-wrong-return", ["compile", "{d}/models.py:wrong"], "must return (module, example_inputs), got int"),
    ("factory-missing", ["compile", "{d}/models.py:nope"], "has no function 'nope'"),
    ("config-not-json", ["compile", "{d}/notjson"], "notjson/config.json is not valid JSON"),
    ("config-layers", ["inspect", "{d}/layers"], "num_hidden_layers 1000000 is more than 10,000"),
    ("config-params", ["compile", "{d}/wide"], "hidden_size 2097152"),
    ("config-string-size", ["compile", "{d}/strsize"], "hidden_size must be a positive integer, got 'big'"),
    ("gguf-alignment-0", ["inspect", "{d}/align0.gguf"], "general.alignment is 0"),
    ("gguf-heads-0", ["compile", "{d}/heads0.gguf"], "llama.attention.head_count is 0"),
    ("gguf-heads-string", ["inspect", "{d}/headsstr.gguf"], "llama.attention.head_count is 'four'"),
    ("seq-0", ["compile", "--seq", "0"], "--seq must be >= 1, got 0"),
    ("seq-0-plan-only", ["compile", "--seq", "0", "--plan-only"], "--seq must be >= 1, got 0"),
    ("seq-too-long", ["compile", "--seq", "5000"], "seq 5000 exceeds demo's context length 1024"),
    ("batch-negative", ["compile", "--batch", "-1"], "--batch must be >= 1, got -1"),
    ("inspect-seq-0", ["inspect", "--seq", "0"], "--seq must be >= 1, got 0"),
    ("max-cache-0", ["compile", "--max-cache", "0"], "--max-cache must be >= 1, got 0"),
    ("max-cache-too-big", ["compile", "--max-cache", "100000000"], "max_cache 100000000 exceeds demo's context"),
    ("time-limit-negative", ["compile", "--time-limit", "-1"], "--time-limit must be a finite number"),
    ("quantize-int3", ["compile", "--quantize", "int3"], "unknown weight format 'int3'"),
    ("quantize-int4-g7", ["compile", "--quantize", "int4:g7"], "unknown weight format 'int4:g7'"),
    ("kv-unknown", ["compile", "--kv", "bogus:1"], "unknown KV policy 'bogus:1'"),
    ("kv-streaming-huge", ["compile", "--kv", "streaming:100000000:100000000"], "keeps 200000000 tokens"),
    ("kv-h2o-over-cache", ["compile", "--kv", "h2o:600", "--max-cache", "512"], "keeps 600 tokens"),
    ("kv-kivi-residual", ["compile", "--kv", "kivi:k4v2:r256", "--max-cache", "128"], "residual 256"),
    ("kv-not-a-decoder", ["compile", "{d}/models.py:linear", "--kv", "kivi:4"], "--kv needs a decoder LM"),
    ("offload-kv-index", ["compile", "--offload-kv", "99"], "--offload-kv 99 matches no layer of demo"),
    ("offload-kv-pattern", ["compile", "--offload-kv", "layers.9"], "--offload-kv 'layers.9' matches no layer"),
    ("calibration-missing", ["compile", "--quantize", "int4:gptq", "--calibration", "{d}/nope.txt"],
     "nope.txt' does not exist"),
    ("calibration-no-tokenizer", ["compile", "--quantize", "int4:gptq", "--calibration", "{d}/models.py"],
     "demo has none"),
    ("kv-cache-memory", ["compile", "--batch", "10000000", "--max-cache", "1024"], "batch 10000000 x 1024 tokens"),
]


@pytest.mark.parametrize("argv, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clean_line(argv, fragment, bad, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(d=bad) for a in argv]
    argv += ["-o", str(out)] if argv[0] == "compile" else ["--json"]  # inspect --json: no progress lines
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("memopt: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert not out.exists()


API_CASES = [
    ("seq-0", dict(seq=0), "seq must be an integer >= 1, got 0"),
    ("batch-bool", dict(batch=True), "batch must be an integer >= 1, got True"),
    ("time-limit-nan", dict(time_limit_s=float("nan")), "time_limit_s must be a finite number"),
    ("budget-inf", dict(budget=float("inf")), "budget inf is not a byte count"),
    ("budget-huge", dict(budget=2**70), "is out of range"),
    ("kv-huge", dict(kv="streaming:4:100000000"), "keeps 100000004 tokens"),
    ("kv-encoder-module", dict(model="linear", kv="kivi:4"), "--kv needs a decoder LM"),
    ("offload-kv-negative", dict(offload_kv=[-1]), "layers must be indices >= 0"),
    ("solver", dict(arena_solver="magic"), "solver must be cbc, highs or greedy"),
]


@pytest.mark.parametrize("kwargs, fragment", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_compile_model_refuses_before_capture(kwargs, fragment, bad):
    import memopt

    kwargs = dict(kwargs)
    if kwargs.get("model") == "linear":
        kwargs["model"] = f"{bad}/models.py:linear"
    with pytest.raises(ValueError) as info:
        memopt.compile_model(kwargs.pop("model", "demo"), **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("model, kwargs, fragment", [
    ("demo", dict(target="custom:mem=24GiB,bw=1TB/s,fp32=0"), "fp32 must be a positive rate"),
    ("{d}/heads0.gguf", {}, "head_count is 0"),
    ("{d}/layers", {}, "num_hidden_layers 1000000"),
])
def test_inspect_model_refuses_before_capture(model, kwargs, fragment, bad):
    import memopt

    with pytest.raises(ValueError, match=fragment):
        memopt.inspect_model(model.format(d=bad), **kwargs)
