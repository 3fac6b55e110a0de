"""Run the passes: capture -> (weight passes) -> re-capture -> analyze -> plan the arena -> emit.

`memopt.compile(model, example_inputs, target=..., passes=...)` is the one-call Python API; the CLI's
`memopt compile` calls the same function.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from memopt.analysis import Analysis, analyze
from memopt.capture import Captured, capture
from memopt.plan import Plan
from memopt.sources import ModelSource, resolve_source
from memopt.targets import get_target

KNOWN_PASSES = ("quantize", "arena")


class OptimizedModule(nn.Module):
    """The emitted model: an ordinary `nn.Module`, callable like the original, with `.plan`."""

    def __init__(self, gm: torch.fx.GraphModule, plan: Plan, report: dict | None = None):
        super().__init__()
        self.gm = gm
        self.plan = plan
        self.report = report or {}

    def forward(self, *args, **kwargs):
        with torch.no_grad():  # an inference artifact; out= ops refuse autograd
            return self.gm(*args, **kwargs)


@dataclass
class CompileResult:
    module: OptimizedModule
    plan: Plan
    source: ModelSource
    captured: Captured
    analysis: Analysis
    notes: list[str] = field(default_factory=list)


def _as_source(model: Any, example_inputs: Sequence | None, dtype) -> ModelSource:
    if isinstance(model, ModelSource):
        return model
    if model is None or isinstance(model, str):
        return resolve_source(model, dtype=dtype)
    if isinstance(model, nn.Module):
        if example_inputs is None:
            raise ValueError("compiling an nn.Module needs example_inputs, e.g. memopt.compile(model, (x,))")
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        return ModelSource(type(model).__name__, model.eval(), "module", fixed_inputs=inputs)
    raise ValueError(f"model must be a source string, an nn.Module or a ModelSource, got {type(model).__name__}")


def _recapture(gm: torch.fx.GraphModule, captured: Captured) -> Captured:
    """Export a rewritten GraphModule again, so the analysis sees its real tensors and new ops."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(gm, captured.example_inputs, captured.example_kwargs, strict=False)
    return Captured(ep, captured.phase, captured.source, captured.example_inputs, captured.example_kwargs,
                    captured.batch, captured.seq, captured.cache_len, False, captured.notes)


def compile_model(model: Any = None, example_inputs: Sequence | None = None, *, target: str = "h100-80gb",
                  passes: Sequence[str] = ("arena",), batch: int = 1, seq: int | None = None,
                  quantize: str | None = None, quantize_skip: Sequence[str] = (), arena_solver: str = "cbc",
                  time_limit_s: float = 10.0, outputs_in_arena: bool = False, dtype=None,
                  verbose: bool = False) -> CompileResult:
    """Capture `model`, run `passes` in order and return the emitted module with its plan."""
    from memopt.passes.arena import ArenaConfig, ArenaPass
    from memopt.solvers.arena import greedy_arena, solve_arena

    passes = list(passes)
    if quantize and "quantize" not in passes:
        passes.insert(0, "quantize")
    for p in passes:
        if p not in KNOWN_PASSES:
            raise ValueError(f"unknown pass {p!r}; choose from {', '.join(KNOWN_PASSES)}")
    if "arena" in passes and passes[-1] != "arena":
        raise ValueError("the arena pass plans the final graph: list it last")
    tgt = get_target(target)
    say = (lambda m: print(f"memopt: {m}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    src = _as_source(model, example_inputs, dtype)
    say(f"capturing {src.name}")
    captured = capture(src, batch=batch, seq=seq)
    plan = Plan(model=src.name, target=tgt.name, batch=captured.batch, seq=captured.seq, passes=tuple(passes))
    gm = captured.module()
    notes: list[str] = []
    if "quantize" in passes:
        from memopt.passes.quantize import QuantizePass, parse_quantize_spec

        config = parse_quantize_spec(quantize or "int8")
        say(f"quantizing weights ({quantize or 'int8'})")
        result = QuantizePass(config, skip=tuple(quantize_skip))(gm, plan)
        gm, notes = result.gm, notes + result.notes
        plan = plan.with_(pass_configs={**plan.pass_configs, "quantize": quantize or "int8"})
        captured = _recapture(gm, captured)
        gm = captured.module()
    analysis = analyze(captured)
    if "arena" in passes:
        config = ArenaConfig(time_limit_s=time_limit_s, solver=arena_solver, outputs_in_arena=outputs_in_arena)
        kinds = ("activation", "output") if outputs_in_arena else ("activation",)
        say(f"planning the arena ({len(analysis.storages)} storages, solver {arena_solver})")
        t0 = time.perf_counter()
        graph = analysis.to_memgraph()
        if config.solver == "greedy":
            arena = greedy_arena(graph, kinds=kinds, alignment=config.alignment)
        else:
            arena = solve_arena(graph, kinds=kinds, alignment=config.alignment,
                                time_limit_s=config.time_limit_s, solver=config.solver)
        say(f"arena {arena.size_bytes} bytes (lower bound {arena.lower_bound_bytes}) in {time.perf_counter() - t0:.2f} s")
        plan = plan.with_(arena=arena, pass_configs={**plan.pass_configs, "arena": config.to_json()})
        result = ArenaPass(config)(gm, plan)
        gm, notes = result.gm, notes + result.notes
    plan = plan.with_(predictions={
        "weights_bytes": analysis.weights_bytes,
        "activation_lower_bound_bytes": analysis.activation_lower_bound_bytes,
        "arena_bytes": plan.arena.size_bytes if plan.arena else None,
    })
    module = OptimizedModule(gm, plan, {"notes": notes})
    return CompileResult(module, plan, src, captured, analysis, notes)


def compile(model: Any = None, example_inputs: Sequence | None = None, **kwargs) -> OptimizedModule:  # noqa: A001
    """`opt = memopt.compile(model, example_inputs, target="rtx-4090")`: a callable module with `.plan`."""
    return compile_model(model, example_inputs, **kwargs).module
