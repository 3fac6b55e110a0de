"""Model -> aten-level FX graph with FakeTensor metadata on every node, via torch.export.

Phases:
  prefill  decoder LMs: input_ids (batch, seq) -> logits, no cache
  decode   decoder LMs: one token with a static KV cache of `cache_len` tokens held as mutable
           buffers (transformers' exportable static-cache wrapper)
  forward  encoders and user modules: their example inputs -> output
"""

from __future__ import annotations

import copy
import inspect
import sys
import threading
import traceback
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from memopt.frontend.sources import ModelSource
from memopt.frontend.weights import refuse_real_inputs
from memopt.lift import lift


class CaptureError(RuntimeError):
    """torch.export failed; the message names the module/op that broke and what to try."""


@dataclass
class Captured:
    exported: ExportedProgram
    phase: str
    source: ModelSource
    example_inputs: tuple
    example_kwargs: dict = field(default_factory=dict)
    batch: int = 1
    seq: int = 0
    cache_len: int = 0
    dynamic: bool = False
    notes: list[str] = field(default_factory=list)
    dynamic_shapes: object = None

    @property
    def graph(self) -> torch.fx.Graph:
        return self.exported.graph

    def module(self) -> torch.fx.GraphModule:
        """The exported program as a runnable GraphModule (weights as attributes)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.exported.module()


def default_phase(source: ModelSource) -> str:
    return "prefill" if source.family == "causal_lm" else "forward"


def capture(source: ModelSource, *, phase: str | None = None, batch: int = 1, seq: int | None = None,
            cache_len: int | None = None, dynamic: bool = False) -> Captured:
    """Export `source` for one phase. `dynamic=True` makes the sequence length symbolic where the
    model allows (prefill/forward); analysis wants concrete sizes, so it is off by default."""
    phase = phase or default_phase(source)
    if phase not in ("prefill", "decode", "forward"):
        raise ValueError(f"phase must be prefill, decode or forward, got {phase!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if phase in ("prefill", "decode") and source.family != "causal_lm":
        raise ValueError(f"phase {phase!r} needs a decoder LM; {source.name} is a {source.family} (use phase='forward')")
    if phase == "decode":
        return _capture_decode(source, batch, cache_len or seq or min(source.max_seq, 1024), dynamic)
    module = source.traceable().eval()
    dynamic_shapes = None
    if dynamic and source.fixed_inputs is None:
        # trace with batch and seq >= 2 so neither specializes to 1; the graph still runs at size 1
        args = source.example_inputs(max(batch, 2), max(seq or 0, 2) if seq else None)
        dynamic_shapes = tuple({0: Dim.DYNAMIC, 1: Dim.DYNAMIC} for _ in args)
    else:
        args = source.example_inputs(batch, seq)
    ep = traced(source, module, args, {}, dynamic_shapes, lambda: _drop_detach_(_linear_matmuls(_aten_grouped_mm(
        _export(module, args, {}, dynamic_shapes, source)))), phase)
    seq_len = args[0].shape[1] if source.fixed_inputs is None and args[0].dim() > 1 else 0
    return Captured(ep, phase, source, args, {}, args[0].shape[0] if seq_len else batch, seq_len, 0,
                    dynamic_shapes is not None, [], dynamic_shapes)


# ---------------------------------------------------------------- one trace per architecture and shape
# Compiling a model several times (formats compared side by side, a budget tried at several sizes, the same model
# directory compiled again) traces the same programs each time, and the export is most of a compile (a tiny Llama's
# int8 compile: 1.5 s of 3.4). A program depends on the model's code, config and tensor shapes, not on its weights'
# values (torch.export traces with fake tensors), so traces are kept by those (`_cache_key`) without any tensor
# (`_keep`) and bound to the next model's own parameters and buffers by name (`_rebind`). Kept: the most recent
# traces up to `CACHE_NODES` graph nodes in all. Not kept: models without a config (a plain nn.Module's Python
# attributes, which its forward may read, are not in the key). `clear_captures()` empties it.
# A program exported again after its passes (`export_again`) is kept the same way: a GraphModule's forward is its
# generated code, so the key is that code, its tensors' names and shapes, the inputs' specs and the node metadata
# export carries over (`_program_key`); what compiles of the same model with the same options re-export.
CACHE_NODES = 50_000
_CAPTURES: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (trace, model tensor names, orders)
_CAPTURES_LOCK = threading.Lock()


def clear_captures() -> None:
    """Forget every kept trace (the next compile of each model exports it again)."""
    with _CAPTURES_LOCK:
        _CAPTURES.clear()


def traced(source: ModelSource, module: nn.Module, args: tuple, kwargs: dict, dynamic_shapes,
           export: Callable[[], ExportedProgram], *extra) -> ExportedProgram:
    """`export()` (the program of `module`, which wraps `source.model`, called with `args`/`kwargs`), or a kept trace
    of the same architecture and shapes bound to `module`'s tensors. `extra`: whatever else the trace depends on."""
    return _kept_or_exported(_cache_key(source, module, args, kwargs, dynamic_shapes, extra), module, export)


