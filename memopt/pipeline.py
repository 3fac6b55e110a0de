"""Run the stages: capture -> plan -> rewrite passes -> analyze -> arena -> plan -> check -> emit.

A program is exported when captured and once more after its rewrite passes (`Program`): the passes hand
the GraphModule to each other, and the program is exported again only where an exported form is read (the
forward program's analysis, the emitted programs).

`memopt.compile(model, example_inputs, target=..., passes=...)` is the one-call Python API; the CLI's
`memopt compile` calls the same function. Decoder LMs get a second program beside the forward one:
a generation program (static KV cache as buffers, a dynamic number of new tokens) that
`OptimizedModule.generate` and `memopt run --prompt` use.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from memopt.analysis.accounting import Analysis, analyze
from memopt.capture import Captured, CaptureError, capture, export_again
from memopt.lift import adopt
from memopt.frontend.checks import check_source, generation_cache_tokens
from memopt.config import KNOWN_PASSES, CompileConfig, resolve_passes  # noqa: F401  (KNOWN_PASSES: re-exported)
from memopt.emit.module import OptimizedModule
from memopt.names import HOST_PREFIX, OFFLOAD_PREFIX, SLOT_PREFIX, is_kv, is_offload
from memopt.planning.plan import LayerDecision, Plan
from memopt.frontend.sources import ModelSource, resolve_source
from memopt.frontend.targets import get_target


@dataclass
class CompileResult:
    module: OptimizedModule
    plan: Plan
    source: ModelSource
    captured: Captured  # the forward program after weight passes (what program.pt2 stores)
    analysis: Analysis  # ... and its analysis
    before: Analysis  # the original model's analysis
    generation: Captured | None = None  # decoder LMs: the generation program after weight passes
    notes: list[str] = field(default_factory=list)
    config: CompileConfig | None = None  # what was asked

    @property
    def programs(self) -> dict:
        out = {"program": self.captured.exported}
        if self.generation is not None:
            out["generate"] = self.generation.exported
        return out


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


class Program:
    """One program while the passes rewrite it: its last export and the GraphModule the passes have
    rewritten since. Passes read and rewrite `module()`; `captured` lifts (or exports) the rewritten module
    again, once, when an exported form is needed, and keeps that module as the program's module when it is the
    program's graph node for node (`memopt.lift.adopt`). `meta` is the capture's metadata (source, inputs,
    shapes), which rewriting does not change."""

    def __init__(self, captured: Captured):
        self.meta = captured
        self._captured, self._gm, self.rewritten = captured, None, False

    def module(self) -> torch.fx.GraphModule:
        if self._gm is None:
            self._gm = self._captured.module()
        return self._gm

    def update(self, gm: torch.fx.GraphModule) -> None:
        self._gm, self.rewritten = gm, True

    @property
    def captured(self) -> Captured:
        if self.rewritten:
            gm, self._captured, self.rewritten = self._gm, _recapture(self._gm, self._captured), False
            self._gm = gm if adopt(gm, self._captured.exported) else None  # what its module() would be
        return self._captured


def _recapture(gm: torch.fx.GraphModule, captured: Captured) -> Captured:
    """A rewritten GraphModule as a program again (lifted back, or exported), so the analysis sees its real tensors
    and new ops."""
    import memopt.runtime  # noqa: F401  (the custom ops' fake kernels)

    ep = export_again(gm, captured.example_inputs, captured.example_kwargs, captured.dynamic_shapes, captured.exported)
    return Captured(ep, captured.phase, captured.source, captured.example_inputs, captured.example_kwargs,
                    captured.batch, captured.seq, captured.cache_len, captured.dynamic, captured.notes,
                    captured.dynamic_shapes)


def _weight_passes(program: Program, quantize: str | None, skip: Sequence[str], say,
                   decisions: dict | None = None, reuse: torch.fx.GraphModule | None = None,
                   calibration: Any = None) -> tuple[list[str], dict, torch.fx.GraphModule]:
    """Quantize with one format (`quantize`) or per layer (`decisions`: block name -> format). `reuse`: a
    program already quantized from the same weights, whose tensors are taken instead of quantizing again.
    `calibration`: see `_calibration_inputs`."""
    from memopt.passes.quantize import QuantizePass, parse_quantize_spec, weight_sites

    captured, gm = program.meta, program.module()
    calib = None
    if reuse is None and any(needs_calibration(f) for f in ([quantize] if decisions is None
                                                               else set(decisions.values()))):
        if captured.example_kwargs:
            raise ValueError(f"--quantize {quantize} calibrates on example inputs, which the {captured.phase} "
                             "program does not take; compile the forward program with it first")
        calib, calib_note = _calibration_inputs(captured, calibration)
        say(calib_note)
    if decisions is None:
        config, plan = parse_quantize_spec(quantize), None
        say(f"quantizing weights ({quantize}) of the {captured.phase} program")
    else:
        config = None
        sites, _ = weight_sites(gm)
        names = _tied_names(gm)
        per_layer = {s.layer: _format_for_any([s.layer, *names.get(s.target, ())], decisions) for s in sites}
        plan = Plan(decisions=tuple(LayerDecision(name, weight_format=fmt) for name, fmt in per_layer.items()))
        say(f"quantizing weights per the budget plan ({len(per_layer)} weights) of the {captured.phase} program")
    result = QuantizePass(config, skip=tuple(skip), calibration_inputs=calib, reuse=reuse)(gm, plan)
    record = dict(result.gm.meta.get("memopt_weights", {}))
    if calib is not None:
        calib_notes = [calib_note]
    elif calibration is not None and reuse is None:
        calib_notes = [f"calibration not used: {quantize or 'the budget plan'}'s formats do not calibrate "
                       "(only int4 with :gptq or :oF does)"]
    else:
        calib_notes = []
    notes = calib_notes + list(result.notes)
    program.update(result.gm)
    return notes, record, result.gm


def _int4_how(fmt: str, how) -> str:
    """A budget plan's format, with int4 layers quantized the way `how` (the parsed `--quantize`) says
    (`--budget` with `--quantize int4:gptq:had`: the plan picks which layers are int4 and their group size,
    `how` picks GPTQ / the rotation, which change no byte the plan priced)."""
    from memopt.passes.quant_config import Int4WeightConfig, parse_quantize_spec

    if how is None or not fmt.startswith("int4"):
        return fmt
    planned = parse_quantize_spec(fmt)
    return Int4WeightConfig(group_size=planned.group_size, outlier_fraction=planned.outlier_fraction,
                            method=how.method, hadamard=how.hadamard).spec


def _check_budget_quantize(quantize: str | None) -> None:
    from memopt.passes.quant_config import Int4WeightConfig, parse_quantize_spec

    if quantize is None:
        return
    cfg = parse_quantize_spec(quantize)
    if not isinstance(cfg, Int4WeightConfig) or cfg.outlier_fraction:
        raise ValueError(f"with a budget the plan picks each layer's format; --quantize {quantize} can only say how "
                         "its int4 layers are quantized (int4:gptq, int4:had, int4:gptq:had), without outliers")


def needs_calibration(spec: str | None) -> bool:
    from memopt.passes.quant_config import parse_quantize_spec
    from memopt.passes.weight_sites import KEEP_FORMATS

    if spec in KEEP_FORMATS or not spec:
        return False
    return bool(getattr(parse_quantize_spec(spec), "needs_calibration", False))


def _calibration_inputs(captured: Captured, calibration: Any) -> tuple[list, str]:
    """What GPTQ and the outlier choice calibrate on, and a note saying so. `calibration`: args tuples for
    the program; texts (a list of strings, or the path of a text file with one sample per line) run
    through the source's tokenizer; or None: the bundled calibration text when the source has a
    tokenizer, else the example inputs (random token ids for a source without one)."""
    from memopt.frontend.calibration import (
        CalibrationSet,
        default_texts,
        read_texts,
        text_calibration,
    )

    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(c, (list, tuple))
                                                                      for c in calibration):
        given = calibration if isinstance(calibration, CalibrationSet) else list(calibration)  # keeps its masks
        return given, f"calibrated on {len(calibration)} given input(s)"
    if isinstance(calibration, (str, Path)):
        texts, what = read_texts(calibration), f"{str(calibration)!r}"
    elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(c, str) for c in calibration):
        texts, what = list(calibration), "the given texts"
    elif calibration is None:
        texts, what = None, "memopt's bundled calibration text"
    else:
        raise ValueError(f"calibration must be a text file path, a list of texts or a list of args tuples, got "
                         f"{type(calibration).__name__}")
    src = captured.source
    if src.tokenizer is None or src.family not in ("encoder", "causal_lm") or src.fixed_inputs is not None:
        if texts is not None:
            raise ValueError(f"calibration text needs a model with a tokenizer; {src.name} has none: pass "
                             "calibration as a list of args tuples for the model")
        return [captured.example_inputs], (f"calibrated on the example inputs only ({src.name} has no tokenizer; "
                                           "pass calibration inputs for better int4 quality)")
    calib = text_calibration(src.tokenizer, texts or default_texts(), family=src.family, batch=captured.batch,
                             seq=None if captured.dynamic else (captured.seq or None), device=src.device)
    tokens = sum(int(m.sum()) if m is not None else args[0].numel() for args, m in zip(calib, calib.masks))
    return calib, f"calibrated on {what}: {len(calib)} input(s), {tokens} tokens"


def _reorder(captured: Captured, analysis: Analysis, time_limit_s: float, say) -> tuple[Captured, Analysis, list[str]]:
    """Reorder ops for a lower activation peak when the schedule solver finds one (validated as a
    topological order of the FX graph), then re-capture so the arena is planned on the new order."""
    from memopt.passes.reorder import reorder_graph
    from memopt.solvers.schedule import solve_schedule

    graph = analysis.to_memgraph()
    result = solve_schedule(graph, kinds=("activation",), time_limit_s=min(time_limit_s, 5.0))
    if result.peak_bytes >= result.original_peak_bytes:
        return captured, analysis, ["operator order kept: the schedule solver found no lower peak "
                                    f"({result.solver.status})"]
    gm = captured.module()
    reorder_graph(gm, [graph.ops[i].name for i in result.order])
    new = _recapture(gm, captured)
    new_analysis = analyze(new)
    if new_analysis.activation_lower_bound_bytes >= analysis.activation_lower_bound_bytes:
        return captured, analysis, ["operator order kept: the reordered graph did not lower the peak"]
    say(f"reordered ops: activation peak {analysis.activation_lower_bound_bytes} -> "
        f"{new_analysis.activation_lower_bound_bytes} bytes")
    return new, new_analysis, [f"reordered ops ({result.solver.name}): activation lower bound "
                               f"{analysis.activation_lower_bound_bytes} -> "
                               f"{new_analysis.activation_lower_bound_bytes} bytes"]


def _compress_kv(gen: Program, spec: str | None, plan) -> tuple[dict | None, list[str]]:
    """KV-cache compression of the generation program, by one policy (`spec`, e.g. "kivi:4") or per
    layer from a budget plan's `kv_policy` decisions."""
    from memopt.kv.policy import parse_kv_spec
    from memopt.passes.kv import KVCompressionPass

    if spec is None:
        decisions = [d for d in plan.decisions if d.kv_policy not in ("", "full", None)]
        if not decisions:
            return None, []
        plan = Plan(decisions=tuple(decisions))
    gm = gen.module()
    result = KVCompressionPass(parse_kv_spec(spec) if spec else None)(gm, plan if spec is None else None)
    meta = gm.meta["memopt_kv"]
    gen.update(result.gm)
    return meta, result.notes


