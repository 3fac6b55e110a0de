"""Where a graph reads its weights, and the small graph edits every weight pass makes.

`weight_sites(gm)` finds each weight and the linears / embeddings / grouped (mixture-of-experts) matmuls
that read it, after rewriting `[in, out]` matmuls (GPT-2's `Conv1D`) as linears (`linearize_matmuls`).
The quantize and lossless passes share these helpers and `ReusedWeights` (a program already rewritten
from the same weights, whose tensors are taken instead of computing them again).
"""

from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, is_fake
from torch.utils.weak import WeakTensorKeyDictionary

from memopt.frontend.weights import real

LINEAR = torch.ops.aten.linear.default
EMBEDDING = torch.ops.aten.embedding.default
ADDMM = torch.ops.aten.addmm.default
_MATMULS = (ADDMM, torch.ops.aten.mm.default, torch.ops.aten.matmul.default)
_TRANSPOSE = torch.ops.aten.transpose.int
_GROUPED_MMS = ("aten._grouped_mm.default", "transformers.grouped_mm_fallback.default")  # (x, w [E, K, N], offs)
NON_STORAGE_ARGS = {"x", "bias", "indices"}
_TRANSPOSED = WeakTensorKeyDictionary()  # an `[in, out]` weight -> weakref to its `[out, in]` copy
KEEP_FORMATS = (None, "native", "bf16", "fp16", "fp32")


@dataclass
class WeightSite:
    """One weight `get_attr` node and the linear / embedding / grouped expert matmul nodes that read it.
    `grouped`: (grouped-mm node, the `transpose` node between, or None when the weight is stored `[E, K, N]`)."""

    attr: Any  # fx.Node (get_attr)
    target: str  # weight FQN, e.g. "m.encoder.layer.0.attention.self.query.weight"
    linears: list = field(default_factory=list)
    embeddings: list = field(default_factory=list)
    grouped: list = field(default_factory=list)

    @property
    def layer(self) -> str:
        if self.grouped:  # a module holds several fused expert weights: each is its own layer
            return self.target
        return self.target.rsplit(".", 1)[0] if "." in self.target else self.target


def _grouped_use(user, node) -> tuple | None:
    """(grouped-mm node, transpose or None) when `user` feeds weight `node` to a grouped expert matmul as its
    `[E, K, N]` operand, directly or as `node.transpose(-2, -1)` of a `[E, N, K]` weight."""
    via = None
    if user.op == "call_function" and user.target is _TRANSPOSE and user.args[0] is node \
            and sorted(d % 3 for d in user.args[1:3]) == [1, 2] and len(user.users) == 1:
        via, user = user, next(iter(user.users))
    if user.op != "call_function" or str(user.target) not in _GROUPED_MMS or len(user.args) < 2 \
            or user.args[1] is not (via or node) or user.args[0] is (via or node):
        return None
    kw = dict(zip(("offs", "bias", "out_dtype"), user.args[2:]), **user.kwargs)
    if kw.get("offs") is None or kw.get("bias") is not None or kw.get("out_dtype") is not None:
        return None
    return user, via


def grouped_offsets(gmm) -> Any:
    return gmm.args[2] if len(gmm.args) > 2 else gmm.kwargs["offs"]


