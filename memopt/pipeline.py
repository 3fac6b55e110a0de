"""Run the passes: capture -> weight passes -> re-capture -> analyze -> plan the arena -> emit.

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


def _recapture(gm: torch.fx.GraphModule, captured: Captured) -> Captured:
    """Export a rewritten GraphModule again, so the analysis sees its real tensors and new ops."""
    import memopt.runtime  # noqa: F401  (the custom ops' fake kernels)

    ep = export_again(gm, captured.example_inputs, captured.example_kwargs, captured.dynamic_shapes)
    return Captured(ep, captured.phase, captured.source, captured.example_inputs, captured.example_kwargs,
                    captured.batch, captured.seq, captured.cache_len, captured.dynamic, captured.notes,
                    captured.dynamic_shapes)


def _weight_passes(captured: Captured, quantize: str | None, skip: Sequence[str], say,
                   decisions: dict | None = None, reuse: torch.fx.GraphModule | None = None,
                   calibration: Any = None) -> tuple[Captured, list[str], dict, torch.fx.GraphModule]:
    """Quantize with one format (`quantize`) or per layer (`decisions`: block name -> format). `reuse`: a
    program already quantized from the same weights, whose tensors are taken instead of quantizing again.
    `calibration`: see `_calibration_inputs`."""
    from memopt.passes.quantize import QuantizePass, parse_quantize_spec, weight_sites

    gm = captured.module()
    calib = None
    if reuse is None and any(_needs_calibration(f) for f in ([quantize] if decisions is None
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
    return _recapture(result.gm, captured), notes, record, result.gm


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


def _needs_calibration(spec: str | None) -> bool:
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
        return captured, analysis, [f"operator order kept: the schedule solver found no lower peak ({result.solver.status})"]
    gm = captured.module()
    reorder_graph(gm, [graph.ops[i].name for i in result.order])
    new = _recapture(gm, captured)
    new_analysis = analyze(new)
    if new_analysis.activation_lower_bound_bytes >= analysis.activation_lower_bound_bytes:
        return captured, analysis, ["operator order kept: the reordered graph did not lower the peak"]
    say(f"reordered ops: activation peak {analysis.activation_lower_bound_bytes} -> "
        f"{new_analysis.activation_lower_bound_bytes} bytes")
    return new, new_analysis, [f"reordered ops ({result.solver.name}): activation lower bound "
                               f"{analysis.activation_lower_bound_bytes} -> {new_analysis.activation_lower_bound_bytes} bytes"]


def _compress_kv(gen: Captured, spec: str | None, plan) -> tuple[Captured, dict | None, list[str]]:
    """KV-cache compression of the generation program, by one policy (`spec`, e.g. "kivi:4") or per
    layer from a budget plan's `kv_policy` decisions."""
    from memopt.kv.policy import parse_kv_spec
    from memopt.passes.kv import KVCompressionPass

    if spec is None:
        decisions = [d for d in plan.decisions if d.kv_policy not in ("", "full", None)]
        if not decisions:
            return gen, None, []
        plan = Plan(decisions=tuple(decisions))
    gm = gen.module()
    result = KVCompressionPass(parse_kv_spec(spec) if spec else None)(gm, plan if spec is None else None)
    meta = gm.meta["memopt_kv"]
    return _recapture(result.gm, gen), meta, result.notes


def _apply(captured: Captured, pass_obj, plan) -> tuple[Captured, list[str]]:
    gm = captured.module()
    result = pass_obj(gm, plan)
    return (_recapture(result.gm, captured) if result.modified else captured), result.notes


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
    from memopt.passes.offload import block_of
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
class _State:
    """What the stages share while compiling one model: the config, the programs as they are rewritten,
    and the Plan's pieces. Each stage reads and writes only this."""

    config: CompileConfig
    src: ModelSource
    say: Any
    calibration: Any
    passes: list[str]
    target: Any = None
    captured: Captured | None = None
    before: Analysis | None = None
    analysis: Analysis | None = None
    gen: Captured | None = None
    plan: Plan | None = None
    budget_plan: Any = None
    formats: dict | None = None
    weights: dict = field(default_factory=dict)
    kv_meta: dict | None = None
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


