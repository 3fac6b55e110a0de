"""Account for every byte of a captured graph.

Builds a table of every tensor (bytes, dtype, shape, producer, consumers, kind), liveness in the
graph's order, the memory timeline and the live-set lower bound, and lowers it all to a
`MemGraph` of plain ints and strings for the solvers.

Storage model: ops whose schema says their result aliases an input (views, in-place ops) create no
storage; their uses extend the base tensor's lifetime. Each tensor output of a multi-output op (topk,
sort, max.dim, native_layer_norm) is a storage of its own, sized by itself and named `op[i]`; a `getitem`
of it creates nothing and reads that storage.
A tensor is live over [producer index, last use index]; graph inputs, weights and buffers from
-1, graph outputs until len(ops). "Live at op i" includes op i's inputs and outputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.export.graph_signature import InputKind
from torch.multiprocessing.reductions import StorageWeakRef

from memopt.capture import Captured
from memopt.names import BLOCK_NAME, KV_NAME
from memopt.solvers.memgraph import MemGraph, MemOp, MemTensor

ACTIVATION_KINDS = ("activation", "output")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: str
    bytes: int  # 0 for views: they share their base's storage
    dtype: str
    shape: tuple[int, ...]
    producer: str
    consumers: tuple[str, ...]
    alias_of: str = ""
    start: int = -1
    end: int = -1
    scope: str = ""


@dataclass
class Analysis:
    captured: Captured
    op_names: list[str]
    op_targets: list[str]
    op_blocks: list[str]
    op_inputs: list[tuple[str, ...]]
    op_outputs: list[tuple[str, ...]]
    tensors: list[TensorInfo]
    weights_bytes: int
    buffer_bytes: int
    kv_cache_bytes: int
    timeline: dict[str, list[int]] = field(default_factory=dict)  # kind -> bytes live at each op

    @property
    def storages(self) -> list[TensorInfo]:
        return [t for t in self.tensors if not t.alias_of]

    @property
    def num_ops(self) -> int:
        return len(self.op_names)

    def live_activation_bytes(self) -> list[int]:
        return [a + o for a, o in zip(self.timeline["activation"], self.timeline["output"])]

    @property
    def activation_lower_bound_bytes(self) -> int:
        """Max over ops of live intermediate + output bytes: no arena for this order is smaller."""
        return max(self.live_activation_bytes(), default=0)

    @property
    def activation_peak_bytes(self) -> int:
        """Max over ops of everything that is not a weight, buffer or KV cache: inputs included."""
        live = [x + i for x, i in zip(self.live_activation_bytes(), self.timeline["input"])]
        return max(live, default=0)

    @property
    def peak_op(self) -> str:
        live = self.live_activation_bytes()
        return self.op_names[live.index(max(live))] if live else ""

    def total_timeline(self) -> list[int]:
        return [sum(v[i] for v in self.timeline.values()) for i in range(self.num_ops)]

    def to_memgraph(self) -> MemGraph:
        ops = tuple(MemOp(n, t, i, o, b) for n, t, i, o, b in
                    zip(self.op_names, self.op_targets, self.op_inputs, self.op_outputs, self.op_blocks))
        tensors = tuple(MemTensor(t.name, t.bytes, t.kind, t.start, t.end, t.dtype, t.shape) for t in self.storages)
        c = self.captured
        return MemGraph(ops, tensors, {"model": c.source.name, "phase": c.phase, "batch": c.batch, "seq": c.seq})


def _concrete(x) -> int:
    if isinstance(x, int):
        return x
    try:
        return int(x)
    except Exception:
        hint = getattr(getattr(x, "node", None), "hint", None)
        if hint is None:
            raise ValueError(f"cannot size a tensor with symbolic dimension {x}; capture with a static shape")
        return int(hint)


def _nbytes(v: torch.Tensor) -> int:
    numel = 1
    for s in v.shape:
        numel *= _concrete(s)
    return numel * v.element_size()


def _same_storage(a, b) -> bool:
    try:
        return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())
    except Exception:  # no storage to compare: trust the schema
        return True


def _aliases_input(node: torch.fx.Node) -> bool:
    """True when the op's result shares storage with its first input: the schema says it may
    (views, in-place ops) and the FakeTensors agree (`reshape` or `to` that had to copy do not)."""
    if node.target is operator.getitem:
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return _returns_its_input(node)
    val, first = node.meta.get("val"), node.args[0] if node.args else None
    if isinstance(val, (tuple, list)):
        val = next((v for v in val if isinstance(v, torch.Tensor)), None)
    if isinstance(val, torch.Tensor) and isinstance(first, torch.fx.Node):
        src = first.meta.get("val")
        if isinstance(src, torch.Tensor):
            return _same_storage(val, src)
    return True


_DROPOUTS = ("aten::dropout", "aten::feature_dropout", "aten::alpha_dropout", "aten::feature_alpha_dropout")


def _returns_its_input(node: torch.fx.Node) -> bool:
    """A composite op whose schema promises a new tensor but that, when run, hands back its input itself:
    dropout in eval mode (or with p = 0), `contiguous` of a contiguous tensor, `type_as` to its own dtype,
    `_unsafe_view`. Export's FakeTensors do not show it (they are fresh), so the ops are named here."""
    name = getattr(getattr(node.target, "_schema", None), "name", "")
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node):
        return False
    if name in _DROPOUTS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return train is False or p == 0
    src = first.meta.get("val")
    if name == "aten::contiguous":
        fmt = node.kwargs.get("memory_format", torch.contiguous_format)
        return isinstance(src, torch.Tensor) and src.is_contiguous(memory_format=fmt)
    if name == "aten::type_as":  # self.to(other.dtype): self itself when the dtype already matches
        other = node.args[1].meta.get("val") if len(node.args) > 1 and isinstance(node.args[1], torch.fx.Node) else None
        return isinstance(src, torch.Tensor) and isinstance(other, torch.Tensor) and src.dtype == other.dtype
    return name == "aten::_unsafe_view"  # a view whose schema does not say so


