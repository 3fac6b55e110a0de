"""`CompileConfig`: everything `memopt compile` and `memopt.compile_model` are asked to do, as one frozen,
validated, JSON-round-tripping value. The CLI parses flags into it, the Python API builds it from keyword
arguments, and the compile stages read only it.

Passes are data: `PASS_RULES` says which passes must run before which (when both run), and
`resolve_passes` turns what the user listed plus what the options imply into one valid order, or one
clear error. Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

CONFIG_VERSION = 1
# forward/generation rewrite passes, each with the passes that must run before it when both run
PASS_RULES: dict[str, tuple[str, ...]] = {
    "quantize": (),
    "offload": ("quantize",),  # offload moves the final (quantized) weights
    "kv_offload": ("quantize", "offload"),
    "kv": ("kv_offload",),  # compression leaves the offloaded 16-bit layers alone
    "arena": ("quantize", "offload", "kv_offload", "kv"),  # plans the final graph
}
KNOWN_PASSES = tuple(PASS_RULES)


def resolve_passes(listed: tuple[str, ...], implied: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The passes to run, in an order that keeps every rule: `listed` (the user's order, checked against
    `PASS_RULES`) plus `implied` ones (from options such as --quantize), each placed at its earliest valid
    position."""
    for p in (*listed, *implied):
        if p not in PASS_RULES:
            raise ValueError(f"unknown pass {p!r}; choose from {', '.join(KNOWN_PASSES)}")
    for i, p in enumerate(listed):
        for later in listed[i + 1:]:
            if p in PASS_RULES[later] or p == later:
                continue
            if later in PASS_RULES[p]:
                what = "the arena pass plans the final graph: list it last" if p == "arena" else (
                    f"{later} must run before {p}: list {later} before {p}")
                raise ValueError(what)
    order = list(dict.fromkeys(listed))
    for p in implied:
        if p in order:
            continue
        after = max((order.index(q) for q in PASS_RULES[p] if q in order), default=-1)
        order.insert(after + 1, p)  # right after its last prerequisite: before every pass that needs it
    return tuple(order)


@dataclass(frozen=True)
class CompileConfig:
    """What to compile for. Sizes in tokens, `budget` a byte count or text like "20GiB", `time_limit_s` in
    seconds. `calibration`: a text file path or texts (args-tuple calibration inputs, which are not JSON, are
    passed to `compile_model` beside the config)."""

    target: str = "h100-80gb"
    passes: tuple[str, ...] = ("arena",)
    batch: int = 1
    seq: int | None = None
    dtype: str | None = None
    quantize: str | None = None
    quantize_skip: tuple[str, ...] = ()
    calibration: str | tuple[str, ...] | None = None
    arena_solver: str = "cbc"
    time_limit_s: float = 10.0
    outputs_in_arena: bool = False
    reorder: bool = False
    generation: bool = True
    max_cache: int | None = None
    kv: str | None = None
    offload: tuple[str, ...] = ()
    offload_kv: tuple[int | str, ...] = ()
    budget: str | int | None = None
    objective: str = "latency"
    max_quality_loss: float | None = None
    kv_host: bool = False

    def __post_init__(self):
        for name in ("passes", "quantize_skip", "offload", "offload_kv"):
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        if isinstance(self.calibration, Path):
            object.__setattr__(self, "calibration", str(self.calibration))
        elif isinstance(self.calibration, list):
            object.__setattr__(self, "calibration", tuple(self.calibration))
        if self.dtype is not None and not isinstance(self.dtype, str):
            object.__setattr__(self, "dtype", str(self.dtype).replace("torch.", ""))
        if not isinstance(self.target, str) or not self.target:
            raise ValueError(f"target must be a device name or custom:..., got {self.target!r}; see memopt targets")
        object.__setattr__(self, "passes", resolve_passes(self.passes, self.implied_passes()))
        from memopt.frontend.checks import check_specs

        check_specs(batch=self.batch, seq=self.seq, max_cache=self.max_cache, time_limit_s=self.time_limit_s,
                    arena_solver=self.arena_solver, quantize=self.quantize, kv=self.kv, offload=self.offload,
                    offload_kv=self.offload_kv, calibration=self.calibration, budget=self.budget,
                    objective=self.objective, max_quality_loss=self.max_quality_loss)

    def implied_passes(self) -> tuple[str, ...]:
        """Passes the options ask for without naming them (a budget plan may add more once solved)."""
        return tuple(p for p, on in (("quantize", bool(self.quantize)), ("offload", bool(self.offload)),
                                     ("kv_offload", bool(self.offload_kv)), ("kv", bool(self.kv))) if on)

    def with_(self, **changes) -> "CompileConfig":
        return replace(self, **changes)

    def to_json(self) -> dict:
        d = asdict(self)
        for name in ("passes", "quantize_skip", "offload", "offload_kv"):
            d[name] = list(d[name])
        if isinstance(d["calibration"], tuple):
            d["calibration"] = list(d["calibration"])
        return {"type": "compile", "version": CONFIG_VERSION, **d}

    @classmethod
    def from_json(cls, d: dict) -> "CompileConfig":
        from memopt.jsonconfig import config_from_json

        return config_from_json(cls, d, "compile", CONFIG_VERSION)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "CompileConfig":
        """The config from `compile_model`'s keyword arguments, naming any it does not know."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"compile_model() got unknown argument(s) {unknown}; accepted: {sorted(names)}")
        return cls(**kwargs)
