"""`memopt compile --budget`: plan-only answers on presets, infeasible budgets fail clearly, and a
compiled model really fits the budget it was planned for."""

import json
import os
import subprocess
import sys

import pytest
import torch

from memopt.pipeline import compile_model
from memopt.units import parse_bytes

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memopt", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def test_plan_only_on_a_preset_without_weights(tmp_path):
    proc = _cli("compile", "llama-3-8b", "--target", "rtx-4090", "--seq", "32768", "--plan-only", "--json",
                "-o", str(tmp_path / "plan"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    d = json.loads(proc.stdout)
    for key in ("fits", "budget_bytes", "predicted_peak_bytes", "predicted_decode_s_per_token", "decisions", "solver"):
        assert key in d, key
    assert d["fits"] and d["predicted_peak_bytes"] <= d["budget_bytes"]
    assert {"status", "time_s", "gap"} <= set(d["solver"])
    assert (tmp_path / "plan" / "plan.json").is_file() and not (tmp_path / "plan" / "program.pt2").exists()


def test_infeasible_budget_is_one_clear_line():
    proc = _cli("compile", "llama-3-70b", "--target", "t4", "--budget", "8GiB", "--seq", "131072", "--batch", "8",
                "--plan-only")
    assert proc.returncode == 2 and proc.stdout == ""
    line = proc.stderr.strip()
    assert "\n" not in line and "smallest plan needs" in line and "KV cache" in line and "budget 8.0 GiB" in line


def _resident_bytes(module) -> int:
    tensors = {id(t): t for t in list(module.gm.parameters()) + list(module.gm.buffers())}
    if module.generator is not None:
        tensors.update({id(t): t for t in module.generator.buffers() if t.dim() == 4})  # its KV cache
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_compiled_module_fits_its_budget():
    budget = "3MiB"
    result = compile_model("demo", seq=256, budget=budget, target="custom:mem=4GiB,bw=100GB/s")
    m = result.module
    assert result.plan.predictions["budget"]["fits"]
    assert _resident_bytes(m) <= parse_bytes(budget)
    assert any(d.weight_format == "int8" for d in result.plan.decisions)
    ids = result.captured.example_inputs[0]
    ref = result.source.traceable()(ids).float()
    out = m(ids).float()
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).item()
    assert cos >= 0.99, f"cosine {cos} too low"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_budget_plan_compresses_the_kv_cache_it_priced():
    result = compile_model("demo", seq=256, budget="3MiB", target="custom:mem=4GiB,bw=100GB/s")
    planned = result.plan.predictions["budget"]
    kv_policies = {d.kv_policy for d in result.plan.decisions} if result.plan.decisions else set()
    assert result.plan.predictions["kv_cache_bytes"] > 0
    if "kv" in result.plan.pass_configs:  # the planner chose fewer than 16 bits somewhere
        assert result.plan.predictions["kv_cache_bytes"] < 2 * 4 * 2 * 32 * 256 * 2  # below a 16-bit cache
    assert planned["fits"] and kv_policies is not None
    new = result.module.generate(torch.tensor([[5, 17, 99, 4]]), 4)
    assert new.shape == (1, 4)
