"""QuantizePass: rewrite linear (and embedding) weights of an exported GraphModule into int8 / int4 ops.

Techniques: per-channel int8 (LLM.int8() without the outlier split); asymmetric group-wise int4 with
round-to-nearest or GPTQ (`passes/gptq.py`); block quantization with outliers, where the most salient
input channels by mean |x| (AWQ's saliency) stay in bf16. Storage formats and kernels live in
`memopt.runtime.quant_ops`.

`gm` comes from `torch.export.export(model, args, strict=False).module()`: weights are `get_attr`
nodes, linears are `aten.linear.default(x, w, b)`, embeddings `aten.embedding.default(w, ids)`. Matmuls
with a weight stored `[in, out]` (GPT-2's `Conv1D`: `aten.addmm(b, x, w)`, `mm(x, w)`, `matmul(x, w)`) are
first rewritten as linears over the transposed weight, kept under its own name (`linearize_matmuls`).
Fused mixture-of-experts weights (transformers 5.x: `experts.gate_up_proj` `[E, 2I, H]`, read through
`aten._grouped_mm` or `transformers::grouped_mm_fallback` over expert-sorted tokens) are quantized per
expert (int8 per channel, int4 round-to-nearest per group) and run by `memopt::grouped_linear_int8/_int4`
(`memopt.runtime.moe_ops`); such a site is named by its full weight name. A weight the pass cannot handle
is named in a note, and a format that quantizes no weight at all is an error. The pass
rewrites `gm` in place (so the fp weights' bytes are really released), registers the packed weights,
scales and zero points as buffers beside the weight they replace (`<weight>_q`, `_scale`, `_zero`,
`_outlier_idx`, `_outlier`), deletes the fp weight and records what it did in `gm.meta["memopt_weights"]`.
A layer is named by its weight's owner path (`encoder.layer.0.attention.self.query`); `include` and
`skip` take such names or fnmatch patterns.
"""

from __future__ import annotations

import fnmatch
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch._guards import detect_fake_mode
from torch.utils.weak import WeakTensorKeyDictionary

import memopt.runtime.moe_ops as moe
import memopt.runtime.quant_ops as qops
from memopt.passes.base import Pass, PassResult
from memopt.passes.calibrate import LinearStats, record_linear_inputs
from memopt.passes.gptq import gptq_int4
from memopt.passes.quant_config import Int4WeightConfig, Int8WeightConfig, LosslessConfig, parse_quantize_spec

LINEAR = torch.ops.aten.linear.default
EMBEDDING = torch.ops.aten.embedding.default
ADDMM = torch.ops.aten.addmm.default
_MATMULS = (ADDMM, torch.ops.aten.mm.default, torch.ops.aten.matmul.default)
_TRANSPOSE = torch.ops.aten.transpose.int
_GROUPED_MMS = ("aten._grouped_mm.default", "transformers.grouped_mm_fallback.default")  # (x, w [E, K, N], offs)
_NON_STORAGE_ARGS = {"x", "bias", "indices"}
_TRANSPOSED = WeakTensorKeyDictionary()  # an `[in, out]` weight -> weakref to its `[out, in]` copy
_KEEP_FORMATS = (None, "native", "bf16", "fp16", "fp32")


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


def _offs(gmm) -> Any:
    return gmm.args[2] if len(gmm.args) > 2 else gmm.kwargs["offs"]