def _apply(program: Program, pass_obj, plan) -> list[str]:
    result = pass_obj(program.module(), plan)
    if result.modified:
        program.update(result.gm)
    return list(result.notes)


def _tied_names(gm: torch.fx.GraphModule) -> dict[str, list[str]]:
    """Weight FQN -> the layers of every other name bound to the same tensor (a tied LM head reads the
    embedding table under the head's name)."""
    by_ptr: dict[int, list[str]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if t.numel():
            by_ptr.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    return {n: [m.rsplit(".", 1)[0] for m in group if m != n] for group in by_ptr.values() for n in group}


def _format_for_any(layers: list[str], decisions: dict) -> str:
    """The first layer name the budget plan decided on (a weight may be known under tied names)."""
    for layer in layers:
        fmt = _format_for(layer, decisions, default=None)
        if fmt is not None:
            return fmt
    return "native"


def _format_for(layer: str, decisions: dict, default: str | None = "native") -> str | None:
    """The budget plan's format for a weight: the longest decision name that is a dotted part of it."""
    dotted = f".{layer}."
    best = max((name for name in decisions if f".{name}." in dotted), key=len, default=None)
    if best is None:
        return default
    fmt = decisions[best]
    return "native" if fmt in ("bf16", "fp16", "native") else fmt


def _decisions(before: Captured, fwd: Captured, gen: Captured | None, weights: dict, kv_meta: dict | None,
               budget_names: Sequence[str] = ()) -> tuple[LayerDecision, ...]:
    """The Plan's rows, merged from what each pass did: the quantize record (each rewritten weight and its
    format), the offload records (blocks on host, in either program), the KV pass's per-layer policies and
    the KV offload record (caches on host), plus a row for every block a budget plan decided on. Blocks are
    named as in the programs (`model.model.layers.1`); rows come block by block in graph order."""
    from memopt.kv import kv_config_from_json
    from memopt.passes.host_stream import block_of
    from memopt.emit.plan_check import LAYER_INDEX, kv_policy_spec

    known = list(dict.fromkeys(block_of(n) for n in before.exported.state_dict))
    rows: dict[str, dict] = {layer: {"weight_format": r["format"], "bytes": r["bytes"]} for layer, r in weights.items()}
    host: dict[str, dict] = {}
    for c in (fwd, gen):
        if c is not None:
            host.update(c.exported.graph_module.meta.get("memopt_offload", {}).get("blocks", {}))
    by_index = {int(m.group(1)): b for b in known if (m := LAYER_INDEX.search(b))}
    if kv_meta is not None:
        policy = kv_config_from_json(kv_meta["policy"])
        for i in kv_meta["layers"]:
            layer_policy = policy.for_layer(int(i)) if hasattr(policy, "for_layer") else policy
            rows.setdefault(by_index[int(i)], {})["kv_policy"] = kv_policy_spec(layer_policy)
    for u in (gen.exported.graph_module.meta.get("memopt_kv_offload", {}) if gen else {}).get("layers", {}).values():
        rows.setdefault(u["block"], {})["kv_placement"] = "host"
    state = {n: t for n, t in fwd.exported.state_dict.items() if not n.startswith("_memopt")}
    held = {block_of(n) for n in state} | {block_of(w["weight"]) for w in weights.values()}
    for b in [*host, *(b for name in budget_names for b in known if f".{b}".endswith(f".{name}") and b in held)]:
        rows.setdefault(b, {})  # a tied table the programs read under its other name (lm_head) has that row
    for name, r in rows.items():
        if name not in weights:  # a block: the one format of its quantized weights
            formats = {w["format"] for w in weights.values() if block_of(w["weight"]) == name}
            r["weight_format"] = formats.pop() if len(formats) == 1 else ("mixed" if formats else "native")
            r["bytes"] = host[name]["weight_bytes"] if name in host else sum(
                t.nbytes for n, t in state.items() if block_of(n) == name)
        if (block_of(weights[name]["weight"]) if name in weights else name) in host:
            r["placement"] = "host"
    rank = {b: i for i, b in enumerate(known)}
    key = lambda n: (rank.get(block_of(weights[n]["weight"]) if n in weights else n, len(rank)), n in weights)  # noqa: E731
    return tuple(LayerDecision(name, **rows[name]) for name in sorted(rows, key=key))


def _budget_divergence(decisions, budget_plan, formats: dict, *, kv_given: bool, generation: bool) -> list[str]:
    """Notes where the programs hold something other than the budget plan chose (a format a layer cannot
    take, a block that cannot move; the passes' notes say why). The Plan says what the programs hold."""
    rows = {d.name: d for d in decisions}
    notes = []
    for d in budget_plan.to_plan().decisions:
        name = d.name.split(" (")[0]
        want = {"weight_format": _format_for(name, formats), "placement": d.placement}
        if generation and not kv_given:
            want.update(kv_policy=d.kv_policy, kv_placement=d.kv_placement)
        for row in (r for n, r in rows.items() if f".{n}".endswith(f".{name}")):
            for field_name, value in want.items():
                if getattr(row, field_name) != value:
                    notes.append(f"{row.name}: the budget plan chose {field_name} {value!r}; the programs hold "
                                 f"{getattr(row, field_name)!r} (see the passes' notes)")
    return notes


@dataclass
class CompileState:
    """What the stages share while compiling one model: the config, the programs as they are rewritten,
    and the Plan's pieces. Each stage reads and writes only this."""

    config: CompileConfig
    src: ModelSource
    say: Any
    calibration: Any
    passes: list[str]
    target: Any = None
    fwd: Program | None = None  # the forward program
    gen: Program | None = None  # decoder LMs: the generation program
    before: Analysis | None = None
    analysis: Analysis | None = None
    plan: Plan | None = None
    budget_plan: Any = None
    budget_decisions: Plan | None = None  # the budget plan's rows as a Plan (what the passes read)
    formats: dict | None = None
    weights: dict = field(default_factory=dict)
    kv_meta: dict | None = None
    fits: dict | None = None  # a budget plan's promise and the bytes the programs hold (the "fits" stage)
    gm: torch.fx.GraphModule | None = None
    notes: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)

    def configure(self, name: str, value) -> None:
        self.plan = self.plan.with_(pass_configs={**self.plan.pass_configs, name: value})

    def add_pass(self, name: str) -> None:
        """A pass the budget plan asks for: placed by the rules, like one the user listed."""
        if name not in self.passes:
            self.passes[:] = resolve_passes(tuple(self.passes), (name,))
            self.plan = self.plan.with_(passes=tuple(self.passes))


