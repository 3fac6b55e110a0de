"""The offload pass: blocks' weights on host, streamed one block ahead into reused staging slots."""

import dataclasses
import json
import warnings

import pytest
import torch

from memopt.passes.offload import (HOST_PREFIX, SLOT_PREFIX, OffloadConfig, OffloadPass, check_schedule,
                                   offloaded_device_bytes, transfer_schedule)
from memopt.planning.plan import LayerDecision, Plan
from memopt.runtime.offload_ops import PREFETCH, WAIT

OFFLOADED = ("model.model.layers.1", "model.model.layers.2", "model.model.layers.3")


@pytest.fixture(scope="module")
def demo(demo_source):
    from memopt.capture import capture

    captured = capture(demo_source, seq=32)
    gm = captured.module()
    with torch.no_grad():
        expected = gm(*captured.example_inputs)
    return captured, expected


def _block_bytes(gm, blocks) -> int:
    return sum(t.nbytes for name, t in gm.state_dict().items() if any(name.startswith(b + ".") for b in blocks))


def _slots(gm) -> list[torch.Tensor]:
    return [t for name, t in gm.named_buffers() if name.startswith(SLOT_PREFIX)]


@pytest.mark.parametrize("blocks, depth, n_slots", [
    (("layers.[1-3]",), 1, 2),
    (("model.layers.1", "model.layers.2", "model.layers.3"), 2, 3),
    (("model.model.layers.[123]",), 5, 3),  # never more slots than blocks
])
def test_offload_keeps_outputs_and_validates(demo, blocks, depth, n_slots):
    captured, expected = demo
    gm = captured.module()
    original_bytes, offloaded = offloaded_device_bytes(gm), _block_bytes(gm, OFFLOADED)
    result = OffloadPass(OffloadConfig(blocks=blocks, prefetch_depth=depth))(gm, None)
    assert result.modified and result.notes[0].startswith("offloaded 3 blocks")
    assert sorted(gm.meta["memopt_offload"]["blocks"]) == list(OFFLOADED)
    with torch.no_grad():
        for _ in range(2):  # the slots are reused across calls
            torch.testing.assert_close(gm(*captured.example_inputs), expected, rtol=0, atol=0)
    schedule = transfer_schedule(gm)
    check_schedule(schedule)
    assert [t.block for t in schedule] == list(OFFLOADED)
    assert len({t.slot for t in schedule}) == len(_slots(gm)) == n_slots
    assert [t.slot for t in schedule] == [j % n_slots for j in range(3)]
    staging = sum(s.nbytes for s in _slots(gm))
    assert offloaded_device_bytes(gm) == original_bytes - offloaded + staging
    if n_slots < 3:
        assert staging < offloaded
    host = sum(t.nbytes for name, t in gm.named_buffers() if name.startswith(HOST_PREFIX))
    assert host >= offloaded and sum(t.bytes for t in schedule) == host
    # no graph read of an offloaded weight is left; every block is read through its slot
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.startswith(OFFLOADED)]


def test_prefetch_is_one_block_ahead(demo):
    """The transfer into a slot is issued at the start of the block before its user, after the slot's
    previous block was last read."""
    captured, _ = demo
    gm = captured.module()
    OffloadPass(OffloadConfig(blocks=("layers.[1-3]",)))(gm, None)
    s = transfer_schedule(gm)
    assert s[0].issue_op == "embedding"  # the first block is issued at the graph's start
    assert s[1].issue_op == s[0].wait_op and s[2].issue_op == s[1].wait_op  # next block issued as one starts
    assert s[0].last_use_index < s[2].issue_index < s[1].wait_index  # same slot, after its last read
    assert all(t.issue_index < t.wait_index <= t.first_use_index <= t.last_use_index for t in s)


def _valid_schedule(demo):
    captured, _ = demo
    gm = captured.module()
    OffloadPass(OffloadConfig(blocks=("layers.[1-3]",)))(gm, None)
    return transfer_schedule(gm)


@pytest.mark.parametrize("index, change, message", [
    (2, {"issue_index": 200}, "slot 0 is overwritten by model.model.layers.3"),
    (1, {"first_use_index": 100}, "model.model.layers.2 is not resident before its first use"),
    (1, {"wait_index": -1}, "not resident"),
    (1, {"slot": 2}, "prefetch_depth 1 allows slots 0..1"),
    (0, {"bytes": 10**9}, "needs 1000000000 bytes"),
])
def test_check_schedule_rejects(demo, index, change, message):
    schedule = _valid_schedule(demo)
    schedule[index] = dataclasses.replace(schedule[index], **change)
    with pytest.raises(ValueError, match=message):
        check_schedule(schedule)