def weight_sites(gm) -> tuple[list[WeightSite], list[str]]:
    """Weights read only as a linear's weight, an embedding's table or a grouped expert matmul's weights;
    notes on the parameters left out. Rewrites Conv1D-style matmuls as linears first (`linearize_matmuls`)."""
    linearize_matmuls(gm)
    sites, notes, unhandled = [], [], {}
    params = {name for name, _ in gm.named_parameters(remove_duplicate=False)}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(_getattr(gm, node.target), torch.Tensor):
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
        elif other and node.target in params and _getattr(gm, node.target).dim() >= 2 \
                and _getattr(gm, node.target).is_floating_point():
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
            val = _getattr(gm, bias.target)
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
    ptrs: dict[int, int] = {}
    for _, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        ptrs[t.data_ptr()] = ptrs.get(t.data_ptr(), 0) + 1  # tied names: one tensor
    done = 0
    for node in list(gm.graph.nodes):
        w = _getattr(gm, node.target) if node.op == "get_attr" else None
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not node.users \
                or ptrs.get(w.data_ptr(), 0) > 1:
            continue
        forms = [(user, _as_linear(gm, user, node, w.shape[1])) for user in node.users]
        if not all(form for _, form in forms):
            continue
        owner_path, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        wt = _TRANSPOSED[w]() if w in _TRANSPOSED else None
        if wt is None:  # a decoder's second program reads the same weight: one transposed copy while both hold it
            wt = w.detach().t().contiguous()
            wt = torch.nn.Parameter(wt, requires_grad=False) if isinstance(w, torch.nn.Parameter) else wt
            _TRANSPOSED[w] = weakref.ref(wt)
        setattr(owner, name, wt)
        if isinstance(node.meta.get("val"), torch.Tensor):
            node.meta["val"] = node.meta["val"].t().contiguous()
        for user, (x, bias) in forms:
            _replace(gm, user, LINEAR, (x, node) if bias is None else (x, node, bias))
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _getattr(root, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _matches(site: WeightSite, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(site.layer, p) or fnmatch.fnmatchcase(site.target, p) for p in patterns)


def _set_buffer(gm, target: str, value: torch.Tensor, anchor):
    """Register `value` as buffer `target` on gm and return a get_attr node for it placed after `anchor`."""
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner.register_buffer(name, value)
    with gm.graph.inserting_after(anchor):
        node = gm.graph.get_attr(target)
    fake_mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta])
    if fake_mode is not None:
        with fake_mode:
            node.meta["val"] = torch.empty_like(value, device=value.device)
    return node


def _delete_attr(gm, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, name)


def _delete_weight(gm, site: WeightSite) -> None:
    """Drop the replaced weight and every alias of it (tied weights: export keeps one get_attr for the
    shared tensor, the other names stay as unused attributes that would keep its bytes alive)."""
    ptr = _getattr(gm, site.target).untyped_storage().data_ptr()
    gm.graph.erase_node(site.attr)
    for node in list(gm.graph.nodes):
        val = _getattr(gm, node.target) if node.op == "get_attr" and not node.users else None
        if isinstance(val, torch.Tensor) and ptr and val.untyped_storage().data_ptr() == ptr:
            gm.graph.erase_node(node)
    tensors = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
    for name, t in tensors:
        if ptr and t.untyped_storage().data_ptr() == ptr and _getattr(gm, name) is not None:
            _delete_attr(gm, name)


def _replace(gm, old, op, args):
    with gm.graph.inserting_after(old):
        new = gm.graph.call_function(op, tuple(args))
    new.meta = dict(old.meta)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def quantized_weight_bytes(gm) -> int:
    """Bytes of every weight a `memopt::` op reads (packed values, scales, zeros, outliers, codes)."""
    seen, total = set(), 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "memopt":
            continue
        for arg, spec in zip(node.args, node.target._schema.arguments):
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and spec.name not in _NON_STORAGE_ARGS \
                    and arg.target not in seen:
                seen.add(arg.target)
                total += _getattr(gm, arg.target).nbytes
    return total