def _stage_capture(st: CompileState) -> None:
    cfg, src = st.config, st.src
    st.say(f"capturing {src.name}")
    captured = capture(src, batch=cfg.batch, seq=cfg.seq)
    st.fwd = Program(captured)
    st.before = st.analysis = analyze(captured)
    if cfg.generation and src.family == "causal_lm":
        cache = generation_cache_tokens(src, max_cache=cfg.max_cache, seq=captured.seq, budget=cfg.budget)
        st.say(f"capturing the generation program (static KV cache of {cache} tokens)")
        # a prompt chunk or one token per call (memopt::kv_attend prefills a compressed cache from a prompt in
        # one call); a budget plan's program takes one token per call
        try:
            st.gen = Program(capture(src, phase="decode", batch=cfg.batch, cache_len=cache,
                                      dynamic=cfg.budget is None))
        except CaptureError as exc:
            if cfg.kv or cfg.offload_kv:  # asked for a KV rewrite: the generation program is the point
                raise
            st.notes.append(f"no generation program (the forward program is compiled without one): {exc}")
    st.plan = Plan(model=src.name, target=st.target.name, batch=captured.batch, seq=captured.seq,
                   passes=tuple(st.passes), inputs=input_specs(src, captured.example_inputs))


def _stage_budget(st: CompileState) -> None:
    """Solve the budget ILP; its formats, host blocks, host caches and KV bits become passes."""
    from memopt.planning.budget import plan_budget
    from memopt.passes.quant_config import parse_quantize_spec

    cfg = st.config
    st.say(f"planning formats for a budget of {cfg.budget} on {st.target.name}")
    st.budget_plan = plan_budget(st.src, target=st.target, budget_bytes=cfg.budget, batch=st.fwd.meta.batch,
                                 seq=st.fwd.meta.seq or None, objective=cfg.objective,
                                 max_quality_loss=cfg.max_quality_loss, kv_host=cfg.kv_host,
                                 captured=_captured_model(st))
    how = parse_quantize_spec(cfg.quantize) if cfg.quantize else None
    # a tied embedding is labelled "model.embed_tokens (tied lm_head)": the module name is the first word
    st.formats = {d["name"].split(" (")[0]: _int4_how(d["format"], how)
                  for d in st.budget_plan.to_json()["decisions"]}
    st.budget_decisions = st.budget_plan.to_plan()
    decisions = st.budget_decisions.decisions
    if any(f not in ("bf16", "native") for f in st.formats.values()):
        st.add_pass("quantize")
    if any(d.placement == "host" for d in decisions):
        st.add_pass("offload")
    if st.gen is not None and any(d.kv_placement == "host" for d in st.budget_plan.decisions):
        st.add_pass("kv_offload")
    if st.gen is not None:
        st.add_pass("kv")


