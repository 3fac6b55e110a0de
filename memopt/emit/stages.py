"""Pipeline stages: one compiled program pair per device, each holding only its layers, in one artifact.

    result = compile_stages(model, [(0, 2), (2, 4)], quantize="int8")   # decoder layers [0, 2) and [2, 4)
    save_stages(result, "out")                                           # then: memopt run out --launch

A decoder LM (`*ForCausalLM` with `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`: Llama,
Mistral, Qwen2, ...) is cut into contiguous ranges of decoder layers, one per pipeline stage: the first stage
also holds the token embedding, the last the final norm and the LM head. A stage is the model's own code on a
copy of its config with only its layers (same weight tensors, layer names keeping their global index:
`model.model.layers.2...`, caches `key_cache_2`), captured with torch.export into the two programs a
single-device compile emits:

    stage 0        input_ids (batch, T)         -> hidden states (batch, T, hidden)
    stage r        hidden states (batch, T, hidden) -> hidden states (batch, T, hidden)
    stage S-1      hidden states (batch, T, hidden) -> logits (batch, T, vocab)

`program` (the forward program, fixed T = the compiled --seq) and `generate` (static KV cache of its own
layers only, any number of new tokens with their `cache_position`). The first and last stage may hold no
decoder layer (an embedding-only or head-only stage, as the split planner may choose for a small model);
their generation program then has no cache. Every later compile stage runs per pipeline stage exactly as in
`memopt.pipeline.compile_model` (`pipeline.STAGES`: quantize, offload, kv_offload, kv, analyze, arena, plan),
so weight formats and KV compression apply per stage with the same code, and each stage's Plan is checked
against its programs (`check_plan`).

The artifact (`save_stages`): each stage is a complete memopt artifact of its own under `stage<r>/` (its
manifest, plan, programs and weights: a rank reads and hashes only its own stage), and the top level holds
the whole model's `plan.json` (every stage's decisions, under global names, and `Plan.stages`: each stage's
layer range, target, hidden size and dtype), the tokenizer, and a manifest listing those files and every
stage's manifest (whose SHA-256 pins that stage's files). `memopt.serve.distributed` runs it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from memopt.capture import (
    Captured,
    _aten_grouped_mm,
    _cache_heads,
    _export,
    _linear_matmuls,
    _positions_from,
    traced,
)
from memopt.config import CompileConfig
from memopt.frontend.sources import ModelSource
from memopt.planning.plan import Plan

STAGE_DIR = "stage{}"
STAGE_NAME = re.compile(r"stage([0-9]{1,4})\Z")
MAX_STAGES = 1024


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: decoder layers [first, last) (half-open; first == last: none), plus the token
    embedding when `embed` (the first stage) and the final norm and LM head when `head` (the last)."""

    index: int
    first: int
    last: int
    embed: bool
    head: bool

    @property
    def layers(self) -> range:
        return range(self.first, self.last)

    def to_json(self) -> dict:
        return {"stage": self.index, "layers": [self.first, self.last], "embed": self.embed, "head": self.head}

    @classmethod
    def from_json(cls, d: Any, where: str) -> StageSpec:
        try:
            first, last = (int(x) for x in d["layers"])
            spec = cls(int(d["stage"]), first, last, bool(d["embed"]), bool(d["head"]))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{where}: a stage record is malformed ({str(d)[:80]}); recompile the model") from None
        if not 0 <= spec.first <= spec.last or not 0 <= spec.index < MAX_STAGES:
            raise ValueError(f"{where}: stage record {str(d)[:80]} has no valid layer range; recompile the model")
        return spec


