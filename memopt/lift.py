"""A rewritten program back to an `ExportedProgram` without tracing it again.

Passes rewrite `ExportedProgram.module()`: an unlifted GraphModule, its parameters and buffers read by `get_attr`,
its input guards a `_guards_fn` call. memopt's programs are torch.export's training IR, which keeps in-place ops
(a static KV cache's `copy_`, `memopt::kv_attend` writing its state) in the graph, with no mutation outputs; so the
exported form of a rewritten module is the module's own graph with its tensors lifted back to inputs: a `p_<name>`
placeholder per parameter and a `b_<name>` per buffer (the module's order, an alias sharing its tensor's), then
the user inputs, then a user output per flat output. `torch.export.export` of the module gives that graph op for op,
with the same node names and signature (tests/test_capture.py compares the two), by tracing every op again under
fake tensors (~2.5 ms an op on SmolLM2's dynamic generation program). Here a node keeps the `val` its last export
computed unless the passes added it or changed what it reads; only those are run again on fake inputs, in the
program's own fake mode (its symbolic sizes stay the same symbols).

`lift` returns None, and the caller exports, for a module it cannot lift: a call of anything but an op overload,
a higher-order op or a Python operator; a tensor attribute that is neither a parameter nor a buffer; a submodule
call other than the input guards; an op whose fake kernel fails or that makes a data-dependent size.
"""

from __future__ import annotations

import copy
import operator
import threading

import torch
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry
from torch.export.graph_signature import (
    ConstantArgument,
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    TensorArgument,
)

_LOCK = threading.Lock()
_OPERATORS = frozenset(v for v in vars(operator).values() if callable(v))
_DROPPED_META = ("from_node",)  # provenance: memopt reads none, artifacts keep none (capture.without_provenance)


def lift(gm: torch.fx.GraphModule, like: ExportedProgram) -> ExportedProgram | None:
    """`gm` (`like.module()`, rewritten by passes) as an ExportedProgram like `torch.export.export(gm, ...)`'s, or None
    when it cannot be lifted (see the module doc)."""
    from torch._guards import detect_fake_mode

    info = getattr(gm.graph._codegen, "pytree_info", None)
    params = dict(gm.named_parameters(remove_duplicate=False))
    buffers = dict(gm.named_buffers(remove_duplicate=False))
    if info is None or not _liftable(gm, params, buffers):
        return None
    fake = detect_fake_mode([n.meta.get("val") for n in like.graph.nodes if n.op == "placeholder"])
    if fake is None:
        return None
    try:
        with _LOCK:  # the fake mode (and its symbols) may be a kept trace's, shared by compiles on other threads
            return _lift(gm, like, info, params, buffers, fake)
    except Exception:  # a fake kernel that refuses (e.g. aten._grouped_mm in float32), a program torch's verifier
        return None  # refuses: export traces it instead


