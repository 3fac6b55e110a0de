"""torch.compile (inductor) of the emitted programs, and every memopt custom op checked by opcheck.

The arena program compiles as the arena-free program (see passes/arena.py): Inductor plans its own buffers.
Inductor's CPU compile is slow (a cold cache costs tens of seconds a program), so the cases share their
compile_model results and compiled programs (cached per case) and all but `plain` are marked slow.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

import memopt.runtime  # noqa: F401  (registers the memopt:: ops)
from memopt.serve.generate import reset_cache
from memopt.kv.layout import Layout, layouts_to_str
from memopt.passes.arena import ARENA_ATTR
from memopt.pipeline import compile_model
from memopt.runtime import dfloat11, quant_ops

# name: compile_model options for demo at seq 16 with a 64-token cache, and the programs that case checks
CASES = {
    "plain": ({}, ("forward", "generate")),
    "int8": ({"quantize": "int8"}, ("forward", "generate")),
    "int4": ({"quantize": "int4:g32"}, ("forward", "generate")),
    "kivi": ({"kv": "kivi:4:g16:r32"}, ("generate",)),
    "offload": ({"offload": ["model.layers.1"]}, ("forward", "generate")),
    "offload_kv": ({"offload_kv": [0]}, ("generate",)),
}
QUICK = {"plain"}  # the rest compile for minutes on a cold inductor cache


def _cases(program: str) -> list:
    return [pytest.param(name, marks=() if name in QUICK else pytest.mark.slow)
            for name, (_, programs) in CASES.items() if program in programs]


@cache
def _result(case: str):
    return compile_model("demo", seq=16, max_cache=64, **CASES[case][0])


@cache
def _compiled(case: str, program: str):
    r = _result(case)
    return torch.compile(r.module.gm if program == "forward" else r.module.generator, backend="inductor",
                         fullgraph=True)  # no graph breaks


def _decode(program, gen, ids: torch.Tensor) -> torch.Tensor:
    """Logits (batch, len, vocab) of feeding `ids` one token a call from an empty cache (one compiled shape)."""
    reset_cache(gen)
    with torch.no_grad():
        return torch.cat([program(input_ids=ids[:, p:p + 1], cache_position=torch.tensor([p]))
                          for p in range(ids.shape[1])], dim=1)


# ---------------------------------------------------------------- torch.compile of the emitted programs
@pytest.mark.parametrize("case", _cases("forward"))
def test_compiled_forward_matches_eager(case):
    r = _result(case)
    args = r.captured.example_inputs
    want = r.module(*args)  # the arena program (int4 weights put in the CPU kernel's layout first)
    with torch.no_grad():
        got = _compiled(case, "forward")(*args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(r.module(*args), want, atol=0, rtol=0)  # eager still runs in the arena


@pytest.mark.slow
def test_compiled_cnn_forward_matches_eager():
    """The CNN arena program (channels_last convs, in-place batch_norm/relu, max_pool2d into the arena)."""
    from conftest import cnn_factory

    model, inputs = cnn_factory()
    r = compile_model(model, inputs)
    assert r.module.gm.meta["memopt_arena"]["channels_last_convs"] > 0
    with torch.no_grad():
        got = torch.compile(r.module.gm, backend="inductor", fullgraph=True)(*inputs)
    torch.testing.assert_close(got, r.module(*inputs), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_optimized_module_matches_eager():
    """torch.compile of the emitted module itself (shape check, no_grad, kernel preparation): one graph."""
    r = _result("plain")
    args = r.captured.example_inputs
    got = torch.compile(r.module, backend="inductor", fullgraph=True)(*args)
    torch.testing.assert_close(got, r.module(*args), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", _cases("generate"))
def test_compiled_generation_matches_eager(case):
    r = _result(case)
    gen = r.module.generator
    ids = torch.randint(3, 1000, (1, 10), generator=torch.Generator().manual_seed(0))
    r.module.generate(ids[:, :2], max_new_tokens=1)  # a run first: int4 weights in the kernel layout
    want = _decode(gen, gen, ids)
    got = _decode(_compiled(case, "generate"), gen, ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1)), "greedy tokens differ"


def test_compiled_program_leaves_the_arena_alone():
    """Under torch.compile the arena views are fresh tensors: Inductor plans the memory of the arena-free program
    (benchmarks/arena.py compares its measured peak with the plan's), and the arena keeps its bytes."""
    r = _result("plain")
    args = r.captured.example_inputs
    fn = _compiled("plain", "forward")
    with torch.no_grad():
        fn(*args)
        arena = getattr(r.module.gm, ARENA_ATTR).fill_(7)
        torch.testing.assert_close(fn(*args), r.module.gm(*args), atol=1e-5, rtol=1e-4)
    assert not bool((arena == 7).all()), "the eager program no longer writes into the arena"
    arena.fill_(7)
    with torch.no_grad():
        fn(*args)
    assert bool((arena == 7).all()), "the compiled program wrote into the arena"


# ---------------------------------------------------------------- opcheck on every memopt op
def _int4(n: int = 64, k: int = 128, g: int = 32):
    packed, scales, zeros = quant_ops.quantize_int4_groups(torch.randn(n, k), g)
    return packed, scales, zeros


def _int4_kernel_layout():
    """An int4 weight already in the CPU kernel's layout (as prepare_int4_kernel_layout_ leaves it)."""
    packed, scales, zeros = _int4()
    block = quant_ops._kernel_block()
    if block:
        quant_ops._to_kernel_layout_(packed, block)
    return packed, scales, zeros


def _kv_case(layout: Layout):
    state = list(layout.allocate(1).values())
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    return (q, k, v, state, torch.tensor([5]), layouts_to_str((layout,)), 0.25)


def _op_cases():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 128, generator=g)
    q8, s8 = quant_ops.quantize_int8_rows(torch.randn(64, 128))
    packed, scales, zeros = _int4()
    df = dfloat11.encode_bf16(torch.randn(64, 128).to(torch.bfloat16), block_size=256)
    dfa = (df["sign_mantissa"], df["stream"], df["block_offsets"], df["code_lengths"], 256)
    ids = torch.tensor([[1, 5, 63], [0, 2, 2]])
    slot, host = torch.zeros(256, dtype=torch.uint8), torch.randint(0, 255, (200,), dtype=torch.uint8)
    kv_host = torch.randn(2, 8, 1, 2, 16)
    kivi = Layout(heads=(0, 1), head_dim=16, residual=4, group=4, blocks=2, key_bits=4, value_bits=4,
                  dtype="float32")
    ops = torch.ops.memopt
    return {
        "linear_int8": (ops.linear_int8.default, (x, q8, s8, torch.randn(64), False)),
        "linear_int8_decode": (ops.linear_int8.default, (x[:1, :1], q8, s8, None, False)),
        "linear_int8_dyn": (ops.linear_int8.default, (x, q8, s8, None, True)),
        "hadamard": (ops.hadamard.default, (x, 32)),
        "hadamard_strided": (ops.hadamard.default, (x.transpose(0, 1), 32)),
        "linear_int4": (ops.linear_int4.default, (x, packed, scales, zeros, 32)),
        "linear_int4_decode": (ops.linear_int4.default, (x[:1, :1], packed, scales, zeros, 32)),
        "linear_int4_kernel_layout": (ops.linear_int4.default, (x[:1, :2], *_int4_kernel_layout(), 32)),
        "linear_int4_outliers": (ops.linear_int4.default, (x, packed, scales, zeros, 32, torch.randn(64),
                                                          torch.tensor([3, 7]), torch.randn(64, 2))),
        "embedding_int8": (ops.embedding_int8.default, (q8, s8, ids)),
        "linear_dfloat11": (ops.linear_dfloat11.default, (x, *dfa)),
        "embedding_dfloat11": (ops.embedding_dfloat11.default, (*dfa, ids)),
        "grouped_linear_int8": (ops.grouped_linear_int8.default,
                                (x[0], q8.expand(2, 64, 128).contiguous(), s8.expand(2, 64).contiguous(),
                                 torch.tensor([2, 5]))),
        "grouped_linear_int4": (ops.grouped_linear_int4.default,
                                (x[0], packed.expand(2, *packed.shape).contiguous(),
                                 scales.expand(2, *scales.shape).contiguous(),
                                 zeros.expand(2, *zeros.shape).contiguous(), 32, torch.tensor([2, 5]))),
        "kv_attend_full": (ops.kv_attend.default, _kv_case(Layout(heads=(0, 1), head_dim=16, blocks=8,
                                                                      dtype="float32"))),
        "kv_attend_kivi": (ops.kv_attend.default, _kv_case(kivi)),
        "kv_attend_strided_q": (ops.kv_attend.default,
                                (torch.randn(1, 1, 4, 16).transpose(1, 2), *_kv_case(kivi)[1:])),
        "cache_attend": (ops.cache_attend.default, (torch.randn(1, 4, 3, 16), torch.randn(1, 2, 8, 16),
                                                    torch.randn(1, 2, 8, 16), torch.ones(1, 1, 3, 8, dtype=torch.bool).tril(4),
                                                    torch.tensor([2, 3, 4]), None)),
        "cache_attend_decode": (ops.cache_attend.default, (torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16),
                                                           torch.randn(1, 2, 8, 16), None, torch.tensor([5]), 0.25)),
        "offload_prefetch": (ops.offload_prefetch.default, (slot, host, 0)),
        "offload_wait": (ops.offload_wait.default, (slot, host, 0)),
        "kv_offload_prefetch": (ops.kv_offload_prefetch.default, (torch.zeros(kv_host.numel() + 8), kv_host, 0)),
        "kv_offload_wait": (ops.kv_offload_wait.default, (torch.zeros(kv_host.numel() + 8), kv_host, 0)),
        "kv_offload_writeback": (ops.kv_offload_writeback.default,
                                 (kv_host.clone(), torch.randn(kv_host.numel() + 8), torch.tensor([1, 3]), 0)),
    }