class QuantizePass(Pass):
    """Quantize the selected weights. `config` applies to every selected layer; with `config=None` the
    per-layer formats come from `plan.decisions` (`weight_format` "int8" / "int4:g64" / ...; "native"
    and "lossless" are left alone). `calibration_inputs`: args tuples for `gm`, needed by int4 with
    `outlier_fraction > 0` or `method="gptq"`. A `LosslessConfig` (or "lossless" layers in the plan) is
    handed to `LosslessPass`, so one pass object serves every format the CLI accepts.
    `reuse`: a module this pass already quantized from the same weights (a decoder's forward program, when
    this is its generation program): a site it holds in the same format takes those very tensors, with no
    second quantization or calibration, so both programs share one copy.
    """

    name = "quantize"

    def __init__(self, config: Int8WeightConfig | Int4WeightConfig | LosslessConfig | None = None,
                 include: Sequence[str] = ("*",), skip: Sequence[str] = (),
                 calibration_inputs: Sequence[Sequence] | None = None, reuse: torch.nn.Module | None = None):
        if config is not None and not isinstance(config, (Int8WeightConfig, Int4WeightConfig, LosslessConfig)):
            raise ValueError(f"config must be Int8WeightConfig, Int4WeightConfig or LosslessConfig, got {config!r}")
        if isinstance(include, str) or isinstance(skip, str):
            raise ValueError(f"include and skip take a sequence of names/patterns, got {include!r} / {skip!r}")
        self.config, self.include, self.skip = config, tuple(include), tuple(skip)
        self.calibration_inputs = calibration_inputs
        self.reuse = reuse

    def _configs(self, sites: list[WeightSite], plan) -> dict[str, Any]:
        if self.config is not None:
            return {s.target: self.config for s in sites if _matches(s, self.include) and not _matches(s, self.skip)}
        if plan is None or not getattr(plan, "decisions", ()):
            raise ValueError("QuantizePass needs a config, or a plan whose decisions give per-layer weight formats")
        formats = {d.name: d.weight_format for d in plan.decisions}
        out = {}
        for s in sites:
            fmt = formats.get(s.layer, formats.get(s.target))
            if fmt not in _KEEP_FORMATS and not _matches(s, self.skip):
                out[s.target] = parse_quantize_spec(fmt)
        return out

    def __call__(self, gm, plan=None) -> PassResult:
        from memopt.passes.lossless import LosslessPass

        if isinstance(self.config, LosslessConfig):
            return LosslessPass(self.config, self.include, self.skip, reuse=self.reuse)(gm, plan)
        sites, notes = weight_sites(gm)
        configs = self._configs(sites, plan)
        lossless = [s.target for s in sites if isinstance(configs.get(s.target), LosslessConfig)]
        todo, stats_nodes, given = [], [], {}
        reused = ReusedWeights(self.reuse)
        for s in sites:
            cfg = configs.get(s.target)
            if cfg is None or isinstance(cfg, LosslessConfig):
                continue
            why = _unsupported(s, cfg, _getattr(gm, s.target))
            if why:
                notes.append(f"kept {s.layer}: {why}")
                continue
            todo.append((s, cfg))
            given[s.target] = reused.get(s, _site_format(s, cfg), INT_SUFFIXES, required=("q", "scale"))
            if isinstance(cfg, Int4WeightConfig) and cfg.needs_calibration and given[s.target] is None:
                stats_nodes += [n.name for n in s.linears]
        if not todo and not lossless and (self.config is not None or configs):
            what = self.config.spec if self.config is not None else "the plan's formats"
            raise ValueError(f"quantize {what}: no weight of this graph could be quantized"
                             + (": " + "; ".join(notes[:6]) if notes else " (no linear, embedding or expert weight "
                                "matched include/skip)"))
        stats = self._calibrate(gm, todo, stats_nodes)
        notes += _thin_calibration(todo, stats) + _rtn_experts(todo)
        record = gm.meta.setdefault("memopt_weights", {})
        for s, cfg in todo:
            w = _getattr(gm, s.target).detach()
            fmt = _rewrite_site(gm, s, cfg, w, _merge([stats[n.name] for n in s.linears if n.name in stats]),
                                given[s.target])
            record[s.layer] = {"weight": s.target, "format": fmt, "fp_bytes": w.nbytes,
                               "bytes": _site_bytes(gm, s.target)}
            _delete_weight(gm, s)
        if todo:
            _share_rotations(gm)
            gm.graph.lint()
            gm.recompile()
            fp = sum(record[s.layer]["fp_bytes"] for s, _ in todo)
            q = sum(record[s.layer]["bytes"] for s, _ in todo)
            notes.insert(0, f"quantized {len(todo)} weights: {fp / 2**20:.2f} MiB -> {q / 2**20:.2f} MiB")
        if lossless:
            sub = LosslessPass(configs[lossless[0]], include=lossless, reuse=self.reuse)(gm, None)
            return PassResult(gm, bool(todo) or sub.modified, notes + sub.notes)
        return PassResult(gm, bool(todo), notes)

    def _calibrate(self, gm, todo, nodes) -> dict[str, LinearStats]:
        if not nodes:
            return {}
        if not self.calibration_inputs:
            raise ValueError("int4 with outlier_fraction > 0 or method='gptq' needs calibration inputs: "
                             "pass QuantizePass(..., calibration_inputs=[args, ...])")
        gram = any(isinstance(c, Int4WeightConfig) and (c.method == "gptq" or c.hadamard) for _, c in todo)
        return record_linear_inputs(gm, self.calibration_inputs, nodes, gram=gram)


