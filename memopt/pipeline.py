"""Run the passes: capture -> weight passes -> re-capture -> analyze -> plan the arena -> emit.

`memopt.compile(model, example_inputs, target=..., passes=...)` is the one-call Python API; the CLI's
`memopt compile` calls the same function. Decoder LMs get a second program beside the forward one:
a generation program (static KV cache as buffers, a dynamic number of new tokens) that
`OptimizedModule.generate` and `memopt run --prompt` use.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from memopt.analysis import Analysis, analyze
from memopt.capture import Captured, capture
from memopt.checks import check_source, check_specs
from memopt.plan import LayerDecision, Plan
from memopt.sources import ModelSource, resolve_source
from memopt.targets import get_target

KNOWN_PASSES = ("quantize", "offload", "arena")


class OptimizedModule(nn.Module):
    """The emitted model: an ordinary `nn.Module`, callable like the original, with `.plan`.
    Decoders also carry `.generator` (the generation program) and `.tokenizer` when known."""

    def __init__(self, gm: torch.fx.GraphModule, plan: Plan, report: dict | None = None,
                 generator: torch.fx.GraphModule | None = None, tokenizer=None):
        super().__init__()
        self.gm = gm
        self.generator = generator
        self.plan = plan
        self.report = report or {}
        self.tokenizer = tokenizer

    def forward(self, *args, **kwargs):
        if self.plan.arena is not None:
            self._check_shapes(args)
        with torch.no_grad():  # an inference artifact; out= ops refuse autograd
            return self.gm(*args, **kwargs)

    def _check_shapes(self, args: tuple) -> None:
        """The arena is planned for one shape: say so clearly instead of failing inside the graph."""
        for i, (a, spec) in enumerate(zip(args, self.plan.inputs)):
            if isinstance(a, torch.Tensor) and list(a.shape) != list(spec["shape"]):
                dims = spec["shape"]
                hint = f" (recompile with --batch {a.shape[0]} --seq {a.shape[1]})" if len(dims) == 2 else ""
                raise ValueError(f"input {i} has shape {list(a.shape)} but this module's arena was planned for "
                                 f"{dims}{hint}; arena plans are per shape")

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs) -> torch.Tensor:
        """Greedy new tokens (batch, n) after `input_ids` (batch, prompt_len)."""
        from memopt.runner import generate

        if self.generator is None:
            raise ValueError(f"{self.plan.model} was not compiled as a decoder LM; it has no generation program")
        input_ids = input_ids.to(_device_of(self.generator))
        eos = kwargs.pop("eos_token_id", getattr(self.tokenizer, "eos_token_id", None))
        if "memopt_kv" in self.generator.meta:  # a compressed cache: prefill and decode one token per call
            from memopt.generate import generate as generate_compressed

            return generate_compressed(self.generator, input_ids, max_new_tokens, eos_token_id=eos)
        return generate(self.generator, input_ids, max_new_tokens, eos_token_id=eos, **kwargs)

    def chat(self, prompt: str, max_new_tokens: int = 64) -> str:
        """Generate a reply to `prompt` (chat template applied when the tokenizer has one)."""
        from memopt.runner import chat_ids

        if self.tokenizer is None:
            raise ValueError(f"{self.plan.model} has no tokenizer; pass token ids to generate() instead")
        new = self.generate(chat_ids(self.tokenizer, prompt), max_new_tokens)
        return self.tokenizer.decode(new[0], skip_special_tokens=True)


def _device_of(program: nn.Module) -> torch.device:
    """Where the program computes: its first tensor not left in host memory by an offload pass."""
    for name, t in [*program.named_parameters(), *program.named_buffers()]:
        if "_memopt_offload_host_" not in name:
            return t.device
    return torch.device("cpu")


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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(gm, captured.example_inputs, captured.example_kwargs,
                                 dynamic_shapes=captured.dynamic_shapes, strict=False)
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
    from memopt.passes.quantize import _KEEP_FORMATS, parse_quantize_spec

    if spec in _KEEP_FORMATS or not spec:
        return False
    return bool(getattr(parse_quantize_spec(spec), "needs_calibration", False))


def _calibration_inputs(captured: Captured, calibration: Any) -> tuple[list, str]:
    """What GPTQ and the outlier choice calibrate on, and a note saying so. `calibration`: args tuples for
    the program; texts (a list of strings, or the path of a text file with one sample per line) run
    through the source's tokenizer; or None: the bundled calibration text when the source has a
    tokenizer, else the example inputs (random token ids for a source without one)."""
    from memopt.calibration import CalibrationSet, default_texts, read_texts, text_calibration

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
    from memopt.reorder import reorder_graph
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
    from memopt.plan_check import LAYER_INDEX, kv_policy_spec

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


def compile_model(model: Any = None, example_inputs: Sequence | None = None, *, target: str = "h100-80gb",
                  passes: Sequence[str] = ("arena",), batch: int = 1, seq: int | None = None,
                  quantize: str | None = None, quantize_skip: Sequence[str] = (), arena_solver: str = "cbc",
                  time_limit_s: float = 10.0, outputs_in_arena: bool = False, max_cache: int | None = None,
                  generation: bool = True, budget: str | int | None = None, objective: str = "latency",
                  max_quality_loss: float | None = None, offload: Sequence[str] = (), reorder: bool = False,
                  kv: str | None = None, offload_kv: Sequence[int | str] = (), kv_host: bool = False, dtype=None,
                  calibration: Any = None, verbose: bool = False) -> CompileResult:
    """Capture `model`, run `passes` in order and return the emitted module with its plan.
    `max_cache`: KV-cache capacity (tokens) of a decoder's generation program (default: min(2048,
    the model's context)); `generation=False` skips that program. `calibration` (for GPTQ and outlier
    formats): a text file path or a list of texts for a model with a tokenizer (default: the bundled
    calibration text), or a list of args tuples for the model (default: its example inputs)."""
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
    if "offload" in passes and "quantize" in passes and passes.index("offload") < passes.index("quantize"):
        raise ValueError("offload moves the final weights: list quantize before offload")
    if offload and "offload" not in passes:
        passes.insert(passes.index("arena") if "arena" in passes else len(passes), "offload")
    if "quantize" in passes and not quantize and budget is None:
        quantize = "int8"
    tgt = get_target(target)
    check_specs(batch=batch, seq=seq, max_cache=max_cache, time_limit_s=time_limit_s, arena_solver=arena_solver,
                quantize=quantize, kv=kv, offload=offload, offload_kv=offload_kv, calibration=calibration,
                budget=budget, objective=objective, max_quality_loss=max_quality_loss)  # before any capture
    if budget is not None:
        _check_budget_quantize(quantize)
    say = (lambda m: print(f"memopt: {m}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    src = _as_source(model, example_inputs, dtype)
    if budget is not None and src.dtype == torch.float32 and dtype is None:
        # the budget planner prices 16-bit weights and caches; serve the model the way it was planned
        src = _to_bf16(src)
        notes_pre = [f"{src.name}: cast from float32 to bfloat16, the 16-bit dtype the budget plan assumes"]
    else:
        notes_pre = []
    if src.on_meta:
        raise ValueError(f"{src.name} has no weights (built on the meta device); compile needs real weights — "
                         "use memopt inspect to plan it, or pass a model directory with safetensors")
    check_source(src, batch=batch, seq=seq, max_cache=max_cache, budget=budget, kv=kv, offload_kv=offload_kv,
                 generation=generation, quantize=quantize, calibration=calibration)
    say(f"capturing {src.name}")
    captured = capture(src, batch=batch, seq=seq)
    before = analyze(captured)
    gen = None
    if generation and src.family == "causal_lm":
        cache = max_cache or (captured.seq if budget is not None else min(2048, src.max_seq))
        say(f"capturing the generation program (static KV cache of {cache} tokens)")
        # a compressed cache is written one token at a time: its program takes one token per call
        gen = capture(src, phase="decode", batch=batch, cache_len=cache, dynamic=not (kv or budget is not None))
    plan = Plan(model=src.name, target=tgt.name, batch=captured.batch, seq=captured.seq, passes=tuple(passes),
                inputs=_input_specs(src, captured.example_inputs))
    notes: list[str] = list(notes_pre)
    weights_record: dict = {}
    budget_plan, formats = None, None
    if budget is not None:
        from memopt.budget import plan_budget

        say(f"planning formats for a budget of {budget} on {tgt.name}")
        budget_plan = plan_budget(src, target=tgt, budget_bytes=budget, batch=captured.batch,
                                  seq=captured.seq or None, objective=objective, max_quality_loss=max_quality_loss,
                                  kv_host=kv_host)
        from memopt.passes.quant_config import parse_quantize_spec

        how = parse_quantize_spec(quantize) if quantize else None
        # a tied embedding is labelled "model.embed_tokens (tied lm_head)": the module name is the first word
        formats = {d["name"].split(" (")[0]: _int4_how(d["format"], how) for d in budget_plan.to_json()["decisions"]}
        if any(f not in ("bf16", "native") for f in formats.values()) and "quantize" not in passes:
            passes.insert(0, "quantize")
        plan = plan.with_(passes=tuple(passes))
        if any(d.placement == "host" for d in budget_plan.to_plan().decisions) and "offload" not in passes:
            passes.insert(passes.index("arena") if "arena" in passes else len(passes), "offload")
            plan = plan.with_(passes=tuple(passes))
    if "quantize" in passes:
        captured, qnotes, weights_record, quantized = _weight_passes(captured, quantize, quantize_skip, say,
                                                                             formats, calibration=calibration)
        notes += qnotes
        if gen is not None:  # takes the forward program's quantized tensors: quantized once, held once
            gen, _, _, _ = _weight_passes(gen, quantize, quantize_skip, say, formats, reuse=quantized)
            shared = _share_state(captured, gen)
            say(f"generation program shares {shared} weight tensors with the {captured.phase} program")
        plan = plan.with_(pass_configs={**plan.pass_configs, "quantize": quantize or "budget plan"})
    if "offload" in passes:
        from memopt.passes.offload import OffloadConfig, OffloadPass

        host_plan = budget_plan.to_plan() if budget_plan is not None else None
        config = OffloadConfig(blocks=tuple(offload)) if offload else None
        if config is None and host_plan is None:
            raise ValueError("the offload pass needs blocks to offload: pass offload=[...] (--offload) or a --budget")
        say("offloading blocks to host memory")
        captured, onotes = _apply(captured, OffloadPass(config), host_plan)
        notes += onotes
        if gen is not None:
            gen, _ = _apply(gen, OffloadPass(config), host_plan)
            _share_offload(captured, gen)
        plan = plan.with_(pass_configs={**plan.pass_configs, "offload": config.to_json() if config else "budget plan"})
    kv_host_plan = budget_plan is not None and any(d.kv_placement == "host" for d in budget_plan.decisions)
    if offload_kv and gen is None:
        raise ValueError("offload_kv needs a decoder LM's generation program; this model has none")
    if gen is not None and (offload_kv or kv_host_plan):
        from memopt.passes.kv_offload import KVOffloadConfig, KVOffloadPass

        # before KV compression: compression then leaves the offloaded (16-bit, host) layers alone
        kv_config = KVOffloadConfig(layers=tuple(offload_kv)) if offload_kv else None
        say("offloading KV caches to host memory")
        gen, kvo_notes = _apply(gen, KVOffloadPass(kv_config), budget_plan.to_plan() if kv_host_plan else None)
        notes += kvo_notes
        plan = plan.with_(pass_configs={**plan.pass_configs,
                                        "kv_offload": kv_config.to_json() if kv_config else "budget plan"})
    kv_meta = None
    if gen is not None and (kv or budget_plan is not None):
        gen, kv_meta, knotes = _compress_kv(gen, kv, budget_plan.to_plan() if budget_plan and not kv else None)
        notes += knotes
        if kv_meta is not None:
            plan = plan.with_(pass_configs={**plan.pass_configs, "kv": {"spec": kv or "budget plan", "meta": kv_meta}})
    analysis = analyze(captured) if ("quantize" in passes or "offload" in passes) else before
    if reorder and "arena" in passes:
        captured, analysis, rnote = _reorder(captured, analysis, time_limit_s, say)
        notes += rnote
    gm = captured.module()
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
    budget_names = [d.name.split(" (")[0] for d in budget_plan.decisions] if budget_plan is not None else []
    decisions = _decisions(before.captured, captured, gen, weights_record, kv_meta, budget_names)
    if budget_plan is not None:
        notes += _budget_divergence(decisions, budget_plan, formats, kv_given=bool(kv), generation=gen is not None)
    plan = plan.with_(decisions=decisions, order=tuple(analysis.op_names) if "arena" in passes else None)
    plan = plan.with_(predictions={
        "weights_bytes_before": before.weights_bytes,
        "weights_bytes": _state_bytes(captured),
        "activation_lower_bound_bytes": analysis.activation_lower_bound_bytes,
        "activation_peak_bytes_before": before.activation_peak_bytes,
        "arena_bytes": plan.arena.size_bytes if plan.arena else None,
        "kv_cache_bytes": _kv_bytes(gen) if gen is not None else 0,
    })
    if budget_plan is not None:
        bp = budget_plan.to_json()
        plan = plan.with_(predictions={**plan.predictions, "budget": {
            k: bp[k] for k in ("fits", "budget_bytes", "predicted_peak_bytes", "predicted_decode_s_per_token",
                               "solver")}})
    generator = gen.module() if gen is not None else None
    if generator is not None and kv_meta is not None:
        generator.meta["memopt_kv"] = kv_meta
    from memopt.plan_check import check_plan

    check_plan(plan, {"program": gm, "generate": generator})  # the plan says what the programs do
    module = OptimizedModule(gm, plan, {"notes": notes}, generator=generator, tokenizer=src.tokenizer)
    result = CompileResult(module, plan, src, captured, analysis, before, gen, notes)
    module.programs = result.programs  # what memopt.save writes
    return result


def _to_bf16(src: ModelSource) -> ModelSource:
    import copy

    model = src.model if src.fixed_inputs is None else copy.deepcopy(src.model)
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
                    and not _is_kv(name) and "_memopt_offload" not in name):
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
              if n.startswith("_memopt_offload_")}
    ep = dst.exported
    for table in (ep._state_dict, ep._constants):
        for name, t in list(table.items()):
            other = theirs.get(name)
            if other is None or other.shape != t.shape or other.dtype != t.dtype or other.device != t.device:
                continue
            if name.startswith("_memopt_offload_slot") or torch.equal(other, t):
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
        if _is_kv(name) or "_memopt_offload_host_" in name or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _kv_bytes(captured: Captured) -> int:
    ep = captured.exported
    tensors = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
    return sum(t.numel() * t.element_size() for n, t in tensors.items() if _is_kv(n))


def _is_kv(name: str) -> bool:
    return "key_cache" in name or "value_cache" in name or "kv_cache_" in name


def compile(model: Any = None, example_inputs: Sequence | None = None, **kwargs) -> OptimizedModule:  # noqa: A001
    """`opt = memopt.compile(model, example_inputs, target="rtx-4090")`: a callable module with `.plan`."""
    return compile_model(model, example_inputs, **kwargs).module
