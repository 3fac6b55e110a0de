"""Arena pass: planned intermediates live in one preallocated buffer, written there by the ops themselves.

Reads `plan.arena` (offsets per tensor, from `plan_arena`) and rewrites the GraphModule (an unlifted
`ExportedProgram.module()` with static shapes) so that:
  - one `uint8` buffer `_memopt_arena` of `plan.arena.size_bytes` bytes is allocated once;
  - each planned op writes its result through an `out=` kernel that writes directly (not one that computes a
    temporary and copies it, as ATen's generated out= wrappers of `convolution`, `layer_norm`, `embedding`
    do) into `arena_view(view_dtype(arena[offset : offset + span]), shape, stride)`; substitutes reach such
    a kernel for relu, eval batch_norm, copying reshapes, embedding and max_pool2d (`arena_kernels.writer`);
  - an op's scratch is planned too, live while the op runs: SDPA's additive form of a boolean mask, which
    SDPA would allocate at every call (four times the mask's bytes), named `<op>:scratch` in the plan;
  - ops without one (`conv2d`, SDPA, `layer_norm`, memopt's custom ops) are not planned: they allocate their
    result as eager PyTorch would, so no op's output is held twice (outside the arena and inside);
  - in place (`inplace=True`, after Inductor's buffer reuse): an elementwise op whose input dies there and
    has its exact shape, dtype and contiguous layout writes over that input. Inside the arena the planner
    merges the two into one tensor (both names get one offset); outside it the op writes `out=` its input
    (conv -> batch_norm -> relu then needs one buffer, not three). `inplace_pairs` is the rule;
  - `channels_last=True`: 2-D convolutions compute in channels_last where every reader of their results,
    transitively, takes any layout (`channels_last_convs`). On CPU, oneDNN computes an NCHW result into a
    blocked temporary and reorders it (the conv's own peak is twice its output; measured: a ResNet stem conv
    at batch 8 peaks at 49 MiB for a 24.5 MiB result), while an NHWC result is written directly.
Graph outputs are planned only with `outputs_in_arena=True` (as TFLite and ExecuTorch do): the module then
returns views into the arena that the next call overwrites, so the caller must clone what it keeps.

torch.compile: Inductor refuses writes through `as_strided` views of one buffer ("mutation on a view chain
... as_strided() is non-compositional"), and Dynamo refuses `out=` tensors that are not contiguous. So
`arena_view` is the one switch: eagerly it is the arena's bytes; while torch.compile or torch.export trace
it is a fresh tensor, so the compiled program is the arena-free program (every `out=` op becomes its
functional form) and Inductor does its own buffer reuse and fusion. memopt's plan is then the bound to
check Inductor against (`benchmarks/arena.py` and tests/test_compile.py measure both). Views built from
`slice`/`view` alone would compile too, but the program would then mutate a buffer it owns at every planned
tensor: Inductor must keep each write (no fusion across them, every intermediate materialized) and still
cannot take non-contiguous `out=` tensors. One graph serves both: `plan_check` reads the arena views, and
`torch.compile(result.module)` or `torch.compile(result.module.gm)` needs nothing else.
The kernels it writes with (the substitutes, the in-place and layout rules) are in `arena_kernels.py`.
After the ExecuTorch memory-planning pass and TFLite's arena planner.
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch
from torch import fx

from memopt.passes.arena_kernels import (  # noqa: F401  (out_variant, INPLACE_ARGS: part of this module's API)
    INPLACE_ARGS,
    channels_last_convs,
    conv2d_channels_last,
    inplace_pairs,
    out_variant,
    scratch_of,
    sdpa_scratch_mask,
    writer,
)
from memopt.passes.base import Pass, PassResult

ARENA_ATTR = "_memopt_arena"
SCRATCH = ":scratch"  # plan name suffix of an op's scratch, live only while the op runs


@dataclass(frozen=True)
class ArenaConfig:
    alignment: int = 64
    time_limit_s: float = 10.0
    solver: str = "cbc"
    outputs_in_arena: bool = False
    inplace: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {self.alignment}")
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")
        if self.solver not in ("cbc", "highs", "greedy"):
            raise ValueError(f"solver must be cbc, highs or greedy, got {self.solver!r}")
        for name in ("outputs_in_arena", "inplace", "channels_last"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("activation", "output") if self.outputs_in_arena else ("activation",)

    def to_json(self) -> dict:
        return {"type": "arena", "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict | str) -> ArenaConfig:
        """From `to_json`'s dict (or the JSON text plans written before version 0.1 of the plan held)."""
        from memopt.jsonconfig import config_from_json

        if isinstance(d, str):  # an older plan: the config as a JSON string, without a type tag
            d = {"type": "arena", **json.loads(d)}
        return config_from_json(cls, d, "arena", 1)