def _kept_or_exported(key: tuple | None, module: nn.Module, export: Callable[[], ExportedProgram]) -> ExportedProgram:
    """The trace kept under `key` bound to `module`'s tensors, else `export()`, kept under `key` (None: not kept).
    A GraphModule's metadata is what export copies onto the program's (after its own keys): a rebound program gets
    `module`'s in a GraphModule of its own, over the kept program's own keys."""
    with _CAPTURES_LOCK:
        held = _CAPTURES.get(key) if key is not None else None
        if held is not None:
            _CAPTURES.move_to_end(key)
    carries_meta = isinstance(module, torch.fx.GraphModule)
    if held is not None:
        ep = _rebind(held, module)
        if ep is not None:
            if carries_meta:
                ep._graph_module = copy.copy(held[0].graph_module)  # (a GraphModule of the same graph)
                ep._graph_module.meta = {**held[3], **module.meta}
            return ep
    ep = export()
    if key is not None:
        _keep(key, ep, {k: v for k, v in ep.graph_module.meta.items() if k not in module.meta} if carries_meta
              else None)
    return ep


_PLAIN = (bool, int, float, str, type(None))


# Forward hooks that never change what a trace records, left out of `_cache_key`: a streamed model's refusal to run
# on real inputs (it only raises, and never on a trace's fake inputs). A streamed model and the same model loaded
# trace to the same graph, node for node (its fake parameters say "cpu"), so either one's trace serves the other.
_TRACE_NEUTRAL_HOOKS = frozenset({refuse_real_inputs})


def _cache_key(source: ModelSource, module: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, extra: tuple):
    config = source.config
    if source.fixed_inputs is not None or not hasattr(config, "to_json_string"):
        return None
    try:
        config_json = config.to_json_string(use_diff=False)
    except Exception:  # a config that does not serialize: no key, no reuse
        return None

    def spec(x):
        if isinstance(x, torch.Tensor):
            return "tensor", x.dtype, x.device.type, tuple(x.shape)
        return "value", repr(x)

    def described(m: nn.Module) -> tuple:  # its class, mode, hooks and plain attributes (a forward may read them)
        hooks = tuple(getattr(f, "__qualname__", repr(f)) for table in (m._forward_pre_hooks, m._forward_hooks)
                      for f in table.values() if f not in _TRACE_NEUTRAL_HOOKS)
        plain = tuple(sorted((k, v) for k, v in vars(m).items() if isinstance(v, _PLAIN)))
        return type(m).__module__, type(m).__qualname__, hooks, plain

    inputs = (tuple(spec(a) for a in args), tuple((k, spec(v)) for k, v in sorted(kwargs.items())))
    tensors = tuple((name, t.dtype, t.device.type, tuple(t.shape), isinstance(t, nn.Parameter))
                    for name, t in (*module.named_parameters(remove_duplicate=False),
                                    *module.named_buffers(remove_duplicate=False)))
    tied = tuple(name for name, _ in module.named_parameters(remove_duplicate=True))
    modules = tuple((name, described(m)) for name, m in module.named_modules(remove_duplicate=False))
    return (extra, inputs, repr(dynamic_shapes), source.family, config_json,
            getattr(config, "_attn_implementation", None), tensors, tied, modules)