def _lift(gm: torch.fx.GraphModule, like: ExportedProgram, info, params: dict, buffers: dict,
          fake) -> ExportedProgram | None:
    old = {n.name: n for n in like.graph.nodes}
    transient = set()
    for prefix, module in gm.named_modules(remove_duplicate=False):
        transient.update(f"{prefix}.{b}" if prefix else b for b in module._non_persistent_buffers_set)

    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    specs, state, constants, lifted, by_tensor = [], {}, {}, {}, {}
    for fqn, t in [*params.items(), *buffers.items()]:
        if id(t) in by_tensor:  # an alias (tied weights): the tensor's first name holds it, as export lifts it
            lifted[fqn] = by_tensor[id(t)]
            continue
        kind = InputKind.PARAMETER if fqn in params else InputKind.BUFFER
        node = graph.placeholder(("p_" if kind is InputKind.PARAMETER else "b_") + fqn.replace(".", "_"))
        before = old.get(node.name)
        kept = before is not None and before.op == "placeholder" and _same_meta(before.meta.get("val"), t)
        node.meta["val"] = before.meta["val"] if kept else fake.from_tensor(t, static_shapes=True)
        by_tensor[id(t)] = lifted[fqn] = node
        persistent = None if kind is InputKind.PARAMETER else fqn not in transient
        specs.append(InputSpec(kind, TensorArgument(node.name), fqn, persistent))
        (constants if persistent is False else state)[fqn] = t
    for node in gm.graph.find_nodes(op="placeholder"):
        new = env[node] = graph.placeholder(node.name)
        new.meta = _meta(node)
        before = old.get(node.name)
        if before is not None and before.op == "placeholder" and "val" in before.meta \
                and _same_meta(before.meta["val"], node.meta.get("val")):  # the program's own fake value (the
            new.meta["val"] = before.meta["val"]  # module's is a copy): one fake mode, the same symbols
        elif not isinstance(node.meta.get("val"), torch.Tensor):
            return None
        specs.append(InputSpec(InputKind.USER_INPUT, TensorArgument(new.name), None, None))

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node] = lifted[node.target]
        elif node.op == "call_function":
            new = env[node] = graph.node_copy(node, env.__getitem__)
            new.meta = _meta(node)
            if not _val(new, old.get(node.name), fake):
                return None
        elif node.op == "output":
            outs = node.args[0] if isinstance(node.args[0], (list, tuple)) else (node.args[0],)
            graph.output(tuple(env[o] if isinstance(o, torch.fx.Node) else o for o in outs))
    out_specs = [OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(o.name) if isinstance(o, torch.fx.Node)
                            else ConstantArgument("", o), None) for o in graph.output_node().args[0]]
    calls = [ModuleCallEntry(e.fqn, copy.copy(e.signature)) for e in like.module_call_graph]
    if not calls or calls[0].fqn != "" or calls[0].signature is None:
        return None
    calls[0].signature.in_spec, calls[0].signature.out_spec = info.in_spec, info.out_spec
    ep = ExportedProgram(root={**state, **constants}, graph=graph,
                         graph_signature=ExportGraphSignature(specs, out_specs), state_dict=state,
                         range_constraints=like.range_constraints, module_call_graph=calls, constants=constants,
                         verifiers=like.verifiers)
    ep.graph_module.meta.update(gm.meta)
    return ep


def adopt(gm: torch.fx.GraphModule, ep: ExportedProgram) -> bool:
    """Let `gm` stand for `ep.module()` (the GraphModule `ep` was lifted or exported from, saving its unlifting:
    a copy of the graph and its code generated again): when `ep`'s graph is `gm`'s node for node (the same names,
    ops and arguments; each `get_attr` a placeholder of the same tensor), `gm`'s nodes take `ep`'s fake values, as
    unlifting gives them, and True; else False and `gm` is left as it was. A program with example inputs (an
    export's) is not adopted: unlifting it makes input guards of its own, where `gm`'s are its first capture's."""
    if getattr(ep, "example_inputs", None):
        return False
    theirs = {n.name: n for n in ep.graph.nodes}
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    held = {**ep.constants, **ep.state_dict}
    by_tensor = {id(held[fqn]): theirs[name] for name, fqn in names.items() if fqn in held and name in theirs}
    tables = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    match: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            other = by_tensor.get(id(tables.get(node.target)))
        elif node.op in ("placeholder", "call_function"):
            other = theirs.get(node.name)  # (an input's placeholder: matched by name; lifting names its target so)
            if other is None or other.op != node.op or (node.op == "call_function" and other.target != node.target):
                return False
            try:
                same = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: ("node", match.get(n))) == \
                    torch.fx.node.map_arg((other.args, other.kwargs), lambda n: ("node", n))
            except Exception:  # a value without a plain equality
                same = False
            if not same:
                return False
        elif node.op == "call_module" and node.target != "_guards_fn":
            return False
        else:
            continue
        if other is None or "val" not in other.meta:
            return False
        match[node] = other
    outs = gm.graph.output_node().args[0]
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    if [match.get(o, o) if isinstance(o, torch.fx.Node) else o for o in outs] != list(ep.graph.output_node().args[0]):
        return False
    if len(match) != sum(1 for n in ep.graph.nodes if n.op in ("placeholder", "call_function")
                         and not (n.op == "placeholder" and n.name in names)) + \
            sum(1 for n in gm.graph.nodes if n.op == "get_attr"):
        return False
    for node, other in match.items():
        node.meta["val"] = other.meta["val"]
        for key in _DROPPED_META:
            node.meta.pop(key, None)
    guards = gm.graph.find_nodes(op="call_module", target="_guards_fn")
    for node in guards:  # a lifted program has no example inputs, so no guards: its pre-hook checks inputs
        gm.graph.erase_node(node)
    if guards:
        delattr(gm, "_guards_fn")
        gm.recompile()
    return True