def _captured_model(st: CompileState):
    """What the budget planner prices: the captured programs' tensors (memopt/planning/captured.py), the KV
    caches the plan's policies give and the arena the arena stage will plan."""
    from memopt.passes.arena import ArenaConfig
    from memopt.planning.budget import BudgetConfig
    from memopt.planning.captured import captured_model

    cfg, kv = st.config, BudgetConfig()
    arena = ArenaConfig(time_limit_s=cfg.time_limit_s, solver=cfg.arena_solver,
                        outputs_in_arena=cfg.outputs_in_arena) if "arena" in st.passes else None
    return captured_model(st.fwd.meta, st.gen.meta if st.gen is not None else None, st.before, arena=arena,
                          kv_policy=f"kivi:k{{bits}}v{{bits}}:g{kv.kv_group_size}:r{kv.kv_residual}")


def _stage_quantize(st: CompileState) -> None:
    cfg = st.config
    quantize = cfg.quantize or (None if cfg.budget is not None else "int8")  # the pass listed alone: int8
    qnotes, st.weights, quantized = _weight_passes(st.fwd, quantize, cfg.quantize_skip, st.say, st.formats,
                                                   calibration=st.calibration)
    st.notes += qnotes
    if st.gen is not None:  # takes the forward program's quantized tensors: quantized once, held once
        _weight_passes(st.gen, quantize, cfg.quantize_skip, st.say, st.formats, reuse=quantized)
        shared = _share_state(st.fwd.module(), st.gen.module())
        st.say(f"generation program shares {shared} weight tensors with the {st.fwd.meta.phase} program")
    st.configure("quantize", quantize or "budget plan")