def _stage_capture(st: _State) -> None:
    cfg, src = st.config, st.src
    st.say(f"capturing {src.name}")
    st.captured = capture(src, batch=cfg.batch, seq=cfg.seq)
    st.before = st.analysis = analyze(st.captured)
    if cfg.generation and src.family == "causal_lm":
        cache = generation_cache_tokens(src, max_cache=cfg.max_cache, seq=st.captured.seq, budget=cfg.budget)
        st.say(f"capturing the generation program (static KV cache of {cache} tokens)")
        # a prompt chunk or one token per call (memopt::kv_attend prefills a compressed cache from a prompt in
        # one call); a budget plan's program takes one token per call
        try:
            st.gen = capture(src, phase="decode", batch=cfg.batch, cache_len=cache, dynamic=cfg.budget is None)
        except CaptureError as exc:
            if cfg.kv or cfg.offload_kv:  # asked for a KV rewrite: the generation program is the point
                raise
            st.notes.append(f"no generation program (the forward program is compiled without one): {exc}")
    st.plan = Plan(model=src.name, target=st.target.name, batch=st.captured.batch, seq=st.captured.seq,
                   passes=tuple(st.passes), inputs=_input_specs(src, st.captured.example_inputs))


def _stage_budget(st: _State) -> None:
    """Solve the budget ILP; its formats, host blocks, host caches and KV bits become passes."""
    from memopt.planning.budget import plan_budget
    from memopt.passes.quant_config import parse_quantize_spec

    cfg = st.config
    st.say(f"planning formats for a budget of {cfg.budget} on {st.target.name}")
    st.budget_plan = plan_budget(st.src, target=st.target, budget_bytes=cfg.budget, batch=st.captured.batch,
                                 seq=st.captured.seq or None, objective=cfg.objective,
                                 max_quality_loss=cfg.max_quality_loss, kv_host=cfg.kv_host)
    how = parse_quantize_spec(cfg.quantize) if cfg.quantize else None
    # a tied embedding is labelled "model.embed_tokens (tied lm_head)": the module name is the first word
    st.formats = {d["name"].split(" (")[0]: _int4_how(d["format"], how)
                  for d in st.budget_plan.to_json()["decisions"]}
    decisions = st.budget_plan.to_plan().decisions
    if any(f not in ("bf16", "native") for f in st.formats.values()):
        st.add_pass("quantize")
    if any(d.placement == "host" for d in decisions):
        st.add_pass("offload")
    if st.gen is not None and any(d.kv_placement == "host" for d in st.budget_plan.decisions):
        st.add_pass("kv_offload")
    if st.gen is not None:
        st.add_pass("kv")


def _stage_quantize(st: _State) -> None:
    cfg = st.config
    quantize = cfg.quantize or (None if cfg.budget is not None else "int8")  # the pass listed alone: int8
    st.captured, qnotes, st.weights, quantized = _weight_passes(st.captured, quantize, cfg.quantize_skip, st.say,
                                                                st.formats, calibration=st.calibration)
    st.notes += qnotes
    if st.gen is not None:  # takes the forward program's quantized tensors: quantized once, held once
        st.gen, _, _, _ = _weight_passes(st.gen, quantize, cfg.quantize_skip, st.say, st.formats, reuse=quantized)
        shared = _share_state(st.captured, st.gen)
        st.say(f"generation program shares {shared} weight tensors with the {st.captured.phase} program")
    st.configure("quantize", quantize or "budget plan")


def _stage_offload(st: _State) -> None:
    from memopt.passes.offload import OffloadConfig, OffloadPass

    host_plan = st.budget_plan.to_plan() if st.budget_plan is not None else None
    config = OffloadConfig(blocks=st.config.offload) if st.config.offload else None
    if config is None and host_plan is None:
        raise ValueError("the offload pass needs blocks to offload: pass offload=[...] (--offload) or a --budget")
    st.say("offloading blocks to host memory")
    st.captured, onotes = _apply(st.captured, OffloadPass(config), host_plan)
    st.notes += onotes
    if st.gen is not None:
        st.gen, _ = _apply(st.gen, OffloadPass(config), host_plan)
        _share_offload(st.captured, st.gen)
    st.configure("offload", config.to_json() if config else "budget plan")


def _stage_kv_offload(st: _State) -> None:
    from memopt.passes.kv_offload import KVOffloadConfig, KVOffloadPass

    if st.gen is None:
        raise ValueError("offload_kv needs a decoder LM's generation program; this model has none")
    kv_config = KVOffloadConfig(layers=st.config.offload_kv) if st.config.offload_kv else None
    host_plan = st.budget_plan.to_plan() if kv_config is None and st.budget_plan is not None else None
    st.say("offloading KV caches to host memory")
    st.gen, notes = _apply(st.gen, KVOffloadPass(kv_config), host_plan)
    st.notes += notes
    st.configure("kv_offload", kv_config.to_json() if kv_config else "budget plan")