def _keep(key: tuple, ep: ExportedProgram, own_meta: dict | None = None) -> None:
    """Keep `ep`'s trace without the model's tensors (its parameters and buffers: names are enough). `own_meta`:
    the graph module's metadata export wrote itself (a re-exported program's: the rest came from its module)."""
    sig = ep.graph_signature
    bound = frozenset((*sig.parameters, *sig.buffers))
    order = (tuple(ep.state_dict), tuple(ep.constants))  # a fresh export's order, which a rebound one keeps
    fresh = copy.copy(ep)
    fresh._state_dict = {}
    fresh._constants = {n: t for n, t in ep.constants.items() if n not in bound}
    with _CAPTURES_LOCK:  # compiles may run on several threads
        _CAPTURES[key] = (fresh, bound, order, own_meta)
        nodes = 0
        for k in reversed(list(_CAPTURES)):
            nodes += len(_CAPTURES[k][0].graph.nodes)
            if nodes > CACHE_NODES and k != key:
                del _CAPTURES[k]


def _rebind(held: tuple, module: nn.Module) -> ExportedProgram | None:
    """The kept trace with `module`'s own parameters and buffers (a decode wrapper's: a new KV cache), or None when
    `module` lacks one of them."""
    ep, bound, (state_order, constant_order), _ = held
    tables = {**dict(module.named_parameters(remove_duplicate=False)),
              **dict(module.named_buffers(remove_duplicate=False))}
    if not bound <= tables.keys():
        return None
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    fresh = copy.copy(ep)
    fresh._state_dict = {n: tables[n] for n in state_order}
    fresh._constants = {n: tables[n] if n in bound else (ep.constants[n].clone() if n in mutated else ep.constants[n])
                        for n in constant_order}
    return fresh


