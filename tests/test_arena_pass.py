"""The arena pass: one preallocated buffer, outputs equal to the original model's."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import cnn_factory, mlp_factory
from memopt.passes.arena import ARENA_ATTR, ArenaConfig, arena_view, out_variant
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
    views = [n for n in gm.graph.nodes if n.target is arena_view]
    assert len(views) >= len(planned)


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
    code = ("import torch, memopt.emit.artifact as A; from memopt.frontend.sources import resolve_source;"
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


# ---------------------------------------------------------------- the kernels the arena pass writes with
def _bn_args():
    torch.manual_seed(0)
    return torch.randn(64), torch.randn(64), torch.randn(64), torch.rand(64) + 0.5


@pytest.mark.parametrize("case", ["relu", "batch_norm", "batch_norm_in_place", "reshape_copy", "to_dtype",
                                  "embedding", "max_pool2d", "max_pool2d_dilated", "additive_mask"])
def test_arena_kernels_compute_what_the_op_computes(case):
    """Each substitute the arena pass writes with gives the captured op's result bit for bit."""
    from memopt.passes import arena_kernels as K

    torch.manual_seed(0)
    aten = torch.ops.aten
    x = torch.randn(2, 64, 9, 11)
    x[0, 0, 0, 0] = float("nan")
    if case == "relu":
        want, got = aten.relu(x), aten.clamp_min.out(x, 0, out=torch.empty_like(x))
    elif case.startswith("batch_norm"):
        w, b, rm, rv = _bn_args()
        want = aten.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5, True)
        out = x.clone() if case.endswith("in_place") else torch.empty_like(x)
        got = K.batch_norm_out(out if case.endswith("in_place") else x, w, b, rm, rv, 0.1, 1e-5, out=out)
    elif case == "reshape_copy":  # repeat_kv: expand, then a reshape that must copy
        kv = torch.randn(1, 2, 1, 7, 4).expand(1, 2, 3, 7, 4)
        want = aten.reshape(kv, [1, 6, 7, 4])
        got = K.copy_out(kv, [1, 6, 7, 4], out=torch.empty(1, 6, 7, 4))
    elif case == "to_dtype":
        want, got = x.to(torch.bfloat16), K.copy_out(x, list(x.shape), out=torch.empty_like(x, dtype=torch.bfloat16))
    elif case == "embedding":
        ids = torch.tensor([[3, 0, 9], [9, 1, 2]])
        want = aten.embedding(x[0, :10, 0], ids)
        got = K.embedding_out(x[0, :10, 0], ids, out=torch.empty(2, 3, 11))
    elif case.startswith("max_pool2d"):
        k, s, p, d = ([3, 3], [2, 2], [1, 1], [1, 1]) if case == "max_pool2d" else ([3, 2], [1, 2], [1, 0], [2, 1])
        want = aten.max_pool2d(x, k, s, p, d, False)
        got = K.max_pool2d_out(x.contiguous(memory_format=torch.channels_last), k, s, p, d, False,
                               out=torch.empty_like(want))
    else:  # SDPA with the boolean mask vs with its additive form made in planned scratch
        q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
        mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None].expand(1, 4, 6, 6)
        want = aten.scaled_dot_product_attention(q, kv, kv, mask, scale=0.3)
        got = K.sdpa_scratch_mask(q, kv, kv, mask, scale=0.3, scratch=torch.empty(1, 4, 6, 6))
    assert torch.equal(want.nan_to_num(), got.nan_to_num()) and torch.equal(want.isnan(), got.isnan())


def test_autogen_out_list_matches_torchgen():
    """AUTOGEN_OUT names only out= overloads ATen generates from the functional op (which allocate, then copy)."""
    import pathlib

    torchgen = pytest.importorskip("torchgen")
    from memopt.passes.arena_kernels import AUTOGEN_OUT

    yaml = pathlib.Path(torchgen.__file__).parent / "packaged/ATen/native/native_functions.yaml"
    if not yaml.exists():
        pytest.skip("torchgen without native_functions.yaml")
    autogen = {name.strip() for line in yaml.read_text().splitlines() if line.strip().startswith("autogen:")
               for name in line.split(":", 1)[1].split(",")}
    assert AUTOGEN_OUT <= autogen, sorted(AUTOGEN_OUT - autogen)
    for name in ("convolution.out", "native_layer_norm.out", "relu.out", "embedding.out", "clone.out"):
        assert name in AUTOGEN_OUT


def test_inplace_and_channels_last_outside_the_arena():
    """conv -> batch_norm -> relu: the convolutions compute in channels_last, the rest write over them."""
    from memopt.passes.arena_kernels import conv2d_channels_last

    model, inputs = cnn_factory()
    result = compile_model(model, inputs)
    info = result.module.gm.meta["memopt_arena"]
    assert info["channels_last_convs"] == 2 and info["inplace_ops"] >= 4
    assert sum(n.target is conv2d_channels_last for n in result.module.gm.graph.nodes) == 2
    for _ in range(2):
        torch.testing.assert_close(result.module(*inputs), model(*inputs), atol=1e-5, rtol=1e-4)