def _stage_kv(st: _State) -> None:
    if st.gen is None:
        raise ValueError(f"--kv needs a decoder LM's generation program, which {st.src.name} does not have")
    spec = st.config.kv
    st.gen, st.kv_meta, notes = _compress_kv(st.gen, spec, st.budget_plan.to_plan() if not spec else None)
    st.notes += notes
    if st.kv_meta is not None:
        st.configure("kv", {"spec": spec or "budget plan", "meta": st.kv_meta})


def _stage_arena(st: _State) -> None:
    from memopt.passes.arena import ArenaConfig, ArenaPass, plan_arena

    cfg = st.config
    if cfg.reorder:
        st.captured, st.analysis, rnote = _reorder(st.captured, st.analysis, cfg.time_limit_s, st.say)
        st.notes += rnote
        st.gm = st.captured.module()
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


def _stage_analyze(st: _State) -> None:
    """The forward program after its weight passes, analysed once (the arena plans from it)."""
    if any(p in st.ran for p in ("quantize", "offload")):
        st.analysis = analyze(st.captured)
    st.gm = st.captured.module()


def _stage_plan(st: _State) -> None:
    """The Plan's rows and predictions, read from what the stages built."""
    bp = st.budget_plan
    budget_names = [d.name.split(" (")[0] for d in bp.decisions] if bp is not None else []
    decisions = _decisions(st.before.captured, st.captured, st.gen, st.weights, st.kv_meta, budget_names)
    if bp is not None:
        st.notes += _budget_divergence(decisions, bp, st.formats, kv_given=bool(st.config.kv),
                                       generation=st.gen is not None)
    st.plan = st.plan.with_(decisions=decisions, predictions={
        "weights_bytes_before": st.before.weights_bytes,
        "weights_bytes": _state_bytes(st.captured),
        "activation_lower_bound_bytes": st.analysis.activation_lower_bound_bytes,
        "activation_peak_bytes_before": st.before.activation_peak_bytes,
        "arena_bytes": st.plan.arena.size_bytes if st.plan.arena else None,
        "kv_cache_bytes": _kv_bytes(st.gen) if st.gen is not None else 0,
    })
    if bp is not None:
        b = bp.to_json()
        st.plan = st.plan.with_(predictions={**st.plan.predictions, "budget": {
            k: b[k] for k in ("fits", "budget_bytes", "predicted_peak_bytes", "predicted_decode_s_per_token",
                              "solver")}})


# The compile, as a list of stages: (name, function, whether it runs). Rewrite passes run when the resolved
# pass list holds them (see memopt.config.PASS_RULES for their order); the others always run.
STAGES = (
    ("capture", _stage_capture, lambda st: True),
    ("budget", _stage_budget, lambda st: st.config.budget is not None),
    ("quantize", _stage_quantize, lambda st: "quantize" in st.passes),
    ("offload", _stage_offload, lambda st: "offload" in st.passes),
    ("kv_offload", _stage_kv_offload, lambda st: "kv_offload" in st.passes),
    ("kv", _stage_kv, lambda st: "kv" in st.passes),
    ("analyze", _stage_analyze, lambda st: True),
    ("arena", _stage_arena, lambda st: "arena" in st.passes),
    ("plan", _stage_plan, lambda st: True),
)