def weight_sites(gm) -> tuple[list[WeightSite], list[str]]:
    """Weights read only as a linear's weight, an embedding's table or a grouped expert matmul's weights;
    notes on the parameters left out. Rewrites Conv1D-style matmuls as linears first (`linearize_matmuls`)."""
    linearize_matmuls(gm)
    sites, notes, unhandled = [], [], {}
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(get_attr_path(gm, node.target), torch.Tensor):
            continue
        site = WeightSite(node, node.target)
        other = []
        for user in node.users:
            if user.op == "call_function" and user.target is LINEAR and user.args[1] is node \
                    and node not in (user.args[0], *user.args[2:]):
                site.linears.append(user)
            elif user.op == "call_function" and user.target is EMBEDDING and user.args[0] is node:
                site.embeddings.append(user)
            elif (use := _grouped_use(user, node)) is not None:
                site.grouped.append(use)
            else:
                other.append(str(user.target))
        if site.grouped and (site.linears or site.embeddings or any(v is None for _, v in site.grouped)
                             and any(v is not None for _, v in site.grouped)):
            notes.append(f"kept {site.layer}: its expert weights are read both as stored and transposed")
        elif site.linears or site.embeddings or site.grouped:
            if other:
                notes.append(f"kept {site.layer}: its weight has users other than linear/embedding "
                             f"({', '.join(sorted(set(other)))})")
            else:
                sites.append(site)
        elif other and node.target in params and get_attr_path(gm, node.target).dim() >= 2 \
                and get_attr_path(gm, node.target).is_floating_point():
            unhandled.setdefault(", ".join(sorted(set(other))), []).append(node.target)
    for ops, names in unhandled.items():
        notes.append(f"kept {len(names)} weight(s) read by {ops}, which quantize does not rewrite (it handles "
                     f"linear, Conv1D-style addmm/mm/matmul, embedding and grouped expert matmuls): "
                     + ", ".join(names[:4]) + (" ..." if len(names) > 4 else ""))
    return sites, notes


def _as_linear(gm, user, node, out_features: int) -> tuple | None:
    """(x, bias) when `user` computes `x @ W (+ bias)` with `node` the weight W stored `[in, out]`."""
    if user.op != "call_function" or user.target not in _MATMULS:
        return None
    if user.target is ADDMM:
        if len(user.args) != 3 or user.args[2] is not node or any(user.kwargs.get(k, 1) != 1
                                                                  for k in ("beta", "alpha")):
            return None
        bias, x = user.args[0], user.args[1]
        val = getattr(bias, "meta", {}).get("val")
        if val is None and getattr(bias, "op", "") == "get_attr":
            val = get_attr_path(gm, bias.target)
        if not isinstance(val, torch.Tensor) or tuple(val.shape) != (out_features,) or node in (bias, x):
            return None  # a bias of another shape is no linear's
        return x, bias
    if len(user.args) != 2 or user.kwargs or user.args[1] is not node or user.args[0] is node:
        return None
    return user.args[0], None


def linearize_matmuls(gm) -> int:
    """Rewrite every matmul with a 2-D parameter stored `[in, out]` (GPT-2's `Conv1D`: `addmm(b, x, W)`,
    `mm(x, W)`, `matmul(x, W)`) as `aten.linear(x, W.T, b)`: W is replaced, under its own name, by its
    contiguous transpose, so the rest of the pass sees ordinary linears. A weight read any other way, or
    shared with another name, is left alone. Returns how many weights were rewritten."""
    ptrs: dict = {}
    for _, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        ptrs[_data_key(t)] = ptrs.get(_data_key(t), 0) + 1  # tied names: one tensor
    done = 0
    for node in list(gm.graph.nodes):
        w = get_attr_path(gm, node.target) if node.op == "get_attr" else None
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not node.users \
                or ptrs.get(_data_key(w), 0) > 1:
            continue
        forms = [(user, _as_linear(gm, user, node, w.shape[1])) for user in node.users]
        if not all(form for _, form in forms):
            continue
        owner_path, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        wt = _TRANSPOSED[w]() if w in _TRANSPOSED else None
        if wt is None:  # a decoder's second program reads the same weight: one transposed copy while both hold it
            wt = real(w).detach().t().contiguous()  # a streamed weight is read here (memopt/frontend/weights.py)
            wt = torch.nn.Parameter(wt, requires_grad=False) if isinstance(w, torch.nn.Parameter) else wt
            _TRANSPOSED[w] = weakref.ref(wt)
        setattr(owner, name, wt)
        if isinstance(node.meta.get("val"), torch.Tensor):
            node.meta["val"] = node.meta["val"].t().contiguous()
        for user, (x, bias) in forms:
            replace_node(gm, user, LINEAR, (x, node) if bias is None else (x, node, bias))
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def storage_key(t: torch.Tensor):
    """Equal for tensors on one storage (tied names): the data pointer (0 for an empty tensor, which shares with
    none), or for a fake tensor (a streamed weight, no data) its storage's identity."""
    return ("fake", t.untyped_storage()._cdata) if is_fake(t) else t.untyped_storage().data_ptr()