def static_cache_decoder(model: nn.Module, batch: int, cache_len: int, device=None) -> nn.Module:
    """transformers' exportable static-cache wrapper, with the cache layers bound to the wrapper's
    registered buffers at every call, so torch.export sees the KV cache as mutable buffers
    (`key_cache_{i}`, `value_cache_{i}`) rather than lifting the layers' own tensors as constants."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class StaticCacheDecoder(TorchExportableModuleWithStaticCache):
        def forward(self, input_ids=None, inputs_embeds=None, cache_position=None):
            for i, layer in enumerate(self.static_cache.layers):
                layer.keys = getattr(self, f"key_cache_{i}")
                layer.values = getattr(self, f"value_cache_{i}")
                layer.cumulative_length = getattr(self, f"cumulative_length_{i}")
            with _positions_from(self.model, cache_position):
                return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, cache_position=cache_position)

    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    with _cache_heads(model.config):
        return StaticCacheDecoder(model, batch_size=batch, max_cache_len=cache_len, device=device)


@contextmanager
def _positions_from(model: nn.Module, cache_position: torch.Tensor):
    """Give the model `position_ids` = `cache_position`: models that derive positions from the cache's length
    (OPT: `cumsum` over a mask of `past + new` ones, sliced at `past`) otherwise export data-dependent shapes."""
    if "position_ids" not in inspect.signature(model.forward).parameters:
        yield
        return

    def add_positions(_, args, kwargs):
        batch = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]).shape[0]
        return args, {**kwargs, "position_ids": cache_position.unsqueeze(0).expand(batch, -1)}
    handle = model.register_forward_pre_hook(add_positions, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _cache_heads(config):
    """Falcon's multi-query attention keeps one KV head, but its config names none (`num_kv_heads` counts the
    query heads): size the static cache by the heads the attention really writes."""
    mqa = getattr(config, "model_type", "") == "falcon" and config.multi_query and not config.new_decoder_architecture
    if not mqa:
        yield
        return
    config.num_key_value_heads = 1
    try:
        yield
    finally:
        del config.num_key_value_heads


def _capture_decode(source: ModelSource, batch: int, cache_len: int, dynamic: bool = False) -> Captured:
    """One step with a static cache. `dynamic=True` makes the number of new tokens symbolic, so the
    same program runs a chunked prefill and then one-token decode steps (a generation program)."""
    if cache_len > source.max_seq:
        raise ValueError(f"cache length {cache_len} exceeds {source.name}'s context length {source.max_seq}")
    wrapper = static_cache_decoder(source.model, batch, cache_len, source.device)
    device = source.device
    tokens = 2 if dynamic else 1
    kwargs = {
        "input_ids": torch.zeros((batch, tokens), dtype=torch.long, device=device),
        "cache_position": torch.arange(tokens, dtype=torch.long, device=device) + max(cache_len - tokens, 0),
    }
    shapes = None
    if dynamic:
        dim = Dim("tokens", min=1, max=cache_len)
        shapes = {"input_ids": {1: dim}, "cache_position": {0: dim}}
    def export() -> ExportedProgram:
        ep = _drop_detach_(_linear_matmuls(_aten_grouped_mm(_export(wrapper, (), kwargs, shapes, source))))
        if ep.graph.eliminate_dead_code():  # e.g. OPT's unused mask of `past + new` ones, sized by the cache's length
            ep.graph_module.recompile()
        return ep

    ep = traced(source, wrapper, (), kwargs, shapes, export, "decode", dynamic)
    return Captured(ep, "decode", source, (), kwargs, batch, tokens, cache_len, dynamic,
                    [f"decode step with a static KV cache of {cache_len} tokens"], shapes)


@contextmanager
def _without_stack_traces():
    """Trace without recording each node's Python stack (torch.fx's `do_not_emit_stack_traces`, where this torch
    has it): memopt reads none (artifacts keep only `nn_module_stack`, plus a stack trace if one is there), the
    recording was an eighth of every export (SmolLM2 int8 compile: 19.2 s -> 16.6 s), and traces of the compiling
    machine's source paths have no business in a shared artifact."""
    import torch.fx.config as fx_config

    if not hasattr(fx_config, "do_not_emit_stack_traces"):
        yield
        return
    before = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = before


def without_provenance(ep: ExportedProgram) -> ExportedProgram:
    """Drop torch.fx's provenance records (`node.meta["from_node"]`): each export copies every source node's chain
    deeply into the new nodes, so a program exported again after the passes carried its whole history (1.7 s of a
    SmolLM2 int4 compile went to copying it). memopt reads none, and artifacts never kept it (`program_io`)."""
    for node in ep.graph.nodes:
        node.meta.pop("from_node", None)
    return ep


def _export(module: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, source: ModelSource) -> ExportedProgram:
    return without_provenance(_trace(module, args, kwargs, dynamic_shapes, source))


def _trace(module: nn.Module, args: tuple, kwargs: dict, dynamic_shapes, source: ModelSource) -> ExportedProgram:
    with warnings.catch_warnings(), _without_stack_traces():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
        except Exception as exc:  # torch.export raises many types; we translate all of them
            if dynamic_shapes is not None:
                try:  # dynamic shapes are a nicety: retry static before giving up
                    with torch.no_grad():
                        ep = torch.export.export(module, args, kwargs, strict=False)
                    print(f"memopt: dynamic sequence length not exportable for {source.name}; captured static",
                          file=sys.stderr)
                    return ep
                except Exception:
                    pass
            raise CaptureError(_explain(exc, module, source)) from exc


