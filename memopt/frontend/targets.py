"""Target devices: memory, bandwidth, peak FLOP/s per dtype, host-link bandwidth and the links between devices.

Built-in specs live in `data/targets.json`; `custom:mem=24GiB,bw=1TB/s,bf16=165T,host=32GB/s`
describes any other device. Several devices (`parse_cluster`): `4xh100-80gb`, `2x(rtx-4090)`,
`1x(rtx-4090)+1x(rtx-3090)` describe one node; `nodes=M` repeats it M times. Two devices in one node talk
over their `interconnect` (NVLink, else PCIe), two nodes over the `network` (InfiniBand, Ethernet).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from memopt.frontend.units import fmt_rate, parse_bytes, parse_rate

MAX_DEVICES = 4096
_COUNT = re.compile(r"^\s*(\d+)\s*[x×*]\s*(.*)$", re.S)


@dataclass(frozen=True)
class Target:
    name: str
    memory_bytes: int
    bandwidth: float  # device memory bytes/s
    flops: dict = field(default_factory=dict)  # dtype -> dense peak FLOP/s
    host_link: float = 0.0  # host<->device bytes/s per direction
    description: str = ""
    interconnect: str = ""  # link to a device of the same kind in the same node (a name in `link_names()`)
    network: str = ""  # default link between nodes

    def flops_for(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` ('bf16', 'fp16', 'fp32', 'int8', ...), falling back to fp32."""
        dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
        return float(self.flops.get(dtype) or self.flops.get("fp32") or max(self.flops.values()))

    def to_json(self) -> dict:
        return {"name": self.name, "memory_bytes": self.memory_bytes, "bandwidth": self.bandwidth,
                "flops": dict(self.flops), "host_link": self.host_link, "description": self.description,
                "interconnect": self.interconnect, "network": self.network}


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


_CUSTOM_FIELDS = {"mem", "bw", "host", "name", "fp32", "tf32", "bf16", "fp16", "fp8", "int8", "flops", "link", "net"}


def parse_custom(spec: str) -> Target:
    """`custom:mem=24GiB,bw=1TB/s,bf16=165T,fp32=80T,host=32GB/s[,name=my-gpu][,link=nvlink4][,net=ib-ndr400]`;
    mem and bw required; link (between two such devices in a node) defaults to PCIe at the host rate."""
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
    for key in ("link", "net"):
        if key in fields:
            get_link(fields[key], what=f"custom target field {key}")
    return Target(fields.get("name", "custom"), mem, bw, flops, host, spec, fields.get("link", ""),
                  fields.get("net", "eth-100g"))


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
        m = _COUNT.match(str(name))
        if m and int(m.group(1)) == 1 and "+" not in key:  # 1xNAME, 1x(NAME): one device
            return get_target(m.group(2).strip().removeprefix("(").removesuffix(")"))
        if m or "+" in key:
            raise ValueError(f"target {name!r} names several devices; this needs one (several devices are planned "
                             "by `memopt compile --plan-only` and memopt.planning.split.plan_split)")
        raise ValueError(
            f"unknown target {name!r}; choose one of {', '.join(target_names())} "
            "or describe one as custom:mem=24GiB,bw=1TB/s,bf16=165T"
        )
    d = table["targets"][key]
    mem = d["memory_bytes"] or _host_memory_bytes()
    return Target(key, int(mem), float(d["bandwidth"]), dict(d["flops"]), float(d["host_link"]), d["description"],
                  d.get("interconnect", ""), d.get("network", ""))


# ---------------------------------------------------------------- links and several devices
@dataclass(frozen=True)
class Link:
    """A link between two devices: `bandwidth` bytes/s per direction per device, `latency_s` the fixed cost
    of one message (alpha in the alpha-beta model). `kind`: nvlink, pcie or network."""

    name: str
    kind: str
    bandwidth: float
    latency_s: float
    description: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "bandwidth": self.bandwidth, "latency_s": self.latency_s,
                "description": self.description}


def link_names() -> list[str]:
    return list(_table()["links"])


def get_link(name: str | Link, *, what: str = "link") -> Link:
    """A link from `data/targets.json` by name (nvlink4, pcie4, ib-ndr400, eth-100g, ...)."""
    if isinstance(name, Link):
        return name
    key = str(name).strip().lower()
    d = _table()["links"].get(key)
    if d is None:
        raise ValueError(f"{what} {name!r} is unknown; choose one of {', '.join(link_names())}")
    return Link(key, d["kind"], float(d["bandwidth"]), float(d["latency_s"]), d["description"])


def _pcie_link(t: Target) -> Link:
    """The PCIe path of a device: its interconnect when that is PCIe, else PCIe at its host-link rate (an NVLink
    device next to a device of another kind)."""
    if t.interconnect and get_link(t.interconnect).kind == "pcie":
        return get_link(t.interconnect)
    pcie = get_link("pcie4")
    return Link(f"pcie@{fmt_rate(t.host_link)}", "pcie", t.host_link, pcie.latency_s,
                f"PCIe peer-to-peer at {t.name}'s host-link rate")


def _slowest(links: list[Link]) -> Link:
    return min(links, key=lambda k: (k.bandwidth, -k.latency_s))


