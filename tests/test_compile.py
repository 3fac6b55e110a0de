"""torch.compile (inductor) of the emitted programs, and every memopt custom op checked by opcheck.

The arena program compiles as the arena-free program (see passes/arena.py): inductor plans its own buffers.
Inductor's CPU compile is slow (a cold cache costs tens of seconds a program), so the cases share the
compiled modules of one module-scoped fixture and the heavier ones are marked slow.
"""

from __future__ import annotations

import pytest
import torch

import memopt.runtime  # noqa: F401  (registers the memopt:: ops)
from memopt.kv.layout import Layout, layouts_to_str
from memopt.runtime import dfloat11, quant_ops


# ---------------------------------------------------------------- opcheck on every memopt op
def _int4(n: int = 64, k: int = 128, g: int = 32):
    packed, scales, zeros = quant_ops.quantize_int4_groups(torch.randn(n, k), g)
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
    assert ours - {"name"} <= covered, f"no opcheck case for {sorted(ours - covered)}"


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_opcheck(case):
    op, args = OP_CASES[case]
    torch.library.opcheck(op, args)
