"""Arena pass: every planned intermediate becomes a view into one preallocated buffer.

Reads `plan.arena` (offsets per tensor, from `memopt.solvers.arena.solve_arena`) and rewrites the
GraphModule (an unlifted `ExportedProgram.module()` with static shapes) so that:
  - one `uint8` buffer `_memopt_arena` of `plan.arena.size_bytes` bytes is allocated once;
  - each planned op writes its result through its `out=` variant into
    `as_strided(view_dtype(arena[offset : offset + span]), shape, stride)`;
  - ops with no `out=` variant (e.g. scaled_dot_product_attention, layer_norm) compute as usual and
    their result is copied into the arena at once, so only that op's own transient output lives
    outside it; these are counted and listed in the notes.
Graph outputs are planned only with `outputs_in_arena=True` (as TFLite and ExecuTorch do): the
module then returns views into the arena that the next call overwrites, so the caller must clone
what it keeps. By default outputs are fresh tensors the caller owns.
After the ExecuTorch memory-planning pass and TFLite's arena planner.
"""

from __future__ import annotations

import json
import operator
from collections import Counter
from dataclasses import asdict, dataclass

import torch
from torch import fx

from memopt.passes.base import Pass, PassResult

ARENA_ATTR = "_memopt_arena"


@dataclass(frozen=True)
class ArenaConfig:
    alignment: int = 64
    time_limit_s: float = 10.0
    solver: str = "cbc"
    outputs_in_arena: bool = False

    def __post_init__(self) -> None:
        if self.alignment < 1 or self.alignment & (self.alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {self.alignment}")
        if self.time_limit_s <= 0:
            raise ValueError(f"time_limit_s must be > 0, got {self.time_limit_s}")
        if self.solver not in ("cbc", "highs", "greedy"):
            raise ValueError(f"solver must be cbc, highs or greedy, got {self.solver!r}")

    def to_json(self) -> str:
        return json.dumps({"version": 1, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> "ArenaConfig":
        d = json.loads(text)
        d.pop("version", None)
        return cls(**d)


def out_variant(op) -> torch._ops.OpOverload | None:
    """The `out=` overload whose other arguments match `op`'s exactly, with a single `out` tensor."""
    packet = getattr(op, "overloadpacket", None)
    schema = getattr(op, "_schema", None)
    if packet is None or schema is None:
        return None
    want = [(a.name, str(a.type)) for a in schema.arguments]
    for name in packet.overloads():
        cand = getattr(packet, name)
        args = cand._schema.arguments
        outs = [a for a in args if a.is_out]
        if len(outs) != 1 or outs[0].name != "out" or len(cand._schema.returns) != 1:
            continue
        if [(a.name, str(a.type)) for a in args if not a.is_out] == want:
            return cand
    return None


def _span_elems(shape, stride) -> int:
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(shape, stride))


def _arena_view(graph: fx.Graph, arena: fx.Node, offset: int, val: torch.Tensor) -> fx.Node:
    """aten ops only, so the rewritten graph stays traceable: slice -> view(dtype) -> as_strided."""
    shape, stride = [int(s) for s in val.shape], [int(s) for s in val.stride()]
    nbytes = max(_span_elems(shape, stride), 1) * val.element_size()
    raw = graph.call_function(torch.ops.aten.slice.Tensor, (arena, 0, offset, offset + nbytes))
    typed = graph.call_function(torch.ops.aten.view.dtype, (raw, val.dtype))
    return graph.call_function(torch.ops.aten.as_strided.default, (typed, shape, stride))


class ArenaPass(Pass):
    """Place every tensor of `plan.arena.offsets` into one preallocated arena."""

    name = "arena"

    def __init__(self, config: ArenaConfig | None = None):
        self.config = config or ArenaConfig()

    def __call__(self, gm: fx.GraphModule, plan) -> PassResult:
        arena_plan = getattr(plan, "arena", None)
        if arena_plan is None:
            raise ValueError("the arena pass needs plan.arena; plan it first with memopt.solvers.arena.solve_arena")
        graph = gm.graph
        nodes = {n.name: n for n in graph.nodes}
        device = next((b.device for b in gm.buffers()), None) or next((p.device for p in gm.parameters()), None)
        gm.register_buffer(ARENA_ATTR, torch.empty(arena_plan.size_bytes, dtype=torch.uint8, device=device))
        first = next(n for n in graph.nodes if n.op != "placeholder")
        with graph.inserting_before(first):
            arena = graph.get_attr(ARENA_ATTR)
        placed, copied = 0, Counter()
        for name, offset in arena_plan.offsets.items():
            node_name, _, index = name.partition("[")
            node = nodes.get(node_name)
            if node is None:
                raise ValueError(f"arena plan names tensor {name!r}, which is not in the graph; re-plan this graph")
            if index:  # one output of a multi-output op: copy the getitem result in
                users = [u for u in node.users if u.target is operator.getitem and u.args[1] == int(index[:-1])]
                for u in users:
                    self._copy_in(graph, arena, u, offset, u.meta["val"])
                copied[str(node.target)] += 1
                continue
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ValueError(f"arena plan names {name!r}, which is not a single tensor")
            out_op = out_variant(node.target) if node.op == "call_function" else None
            if out_op is not None:
                with graph.inserting_before(node):
                    view = _arena_view(graph, arena, offset, val)
                    new = graph.call_function(out_op, node.args, {**node.kwargs, "out": view})
                new.meta = {**node.meta, "memopt_replaces": node.name}  # the planned op's name, for plan_check
                node.replace_all_uses_with(new)
                graph.erase_node(node)
                placed += 1
            else:
                self._copy_in(graph, arena, node, offset, val)
                copied[str(node.target)] += 1
        graph.lint()
        gm.recompile()
        total = placed + sum(copied.values())
        notes = [f"arena {arena_plan.size_bytes} bytes holds {total} intermediates: {placed} written through out=, "
                 f"{sum(copied.values())} copied in (no out= variant: "
                 + ", ".join(f"{k} x{v}" for k, v in copied.most_common()) + ")"]
        gm.meta["memopt_arena"] = {"size_bytes": arena_plan.size_bytes, "out_variant_ops": placed,
                                   "copied_ops": dict(copied)}
        return PassResult(gm, True, notes)

    @staticmethod
    def _copy_in(graph: fx.Graph, arena: fx.Node, node: fx.Node, offset: int, val: torch.Tensor) -> None:
        users = list(node.users)
        with graph.inserting_before(node.next):  # in order, right after `node`
            view = _arena_view(graph, arena, offset, val)
            copy = graph.call_function(torch.ops.aten.copy_.default, (view, node))
        copy.meta = dict(node.meta)
        for u in users:
            u.replace_input_with(node, copy)