@dataclass(frozen=True)
class Cluster:
    """Devices in node-major order (`devices[n * per_node + i]` is device i of node n); two devices of one
    node talk over `intra_link`, two nodes over `network` (None: one node)."""

    devices: tuple[Target, ...]
    nodes: int = 1
    intra_link: Link | None = None
    network: Link | None = None
    spec: str = ""

    @property
    def per_node(self) -> int:
        return len(self.devices) // self.nodes

    @property
    def node_spec(self) -> str:
        """One node as a spec: `4xh100-80gb`, `1xrtx-4090+1xrtx-3090`."""
        runs: list[list] = []
        for t in self.devices[:self.per_node]:
            if runs and runs[-1][1] == t.name:
                runs[-1][0] += 1
            else:
                runs.append([1, t.name])
        return "+".join(f"{n}x{name}" for n, name in runs)

    @property
    def name(self) -> str:
        return self.node_spec if self.nodes == 1 else f"{self.nodes} nodes x {self.node_spec}"

    def node_of(self, device: int) -> int:
        return device // self.per_node

    def link(self, a: int, b: int) -> Link | None:
        """The link between devices `a` and `b` (None for a device with itself)."""
        if a == b:
            return None
        return self.intra_link if self.node_of(a) == self.node_of(b) else self.network

    def to_json(self) -> dict:
        return {"name": self.name, "nodes": self.nodes, "devices_per_node": self.per_node,
                "devices": [t.name for t in self.devices],
                "intra_link": self.intra_link.to_json() if self.intra_link else None,
                "network": self.network.to_json() if self.network else None}


def _terms(spec: str) -> list[str]:
    """Split `spec` on '+' outside parentheses."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            break
        if ch == "+" and depth == 0:
            terms.append(spec[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"target {spec!r} has unbalanced parentheses; write e.g. 2x(rtx-4090)+1x(rtx-3090)")
    return terms + [spec[start:]]


def _term(spec: str, term: str) -> tuple[int | None, Target]:
    m = _COUNT.match(term)
    count, body = (int(m.group(1)), m.group(2).strip()) if m else (None, term.strip())
    if body.startswith("(") and body.endswith(")"):
        body = body[1:-1].strip()
    elif "(" in body or ")" in body:
        raise ValueError(f"target {spec!r}: cannot read {term.strip()!r}; write COUNTxDEVICE or COUNTx(DEVICE), "
                         "e.g. 2xh100-80gb or 2x(rtx-4090)")
    if not body:
        raise ValueError(f"target {spec!r}: {term.strip()!r} names no device; write e.g. 2xh100-80gb or 2x(rtx-4090)")
    if count == 0:
        raise ValueError(f"target {spec!r} asks for 0 devices of {body}; a device count must be at least 1")
    if _COUNT.match(body) or "+" in body:
        raise ValueError(f"target {spec!r}: {body!r} is not one device; write e.g. 2xh100-80gb+2xa100-80gb")
    return count, get_target(body)


def parse_cluster(spec: str | Target | Cluster, *, devices: int | None = None, nodes: int | None = None,
                  network: str | Link | None = None) -> Cluster:
    """Several devices from `4xh100-80gb`, `2x(rtx-4090)`, `1x(rtx-4090)+1x(rtx-3090)` or a device name
    with `devices=N`: one node's devices; `nodes=M` repeats that node M times (default 1). `network`
    overrides the devices' default link between nodes. A plain device name is a one-device cluster."""
    if isinstance(spec, Cluster):
        if devices is None and nodes is None and network is None:
            return spec
        spec = spec.node_spec
    text = spec.name if isinstance(spec, Target) else str(spec).strip()
    if not text:
        raise ValueError("target is empty; write a device name (see memopt targets) or e.g. 2xh100-80gb")
    terms = [(1, spec)] if isinstance(spec, Target) else [_term(text, t) for t in _terms(text)]
    if devices is not None:
        if not isinstance(devices, int) or devices < 1:
            raise ValueError(f"devices must be an int >= 1, got {devices!r}; pass e.g. --devices 2")
        if len(terms) > 1:
            raise ValueError(f"--devices {devices} needs one kind of device, but target {text!r} lists "
                             f"{len(terms)}; drop --devices or write the counts in the target")
        if terms[0][0] not in (None, 1, devices) or (terms[0][0] == 1 and _COUNT.match(text)):
            raise ValueError(f"--devices {devices} contradicts target {text!r}; give the count once")
        terms = [(devices, terms[0][1])]
    if nodes is not None and (not isinstance(nodes, int) or nodes < 1):
        raise ValueError(f"nodes must be an int >= 1, got {nodes!r}; pass e.g. --nodes 2")
    nodes = nodes or 1
    node = tuple(t for count, t in terms for _ in range(count or 1))
    if len(node) * nodes > MAX_DEVICES:
        raise ValueError(f"target {text!r} x {nodes} node(s) asks for {len(node) * nodes} devices; "
                         f"at most {MAX_DEVICES} are planned")
    kinds = {t.name: t for t in node}
    if len(kinds) == 1 and node[0].interconnect:
        intra = get_link(node[0].interconnect)
    else:  # devices of different kinds share no NVLink: the slowest PCIe path binds
        intra = _slowest([_pcie_link(t) for t in kinds.values()])
    net = None
    if nodes > 1:
        net = get_link(network, what="network") if network is not None else _slowest(
            [get_link(t.network or "eth-100g") for t in kinds.values()])
    elif network is not None:
        get_link(network, what="network")
    return Cluster(node * nodes, nodes, intra if len(node) * nodes > 1 else None, net, text)