@pytest.mark.parametrize("make, bad", [
    (lambda: OffloadConfig(prefetch_depth=0), "0"),
    (lambda: OffloadConfig(prefetch_depth=1.5), "1.5"),
    (lambda: OffloadConfig(blocks="layers.1"), "'layers.1'"),
    (lambda: OffloadConfig(blocks=("",)), "''"),
    (lambda: OffloadConfig(pin_memory="yes"), "'yes'"),
    (lambda: OffloadConfig.from_json({"type": "offload", "version": 1, "depth": 2}), "depth"),
])
def test_bad_config_is_one_line_error(make, bad):
    with pytest.raises(ValueError) as err:
        make()
    assert bad in str(err.value) and "\n" not in str(err.value)


def test_unknown_block_is_one_line_error(demo):
    captured, _ = demo
    with pytest.raises(ValueError, match=r"'layers\.9' matches no block") as err:
        OffloadPass(OffloadConfig(blocks=("layers.9",)))(captured.module(), None)
    assert "\n" not in str(err.value)


def test_config_round_trips_through_json():
    config = OffloadConfig(blocks=("layers.1", "model.layers.[23]"), prefetch_depth=2, pin_memory=False)
    assert OffloadConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


def test_rewritten_graph_reexports(demo):
    captured, expected = demo
    gm = captured.module()
    OffloadPass(OffloadConfig(blocks=("layers.[1-3]",)))(gm, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(gm, captured.example_inputs, strict=False)
    targets = [n.target for n in ep.graph.nodes]
    assert targets.count(PREFETCH) == 3 and targets.count(WAIT) == 3
    reloaded = ep.module()
    check_schedule(transfer_schedule(reloaded))  # the schedule is read back from the re-exported graph
    assert offloaded_device_bytes(reloaded) == offloaded_device_bytes(gm)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*captured.example_inputs), expected, rtol=0, atol=0)


def test_plan_host_placement_selects_the_same_blocks(demo):
    captured, expected = demo
    plan = Plan(decisions=(LayerDecision("model.layers.2", placement="host"),
                           LayerDecision("model.layers.1", placement="device")))
    by_plan, by_config = captured.module(), captured.module()
    OffloadPass()(by_plan, plan)
    OffloadPass(OffloadConfig(blocks=("model.layers.2",)))(by_config, None)
    assert list(by_plan.meta["memopt_offload"]["blocks"]) == list(by_config.meta["memopt_offload"]["blocks"]) \
        == ["model.model.layers.2"]
    assert offloaded_device_bytes(by_plan) == offloaded_device_bytes(by_config)
    with torch.no_grad():
        torch.testing.assert_close(by_plan(*captured.example_inputs), expected, rtol=0, atol=0)


def test_nothing_selected_and_applied_twice(demo):
    captured, _ = demo
    gm = captured.module()
    assert not OffloadPass()(gm, Plan()).modified
    OffloadPass(OffloadConfig(blocks=("layers.1",)))(gm, None)
    with pytest.raises(ValueError, match="already offloaded"):
        OffloadPass(OffloadConfig(blocks=("layers.2",)))(gm, None)


def test_offload_after_int8_quantization(demo):
    """Packed int8 values and their scales (mixed dtypes) share one host buffer per block."""
    from memopt.passes.quant_config import Int8WeightConfig
    from memopt.passes.quantize import QuantizePass

    captured, _ = demo
    gm = captured.module()
    QuantizePass(Int8WeightConfig())(gm, None)
    with torch.no_grad():
        expected = gm(*captured.example_inputs)
    OffloadPass(OffloadConfig(blocks=("layers.[1-3]",)))(gm, None)
    check_schedule(transfer_schedule(gm))
    with torch.no_grad():
        torch.testing.assert_close(gm(*captured.example_inputs), expected, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_from_pinned_host():
    """Weights on the GPU, offloaded to pinned host memory; copies on a side stream overlap compute."""
    from memopt.capture import capture
    from memopt.frontend.sources import resolve_source

    src = resolve_source("demo")
    src.model.to("cuda")
    captured = capture(src, seq=32)
    gm = captured.module()
    inputs = [captured.example_inputs] + [(torch.randint(3, 1000, (1, 32), device="cuda"),) for _ in range(3)]
    with torch.no_grad():
        expected = [gm(*x) for x in inputs]
    OffloadPass(OffloadConfig(blocks=("layers.[1-3]",)))(gm, None)
    hosts = [t for name, t in gm.named_buffers() if name.startswith(HOST_PREFIX)]
    assert hosts and all(t.device.type == "cpu" and t.is_pinned() for t in hosts)
    assert all(t.device.type == "cuda" for t in _slots(gm))
    check_schedule(transfer_schedule(gm))
    with torch.no_grad():
        for _ in range(3):
            for x, want in zip(inputs, expected):
                # same weights bit for bit; only the kernels' choice for a different alignment may differ
                torch.testing.assert_close(gm(*x), want, rtol=1e-4, atol=1e-5)
    torch.cuda.synchronize()
