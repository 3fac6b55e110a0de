"""Plan: plain, frozen, JSON-serializable decisions. Solvers write it; passes read it.

Torch-free on purpose: `memopt.solvers` builds these without importing torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# 2: KIVI 4-bit key stores packed along a block's tokens (the C kernel's layout), typed arena config,
# pipeline stages, measured budget bytes. Artifacts of version 1 are refused with "recompile".
PLAN_SCHEMA_VERSION = 2


@dataclass(frozen=True)
class SolverReport:
    """How a solver ended. `gap` is (result - bound) / bound against the best proven bound."""

    name: str
    status: str
    time_s: float
    gap: float
    objective: float = 0.0
    baseline_objective: float = 0.0
    notes: str = ""


@dataclass(frozen=True)
class ArenaPlan:
    """Offsets of every planned tensor inside one arena of `size_bytes` bytes."""

    size_bytes: int
    offsets: dict[str, int]
    sizes: dict[str, int]
    alignment: int
    lower_bound_bytes: int
    greedy_size_bytes: int
    solver: SolverReport


@dataclass(frozen=True)
class LayerDecision:
    """What was decided for one weight or one block, as the emitted programs carry it.

    `name` is a weight's layer (`model.model.layers.0.self_attn.q_proj`: a weight the quantize pass
    rewrote) or a block (`model.model.layers.0`: offloaded, a decoder layer's KV cache, or a budget plan's
    decision), or both (`model.lm_head`). A block's `weight_format` is the one format of its quantized
    weights ("native" when none is, "mixed" when they differ: their own rows say which). A weight or block
    without a row is native, on the device, with a full KV cache on the device. `kv_policy` is the full
    `parse_kv_spec` string (`kivi:k4v2:g32:r128`, `streaming:4:28`, `full`). `memopt.emit.plan_check.verify_plan`
    reads the programs back against these rows."""

    name: str
    weight_format: str = "native"  # native | int8 | int8:dyn | int4:g64[:gptq][:had][:oF] | lossless | mixed
    placement: str = "device"  # device | host
    kv_policy: str = "full"
    bytes: int = 0
    kv_placement: str = "device"  # device | host (the KV cache streamed one layer ahead)


@dataclass(frozen=True)
class Plan:
    model: str = ""
    target: str = ""
    batch: int = 1
    seq: int = 0
    decisions: tuple[LayerDecision, ...] = ()
    arena: ArenaPlan | None = None
    order: tuple[str, ...] | None = None
    predictions: dict = field(default_factory=dict)
    passes: tuple[str, ...] = ()
    pass_configs: dict = field(default_factory=dict)
    inputs: tuple = ()  # example input specs: {"shape", "dtype", "role", "high"} per forward input
    version: int = PLAN_SCHEMA_VERSION
    # pipeline stages (memopt.emit.stages): per stage {"stage", "layers": [first, last), "embed", "head", ...}
    stages: tuple = ()

    def with_(self, **changes) -> "Plan":
        return replace(self, **changes)

    def to_json(self) -> dict:
        d = asdict(self)
        d["decisions"] = [asdict(x) for x in self.decisions]
        d["order"] = list(self.order) if self.order is not None else None
        d["passes"] = list(self.passes)
        d["inputs"] = [dict(x) for x in self.inputs]
        d["stages"] = [dict(x) for x in self.stages]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Plan":
        version = d.get("version")
        if version != PLAN_SCHEMA_VERSION:
            raise ValueError(
                f"plan schema version {version!r} is not supported (this memopt reads version "
                f"{PLAN_SCHEMA_VERSION}); recompile the model with this memopt"
            )
        arena = d.get("arena")
        if arena is not None:
            arena = ArenaPlan(**{**arena, "solver": SolverReport(**arena["solver"])})
        return cls(
            model=d.get("model", ""),
            target=d.get("target", ""),
            batch=d.get("batch", 1),
            seq=d.get("seq", 0),
            decisions=tuple(LayerDecision(**x) for x in d.get("decisions", [])),
            arena=arena,
            order=tuple(d["order"]) if d.get("order") is not None else None,
            predictions=dict(d.get("predictions", {})),
            passes=tuple(d.get("passes", ())),
            pass_configs=dict(d.get("pass_configs", {})),
            inputs=tuple(d.get("inputs", ())),
            version=version,
            stages=tuple(dict(x) for x in d.get("stages", ())),
        )
