"""The arena pass: one preallocated buffer, outputs equal to the original model's."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import cnn_factory, mlp_factory
from memopt.passes.arena import ARENA_ATTR, ArenaConfig, out_variant
from memopt.pipeline import compile_model


def _check(result, atol=1e-5):
    args = result.captured.example_inputs
    expected = result.source.traceable()(*args)
    for _ in range(2):  # the arena is reused across calls
        torch.testing.assert_close(result.module(*args), expected, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("case", ["demo", "minilm", "mlp", "cnn"])
def test_arena_module_matches_original(case, request):
    if case in ("mlp", "cnn"):
        model, inputs = (mlp_factory if case == "mlp" else cnn_factory)()
        result = compile_model(model, inputs)
    else:
        result = compile_model(request.getfixturevalue("minilm_source") if case == "minilm" else case, seq=48)
    _check(result)
    gm = result.module.gm
    arena = getattr(gm, ARENA_ATTR)
    assert arena.numel() == result.plan.arena.size_bytes
    assert result.plan.arena.size_bytes >= result.plan.arena.lower_bound_bytes
    info = gm.meta["memopt_arena"]
    assert info["out_variant_ops"] > 0
    # every planned intermediate really is a view into the arena
    planned = set(result.plan.arena.offsets)
    as_strided = [n for n in gm.graph.nodes if n.target is torch.ops.aten.as_strided.default]
    assert len(as_strided) >= len(planned)


def test_arena_storage_is_shared():
    """Intermediates are written into the arena's memory, not fresh allocations."""
    model, inputs = mlp_factory()
    result = compile_model(model, inputs)
    gm = result.module.gm
    arena = getattr(gm, ARENA_ATTR)
    arena.fill_(0)
    result.module(*inputs)
    assert arena.count_nonzero() > 0


def test_out_variant_lookup():
    assert out_variant(torch.ops.aten.add.Tensor) is torch.ops.aten.add.out
    assert out_variant(torch.ops.aten.linear.default) is torch.ops.aten.linear.out
    assert out_variant(torch.ops.aten.scaled_dot_product_attention.default) is None


@pytest.mark.parametrize("kwargs, fragment", [(dict(alignment=48), "power of two"),
                                              (dict(time_limit_s=0), "time_limit_s"),
                                              (dict(solver="gurobi"), "'gurobi'")])
def test_arena_config_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ArenaConfig(**kwargs)


def test_arena_config_json_round_trip():
    c = ArenaConfig(alignment=128, time_limit_s=3.0, solver="greedy")
    assert ArenaConfig.from_json(c.to_json()) == c


@pytest.mark.slow  # two fresh Python processes
def test_compile_cli_writes_artifact_and_reloads(tmp_path):
    out = tmp_path / "demo-art"
    proc = subprocess.run([sys.executable, "-m", "memopt", "compile", "demo", "--seq", "32", "--passes", "arena",
                           "-o", str(out), "--json"], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["arena"]["size_bytes"] >= d["arena"]["lower_bound_bytes"] > 0
    assert {"plan.json", "program.pt2", "manifest.json"} <= {p.name for p in out.iterdir()}
    # a fresh process loads it without the model's code and gets the same outputs
    code = ("import torch, memopt.artifact as A; from memopt.sources import resolve_source;"
            f"m = A.load({str(out)!r}); ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(1));"
            "ref = resolve_source('demo').traceable()(ids);"
            "print(float((m(ids) - ref).abs().max()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout.strip().splitlines()[-1]) < 1e-5


def test_compile_rejects_unknown_pass():
    with pytest.raises(ValueError, match="unknown pass 'fuse'"):
        compile_model("demo", passes=["fuse"])


def test_reorder_lowers_the_arena_and_keeps_outputs():
    from conftest import branchy_factory

    model, inputs = branchy_factory()
    plain = compile_model(model, inputs)
    reordered = compile_model(model, inputs, reorder=True)
    assert reordered.plan.arena.size_bytes < plain.plan.arena.size_bytes
    assert any("reordered ops" in n for n in reordered.notes)
    torch.testing.assert_close(reordered.module(*inputs), model(*inputs))