def stage_specs(split: Sequence[Sequence[int]], n_layers: int) -> tuple[StageSpec, ...]:
    """`split` ([(0, 2), (2, 4)]: contiguous half-open ranges covering layers 0..n_layers-1 in order) as
    stages; only the first and the last stage may be empty (an embedding-only or head-only stage)."""
    ranges = [tuple(r) for r in split]
    if not ranges:
        raise ValueError("a pipeline split needs at least 1 stage (0 devices given); pass --devices N >= 1")
    if len(ranges) > MAX_STAGES:
        raise ValueError(f"a pipeline split of {len(ranges)} stages is more than {MAX_STAGES}; use fewer devices")
    bad = next((r for r in ranges if len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in r)), None)
    if bad is not None:
        raise ValueError(f"each stage is a (first, last) pair of layer indices, got {bad!r}")
    expected = 0
    for i, (first, last) in enumerate(ranges):
        if first != expected or last < first:
            raise ValueError(f"stage {i} covers layers [{first}, {last}), but the stages must cover layers 0.."
                             f"{n_layers - 1} contiguously in order (it should start at {expected}); e.g. "
                             f"{even_split(n_layers, len(ranges)) if n_layers >= len(ranges) else [(0, n_layers)]}")
        if first == last and 0 < i < len(ranges) - 1:
            raise ValueError(f"stage {i} holds no decoder layer; only the first (embedding) and last (LM head) "
                             "stages may be empty: use fewer stages")
        expected = last
    if expected != n_layers:
        raise ValueError(f"the stages cover layers 0..{expected - 1}, but the model has {n_layers} layers; the last "
                         f"stage must end at {n_layers}")
    return tuple(StageSpec(i, f, l, i == 0, i == len(ranges) - 1) for i, (f, l) in enumerate(ranges))


def even_split(n_layers: int, stages: int) -> list[tuple[int, int]]:
    """`stages` contiguous ranges of layers as equal as possible (earlier stages one layer more)."""
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"the number of stages (devices) must be an int >= 1, got {stages!r}")
    if stages > n_layers:
        raise ValueError(f"{stages} stages need at least {stages} decoder layers; the model has {n_layers}: "
                         "use fewer devices")
    base, extra = divmod(n_layers, stages)
    out, first = [], 0
    for i in range(stages):
        last = first + base + (i < extra)
        out.append((first, last))
        first = last
    return out


def split_from_plan(plan, n_layers: int) -> list[tuple[int, int]]:
    """The decoder-layer range of each pipeline stage of a multi-device `BudgetPlan` (memopt.planning.split):
    its devices' ranges of planned layers, read through the names of the plan's decisions."""
    from memopt.names import LAYER_INDEX

    if not plan.devices:
        return [(0, n_layers)]
    if plan.tensor_parallel != 1:
        raise ValueError(f"the plan splits every layer {plan.tensor_parallel} ways (tensor parallel); memopt runs "
                         "pipeline stages only: plan with --tensor-parallel 1")
    names = [d.name.split(" (")[0] for d in plan.decisions]
    out, expected = [], 0
    for dev in sorted((d for d in plan.devices if d.tp_rank == 0), key=lambda d: d.stage):
        blocks = [int(m.group(1)) for n in names[dev.first:dev.last + 1] if (m := LAYER_INDEX.search(n))]
        first, last = (min(blocks), max(blocks) + 1) if blocks else (expected, expected)
        out.append((first, last))
        expected = last
    return out


# ---------------------------------------------------------------- a stage as a model
def _parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not (isinstance(layers, nn.ModuleList) and hasattr(inner, "embed_tokens") and hasattr(inner, "norm")
            and isinstance(getattr(model, "lm_head", None), nn.Module) and hasattr(model, "config")):
        raise ValueError(f"pipeline stages need a transformers decoder LM laid out as model.embed_tokens, "
                         f"model.layers, model.norm and lm_head (Llama, Mistral, Qwen2, ...); "
                         f"{type(model).__name__} is not: compile it on one device")
    return inner, layers