def export_again(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, dynamic_shapes=None,
                 like: ExportedProgram | None = None) -> ExportedProgram:
    """A rewritten program as an ExportedProgram. `like`: the program `gm` was rewritten from (`gm` began as
    `like.module()`): `gm` is lifted back without tracing (`memopt.lift`: its graph, tensors lifted to inputs, only
    the nodes the passes added or changed given new fake values) where it can be. Else exported again, or a kept
    export of the same program (`_program_key`: the same code, tensor shapes, inputs and carried metadata) bound to
    `gm`'s tensors, with `gm`'s metadata."""
    if like is not None:
        ep = lift(gm, like)
        if ep is not None:
            return ep
    return _kept_or_exported(_program_key(gm, args, kwargs, dynamic_shapes), gm,
                             lambda: _export_again(gm, args, kwargs, dynamic_shapes))


_CARRIED = ("nn_module_stack", "custom", "stack_trace")  # node metadata export copies from the module it traces


def _program_key(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, dynamic_shapes) -> tuple | None:
    """What exporting `gm` depends on: its generated code (the graph and its input/output structure), its mode,
    every parameter's and buffer's name, dtype, device and shape, the inputs' specs and dynamic shapes, and the
    node metadata export carries over. None (not kept) when the graph reads a tensor attribute that is neither a
    parameter nor a buffer (its value would be lifted as a constant of the trace) or calls a submodule other than
    the input guards an unlifted program checks first (whose code is then part of the key)."""
    tables = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    carried = []
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tables and isinstance(getattr(gm, node.target, None),
                                                                              torch.Tensor):
            return None
        if node.op == "call_module":
            guards = _guards_code(getattr(gm, node.target, None))
            if guards is None:
                return None
            carried.append(guards)
        if node.op == "call_function":
            carried.append(repr([node.meta.get(k) for k in _CARRIED]))

    def spec(x):
        if isinstance(x, torch.Tensor):
            return "tensor", x.dtype, x.device.type, tuple(x.shape)
        return "value", repr(x)

    tensors = tuple((name, t.dtype, t.device.type, tuple(t.shape), isinstance(t, nn.Parameter), t.requires_grad)
                    for name, t in tables.items())
    tied = tuple(name for name, _ in gm.named_parameters(remove_duplicate=True))
    inputs = (tuple(spec(a) for a in args), tuple((k, spec(v)) for k, v in sorted(kwargs.items())))
    return ("export_again", gm.code, gm.training, tensors, tied, inputs, repr(dynamic_shapes), tuple(carried))


def _guards_code(module) -> tuple | None:
    """The code of the input-guard module `ExportedProgram.module()` gives an unlifted program (torch's `GuardsFn`:
    a function, materialized from the guards' source, behind a wrapper): each function's bytecode, constants
    (the guards' expressions and messages) and names. None for any other module, or when that function is not
    found (another torch's layout: then the program is not kept)."""
    if type(module).__name__ != "GuardsFn":
        return None
    found, todo, seen = [], [getattr(module, "forward", None)], set()
    while todo:
        fn = todo.pop()
        code = getattr(fn, "__code__", None)
        if code is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        found.append((fn.__name__, code.co_code, repr(code.co_consts), code.co_names))
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                todo.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
    return tuple(found) if any(name == "_" for name, *_ in found) else None


def _export_again(gm: torch.fx.GraphModule, args: tuple, kwargs: dict, dynamic_shapes=None) -> ExportedProgram:
    """`torch.export` of a rewritten program. `aten._grouped_mm`'s fake kernel takes bfloat16 only, so float32
    expert matmuls are traced as transformers' fallback op (same arguments) and turned back into aten after."""
    swapped = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten._grouped_mm.default
               and getattr(n.args[0].meta.get("val"), "dtype", torch.bfloat16) != torch.bfloat16]
    for node in swapped:
        node.target = torch.ops.transformers.grouped_mm_fallback.default
    if swapped:
        gm.recompile()
    try:
        with warnings.catch_warnings(), _without_stack_traces():
            warnings.simplefilter("ignore")
            return without_provenance(_aten_grouped_mm(
                torch.export.export(gm, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)))
    finally:
        for node in swapped:
            node.target = torch.ops.aten._grouped_mm.default
        if swapped:
            gm.recompile()