_ROTATION = "memopt_hadamard"  # node.meta key: the input Hadamard block of a linear_int4 with rotated weights


def _share_rotations(gm) -> int:
    """Rotate each input once: the linear_int4 nodes `_wire_int4` marked with a Hadamard block that read the
    same input get one `memopt::hadamard` node, inserted before the first of them, as their input.
    Returns how many rotation nodes were inserted."""
    groups: dict[tuple, list] = {}
    for node in gm.graph.nodes:
        if node.meta.get(_ROTATION):
            groups.setdefault((node.args[0], node.meta.pop(_ROTATION)), []).append(node)
    for (x, block), linears in groups.items():
        with gm.graph.inserting_before(linears[0]):
            rot = gm.graph.call_function(torch.ops.memopt.hadamard.default, (x, block))
        if isinstance(x, torch.fx.Node) and "val" in x.meta:
            rot.meta["val"] = x.meta["val"]
        for lin in linears:
            lin.args = (rot, *lin.args[1:])
    return len(groups)


def _rtn_experts(todo) -> list[str]:
    """A note when an int4 format asked for GPTQ, a rotation or outliers, which fused expert weights do not get."""
    rtn = [(s, cfg) for s, cfg in todo if s.grouped and isinstance(cfg, Int4WeightConfig)
           and (cfg.method == "gptq" or cfg.hadamard or cfg.outlier_fraction)]
    if not rtn:
        return []
    return [f"{len(rtn)} fused expert weight(s) quantized round-to-nearest {_site_format(*rtn[0])}: GPTQ, "
            "the Hadamard rotation and outliers are not implemented for grouped expert matmuls"]


def _thin_calibration(todo, stats: dict[str, LinearStats]) -> list[str]:
    """A note when GPTQ layers saw fewer calibration rows than input channels: their Hessian is then
    rank-deficient and GPTQ fits the calibration tokens more than the model's (measured on MiniLM: 395
    rows for 1536 channels cost ~0.003 mean cosine against 2.8k rows)."""
    gptq = [s for s, cfg in todo if isinstance(cfg, Int4WeightConfig) and cfg.method == "gptq"]
    thin = [(st.rows, st.abs_sum.numel()) for s in gptq for n in s.linears
            if (st := stats.get(n.name)) is not None and st.rows < st.abs_sum.numel()]
    if not thin:
        return []
    return [f"GPTQ: {len(thin)} linear(s) saw fewer calibration token rows ({min(r for r, _ in thin)}) than input "
            f"channels (up to {max(k for _, k in thin)}); give more calibration inputs for better int4 quality "
            "(--calibration FILE, for a model with a tokenizer)"]