def arena_view(base: torch.Tensor, shape: list[int], stride: list[int]) -> torch.Tensor:
    """A planned tensor's bytes: `base` (the arena's slice, viewed as its dtype) as_strided to its layout.
    While torch.compile or torch.export trace, a fresh contiguous tensor instead (see the module doc)."""
    if torch.compiler.is_compiling():
        return base.new_empty(shape)
    return torch.ops.aten.as_strided.default(base, shape, stride)


def _nbytes(val: torch.Tensor) -> int:
    return max(_span_elems(val.shape, val.stride()), 0) * val.element_size()


def _span_elems(shape, stride) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def _arena_view(graph: fx.Graph, arena: fx.Node, offset: int, val: torch.Tensor) -> fx.Node:
    """slice -> view(dtype) -> arena_view, so plan_check reads the offset back from the graph."""
    shape, stride = [int(s) for s in val.shape], [int(s) for s in val.stride()]
    nbytes = max(_span_elems(shape, stride), 1) * val.element_size()
    raw = graph.call_function(torch.ops.aten.slice.Tensor, (arena, 0, offset, offset + nbytes))
    typed = graph.call_function(torch.ops.aten.view.dtype, (raw, val.dtype))
    return graph.call_function(arena_view, (typed, shape, stride))


# ---------------------------------------------------------------- planning
def arena_memgraph(analysis, config: ArenaConfig):
    """(MemGraph of the tensors the pass writes into the arena, {member: head} of in-place chains).

    A tensor is planned when its op has a direct `out=` kernel (`writer`) and its kind is in `config.kinds`;
    an in-place chain (head, then ops writing over it) is one tensor, live from the head's op to the last
    member's last read; an op's scratch (`scratch_of`, named `<op>:scratch`) is live at that op only."""
    from memopt.solvers.memgraph import MemGraph, MemTensor

    graph = analysis.captured.exported.graph
    nodes = {n.name: n for n in graph.nodes}
    pairs = inplace_pairs(graph) if config.inplace else {}
    head = {}
    for n in graph.nodes:  # in order: a member's input already knows its head
        if n.name in pairs:
            head[n.name] = head.get(pairs[n.name], pairs[n.name])
    g = analysis.to_memgraph()
    end = {t.name: t.end for t in g.tensors}
    for member, h in head.items():  # a head that is no storage of the analysis (a getitem) is never planned
        end[h] = max(end.get(h, -1), end.get(member, -1))
    tensors = tuple(replace(t, end=end[t.name], size_bytes=_nbytes(nodes[t.name].meta["val"])) for t in g.tensors
                    if t.kind in config.kinds and t.name in nodes and t.name not in head and writer(nodes[t.name]))
    planned = {t.name for t in tensors}
    index = {op.name: i for i, op in enumerate(g.ops)}
    scratch = tuple(MemTensor(n.name + SCRATCH, _nbytes(scratch_of(n)), "activation", index[n.name], index[n.name])
                    for n in graph.nodes if n.name in index and scratch_of(n) is not None)
    return MemGraph(g.ops, tensors + scratch, g.meta), {m: h for m, h in head.items() if h in planned}


def plan_arena(analysis, config: ArenaConfig | None = None):
    """The ArenaPlan for `analysis`'s program: offsets of the tensors the pass writes into the arena (both names
    of an in-place pair at one offset), by the config's solver; outputs only with `outputs_in_arena`."""
    from memopt.solvers.arena import greedy_arena, solve_arena

    config = config or ArenaConfig()
    g, chains = arena_memgraph(analysis, config)
    if config.solver == "greedy":
        plan = greedy_arena(g, kinds=config.kinds, alignment=config.alignment)
    else:
        plan = solve_arena(g, kinds=config.kinds, alignment=config.alignment, time_limit_s=config.time_limit_s,
                           solver=config.solver)
    return replace(plan, offsets={**plan.offsets, **{m: plan.offsets[h] for m, h in chains.items()}},
                   sizes={**plan.sizes, **{m: plan.sizes[h] for m, h in chains.items()}})