def compile_model(model: Any = None, example_inputs: Sequence | None = None, config: CompileConfig | None = None,
                  *, calibration: Any = None, verbose: bool = False, **options) -> CompileResult:
    """Capture `model`, run the stages and return the emitted module with its plan. `config` (or the same
    fields as keyword arguments: `target`, `passes`, `quantize`, `kv`, `budget`, ... see `CompileConfig`)
    says what to do. `calibration` (GPTQ and outlier formats): a text file path or a list of texts for a
    model with a tokenizer (default: the bundled calibration text), or a list of args tuples for the model
    (default: its example inputs)."""
    from memopt.emit.plan_check import check_plan

    if config is None:
        texts = calibration if isinstance(calibration, (str, Path)) or (
            isinstance(calibration, (list, tuple)) and all(isinstance(c, str) for c in calibration)) else None
        config = CompileConfig.from_kwargs(**options, **({"calibration": texts} if texts else {}))
    elif options:
        raise TypeError(f"pass either config= or keyword options, not both (got {sorted(options)})")
    if config.budget is not None:
        _check_budget_quantize(config.quantize)
    say = (lambda m: print(f"memopt: {m}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    src, notes = _source_for(model, example_inputs, config)
    check_source(src, batch=config.batch, seq=config.seq, max_cache=config.max_cache, budget=config.budget,
                 kv=config.kv, offload_kv=config.offload_kv, generation=config.generation, quantize=config.quantize,
                 calibration=calibration if calibration is not None else config.calibration)
    st = _State(config, src, say, calibration if calibration is not None else config.calibration,
                list(config.passes), target=get_target(config.target), notes=notes)
    for name, stage, runs in STAGES:
        if runs(st):
            stage(st)
            st.ran.append(name)
    generator = st.gen.module() if st.gen is not None else None
    if generator is not None and st.kv_meta is not None:
        generator.meta["memopt_kv"] = st.kv_meta
    check_plan(st.plan, {"program": st.gm, "generate": generator})  # the plan says what the programs do
    module = OptimizedModule(st.gm, st.plan, {"notes": st.notes}, generator=generator, tokenizer=src.tokenizer)
    result = CompileResult(module, st.plan, src, st.captured, st.analysis, st.before, st.gen, st.notes, config)
    module.programs = result.programs  # what memopt.save writes
    return result


def _source_for(model: Any, example_inputs: Sequence | None, config: CompileConfig) -> tuple[ModelSource, list]:
    """The model as a source with real weights; a float32 model under a budget is served in bfloat16, the
    16-bit dtype the budget planner prices."""
    src = _as_source(model, example_inputs, config.dtype)
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


def _state_tensors(captured: Captured) -> dict[str, torch.Tensor]:
    """The program's weights: tensors named after a module's weight or bias (`...weight`, `...weight_q`,
    `...weight_scale`, `...bias`), never state the graph updates (KV caches, their position counters,
    offload staging slots), which must stay private to one program even while it equals another's."""
    ep = captured.exported
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    out = {}
    for table in (ep.state_dict, ep.constants):
        for name, t in table.items():
            leaf = name.rsplit(".", 1)[-1]
            if (isinstance(t, torch.Tensor) and (leaf.startswith("weight") or leaf == "bias") and name not in mutated
                    and not is_kv(name) and not is_offload(name)):
                out[name] = t
    return out


def _share_state(src: Captured, dst: Captured) -> int:
    """Bind `dst`'s weights to `src`'s tensors of the same name where the two programs hold equal ones, so a
    decoder's forward and generation programs keep one copy of each weight in memory (a budget counts it
    once). Only same-named weights: equal tensors of different layers (e.g. norms still at their init) stay
    apart, as the offload pass needs each block's weights to be its own. Returns how many weight tensors the
    two programs then hold in common (re-bound here, or already the same tensors: quantized ones reused)."""
    mine = _state_tensors(src)
    ptrs = {t.untyped_storage().data_ptr() for t in mine.values() if t.device.type != "meta"}
    ep, shared = dst.exported, 0
    for name, t in _state_tensors(dst).items():
        same = mine.get(name)
        if same is t or (t.device.type != "meta" and t.untyped_storage().data_ptr() in ptrs):
            shared += 1
            continue
        if same is None or same.shape != t.shape or same.dtype != t.dtype or same.device != t.device \
                or not torch.equal(same, t):
            continue
        table = ep.state_dict if name in ep.state_dict else ep.constants
        # the very tensor object, not a view of it: runtime ops may tag a buffer (the CPU int4 kernel
        # rewrites its layout in place and marks the tensor), and both programs must see that mark
        table[name] = same if isinstance(same, nn.Parameter) == isinstance(t, nn.Parameter) else (
            nn.Parameter(same.detach(), t.requires_grad) if isinstance(t, nn.Parameter) else same.detach())
        shared += 1
    return shared


def _share_offload(src: Captured, dst: Captured) -> None:
    """One set of offload buffers for both programs of a decoder: the host copy of each block (read-only,
    equal in both) and the device staging slots (scratch each program fills before every read; the two
    programs never run at once), so the device holds the plan's prefetch buffers once, not twice."""
    theirs = {n: t for n, t in [*src.exported.state_dict.items(), *src.exported.constants.items()]
              if n.startswith(OFFLOAD_PREFIX)}
    ep = dst.exported
    for table in (ep._state_dict, ep._constants):
        for name, t in list(table.items()):
            other = theirs.get(name)
            if other is None or other.shape != t.shape or other.dtype != t.dtype or other.device != t.device:
                continue
            if name.startswith(SLOT_PREFIX) or torch.equal(other, t):
                table[name] = other


def _input_specs(src: ModelSource, args: tuple) -> tuple:
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