def _scope(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _block(scope: str) -> str:
    m = BLOCK_NAME.match(scope)
    return m.group(1) if m else ""


def _placeholder_kinds(captured: Captured) -> dict[str, str]:
    kinds = {}
    for spec in captured.exported.graph_signature.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            kinds[name] = "weight"
        elif spec.kind in (InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            kinds[name] = "kv_cache" if KV_NAME.search(spec.target or "") else "buffer"
        else:
            kinds[name] = "input"
    return kinds


def _model_weight_bytes(captured: Captured) -> int:
    src = captured.source
    if src.weights_bytes_override is not None:
        return src.weights_bytes_override
    seen, total = set(), 0
    for p in src.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def analyze(captured: Captured) -> Analysis:
    graph = captured.exported.graph
    kinds = _placeholder_kinds(captured)
    ops = [n for n in graph.nodes if n.op == "call_function"]
    index = {n: i for i, n in enumerate(ops)}
    n_ops = len(ops)

    base: dict[torch.fx.Node, str] = {}  # node -> name of the storage it lives in
    elements: dict[torch.fx.Node, dict[int, str]] = {}  # multi-output op -> {output index: storage name}
    rows: dict[str, dict] = {}
    for node in graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            base[node] = node.name
            rows[node.name] = dict(kind=kinds.get(node.name, "input"), val=val, producer="", start=-1, alias_of="",
                                   scope="")
        elif node.op == "call_function" and isinstance(val, (torch.Tensor, tuple, list)):
            first = node.args[0] if node.args else None
            if node.target is operator.getitem and first in elements:
                if node.args[1] in elements[first]:  # one output of a multi-output op: its own storage
                    base[node] = elements[first][node.args[1]]
                continue  # a non-tensor output (SymInt, None): no storage
            if _aliases_input(node) and isinstance(first, torch.fx.Node) and base.get(first) in rows:
                base[node] = base[first]
                if isinstance(val, torch.Tensor):
                    rows[node.name] = dict(kind=rows[base[first]]["kind"], val=val, producer=node.name,
                                           start=index[node], alias_of=base[first], scope=_scope(node))
                continue
            if isinstance(val, torch.Tensor):
                base[node] = node.name
                rows[node.name] = dict(kind="activation", val=val, producer=node.name, start=index[node],
                                       alias_of="", scope=_scope(node))
            else:  # a multi-output op (topk, sort, max.dim, native_layer_norm, ...): each tensor output
                elements[node] = {}  # is a storage of its own, sized by itself, reached through getitem
                for i, v in enumerate(val):
                    if isinstance(v, torch.Tensor):
                        elements[node][i] = f"{node.name}[{i}]"
                        rows[f"{node.name}[{i}]"] = dict(kind="activation", val=v, producer=node.name,
                                                         start=index[node], alias_of="", scope=_scope(node))

    end: dict[str, int] = {name: r["start"] for name, r in rows.items()}
    consumers: dict[str, list[str]] = {name: [] for name in rows}
    produced: dict[str, list[str]] = {}
    for name, r in rows.items():
        if not r["alias_of"]:
            produced.setdefault(r["producer"], []).append(name)
    picked = {n: base[n] for n in ops if n.target is operator.getitem and n.args[0] in elements and n in base}

    def consumer_key(arg: torch.fx.Node) -> str:  # a getitem's readers read the element's storage
        return picked.get(arg, arg.name)

    op_inputs, op_outputs = [], []
    for node in ops:
        if node in picked:  # getitem of a multi-output op: reads its element, writes nothing
            end[picked[node]] = max(end[picked[node]], index[node])
            op_inputs.append((picked[node],))
            op_outputs.append(())
            continue
        ins = []
        for arg in node.all_input_nodes:
            if arg in base and base[arg] in end:
                end[base[arg]] = max(end[base[arg]], index[node])
                if consumer_key(arg) in consumers:
                    consumers[consumer_key(arg)].append(node.name)
                if base[arg] not in ins:
                    ins.append(base[arg])
        op_inputs.append(tuple(ins))
        outs = produced.get(node.name, ())
        if not outs and node in base and base[node] in end and base[node] != node.name:
            outs = (base[node],)  # a view or in-place op: ordered like a write to its base
        op_outputs.append(tuple(outs))
    for out in (n for n in graph.output_node().all_input_nodes if n in base):
        name = base[out]
        end[name] = n_ops
        if rows[name]["kind"] == "activation":
            rows[name]["kind"] = "output"
        consumers.setdefault(consumer_key(out), []).append("output")
    for name, r in rows.items():
        if r["kind"] in ("weight", "buffer", "kv_cache"):
            end[name] = n_ops  # resident for the whole run

    tensors = []
    for name, r in rows.items():
        v = r["val"]
        storage = r["alias_of"] or name
        tensors.append(TensorInfo(
            name=name, kind=rows[storage]["kind"], bytes=0 if r["alias_of"] else _nbytes(v),
            dtype=str(v.dtype).replace("torch.", ""), shape=tuple(_concrete(s) for s in v.shape),
            producer=r["producer"], consumers=tuple(consumers.get(name, ())), alias_of=r["alias_of"],
            start=r["start"], end=end[storage], scope=r["scope"]))

    def total(kind: str) -> int:
        return sum(t.bytes for t in tensors if t.kind == kind and not t.alias_of)

    analysis = Analysis(
        captured=captured, op_names=[n.name for n in ops], op_targets=[str(n.target) for n in ops],
        op_blocks=[_block(_scope(n)) for n in ops], op_inputs=op_inputs, op_outputs=op_outputs,
        tensors=tensors, weights_bytes=_model_weight_bytes(captured), buffer_bytes=total("buffer"),
        kv_cache_bytes=total("kv_cache"))
    analysis.timeline = _timeline(tensors, n_ops)
    return analysis


def _timeline(tensors: list[TensorInfo], n_ops: int) -> dict[str, list[int]]:
    """Bytes of each kind live at each op (closed lifetimes)."""
    out = {}
    for kind in ("weight", "buffer", "kv_cache", "input", "activation", "output"):
        delta = [0] * (n_ops + 2)
        for t in tensors:
            if t.kind != kind or t.alias_of:
                continue
            lo, hi = max(t.start, 0), min(t.end, n_ops - 1)
            if lo <= hi:
                delta[lo] += t.bytes
                delta[hi + 1] -= t.bytes
        acc, series = 0, []
        for i in range(n_ops):
            acc += delta[i]
            series.append(acc)
        out[kind] = series
    return out