def _stage_weights(st: CompileState) -> None:
    """A streamed source (memopt/frontend/weights.py): bind the weights no pass read, for the stages after (in the
    program's current form only: a rewritten program's first export is `st.before`'s, which must stay unread)."""
    from memopt.frontend.weights import materialize

    for program in (st.fwd, st.gen):
        if program is not None:
            materialize(program._gm, None if program.rewritten else program._captured.exported)


def _stage_offload(st: CompileState) -> None:
    from memopt.passes.offload import OffloadConfig, OffloadPass

    host_plan = st.budget_decisions
    config = OffloadConfig(blocks=st.config.offload) if st.config.offload else None
    if config is None and host_plan is None:
        raise ValueError("the offload pass needs blocks to offload: pass offload=[...] (--offload) or a --budget")
    st.say("offloading blocks to host memory")
    st.notes += _apply(st.fwd, OffloadPass(config), host_plan)
    if st.gen is not None:
        _apply(st.gen, OffloadPass(config), host_plan)
        _share_offload(st.fwd.module(), st.gen.module())
    st.configure("offload", config.to_json() if config else "budget plan")


def _stage_kv_offload(st: CompileState) -> None:
    from memopt.passes.kv_offload import KVOffloadConfig, KVOffloadPass

    if st.gen is None:
        raise ValueError("offload_kv needs a decoder LM's generation program; this model has none")
    kv_config = KVOffloadConfig(layers=st.config.offload_kv) if st.config.offload_kv else None
    host_plan = st.budget_decisions if kv_config is None else None
    st.say("offloading KV caches to host memory")
    st.notes += _apply(st.gen, KVOffloadPass(kv_config), host_plan)
    st.configure("kv_offload", kv_config.to_json() if kv_config else "budget plan")