def _unsupported(s: WeightSite, cfg, w: torch.Tensor) -> str:
    if s.grouped:
        if w.dim() != 3 or not w.is_floating_point():
            return f"expert weights are {tuple(w.shape)} {w.dtype}, not a 3-D float tensor"
        k = w.shape[2] if s.grouped[0][1] is not None else w.shape[1]
        if isinstance(cfg, Int4WeightConfig) and k % cfg.group_size:
            return f"in_features {k} is not divisible by group_size {cfg.group_size}"
        return ""
    if w.dim() != 2 or not w.is_floating_point():
        return f"weight is {tuple(w.shape)} {w.dtype}, not a 2-D float matrix"
    if isinstance(cfg, Int4WeightConfig) and s.linears and s.embeddings:
        return ("weight is shared by an embedding and a linear (tied); int4 has no embedding kernel "
                "(give this layer int8 to quantize it)")
    if s.embeddings and not cfg.embeddings:
        return "embedding tables are not quantized by this config (embeddings=False)" + \
            (" and this one is tied to a linear" if s.linears else "")
    if isinstance(cfg, Int4WeightConfig) and s.linears and w.shape[1] % cfg.group_size:
        return f"in_features {w.shape[1]} is not divisible by group_size {cfg.group_size}"
    return ""


def _merge(parts: list[LinearStats]) -> LinearStats | None:
    if not parts:
        return None
    out = LinearStats(rows=sum(p.rows for p in parts), abs_sum=sum(p.abs_sum for p in parts))
    if parts[0].gram is not None:
        out.gram = sum(p.gram for p in parts)
    return out


def _site_bytes(gm, target: str) -> int:
    prefix = target + "_"
    return sum(b.nbytes for name, b in gm.named_buffers() if name.startswith(prefix))


def _site_format(s: WeightSite, cfg) -> str:
    """The format `_rewrite_site` records for `s` under `cfg`."""
    if s.grouped and isinstance(cfg, Int4WeightConfig):
        return f"int4:g{cfg.group_size}"  # experts: round-to-nearest (see `_rewrite_experts`)
    if isinstance(cfg, Int8WeightConfig) or not s.linears:
        return "int8:dyn" if isinstance(cfg, Int8WeightConfig) and cfg.dynamic_activations else "int8"
    return cfg.spec


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


def _rewrite_site(gm, s: WeightSite, cfg, w: torch.Tensor, stats: LinearStats | None,
                  given: dict[str, torch.Tensor] | None = None) -> str:
    """Quantize `w` (or take the `given` tensors, {suffix: tensor}) and rewire the site's ops to them."""
    if s.grouped:
        return _rewrite_experts(gm, s, cfg, w, given)
    if isinstance(cfg, Int8WeightConfig) or not s.linears:  # int8, or an int4 config's embedding table
        if given:
            q, scales = given["q"], given["scale"]
        else:
            q, scales = qops.quantize_int8_rows(w)
            scales = scales.to(w.dtype) if s.embeddings else scales
        q_node = _set_buffer(gm, s.target + "_q", q, s.attr)
        s_node = _set_buffer(gm, s.target + "_scale", scales, q_node)
        dyn = isinstance(cfg, Int8WeightConfig) and cfg.dynamic_activations
        for lin in s.linears:
            _replace(gm, lin, torch.ops.memopt.linear_int8.default,
                     (lin.args[0], q_node, s_node, lin.args[2] if len(lin.args) > 2 else None, dyn))
        for emb in s.embeddings:
            _replace(gm, emb, torch.ops.memopt.embedding_int8.default, (q_node, s_node, emb.args[1]))
        return "int8:dyn" if dyn else "int8"
    g = cfg.group_size
    rot = qops.hadamard_block(w.shape[1]) if cfg.hadamard else 0
    if given:
        return _wire_int4(gm, s, g, [given[k] for k in ("q", "scale", "zero", "outlier_idx", "outlier") if k in given],
                          cfg.spec, rot)
    hessian = stats.hessian if stats is not None and stats.gram is not None else None
    saliency = stats.mean_abs if stats is not None else None
    if rot:  # quantize W R for inputs x R: the Hessian becomes R H R, saliency the rotated channels' RMS
        w = qops.hadamard_rotate(w.float(), rot)
        if hessian is not None:
            hessian = qops.hadamard_rotate(qops.hadamard_rotate(hessian, rot).t(), rot).t()
            saliency = torch.diagonal(hessian).clamp_min(0).sqrt()
    keep = None
    if cfg.outlier_fraction > 0:
        n_keep = max(1, round(cfg.outlier_fraction * w.shape[1]))
        keep = torch.sort(saliency.topk(n_keep).indices).values
    if cfg.method == "gptq":
        q, scales, zeros, w_final = gptq_int4(w, hessian, g, keep=keep)
        packed = qops.pack_int4(q)
    else:
        w_final = w.float().clone()
        if keep is not None:
            w_final[:, keep] = 0.0
        packed, scales, zeros = qops.quantize_int4_groups(w_final, g)
        w_final = w.float()
    tensors = [packed, scales, zeros]
    if keep is not None:
        tensors += [keep, w_final[:, keep].to(torch.bfloat16)]
    return _wire_int4(gm, s, g, tensors, cfg.spec, rot)