def _liftable(gm: torch.fx.GraphModule, params: dict, buffers: dict) -> bool:
    for node in gm.graph.nodes:
        if node.op == "call_function" and not (isinstance(node.target, (torch._ops.OpOverload,
                                                                         torch._ops.HigherOrderOperator))
                                               or node.target in _OPERATORS):
            return False
        if node.op == "get_attr" and node.target not in params and node.target not in buffers:
            return False
        if node.op == "call_module" and node.target != "_guards_fn":
            return False
    return True


def _meta(node: torch.fx.Node) -> dict:
    return {k: v for k, v in node.meta.items() if k not in _DROPPED_META}


def _val(new: torch.fx.Node, before: torch.fx.Node | None, fake) -> bool:
    """Give `new` its fake value: its namesake's in `like` when it calls the same op on the same inputs (matched by
    name, each input's value the same, or for an input the value does not alias, described the same), else by
    running the op on its inputs' fake values. False: a data-dependent size appeared (unbacked symbols), which
    export binds and this does not."""
    if before is not None and before.op == "call_function" and before.target == new.target and "val" in before.meta:
        pairs = _input_pairs(new, before)
        if pairs is not None:
            if all(a.meta["val"] is b.meta.get("val") or (_same_meta(b.meta.get("val"), a.meta["val"])
                                                            and not _aliases(before.meta["val"], b.meta.get("val")))
                   for a, b in pairs):
                new.meta["val"] = before.meta["val"]
                return True
    args, kwargs = torch.fx.node.map_arg((new.args, new.kwargs), lambda n: n.meta["val"])
    pending = _unbacked(fake)
    with fake:
        value = new.target(*args, **kwargs)
    if _unbacked(fake) > pending:
        return False
    new.meta["val"] = value
    return True


def _unbacked(fake) -> int:
    """How many data-dependent sizes the fake mode's shape environment has made and not bound yet."""
    return len(getattr(fake.shape_env, "pending_fresh_unbacked_symbols", None) or ())


def _input_pairs(new: torch.fx.Node, before: torch.fx.Node) -> list | None:
    """[(new input node, old input node)] when both call with the same argument structure, node inputs matched by
    name and the rest equal; else None."""
    mine, theirs = [], []
    a = torch.fx.node.map_arg((new.args, new.kwargs), lambda n: mine.append(n) or ("node", n.name))
    b = torch.fx.node.map_arg((before.args, before.kwargs), lambda n: theirs.append(n) or ("node", n.name))
    try:
        return list(zip(mine, theirs)) if a == b else None
    except Exception:  # a value without a plain equality
        return None


def _aliases(x, y) -> bool:
    """Whether a tensor of fake value `x` shares storage with one of `y` (a view, an in-place op's result); a value
    whose storage cannot be read is taken to alias."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def storages(val) -> set:
        found = set()
        for t in torch.utils._pytree.tree_leaves(val):
            if isinstance(t, torch.Tensor):
                try:
                    found.add(StorageWeakRef(t.untyped_storage()))
                except Exception:
                    found.add(None)
        return found

    sx, sy = storages(x), storages(y)
    return None in sx or None in sy or bool(sx & sy)


def _same_meta(val, t) -> bool:
    """Whether fake value `val` describes `t` (a tensor or another fake value): shape, stride, dtype, device, sizes
    compared as printed (a symbolic size by its expression: comparing SymInts would add guards)."""
    if isinstance(val, torch.Tensor) and isinstance(t, torch.Tensor):
        return (val.dtype == t.dtype and val.device.type == t.device.type
                and str(tuple(val.shape)) == str(tuple(t.shape)) and str(val.stride()) == str(t.stride()))
    if isinstance(val, (tuple, list)) and isinstance(t, (tuple, list)):
        return len(val) == len(t) and all(_same_meta(x, y) for x, y in zip(val, t))
    return type(val) is type(t) and str(val) == str(t)


__all__ = ["adopt", "lift"]