def _stage_kv(st: CompileState) -> None:
    if st.gen is None:
        raise ValueError(f"--kv needs a decoder LM's generation program, which {st.src.name} does not have")
    spec = st.config.kv
    st.kv_meta, notes = _compress_kv(st.gen, spec, st.budget_decisions if not spec else None)
    st.notes += notes
    if st.kv_meta is not None:
        st.configure("kv", {"spec": spec or "budget plan", "meta": st.kv_meta})


def _stage_arena(st: CompileState) -> None:
    from memopt.passes.arena import ArenaConfig, ArenaPass, plan_arena

    cfg = st.config
    if cfg.reorder:
        captured, st.analysis, rnote = _reorder(st.fwd.captured, st.analysis, cfg.time_limit_s, st.say)
        st.notes += rnote
        if captured is not st.fwd.captured:
            st.fwd = Program(captured)
        st.gm = st.fwd.module()
    config = ArenaConfig(time_limit_s=cfg.time_limit_s, solver=cfg.arena_solver, outputs_in_arena=cfg.outputs_in_arena)
    st.say(f"planning the arena ({len(st.analysis.storages)} storages, solver {cfg.arena_solver})")
    t0 = time.perf_counter()
    arena = plan_arena(st.analysis, config)  # the tensors the pass writes into it; in-place pairs share offsets
    st.say(f"arena {arena.size_bytes} bytes (lower bound {arena.lower_bound_bytes}) in "
           f"{time.perf_counter() - t0:.2f} s")
    st.plan = st.plan.with_(arena=arena, order=tuple(st.analysis.op_names))
    st.configure("arena", config.to_json())
    result = ArenaPass(config)(st.gm, st.plan)
    st.gm, st.notes = result.gm, st.notes + result.notes


def _stage_analyze(st: CompileState) -> None:
    """The forward program after its rewrite passes, exported again and analysed once (the arena plans from it)."""
    if st.fwd.rewritten:
        st.analysis = analyze(st.fwd.captured)
    st.gm = st.fwd.module()


def _stage_plan(st: CompileState) -> None:
    """The Plan's rows and predictions, read from what the stages built."""
    bp = st.budget_plan
    budget_names = [d.name.split(" (")[0] for d in bp.decisions] if bp is not None else []
    gen = st.gen.captured if st.gen is not None else None
    decisions = _decisions(st.before.captured, st.fwd.captured, gen, st.weights, st.kv_meta, budget_names)
    if bp is not None:
        st.notes += _budget_divergence(decisions, bp, st.formats, kv_given=bool(st.config.kv),
                                       generation=st.gen is not None)
    st.plan = st.plan.with_(decisions=decisions, predictions={
        "weights_bytes_before": st.before.weights_bytes,
        "weights_bytes": _state_bytes(st.fwd.captured),
        "activation_lower_bound_bytes": st.analysis.activation_lower_bound_bytes,
        "activation_peak_bytes_before": st.before.activation_peak_bytes,
        "arena_bytes": st.plan.arena.size_bytes if st.plan.arena else None,
        "kv_cache_bytes": _kv_bytes(gen) if gen is not None else 0,
    })
    if bp is not None:
        b = bp.to_json()
        budget = {k: b[k] for k in ("fits", "budget_bytes", "predicted_peak_bytes", "predicted_decode_s_per_token",
                                    "solver")}
        st.plan = st.plan.with_(predictions={**st.plan.predictions, "budget": {**budget, **(st.fits or {})}})


def _stage_fits(st: CompileState) -> None:
    """A budget plan's promise, checked on the rewritten programs as they will be emitted: the bytes they hold
    on the device (weights, KV caches, arena, staging slots, other tensors; memopt/emit/fits.py) go into the
    Plan beside the prediction, and a model over its budget is an error naming the gap and its cause."""
    from memopt.emit.fits import check_fits, layer_names, measured_json, promise, resident_bytes

    promised = promise(st.budget_plan)
    held = resident_bytes({"program": st.gm, "generate": st.gen.captured.exported if st.gen is not None else None},
                          layer_names(promised))
    st.fits = {"promise": promised, "measured": measured_json(held, promised)}  # the plan stage records it
    check_fits(held, promised)


# The compile, as a list of stages: (name, function, whether it runs). Rewrite passes run when the resolved
# pass list holds them (see memopt.config.PASS_RULES for their order); the others always run.
STAGES = (
    ("capture", _stage_capture, lambda st: True),
    ("budget", _stage_budget, lambda st: st.config.budget is not None),
    ("quantize", _stage_quantize, lambda st: "quantize" in st.passes),
    ("weights", _stage_weights, lambda st: st.src.weights is not None),  # streamed sources: the rest is read here
    ("offload", _stage_offload, lambda st: "offload" in st.passes),
    ("kv_offload", _stage_kv_offload, lambda st: "kv_offload" in st.passes),
    ("kv", _stage_kv, lambda st: "kv" in st.passes),
    ("analyze", _stage_analyze, lambda st: True),
    ("arena", _stage_arena, lambda st: "arena" in st.passes),
    ("fits", _stage_fits, lambda st: st.budget_plan is not None),
    ("plan", _stage_plan, lambda st: True),
)