def _rewrite_experts(gm, s: WeightSite, cfg, w: torch.Tensor, given: dict[str, torch.Tensor] | None) -> str:
    """Fused expert weights: `w` `[E, N, K]` (or `[E, K, N]` when read untransposed) quantized per expert;
    each grouped matmul becomes `memopt::grouped_linear_int8/_int4(x, ..., offs)` on the `[E, N, K]` form."""
    if s.grouped[0][1] is None:
        w = w.transpose(1, 2)
    w = w.float().contiguous()
    if isinstance(cfg, Int8WeightConfig):
        tensors = [given["q"], given["scale"]] if given else list(moe.quantize_experts_int8(w))
    else:
        tensors = [given[k] for k in ("q", "scale", "zero")] if given else \
            list(moe.quantize_experts_int4(w, cfg.group_size))
    nodes = [s.attr]
    for suffix, t in zip(("_q", "_scale", "_zero"), tensors):
        nodes.append(_set_buffer(gm, s.target + suffix, t, nodes[-1]))
    nodes = nodes[1:]
    for gmm, via in s.grouped:
        if isinstance(cfg, Int8WeightConfig):
            args = (gmm.args[0], *nodes, _offs(gmm), cfg.dynamic_activations)
            _replace(gm, gmm, torch.ops.memopt.grouped_linear_int8.default, args)
        else:
            args = (gmm.args[0], *nodes, cfg.group_size, _offs(gmm))
            _replace(gm, gmm, torch.ops.memopt.grouped_linear_int4.default, args)
        if via is not None:
            gm.graph.erase_node(via)
    return _site_format(s, cfg)


def _wire_int4(gm, s: WeightSite, group_size: int, tensors: list[torch.Tensor], spec: str, rot: int = 0) -> str:
    """Register [packed, scales, zeros(, outlier_idx, outlier)] and point the site's linears at linear_int4
    (`rot`: the input Hadamard block the weights are stored rotated by, 0 for none; `_share_rotations`
    then gives the marked linears their rotated input)."""
    nodes = [s.attr]
    for suffix, t in zip(("_q", "_scale", "_zero", "_outlier_idx", "_outlier"), tensors):
        nodes.append(_set_buffer(gm, s.target + suffix, t, nodes[-1]))
    nodes = nodes[1:]
    extra = (nodes[3], nodes[4]) if len(nodes) == 5 else (None, None)
    for lin in s.linears:
        bias = lin.args[2] if len(lin.args) > 2 else None
        new = _replace(gm, lin, torch.ops.memopt.linear_int4.default,
                       (lin.args[0], *nodes[:3], group_size, bias, *extra))
        if rot:
            new.meta[_ROTATION] = rot
    return spec


__all__ = ["QuantizePass", "quantized_weight_bytes", "weight_sites", "WeightSite", "parse_quantize_spec"]
