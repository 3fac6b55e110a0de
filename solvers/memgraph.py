"""MemGraph: the plain-data view of a captured graph that every solver consumes.

Solvers never import torch. `memopt.analysis.accounting.lower_to_memgraph` builds a MemGraph from an
exported FX graph; tests and benchmarks may also build one by hand.

Conventions
- Ops are numbered 0..len(ops)-1 in the graph's execution order.
- A tensor's lifetime is the closed interval [start, end] of op indices during which its storage
  must exist: `start` is the op that writes it (-1 for graph inputs, weights and buffers, which
  exist before the first op), `end` the last op that reads it or any view of it
  (len(ops) for graph outputs, which outlive the graph).
- Views share storage with their base and are folded into the base tensor's lifetime; they do
  not appear as tensors of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("weight", "buffer", "kv_cache", "activation", "input", "output")


@dataclass(frozen=True)
class MemTensor:
    """One storage: `size_bytes` bytes live over ops [start, end] (closed interval)."""

    name: str
    size_bytes: int
    kind: str
    start: int
    end: int
    dtype: str = ""
    shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"tensor {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.size_bytes < 0:
            raise ValueError(f"tensor {self.name!r}: size_bytes must be >= 0, got {self.size_bytes}")
        if self.end < self.start:
            raise ValueError(f"tensor {self.name!r}: end {self.end} < start {self.start}")

    def overlaps(self, other: "MemTensor") -> bool:
        """True when the two lifetimes share at least one op."""
        return self.start <= other.end and other.start <= self.end


@dataclass(frozen=True)
class MemOp:
    """One operator: reads `inputs`, writes `outputs` (tensor names). `block` names the repeated
    module it belongs to (e.g. ``model.layers.3``) or is empty; identical blocks may share a plan."""

    name: str
    target: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    block: str = ""


@dataclass(frozen=True)
class MemGraph:
    ops: tuple[MemOp, ...]
    tensors: tuple[MemTensor, ...]
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError("MemGraph tensor names must be unique")

    def tensor(self, name: str) -> MemTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def of_kind(self, *kinds: str) -> list[MemTensor]:
        return [t for t in self.tensors if t.kind in kinds]

    def live_bytes(self, kinds: tuple[str, ...] = ("activation", "output")) -> list[int]:
        """Bytes of `kinds` live at each op (index i covers tensors with start <= i <= end)."""
        n = len(self.ops)
        delta = [0] * (n + 2)
        for t in self.tensors:
            if t.kind not in kinds:
                continue
            lo, hi = max(t.start, 0), min(t.end, n - 1)
            if lo > hi:
                continue
            delta[lo] += t.size_bytes
            delta[hi + 1] -= t.size_bytes
        out, acc = [], 0
        for i in range(n):
            acc += delta[i]
            out.append(acc)
        return out

    def lower_bound_bytes(self, kinds: tuple[str, ...] = ("activation", "output")) -> int:
        """The live-set lower bound: no arena for this op order can be smaller."""
        return max(self.live_bytes(kinds), default=0)

    def to_json(self) -> dict:
        return {
            "ops": [[o.name, o.target, list(o.inputs), list(o.outputs), o.block] for o in self.ops],
            "tensors": [[t.name, t.size_bytes, t.kind, t.start, t.end, t.dtype, list(t.shape)] for t in self.tensors],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict) -> "MemGraph":
        ops = tuple(MemOp(n, tg, tuple(i), tuple(o), b) for n, tg, i, o, b in d["ops"])
        tensors = tuple(MemTensor(n, s, k, a, e, dt, tuple(sh)) for n, s, k, a, e, dt, sh in d["tensors"])
        return cls(ops, tensors, dict(d.get("meta", {})))
