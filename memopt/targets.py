"""Target devices: memory, bandwidth, peak FLOP/s per dtype and host-link bandwidth.

Built-in specs live in `data/targets.json`; `custom:mem=24GiB,bw=1TB/s,bf16=165T,host=32GB/s`
describes any other device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from memopt.units import parse_bytes, parse_rate


@dataclass(frozen=True)
class Target:
    name: str
    memory_bytes: int
    bandwidth: float  # device memory bytes/s
    flops: dict = field(default_factory=dict)  # dtype -> dense peak FLOP/s
    host_link: float = 0.0  # host<->device bytes/s per direction
    description: str = ""

    def flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` ('bf16', 'fp16', 'fp32', 'int8', ...), falling back to fp32."""
        dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
        return float(self.flops.get(dtype) or self.flops.get("fp32") or max(self.flops.values()))

    def to_json(self) -> dict:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "bandwidth": self.bandwidth,
                "flops": dict(self.flops), "host_link": self.host_link, "description": self.description}


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(resources.files("memopt").joinpath("data/targets.json").read_text())


def target_names() -> list[str]:
    return list(_table()["targets"])


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * 2**30


_CUSTOM_FIELDS = {"mem", "bw", "host", "name", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "flops"}


def parse_custom(spec: str) -> Target:
    """`custom:mem=24GiB,bw=1TB/s,bf16=165T,fp32=80T,host=32GB/s[,name=my-gpu]`; mem and bw required."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise ValueError(f"custom target field {part!r} is not key=value; write e.g. custom:mem=24GiB,bw=1TB/s")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in _CUSTOM_FIELDS:
            raise ValueError(f"custom target field {key!r} is unknown; accepted: {', '.join(sorted(_CUSTOM_FIELDS))}")
        fields[key] = value
    for required in ("mem", "bw"):
        if required not in fields:
            raise ValueError(f"custom target needs field {required!r}; write e.g. custom:mem=24GiB,bw=1TB/s,bf16=165T")
    flops = {}
    for key in ("fp32", "tf32", "bf16", "fp16", "fp8", "int8"):
        if key in fields:
            flops[key] = _positive_rate(fields, key, "FLOP/s")
    if "flops" in fields:
        flops.setdefault("fp32", _positive_rate(fields, "flops", "FLOP/s"))
    if not flops:
        flops = {"fp32": 1e13, "bf16": 1e14, "fp16": 1e14}
    mem = parse_bytes(fields["mem"], what="custom target field mem")
    if mem <= 0:
        raise ValueError(f"custom target field mem must be positive, got {fields['mem']!r}; write e.g. mem=24GiB")
    bw = _positive_rate(fields, "bw", "B/s")
    host = parse_rate(fields.get("host", "16GB/s"), what="custom target field host")
    return Target(fields.get("name", "custom"), mem, bw, flops, host, spec)


def _positive_rate(fields: dict, key: str, unit: str) -> float:
    rate = parse_rate(fields[key], what=f"custom target field {key}", unit=unit)
    if rate <= 0:
        raise ValueError(f"custom target field {key} must be a positive rate, got {fields[key]!r}; "
                         f"write e.g. {key}={'1TB/s' if unit == 'B/s' else '165T'}")
    return rate


def get_target(name: str) -> Target:
    """A built-in target by name (case-insensitive, aliases accepted) or a `custom:` spec."""
    if isinstance(name, Target):
        return name
    key = str(name).strip().lower()
    if key.startswith("custom"):
        return parse_custom(str(name))
    table = _table()
    key = table["aliases"].get(key, key)
    if key not in table["targets"]:
        raise ValueError(
            f"unknown target {name!r}; choose one of {', '.join(target_names())} "
            "or describe one as custom:mem=24GiB,bw=1TB/s,bf16=165T"
        )
    d = table["targets"][key]
    mem = d["memory_bytes"] or _host_memory_bytes()
    return Target(key, int(mem), float(d["bandwidth"]), dict(d["flops"]), float(d["host_link"]), d["description"])
