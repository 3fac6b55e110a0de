"""The C kernels of the KV decode step (`memopt/runtime/kivi_kernels.c`, built by `memopt.runtime.native`) compute
what the PyTorch path computes and store the same cache, for every store format, head dtype and ring state, and
generation falls back to the PyTorch path when they cannot be built."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from memopt.kv.layout import Layout, layouts_to_str
from memopt.kv.policy import parse_kv_spec
from memopt.runtime import kv_ops, native

SPECS = ["kivi:k4v4:g32:r128", "kivi:k2v2:g32:r64", "kivi:k2v2:g64:r64", "kivi:k8v4:g16:r32:s4",
         "kivi:k4v2:g32:r64:had", "kivi:k16v4:g32:r64", "kivi:k4v16:g16:r32", "streaming:4:60"]


def _kernels():
    lib = native.kernels()
    if lib is None:
        pytest.skip(f"memopt's C kernels cannot be built here: {native.why_not()}")
    return lib


def _run(layouts, state, steps, filled, batch, dtype, seed=1):
    torch.manual_seed(seed)
    text, outs = layouts_to_str(layouts), []
    for step in range(steps):
        q, k, v = (torch.randn(batch, heads, 1, 64).to(dtype) for heads in (9, 3, 3))
        outs.append(torch.ops.memopt.kv_attend(q, k, v, state, torch.tensor([filled + step]), text, 0.125))
    return outs


def _filled_state(layouts, batch: int, filled: int) -> list[torch.Tensor]:
    """The layer's state after a prefill of `filled` random tokens (seeded; 3 KV heads of 64 channels)."""
    torch.manual_seed(0)
    state = [t for x in layouts for t in x.allocate(batch).values()]
    if filled:
        for layout, bufs in kv_ops.split_state(layouts_to_str(layouts), state):
            kv_ops.fill_group(layout, bufs, torch.randn(batch, 3, filled, 64), torch.randn(batch, 3, filled, 64))
    return state


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("batch, dtype, cache_dtype", [(1, torch.float32, "float16"), (2, torch.float32, "bfloat16"),
                                                      (1, torch.bfloat16, "float32")])
def test_c_kernels_equal_the_torch_path(spec, batch, dtype, cache_dtype, monkeypatch):
    lib = _kernels()
    layouts = tuple(Layout(**{**x.to_json(), "heads": x.heads, "dtype": cache_dtype})
                    for x in parse_kv_spec(spec).layer_layouts(0, 3, 64, 1024))
    assert all(kv_ops.fast_path(x) for x in layouts)
    for filled in (0, 70, 301):
        state = _filled_state(layouts, batch, filled)
        copy = [t.clone() for t in state]
        got = _run(layouts, state, 40, filled, batch, dtype)
        monkeypatch.setitem(native._STATE, "lib", None)  # the PyTorch path
        want = _run(layouts, copy, 40, filled, batch, dtype)
        monkeypatch.setitem(native._STATE, "lib", lib)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=2e-5 if dtype == torch.float32 else 1e-2, rtol=1e-4)
        assert all(torch.equal(a, b) for a, b in zip(state, copy)), "both paths store the same cache"


@pytest.mark.parametrize("spec", ["kivi:k4v4:g32:r64:pre", "kivi:k2v2:g16:r32:s4:pre", "kivi:k8v4:g16:r32:pre",
                                  "kivi:k2v2:g16:r32:s4:pre:had", "kivi:k4v2:g32:r64:pre:had"])
@pytest.mark.parametrize("batch, cache_dtype", [(1, "float16"), (2, "bfloat16")])
def test_pre_rope_store_in_c_equals_both_torch_paths(spec, batch, cache_dtype, monkeypatch):
    """Keys stored before RoPE, read by the C kernels (a block at a time dequantized, un-rotated if Hadamard-rotated
    and turned to its positions), equal the PyTorch fast path and the general one
    (`attend_group`: keys dequantized, un-rotated and turned forward), through a ring that wraps and a store that
    fills and evicts; all three store the same cache."""
    lib = _kernels()
    inv_freq = tuple((1.0 / 10000 ** (torch.arange(0, 64, 2).float() / 64)).tolist())
    layouts = tuple(Layout(**{**x.to_json(), "heads": x.heads, "dtype": cache_dtype, "rope_inv_freq": inv_freq})
                    for x in parse_kv_spec(spec).layer_layouts(0, 3, 64, 256))
    assert all(x.pre_rope and kv_ops.fast_path(x) for x in layouts)
    for filled in (0, 70, 301):
        state = _filled_state(layouts, batch, filled)
        copies = [[t.clone() for t in state] for _ in range(2)]
        got = _run(layouts, state, 40, filled, batch, torch.float32)
        monkeypatch.setitem(native._STATE, "lib", None)  # the PyTorch fast path
        fast = _run(layouts, copies[0], 40, filled, batch, torch.float32)
        monkeypatch.setattr(kv_ops, "fast_path", lambda layout: False)  # the general path
        general = _run(layouts, copies[1], 40, filled, batch, torch.float32)
        monkeypatch.undo()
        for a, b, c in zip(got, fast, general):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(a, c, atol=2e-5, rtol=1e-4)
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(state, *copies))


