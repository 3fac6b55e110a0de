import pytest

from memopt.frontend.targets import get_target, target_names
from memopt.frontend.units import parse_bytes, parse_rate

REQUIRED = ["h100-80gb", "h200", "a100-40gb", "a100-80gb", "l4", "t4", "rtx-3090", "rtx-4090", "cpu"]


@pytest.mark.parametrize("name", REQUIRED)
def test_builtin_targets_are_complete(name):
    assert name in target_names()
    t = get_target(name)
    assert t.memory_bytes > 0 and t.bandwidth > 0 and t.host_link > 0
    assert t.flops_for("bf16") > 0 and t.flops_for("fp32") > 0


def test_names_and_aliases_are_case_insensitive():
    assert get_target("RTX-4090").name == "rtx-4090"
    assert get_target("4090").memory_bytes == 24 * 2**30


def test_custom_target():
    t = get_target("custom:mem=24GiB,bw=1TB/s,bf16=165T,host=32GB/s,name=mygpu")
    assert (t.name, t.memory_bytes, t.bandwidth, t.flops_for("bf16"), t.host_link) == (
        "mygpu", 24 * 2**30, 1e12, 165e12, 32e9)


@pytest.mark.parametrize("spec, field", [
    ("custom:mem=24GiB", "'bw'"),
    ("custom:mem=lots,bw=1TB/s", "mem"),
    ("custom:mem=24GiB,bw=1TB/s,colour=red", "'colour'"),
    ("custom:mem=24GiB,bw=fast", "bw"),
    ("h300", "unknown target 'h300'"),
])
def test_bad_target_names_the_field(spec, field):
    with pytest.raises(ValueError, match=None) as info:
        get_target(spec)
    assert field in str(info.value)


@pytest.mark.parametrize("text, value", [("24GiB", 24 * 2**30), ("1.5GB", 1_500_000_000), ("512", 512),
                                         ("2 MiB", 2 * 2**20)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_parse_rate():
    assert parse_rate("1TB/s") == 1e12 and parse_rate("900GB/s") == 900e9 and parse_rate("3.35e12") == 3.35e12
    with pytest.raises(ValueError, match="'x1'"):
        parse_bytes("x1")