def stage_model(model: nn.Module, spec: StageSpec) -> nn.Module:
    """A model of `model`'s class holding only `spec`'s parts, sharing `model`'s tensors: its own config
    (num_hidden_layers = the stage's count, so its layers index a cache of its own layers), its layers
    registered under their global index (weights named as in the whole model), an identity for the
    embedding / final norm / LM head it does not hold."""
    inner, layers = _parts(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(spec.layers)
    for key in ("layer_types",):  # per-layer lists of the config
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and len(value) == len(layers):
            setattr(config, key, type(value)(value[spec.first:spec.last]))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sub = type(model)(config)
    sub.eval()
    for name, module in inner.named_children():  # rotary embeddings and the like: shared as they are
        if name not in ("embed_tokens", "layers", "norm"):
            setattr(sub.model, name, module)
    sub.model.embed_tokens = inner.embed_tokens if spec.embed else nn.Identity()
    sub.model.norm = inner.norm if spec.head else nn.Identity()
    sub.lm_head = model.lm_head if spec.head else nn.Identity()
    for j, i in enumerate(spec.layers):
        _share(sub.model.layers[j], layers[i])
    # names as in the whole model: `model.layers.<global index>` (iteration and slicing go by position)
    modules = sub.model.layers._modules.values()
    sub.model.layers._modules = OrderedDict((str(i), m) for i, m in zip(spec.layers, modules))
    left = [n for n, t in [*sub.named_parameters(), *sub.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"stage {spec.index} of {type(model).__name__}: {left[0]} was not taken from the model "
                         "(a part memopt's stage split does not know); compile it on one device")
    sub.generation_config = copy.deepcopy(model.generation_config)
    return sub


def _share(dst: nn.Module, src: nn.Module) -> None:
    """`dst` (built on the meta device from the same config as `src`) holds `src`'s very parameters and buffers:
    no copy, and a streamed source's fake parameters keep their tags (memopt/frontend/weights.py)."""
    into = dict(dst.named_modules())
    for path, module in src.named_modules():
        target = into.get(path)
        if target is None:
            raise ValueError(f"{type(src).__name__} has a part {path!r} that its config does not build; compile it on "
                             "one device")
        target._parameters.update(module._parameters)
        target._buffers.update(module._buffers)


class _StageForward(nn.Module):
    """The forward program's module: token ids (first stage) or hidden states in, `.logits` out (the hidden
    states of a stage without the LM head)."""

    def __init__(self, model: nn.Module, takes_ids: bool):
        super().__init__()
        self.model = model
        self.takes_ids = takes_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = "input_ids" if self.takes_ids else "inputs_embeds"
        return self.model(**{key: x}, use_cache=False).logits


class _StageStep(nn.Module):
    """A stage without decoder layers as a generation program: the same call as a cached one
    (`cache_position` taken, nothing cached)."""

    def __init__(self, model: nn.Module, takes_ids: bool):
        super().__init__()
        self.model = model
        self.takes_ids = takes_ids

    def forward(self, input_ids=None, inputs_embeds=None, cache_position=None):
        x = input_ids if self.takes_ids else inputs_embeds
        return self.model(**{"input_ids" if self.takes_ids else "inputs_embeds": x}, use_cache=False).logits


def _stage_cache_decoder(model: nn.Module, spec: StageSpec, batch: int, cache_len: int, device) -> nn.Module:
    """`memopt.capture.static_cache_decoder` for a stage: its static cache holds only its layers, as buffers
    named by their global index (`key_cache_<i>`, `value_cache_<i>`, `cumulative_length_<i>`)."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    first = spec.first

    class StageCacheDecoder(TorchExportableModuleWithStaticCache):
        def forward(self, input_ids=None, inputs_embeds=None, cache_position=None):
            for j, layer in enumerate(self.static_cache.layers):
                layer.keys = getattr(self, f"key_cache_{first + j}")
                layer.values = getattr(self, f"value_cache_{first + j}")
                layer.cumulative_length = getattr(self, f"cumulative_length_{first + j}")
            with _positions_from(self.model, cache_position):
                return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, cache_position=cache_position)

    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    with _cache_heads(model.config):
        wrapper = StageCacheDecoder(model, batch_size=batch, max_cache_len=cache_len, device=device)
    kinds = ("key_cache", "value_cache", "cumulative_length")
    local = {(k, j): wrapper._buffers.pop(f"{k}_{j}") for j in range(len(spec.layers)) for k in kinds}
    for (k, j), buf in local.items():
        wrapper.register_buffer(f"{k}_{first + j}", buf, persistent=False)
    return wrapper


def _export_quiet(module, args, kwargs, shapes, src, *extra) -> torch.export.ExportedProgram:
    """The stage program of `module`, or a kept trace of the same stage of the same architecture (`traced`)."""
    def export() -> torch.export.ExportedProgram:
        ep = _linear_matmuls(_aten_grouped_mm(_export(module, args, kwargs, shapes, src)))
        if ep.graph.eliminate_dead_code():
            ep.graph_module.recompile()
        return ep

    return traced(src, module, args, kwargs, shapes, export, "stage", *extra)


def capture_stage(src: ModelSource, spec: StageSpec, *, batch: int, seq: int, cache_len: int,
                  hidden_size: int) -> tuple[Captured, Captured]:
    """The forward program (`seq` tokens) and the generation program (a static cache of `cache_len` tokens,
    any number of new tokens) of stage `spec`, whose model is `src.model` (`stage_model`)."""
    from torch.export import Dim

    model, device, dtype = src.model, src.device, src.dtype
    if spec.embed:
        args = src.example_inputs(batch, seq)
    else:
        gen = torch.Generator().manual_seed(spec.index)
        args = (torch.randn((batch, seq, hidden_size), generator=gen).to(device=device, dtype=dtype),)
    fwd = Captured(_export_quiet(_StageForward(model, spec.embed), args, {}, None, src, "forward", repr(spec)),
                   "prefill", src, args, {}, batch, seq, 0, False, [])
    tokens = 2
    x = (torch.zeros((batch, tokens), dtype=torch.long, device=device) if spec.embed else
         torch.zeros((batch, tokens, hidden_size), dtype=dtype, device=device))
    key = "input_ids" if spec.embed else "inputs_embeds"
    kwargs = {key: x, "cache_position": torch.arange(tokens, device=device) + max(cache_len - tokens, 0)}
    dim = Dim("tokens", min=1, max=cache_len)
    shapes = {key: {1: dim}, "cache_position": {0: dim}}
    if spec.layers:
        step = _stage_cache_decoder(model, spec, batch, cache_len, device)
        note = f"decode step with a static KV cache of {cache_len} tokens (layers {spec.first}..{spec.last - 1})"
    else:
        step, note = _StageStep(model, spec.embed), "decode step of a stage without decoder layers (no cache)"
    gen = Captured(_export_quiet(step, (), kwargs, shapes, src, "decode", repr(spec)), "decode", src, (), kwargs, batch,
                   tokens, cache_len if spec.layers else 0, True, [note], shapes)
    return fwd, gen


# ---------------------------------------------------------------- compiling
@dataclass
class StagedResult:
    """A compiled pipeline: `plan` (the whole model's: every stage's decisions, `stages`) and one
    `memopt.pipeline.CompileResult` per stage (its module, its plan, its programs)."""

    plan: Plan
    stages: list
    specs: tuple[StageSpec, ...]
    tokenizer: Any = None
    notes: list[str] = field(default_factory=list)


def _resolve(model: Any, config: CompileConfig) -> ModelSource:
    from memopt.pipeline import source_for

    if isinstance(model, nn.Module) and hasattr(model, "config") and hasattr(model, "lm_head"):
        model = ModelSource(type(model).__name__, model.eval(), "causal_lm", model.config)
    src = source_for(model, None, config)[0]
    if src.family != "causal_lm":
        raise ValueError(f"pipeline stages split a decoder LM's layers; {src.name} is a {src.family}: compile it on "
                         "one device")
    return src


def _check_config(config: CompileConfig) -> None:
    from memopt.pipeline import needs_calibration

    if config.budget is not None:
        raise ValueError(f"--budget {config.budget} plans one device; across devices the split planner picks each "
                         "stage's layers: drop --budget (or plan the formats with --plan-only)")
    if needs_calibration(config.quantize):
        raise ValueError(f"--quantize {config.quantize} calibrates on each layer's inputs, which a pipeline stage "
                         "does not see at compile time; use int8 or int4 (:had) without :gptq or outliers")
    if not config.generation:
        raise ValueError("pipeline stages are compiled with their generation programs; drop generation=False")


def compile_stages(model: Any, split: Sequence[Sequence[int]] | int, config: CompileConfig | None = None, *,
                   targets: Sequence[str] | None = None, cluster: str | None = None, verbose: bool = False,
                   **options) -> StagedResult:
    """Compile `model` (a source string, a ModelSource or a transformers decoder LM) as pipeline stages:
    `split` the decoder-layer range of each stage ([(0, 2), (2, 4)]) or a number of stages (equal ranges).
    `config` (or keyword options, as for `compile_model`) applies to every stage; `targets`: each stage's
    device (default `config.target`); `cluster`: the multi-device target named in the plan."""
    from memopt.frontend.checks import check_source

    if config is None:
        config = CompileConfig.from_kwargs(**options)
    elif options:
        raise TypeError(f"pass either config= or keyword options, not both (got {sorted(options)})")
    _check_config(config)
    say = (lambda m: print(f"memopt: {m}", file=sys.stderr, flush=True)) if verbose else (lambda m: None)
    src = _resolve(model, config)
    n_layers = len(_parts(src.model)[1])
    specs = stage_specs(even_split(n_layers, split) if isinstance(split, int) else split, n_layers)
    targets = list(targets) if targets is not None else [config.target] * len(specs)
    if len(targets) != len(specs):
        raise ValueError(f"{len(targets)} targets for {len(specs)} stages; give one per stage")
    check_source(src, batch=config.batch, seq=config.seq, max_cache=config.max_cache, budget=None, kv=config.kv,
                 offload_kv=config.offload_kv, generation=True, quantize=config.quantize, calibration=None)
    results = []
    for spec, target in zip(specs, targets):
        say(f"stage {spec.index}: {describe(spec)} on {target}")
        results.append(_compile_stage(src, spec, config, target, say))
    plan = _whole_plan(src, specs, results, config, cluster or "+".join(targets), targets)
    return StagedResult(plan, results, specs, src.tokenizer, [n for r in results for n in r.notes])


def describe(spec: StageSpec) -> str:
    """`spec`'s parts in words: "embedding, layers 0-1", "layer 4, final norm + LM head"."""
    parts = (["embedding"] if spec.embed else []) + (
        [f"layers {spec.first}-{spec.last - 1}" if len(spec.layers) > 1 else f"layer {spec.first}"]
        if spec.layers else []) + (["final norm + LM head"] if spec.head else [])
    return ", ".join(parts)


def _compile_stage(src: ModelSource, spec: StageSpec, config: CompileConfig, target: str, say):
    """One stage through `memopt.pipeline.STAGES` (its own capture; no budget stage), as compile_model does."""
    from memopt import pipeline
    from memopt.analysis.accounting import analyze
    from memopt.frontend.checks import generation_cache_tokens
    from memopt.frontend.targets import get_target

    sub = stage_model(src.model, spec)
    # the stage's own model; a streamed source's weight provider stays (the "weights" stage reads from it)
    stage_src = dataclasses.replace(src, model=sub, config=sub.config, tokenizer=None, fixed_inputs=None, notes=[])
    seq = config.seq or min(128, src.max_seq)
    cache = generation_cache_tokens(src, max_cache=config.max_cache, seq=seq, budget=None)
    st = pipeline.CompileState(_for_target(config, target), stage_src, say, None, list(config.passes),
                         target=get_target(target))
    fwd, gen = capture_stage(stage_src, spec, batch=config.batch, seq=seq, cache_len=cache,
                             hidden_size=int(src.config.hidden_size))
    st.fwd, st.gen = pipeline.Program(fwd), pipeline.Program(gen)
    st.before = st.analysis = analyze(fwd)
    st.plan = Plan(model=src.name, target=target, batch=config.batch, seq=seq, passes=tuple(st.passes),
                   inputs=pipeline.input_specs(stage_src, fwd.example_inputs), stages=(spec.to_json(),))
    st.ran.append("capture")
    # captured above; a stage without layers has no cache to compress or move
    pipeline.run_stages(st, skip=("capture", "budget") + (() if spec.layers else ("kv", "kv_offload")))
    result = pipeline.finish(st)
    result.notes = [f"stage {spec.index}: {n}" for n in st.notes]
    return result


def _for_target(config: CompileConfig, target: str) -> CompileConfig:
    return config if config.target == target else dataclasses.replace(config, target=target)


def _whole_plan(src: ModelSource, specs, results, config: CompileConfig, cluster: str, targets) -> Plan:
    """The model's plan: every stage's decisions (global names), summed predictions and per stage its own,
    `stages`: each stage's range, target, and the hidden states it passes on."""
    hidden, vocab = int(src.config.hidden_size), int(src.config.vocab_size)
    dtype = str(src.dtype).replace("torch.", "")
    records = tuple({**spec.to_json(), "target": target, "hidden_size": hidden, "vocab_size": vocab, "dtype": dtype,
                     "directory": STAGE_DIR.format(spec.index)} for spec, target in zip(specs, targets))
    per_stage = [r.plan.predictions for r in results]
    total = {k: sum(p.get(k) or 0 for p in per_stage) for k in ("weights_bytes", "kv_cache_bytes", "arena_bytes")}
    first = results[0].plan
    passes = tuple(dict.fromkeys(p for r in results for p in r.plan.passes))
    return Plan(model=src.name, target=cluster, batch=first.batch, seq=first.seq,
                decisions=tuple(d for r in results for d in r.plan.decisions),
                predictions={**total, "weights_bytes_before": sum(p.get("weights_bytes_before") or 0
                                                                  for p in per_stage),
                             "stages": per_stage},
                passes=passes, pass_configs={"pipeline": {
                    "stages": len(specs), "config": config.to_json(),
                    "kv_compressed": any(r.plan.pass_configs.get("kv") for r in results)}},
                inputs=first.inputs, stages=records)


# ---------------------------------------------------------------- saving
def save_stages(result: StagedResult, directory, *, force: bool = False, key: bytes | None = None) -> Path:
    """Write the pipeline artifact atomically (see the module doc): `stage<r>/` a complete artifact per stage,
    and at the top `plan.json`, `tokenizer/` and a manifest of those and of every stage's manifest."""
    import shutil

    from memopt.emit import artifact
    from memopt.emit.outdir import MANIFEST, check_output, check_space, new_tmp, swap_in, write_error

    directory = check_output(directory, force=force)
    check_space(directory, sum(artifact._tensor_bytes(r.programs) for r in result.stages))
    tmp = new_tmp(directory)
    try:
        listed = []
        for spec, stage in zip(result.specs, result.stages):
            name = STAGE_DIR.format(spec.index)
            artifact.save(stage.module, tmp / name, programs=stage.programs, key=key)
            listed.append(f"{name}/{MANIFEST}")
        (tmp / "plan.json").write_text(json.dumps(result.plan.to_json(), indent=1, default=str))
        listed.append("plan.json")
        if result.tokenizer is not None:
            artifact._save_tokenizer(result.tokenizer, tmp / "tokenizer")
            listed += sorted(p.relative_to(tmp).as_posix() for p in (tmp / "tokenizer").glob("*") if p.is_file())
        files = {n: {"sha256": artifact._sha256(tmp / n), "bytes": (tmp / n).stat().st_size} for n in sorted(listed)}
        artifact.write_manifest(tmp, files, key)
        swap_in(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_error(exc, directory) if isinstance(exc, Exception) else None
        if err is not None:
            raise err from None
        raise
    return directory


# ---------------------------------------------------------------- reading back
def stage_records(plan: Plan, where: str = "plan.json") -> tuple[StageSpec, ...]:
    """The checked stages of a pipeline artifact's plan (empty for a one-device artifact)."""
    specs = tuple(StageSpec.from_json(d, where) for d in plan.stages)
    if specs:
        try:
            layers = stage_specs([(s.first, s.last) for s in specs], specs[-1].last)
        except ValueError as exc:
            raise ValueError(f"{where}: the stages do not fit together ({exc}); recompile the model") from None
        if [s.index for s in specs] != list(range(len(specs))) or layers != specs:
            raise ValueError(f"{where}: the stage records are out of order; recompile the model")
    return specs


def verify_stages(directory, *, key: bytes | None = None) -> dict:
    """`memopt.emit.artifact.verify` of an artifact and, for a pipeline artifact, of every stage it lists;
    returns the manifest with every stage's files added to its table (as `stage<r>/<name>`)."""
    from memopt.emit import artifact

    directory = Path(directory)
    manifest = artifact.verify(directory, key=key)
    files = dict(manifest["files"])
    for name in manifest["files"]:
        top, _, rest = name.partition("/")
        if STAGE_NAME.match(top) and rest == "manifest.json":
            inner = artifact.verify(directory / top, key=key)["files"]
            files.update({f"{top}/{n}": info for n, info in inner.items()})
    return {**manifest, "files": files}


def compile_devices(model: Any, config: CompileConfig, *, target: str, devices: int | None = None,
                    tensor_parallel: int | None = None, verbose: bool = False) -> StagedResult:
    """Compile `model` as one pipeline stage per device of `target` (`2xa100-80gb`, `1x(rtx-4090)+1x(rtx-3090)`,
    or a device with `devices=N`), the layer ranges planned by the split planner (memopt.planning.split, tensor
    parallel degree 1); `config.target` is ignored (each stage is compiled for its own device)."""
    from memopt.frontend.targets import parse_cluster
    from memopt.planning.split import plan_split

    if tensor_parallel not in (None, 1):
        raise ValueError(f"--tensor-parallel {tensor_parallel}: memopt emits and runs pipeline stages only (tensor "
                         "parallel execution is not built yet); drop it or plan with --plan-only")
    cluster = parse_cluster(target, devices=devices)
    names = [t.name for t in cluster.devices]
    if len(names) == 1:
        raise ValueError(f"--target {target} names one device; pipeline stages need several (e.g. --devices 2)")
    config = dataclasses.replace(config, target=names[0])
    _check_config(config)
    src = _resolve(model, config)
    n_layers = len(_parts(src.model)[1])
    plan = plan_split(src, target=target, devices=devices, batch=config.batch, seq=config.seq, tensor_parallel=1,
                      strict=False)
    split = split_from_plan(plan, n_layers)
    result = compile_stages(src, split, config, targets=names, cluster=cluster.name, verbose=verbose)
    result.notes.insert(0, "layer ranges from the split planner: " + "; ".join(
        f"stage {d.stage} on {d.device}: {d.layers}" for d in plan.devices) + ("" if plan.fits else
                                                                                " (the plan does not fit)")
        + "; weight formats and KV cache as --quantize / --kv say (the planner's per-layer choices are not applied)")
    return result