def _linear_matmuls(ep: ExportedProgram) -> ExportedProgram:
    """`x @ W.T` on a 2-D parameter (Falcon's `FalconLinear`) -> `linear(x, W)`, the form every pass reads
    (quantize, offload, ONNX): the same matrix product."""
    params = set(ep.graph_signature.inputs_to_parameters)
    transposes = (torch.ops.aten.numpy_T.default, torch.ops.aten.t.default)
    changed = False
    for node in ep.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.matmul.default:
            continue
        wt = node.args[1]
        if isinstance(wt, torch.fx.Node) and wt.op == "call_function" and wt.target in transposes:
            w = wt.args[0]
            if w.op == "placeholder" and w.name in params and w.meta["val"].dim() == 2:
                node.target, node.args = torch.ops.aten.linear.default, (node.args[0], w)
                changed = True
    if changed:
        ep.graph.eliminate_dead_code()
        ep.graph_module.recompile()
    return ep


def _drop_detach_(ep: ExportedProgram) -> ExportedProgram:
    """Remove in-place `detach_` of intermediate tensors (DeBERTa detaches a lifted constant): autograd
    bookkeeping with no effect on values in an inference program, and an error once the tensor is a view
    into the arena ("Can't detach views in-place")."""
    inputs = {n for n in ep.graph.nodes if n.op == "placeholder"}
    dropped = [n for n in ep.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.detach_.default
               and n.args[0] not in inputs]
    for node in dropped:
        node.replace_all_uses_with(node.args[0])
        ep.graph.erase_node(node)
    if dropped:
        ep.graph_module.recompile()
    return ep


def _aten_grouped_mm(ep: ExportedProgram) -> ExportedProgram:
    """transformers' `grouped_mm_fallback` custom op (how its float32 MoE experts export) -> `aten._grouped_mm`,
    which computes the same rows (`x` `[S, K]` sorted by expert, `w` `[E, K, N]`, `offs` `[E]`) and which a saved
    program may call: artifacts load aten and memopt ops only. Kept where aten's kernel would refuse the strides
    (every stride but the unit one a multiple of 16 bytes)."""
    def aligned(v) -> bool:
        try:
            return isinstance(v, torch.Tensor) and all(int(s) == 1 or int(s) * v.element_size() % 16 == 0
                                                       for s in v.stride())
        except Exception:  # a symbolic stride: keep the fallback
            return False

    changed = False
    for node in ep.graph.nodes:
        if node.op == "call_function" and str(node.target) == "transformers.grouped_mm_fallback.default" \
                and all(aligned(a.meta.get("val")) for a in node.args[:2] if isinstance(a, torch.fx.Node)):
            node.target = torch.ops.aten._grouped_mm.default
            changed = True
    if changed:
        ep.graph_module.recompile()
    return ep


def _explain(exc: Exception, root: nn.Module, source: ModelSource) -> str:
    """Name the innermost nn.Module (and source line) that was executing when export failed."""
    names = {id(m): n for n, m in root.named_modules()}
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            where = (names[id(owner)] or "<root>", type(owner).__name__, frame.f_code.co_filename, lineno)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
    loc = f" in module {where[0]} ({where[1]}, {where[2]}:{where[3]})" if where else ""
    return (f"torch.export failed for {source.name}{loc}: {type(exc).__name__}: {first}. "
            "Try: a static shape (no --dynamic), a smaller --seq, loading with --dtype float32, or pass "
            "path/to/file.py:factory returning a wrapper module with plain tensor inputs and outputs.")