def compile_model(model: Any = None, example_inputs: Sequence | None = None, config: CompileConfig | None = None,
                  *, calibration: Any = None, verbose: bool = False, **options) -> CompileResult:
    """Capture `model`, run the stages and return the emitted module with its plan. `config` (or the same
    fields as keyword arguments: `target`, `passes`, `quantize`, `kv`, `budget`, ... see `CompileConfig`)
    says what to do. `calibration` (GPTQ and outlier formats): a text file path or a list of texts for a
    model with a tokenizer (default: the bundled calibration text), or a list of args tuples for the model
    (default: its example inputs)."""
    if config is None:
        texts = calibration if isinstance(calibration, (str, Path)) or (
            isinstance(calibration, (list, tuple)) and all(isinstance(c, str) for c in calibration)) else None
        config = CompileConfig.from_kwargs(**options, **({"calibration": texts} if texts else {}))
    elif options:
        raise TypeError(f"pass either config= or keyword options, not both (got {sorted(options)})")
    if config.budget is not None:
        _check_budget_quantize(config.quantize)
    say = (lambda m: print(f"memopt: {m}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    src, notes = source_for(model, example_inputs, config)
    check_source(src, batch=config.batch, seq=config.seq, max_cache=config.max_cache, budget=config.budget,
                 kv=config.kv, offload_kv=config.offload_kv, generation=config.generation, quantize=config.quantize,
                 calibration=calibration if calibration is not None else config.calibration)
    st = CompileState(config, src, say, calibration if calibration is not None else config.calibration,
                      list(config.passes), target=get_target(config.target), notes=notes)
    run_stages(st)
    return finish(st)


def run_stages(st: CompileState, *, skip: Sequence[str] = ()) -> None:
    """Run every stage of `STAGES` that applies to `st`, in order, except those named in `skip` (a caller that
    captured the programs itself skips "capture"; `memopt.emit.stages` compiles pipeline stages this way)."""
    for name, stage, runs in STAGES:
        if name not in skip and runs(st):
            stage(st)
            st.ran.append(name)


def finish(st: CompileState) -> CompileResult:
    """The emitted module after the stages: the generation program exported once more, the Plan checked
    against both programs (it says what they do), the result the caller gets."""
    from memopt.emit.plan_check import check_plan

    gen = st.gen.captured if st.gen is not None else None
    generator = st.gen.module() if gen is not None else None
    if generator is not None and st.kv_meta is not None:
        generator.meta["memopt_kv"] = st.kv_meta
    check_plan(st.plan, {"program": st.gm, "generate": generator})  # the plan says what the programs do
    module = OptimizedModule(st.gm, st.plan, {"notes": st.notes}, generator=generator, tokenizer=st.src.tokenizer)
    result = CompileResult(module, st.plan, st.src, st.fwd.captured, st.analysis, st.before, gen, st.notes, st.config)
    module.programs = result.programs  # what memopt.save writes
    return result


def source_for(model: Any, example_inputs: Sequence | None, config: CompileConfig) -> tuple[ModelSource, list]:
    """The model as a source with real weights; a float32 model under a budget is served in bfloat16, the
    16-bit dtype the budget planner prices."""
    # streamed weights (memopt/frontend/weights.py): a GGUF / safetensors source named by a string is read a tensor
    # at a time when no stage runs the loaded model (a budget plan, calibrating formats)
    stream = isinstance(model, str) and config.budget is None and not needs_calibration(config.quantize)
    src = resolve_source(model, dtype=config.dtype, stream=True) if stream else _as_source(model, example_inputs,
                                                                                            config.dtype)
    notes = []
    if config.budget is not None and src.dtype == torch.float32 and config.dtype is None:
        src = _to_bf16(src, copy=not (model is None or isinstance(model, str)))  # never cast the caller's model
        notes.append(f"{src.name}: cast from float32 to bfloat16, the 16-bit dtype the budget plan assumes")
    if src.on_meta:
        raise ValueError(f"{src.name} has no weights (built on the meta device); compile needs real weights — "
                         "use memopt inspect to plan it, or pass a model directory with safetensors")
    return src, notes


def _to_bf16(src: ModelSource, copy: bool = True) -> ModelSource:
    import copy as copying

    model = copying.deepcopy(src.model) if copy or src.fixed_inputs is not None else src.model
    model = model.to(torch.bfloat16)
    inputs = src.fixed_inputs
    if inputs is not None:
        inputs = tuple(a.to(torch.bfloat16) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                       for a in inputs)
    return ModelSource(src.name, model, src.family, src.config, src.on_meta, src.tokenizer, src.pooled, inputs,
                       src.weights_bytes_override, list(src.notes))


def _tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor `gm` holds by qualified name: parameters, buffers and plain tensor attributes (constants)."""
    out = dict(gm.named_parameters(remove_duplicate=False))
    out.update(gm.named_buffers(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in out:
            t = _get(gm, node.target)
            if isinstance(t, torch.Tensor):
                out[node.target] = t
    return out


def _get(gm: nn.Module, name: str):
    owner, _, leaf = name.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf, None)


def _bind(gm: nn.Module, name: str, t: torch.Tensor) -> None:
    """Make `gm`'s tensor `name` the very tensor `t` (a parameter stays a parameter)."""
    owner_name, _, leaf = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old = getattr(owner, leaf)
    if leaf in owner._parameters:
        owner._parameters[leaf] = t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), old.requires_grad)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = t.detach() if isinstance(t, nn.Parameter) else t
    else:
        setattr(owner, leaf, t.detach() if isinstance(t, nn.Parameter) else t)