# ---------------------------------------------------------------- the pass
class ArenaPass(Pass):
    """Place every tensor of `plan.arena.offsets` into one preallocated arena; ops outside it write in place
    where `inplace_pairs` allows. Without a config, the one in `plan.pass_configs["arena"]` (or the default)."""

    name = "arena"

    def __init__(self, config: ArenaConfig | None = None):
        self.config = config

    def __call__(self, gm: fx.GraphModule, plan) -> PassResult:
        arena_plan = getattr(plan, "arena", None)
        if arena_plan is None:
            raise ValueError("the arena pass needs plan.arena; plan it first with memopt.passes.arena.plan_arena")
        config = self.config or _config_of(plan)
        graph = gm.graph
        nodes = {n.name: n for n in graph.nodes}
        pairs = inplace_pairs(graph) if config.inplace else {}
        device = next((b.device for b in gm.buffers()), None) or next((p.device for p in gm.parameters()), None)
        gm.register_buffer(ARENA_ATTR, torch.empty(arena_plan.size_bytes, dtype=torch.uint8, device=device))
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            arena = graph.get_attr(ARENA_ATTR)
        placed, copied, inplace, scratched = 0, Counter(), 0, 0
        convs = channels_last_convs(graph) if config.channels_last else []
        for conv in convs:  # never planned (no direct out= kernel): only the layout it computes in changes
            conv.target = conv2d_channels_last
            conv.meta["memopt_replaces"] = conv.name
        for name, offset in arena_plan.offsets.items():
            if name.endswith(SCRATCH):  # SDPA making its additive mask in the arena
                node = nodes[name.removesuffix(SCRATCH)]
                with graph.inserting_before(node):
                    view = _arena_view(graph, arena, offset, scratch_of(node))
                    new = graph.call_function(sdpa_scratch_mask, node.args, {**node.kwargs, "scratch": view})
                new.meta = {**node.meta, "memopt_replaces": node.name}
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                nodes[new.meta["memopt_replaces"]], scratched = new, scratched + 1
                continue
            node_name, _, index = name.partition("[")
            node = nodes.get(node_name)
            if node is None:
                raise ValueError(f"arena plan names tensor {name!r}, which is not in the graph; re-plan this graph")
            if index:  # one output of a multi-output op (plans before direct writers only): copy it in
                for u in [u for u in node.users if u.target is operator.getitem and u.args[1] == int(index[:-1])]:
                    self._copy_in(graph, arena, u, offset, u.meta["val"])
                copied[str(node.target)] += 1
                continue
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ValueError(f"arena plan names {name!r}, which is not a single tensor")
            if writer(node) is None:  # a plan from before direct writers: the result is copied in
                self._copy_in(graph, arena, node, offset, val)
                copied[str(node.target)] += 1
                continue
            with graph.inserting_before(node):
                nodes[name] = self._write(graph, node, _arena_view(graph, arena, offset, val))
            placed += 1
        for y, x in pairs.items():  # outside the arena: write over the dying input
            if y not in arena_plan.offsets and x not in arena_plan.offsets:
                with graph.inserting_before(nodes[y]):
                    nodes[y] = self._write(graph, nodes[y], nodes[x])
                inplace += 1
        graph.lint()
        gm.recompile()
        gm.meta["memopt_arena"] = {"size_bytes": arena_plan.size_bytes, "out_variant_ops": placed,
                                   "copied_ops": dict(copied), "inplace_ops": inplace,
                                   "channels_last_convs": len(convs), "scratch_ops": scratched}
        notes = [f"arena {arena_plan.size_bytes} bytes holds {placed + sum(copied.values())} intermediates written "
                 f"by their ops' out= kernels ({placed})"
                 + (f" or copied in ({', '.join(f'{k} x{v}' for k, v in copied.most_common())})" if copied else "")
                 + f"; {inplace} ops outside it write over their dying input"
                 + (f"; {len(convs)} convolutions compute in channels_last" if convs else "")
                 + (f"; {scratched} SDPA calls make their additive mask in it" if scratched else "")]
        return PassResult(gm, True, notes)

    @staticmethod
    def _write(graph: fx.Graph, node: fx.Node, out: fx.Node) -> fx.Node:
        """Replace `node` by its writer into `out` (inserted where the graph's cursor is)."""
        target, args, kwargs = writer(node)
        new = graph.call_function(target, tuple(args), {**kwargs, "out": out})
        new.meta = {**node.meta, "memopt_replaces": node.name}  # the planned op's name, for plan_check
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return new

    @staticmethod
    def _copy_in(graph: fx.Graph, arena: fx.Node, node: fx.Node, offset: int, val: torch.Tensor) -> None:
        users = list(node.users)
        with graph.inserting_before(node.next):  # in order, right after `node`
            view = _arena_view(graph, arena, offset, val)
            copy = graph.call_function(torch.ops.aten.copy_.default, (view, node))
        copy.meta = dict(node.meta)
        for u in users:
            u.replace_input_with(node, copy)


def _config_of(plan) -> ArenaConfig:
    given = (getattr(plan, "pass_configs", None) or {}).get("arena")
    return ArenaConfig.from_json(given) if isinstance(given, (str, dict)) else ArenaConfig()