OP_CASES = _op_cases()


def test_every_memopt_op_has_a_case():
    """A new custom op needs a case here (and so a fake kernel and honest mutates_args)."""
    ours = {name.split(".")[0] for name in dir(torch.ops.memopt) if not name.startswith("_")}
    covered = {op.name().split("::")[1].split(".")[0] for op, _ in OP_CASES.values()}
    assert ours - {"name"} <= covered, f"no opcheck case for {sorted(ours - covered - {'name'})}"


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_opcheck(case):
    op, args = OP_CASES[case]
    torch.library.opcheck(op, args)


def test_int4_kernel_layout_is_prepared_outside_the_op():
    """linear_int4 never writes its weight (mutates_args=() is honest); the CPU kernel's layout is made once,
    in place, by prepare_int4_kernel_layout_ before a run."""
    if not quant_ops._kernel_block():
        pytest.skip("this CPU's int4 kernel layout is not known")
    packed, scales, zeros = _int4()

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros)):
                self.register_buffer(name, t)

        def forward(self, x):
            return torch.ops.memopt.linear_int4(x, self.packed, self.scales, self.zeros, 32)

    gm = torch.fx.symbolic_trace(Linear())
    x = torch.randn(2, 128)
    before, version = gm(x), packed._version
    assert packed._version == version and not quant_ops._is_kernel_layout(packed)  # the op wrote nothing
    assert quant_ops.prepare_int4_kernel_layout_(gm) == 1 and quant_ops._is_kernel_layout(gm.packed)
    assert quant_ops.prepare_int4_kernel_layout_(gm) == 0  # once
    after = gm(x)  # the kernel path (bf16 activations) against the reference path
    assert (after - before).abs().max() <= 0.02 * before.abs().max()
