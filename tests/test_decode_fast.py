"""The decode-speed paths compute what the plain paths compute: the CPU int4 kernel's layout on every ATen
capability, `memopt::cache_attend` (a static cache read up to the written slots, grouped heads in place),
`memopt.serve.decode_program.decode_program`, a compressed cache prefilled from a whole prompt in one call, and
`kv_ops.attend_fast` against the general decode step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from memopt.capture import capture
from memopt.serve.generate import generate
from memopt.kv.layout import layouts_to_str
from memopt.kv.policy import parse_kv_spec
from memopt.passes.kv import KVCompressionPass
from memopt.serve.decode_program import decode_program
from memopt.runtime import kv_ops
from memopt.runtime import quant_ops as qops


@pytest.mark.parametrize("block", [32, 64])
def test_int4_kernel_layouts_round_trip(block):
    q = torch.randint(0, 16, (128, 96), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert torch.equal(qops._q_from_kernel(qops._kernel_from_q(q, block), block), q)


@pytest.mark.parametrize("capability, block", [("avx2", 32), ("avx512", 64)])
def test_int4_kernel_serves_each_cpu_capability(capability, block):
    """ATen packs int4 weights in row blocks of 32 (AVX2) or 64 (AVX512); the kernel must be found and
    give the reference result on both, not fall back to dequantizing every call."""
    code = (
        "import torch; from memopt.runtime import quant_ops as q\n"
        f"if torch.backends.cpu.get_cpu_capability().lower() != '{capability}': print('skip'); raise SystemExit\n"
        "torch.manual_seed(0); w, x = torch.randn(192, 256), torch.randn(3, 256)\n"
        "p, s, z = q.quantize_int4_groups(w, 64); ref = x @ q.dequantize_int4(p, s, z, 64).t()\n"
        "q._to_kernel_layout_(p, q._kernel_block()); assert q._cpu_int4_layout(p, s, z) is not None\n"
        "got = torch.ops.memopt.linear_int4(x, p, s, z, 64)\n"
        "print(q._kernel_block(), float((got - ref).norm() / ref.norm()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
                         capture_output=True, text=True, timeout=120, check=False)
    if out.stdout.strip() == "skip":
        pytest.skip(f"this CPU cannot run ATen's {capability} kernels")
    assert out.returncode == 0, out.stderr[-2000:]
    found, error = out.stdout.split()
    assert int(found) == block and float(error) < 1e-2  # bf16 activations


def _repeat(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, heads // h, s, d).reshape(b, heads, s, d)


@pytest.mark.parametrize("tokens, start, window", [(1, 0, 0), (1, 40, 0), (6, 0, 0), (5, 30, 0), (1, 40, 8),
                                                   (4, 30, 8)])
def test_cache_attend_equals_sdpa_over_the_whole_cache(tokens, start, window):
    torch.manual_seed(0)
    kc, vc, q = torch.randn(1, 3, 64, 16), torch.randn(1, 3, 64, 16), torch.randn(1, 9, tokens, 16)
    pos = torch.arange(start, start + tokens)
    slots = torch.arange(64)
    mask = (slots[None, :] <= pos[:, None]) & (slots[None, :] > pos[:, None] - (window or 10**6))
    mask = mask.view(1, 1, tokens, 64)
    want = F.scaled_dot_product_attention(q, _repeat(kc, 9), _repeat(vc, 9), mask, scale=0.3)
    got = torch.ops.memopt.cache_attend(q, kc, vc, mask, pos, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    anywhere = torch.ones(1, 1, tokens, 64, dtype=torch.bool)  # a mask that lets queries see unwritten slots
    want = F.scaled_dot_product_attention(q, _repeat(kc, 9), _repeat(vc, 9), anywhere)
    torch.testing.assert_close(torch.ops.memopt.cache_attend(q, kc, vc, anywhere, pos), want, atol=1e-5, rtol=1e-5)


def test_decode_program_matches_the_generation_program(demo_source):
    gm = capture(demo_source, phase="decode", cache_len=64, dynamic=True).module()
    program = decode_program(gm)
    targets = {n.target for n in program.graph.nodes}
    assert kv_ops.attend_cache in targets  # memopt::cache_attend, called without the dispatcher
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in {n.target for n in gm.graph.nodes}, \
        "the generation program itself is left as compiled"
    assert decode_program(gm) is program
    ids = torch.randint(3, 1000, (1, 13), generator=torch.Generator().manual_seed(0))
    outs = []
    for step in (gm, program):
        for name, buf in gm.named_buffers():
            if name.startswith(("key_cache_", "value_cache_")):  # the others are the session model's own
                buf.zero_()
        with torch.no_grad():
            first = step(input_ids=ids[:, :12], cache_position=torch.arange(12))
            second = step(input_ids=ids[:, 12:], cache_position=torch.tensor([12]))
        outs.append((first[:, -1], second[:, -1], first.shape[1]))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)
    assert (outs[0][2], outs[1][2]) == (12, 1), "the LM head runs on the last position only"


@pytest.mark.parametrize("spec", ["kivi:k4v4:g32:r64", "kivi:k4v2:g32:r64:s4:pre:had", "h2o:96", "snapkv:96",
                                  "streaming:4:60"])
def test_prompt_in_one_call_fills_the_cache_as_the_eager_prefill(demo_source, spec):
    """A generation program captured for several tokens per call prefills a compressed cache from the whole
    prompt (memopt::kv_attend) exactly as the prefill through the eager model does."""
    gm = capture(demo_source, phase="decode", cache_len=256, dynamic=True).module()
    KVCompressionPass(parse_kv_spec(spec))(gm, None)
    ids = torch.randint(3, 1000, (1, 150), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(gm, ids, 10), generate(gm, ids, 10, model=demo_source.model))


@pytest.mark.parametrize("spec", ["kivi:k4v4:g32:r128", "kivi:k2v2:g32:r64", "kivi:k8v4:g16:r32:s4",
                                  "kivi:k4v2:g32:r64:had", "kivi:k16v4:g32:r64", "streaming:4:60"])
def test_fast_decode_step_equals_the_general_one(spec, monkeypatch):
    torch.manual_seed(0)
    layouts = parse_kv_spec(spec).layer_layouts(0, 3, 64, 1024)
    assert all(kv_ops.fast_path(x) for x in layouts)
    text = layouts_to_str(layouts)
    for filled in (0, 50, 129, 517):
        state = [t for x in layouts for t in x.allocate(1).values()]
        if filled:
            for layout, bufs in kv_ops.split_state(text, state):
                kv_ops.fill_group(layout, bufs, torch.randn(1, 3, filled, 64), torch.randn(1, 3, filled, 64))
        general = [t.clone() for t in state]
        for step in range(40):
            q, k, v = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 1, 64), torch.randn(1, 3, 1, 64)
            pos = torch.tensor([filled + step])
            got = torch.ops.memopt.kv_attend(q, k, v, state, pos, text, 0.125)
            with monkeypatch.context() as m:
                m.setattr(kv_ops, "fast_path", lambda layout: False)
                want = torch.ops.memopt.kv_attend(q, k, v, general, pos, text, 0.125)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
            assert all(torch.equal(a, b) for a, b in zip(state, general)), "both paths store the same cache"