def test_soft_capped_wrapped_ring_equals_the_torch_path(monkeypatch):
    lib = _kernels()
    layout = parse_kv_spec("kivi:k4v4:g32:r64").layer_layouts(0, 3, 64, 1024)[0].for_attention(softcap=5.0)
    state = list(layout.allocate(1).values())
    kv_ops.fill_group(layout, dict(zip(layout.buffer_names(), state)), torch.randn(1, 3, 150, 64) * 3,
                      torch.randn(1, 3, 150, 64))
    copy = [t.clone() for t in state]
    got = _run((layout,), state, 20, 150, 1, torch.float32)
    monkeypatch.setitem(native._STATE, "lib", None)
    want = _run((layout,), copy, 20, 150, 1, torch.float32)
    monkeypatch.setitem(native._STATE, "lib", lib)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_without_the_kernels_generation_reads_the_cache_with_torch():
    code = ("import torch; from memopt.runtime import native, kv_ops; from memopt.kv.policy import parse_kv_spec\n"
            "from memopt.kv.layout import layouts_to_str\n"
            "assert native.kernels() is None and 'MEMOPT_NATIVE' in native.why_not(), native.why_not()\n"
            "ls = parse_kv_spec('kivi:k4v4:g32:r64').layer_layouts(0, 3, 64, 512); st = [t for x in ls for t in "
            "x.allocate(1).values()]\n"
            "out = kv_ops.kv_attend(torch.randn(1, 9, 1, 64), torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64), st,"
            " torch.tensor([0]), layouts_to_str(ls), 0.125); print(tuple(out.shape))\n")
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "MEMOPT_NATIVE": "0"},
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "(1, 9, 1, 64)"


@pytest.mark.parametrize("spec", ["kivi:k4v4:g32:r64", "kivi:k2v4:g16:r32"])
@pytest.mark.parametrize("kv_heads, n_rep, head_dim", [(2, 6, 128), (1, 8, 96), (4, 1, 32)])
def test_c_kernels_equal_the_torch_path_for_other_head_shapes(spec, kv_heads, n_rep, head_dim, monkeypatch):
    lib = _kernels()
    layouts = parse_kv_spec(spec).layer_layouts(0, kv_heads, head_dim, 1024)
    text = layouts_to_str(layouts)
    torch.manual_seed(0)
    state = [t for x in layouts for t in x.allocate(1).values()]
    for layout, bufs in kv_ops.split_state(text, state):
        kv_ops.fill_group(layout, bufs, *(torch.randn(1, kv_heads, 200, head_dim) for _ in range(2)))
    copy, outs = [t.clone() for t in state], []
    for impl in (lib, None):
        monkeypatch.setitem(native._STATE, "lib", impl)
        torch.manual_seed(1)
        outs.append([torch.ops.memopt.kv_attend(torch.randn(1, kv_heads * n_rep, 1, head_dim),
                                                torch.randn(1, kv_heads, 1, head_dim),
                                                torch.randn(1, kv_heads, 1, head_dim), s, torch.tensor([200 + i]),
                                                text, head_dim**-0.5)
                     for i in range(40) for s in [state if impl is lib else copy]])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(state, copy))


def test_a_kernel_cache_others_can_write_is_never_loaded(tmp_path):
    """A shared library runs as whoever loads it: one from a directory another user can write is refused (the
    callers stay on the PyTorch path), and the cache memopt creates is private to its user."""
    import os

    _kernels()  # a machine that cannot build them has nothing to refuse
    shared = tmp_path / "shared"
    (shared / "kernels").mkdir(parents=True)
    os.chmod(shared / "kernels", 0o777)
    code = ("from memopt.runtime import native\n"
            "assert native.kernels() is None and 'writable by other users' in native.why_not(), native.why_not()\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MEMOPT_CACHE": str(shared)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    private = tmp_path / "private"
    code = "from memopt.runtime import native\nnative.kernels()\n"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "MEMOPT_CACHE": str(private)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not (private / "kernels").stat().st_mode & 0o022