def _state_tensors(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """The program's weights: tensors named after a module's weight or bias (`...weight`, `...weight_q`,
    `...weight_scale`, `...bias`), never state the graph updates (KV caches, their position counters,
    offload staging slots), which must stay private to one program even while it equals another's."""
    return {name: t for name, t in _tensors(gm).items()
            if (name.rsplit(".", 1)[-1].startswith("weight") or name.rsplit(".", 1)[-1] == "bias")
            and not is_kv(name) and not is_offload(name)}


def _share_state(src: torch.fx.GraphModule, dst: torch.fx.GraphModule) -> int:
    """Bind `dst`'s weights to `src`'s tensors of the same name where the two programs hold equal ones, so a
    decoder's forward and generation programs keep one copy of each weight in memory (a budget counts it
    once). Only same-named weights: equal tensors of different layers (e.g. norms still at their init) stay
    apart, as the offload pass needs each block's weights to be its own. Returns how many weight tensors the
    two programs then hold in common (re-bound here, or already the same tensors: quantized ones reused).
    Exporting a module again keeps its tensor objects, so the sharing holds in the emitted programs."""
    mine = _state_tensors(src)
    ptrs = {t.untyped_storage().data_ptr() for t in mine.values() if t.device.type != "meta"}
    shared = 0
    for name, t in _state_tensors(dst).items():
        same = mine.get(name)
        if same is t or (t.device.type != "meta" and t.untyped_storage().data_ptr() in ptrs):
            shared += 1
            continue
        if same is None or same.shape != t.shape or same.dtype != t.dtype or same.device != t.device \
                or not torch.equal(same, t):
            continue
        # the very tensor object, not a view of it: runtime ops may tag a buffer (the CPU int4 kernel
        # rewrites its layout in place and marks the tensor), and both programs must see that mark
        _bind(dst, name, same)
        shared += 1
    return shared


def _share_offload(src: torch.fx.GraphModule, dst: torch.fx.GraphModule) -> None:
    """One set of offload buffers for both programs of a decoder: the host copy of each block (read-only,
    equal in both) and the device staging slots (scratch each program fills before every read; the two
    programs never run at once), so the device holds the plan's prefetch buffers once, not twice."""
    theirs = {n: t for n, t in _tensors(src).items() if n.startswith(OFFLOAD_PREFIX)}
    for name, t in _tensors(dst).items():
        other = theirs.get(name)
        if other is None or other is t or other.shape != t.shape or other.dtype != t.dtype or other.device != t.device:
            continue
        if name.startswith(SLOT_PREFIX) or torch.equal(other, t):
            _bind(dst, name, other)


def input_specs(src: ModelSource, args: tuple) -> tuple:
    specs = []
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            continue
        role = "mask" if src.family == "encoder" and i == 1 else ("ids" if not a.dtype.is_floating_point else "values")
        specs.append({"shape": list(a.shape), "dtype": str(a.dtype).replace("torch.", ""), "role": role,
                      "high": src.vocab_size if role == "ids" else None})
    return tuple(specs)


def _state_bytes(captured: Captured) -> int:
    """Device bytes of the program's parameters and non-cache buffers (quantized weights as stored;
    offloaded blocks count only through their staging slots)."""
    seen, total = set(), 0
    for name, t in captured.exported.state_dict.items():
        if is_kv(name) or HOST_PREFIX in name or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _kv_bytes(captured: Captured) -> int:
    ep = captured.exported
    tensors = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if _is_kv(n))


_is_kv = is_kv


def compile(model: Any = None, example_inputs: Sequence | None = None, **kwargs) -> OptimizedModule:  # noqa: A001
    """`opt = memopt.compile(model, example_inputs, target="rtx-4090")`: a callable module with `.plan`."""
    return compile_model(model, example_inputs, **kwargs).module