def _data_key(t: torch.Tensor):
    """`t.data_ptr()`, or for a fake tensor where in which storage its data would start."""
    return (t.untyped_storage()._cdata, t.storage_offset()) if is_fake(t) else t.data_ptr()


def get_attr_path(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def site_matches(site: WeightSite, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(site.layer, p) or fnmatch.fnmatchcase(site.target, p) for p in patterns)


def graph_fake_mode(graph):
    """The FakeTensorMode of the graph's `val` metadata (None when it has none). The first fake value answers:
    export records every value under one mode; torch's `detect_fake_mode` over all of them was a third of a
    SmolLM2 quantize, called once per new buffer."""
    active = detect_fake_mode()  # a mode already tracing wins, as with detect_fake_mode(values)
    if active is not None:
        return active
    for node in graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, FakeTensor):
            return val.fake_mode
    return None


def set_buffer(gm, target: str, value: torch.Tensor, anchor):
    """Register `value` as buffer `target` on gm and return a get_attr node for it placed after `anchor`."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner.register_buffer(name, value)
    with gm.graph.inserting_after(anchor):
        node = gm.graph.get_attr(target)
    fake_mode = graph_fake_mode(gm.graph)
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = torch.empty_like(value, device=value.device)
    return node


def delete_attr(gm, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, name)


class WeightAliases:
    """Where each tensor storage of `gm` is named: its get_attr nodes and module attributes, found once for a pass
    that deletes many weights (walking the whole graph and module tree per weight was 2.4 s of SmolLM2's int4
    quantize). Build it after the weights are bound and before the first deletion; `delete_weight` keeps it current."""

    def __init__(self, gm):
        self.nodes: dict = {}
        self.names: dict = {}
        for node in gm.graph.nodes:
            val = get_attr_path(gm, node.target) if node.op == "get_attr" else None
            if isinstance(val, torch.Tensor):
                self.nodes.setdefault(storage_key(val), []).append(node)
        for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
            self.names.setdefault(storage_key(t), []).append(name)


def delete_weight(gm, site: WeightSite, aliases: WeightAliases | None = None) -> None:
    """Drop the replaced weight and every alias of it (tied weights: export keeps one get_attr for the
    shared tensor, the other names stay as unused attributes that would keep its bytes alive). `aliases`: a pass's
    index of names (`WeightAliases`), else the graph is searched."""
    ptr = storage_key(get_attr_path(gm, site.target))
    gm.graph.erase_node(site.attr)
    if not ptr:  # an empty tensor shares storage with none
        return
    if aliases is None:
        aliases = WeightAliases(gm)
    used = []
    for node in aliases.nodes.pop(ptr, ()):
        if getattr(node, "_erased", False):
            continue
        if node.users:  # still read (by another site of the same tensor): kept, and looked up again next time
            used.append(node)
        else:
            gm.graph.erase_node(node)
    if used:
        aliases.nodes[ptr] = used
    for name in aliases.names.pop(ptr, ()):
        if get_attr_path(gm, name) is not None:
            delete_attr(gm, name)


def replace_node(gm, old, op, args):
    with gm.graph.inserting_after(old):
        new = gm.graph.call_function(op, tuple(args))
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


INT_SUFFIXES = ("q", "scale", "zero", "outlier_idx", "outlier")  # buffers `<weight FQN>_<suffix>` of int8/int4


class ReusedWeights:
    """The compressed tensors of a module already rewritten from the same weights (`reuse`; None: nothing to
    reuse), looked up per weight site: the quantize and lossless passes take them instead of computing again."""

    def __init__(self, reuse):
        self.records = reuse.meta.get("memopt_weights", {}) if reuse is not None else {}
        self.buffers = dict(reuse.named_buffers()) if reuse is not None else {}

    def get(self, s: WeightSite, fmt: str, suffixes: Sequence[str], required: Sequence[str]) -> dict | None:
        """{suffix: tensor} for `s` when `reuse` holds the same weight in format `fmt`, else None."""
        rec = self.records.get(s.layer)
        if rec is None or rec.get("weight") != s.target or rec.get("format") != fmt:
            return None
        found = {x: self.buffers[f"{s.target}_{x}"] for x in suffixes if f"{s.target}_{x}" in self.buffers}
        return found if set(required) <= set(found) else None
