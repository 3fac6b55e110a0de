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

from typing import Any, Sequence

import torch
from memopt.passes.base import Pass, PassResult
from memopt.passes.calibrate import LinearStats, record_linear_inputs
from memopt.passes.gptq import gptq_int4
from memopt.passes.quant_config import (
    Int4WeightConfig,
    Int8WeightConfig,
    LosslessConfig,
    parse_quantize_spec,
)
from memopt.passes.weight_sites import (
    NON_STORAGE_ARGS,
    INT_SUFFIXES,
    KEEP_FORMATS,
    ReusedWeights,
    WeightAliases,
    WeightSite,
    grouped_offsets,
    delete_weight,
    get_attr_path,
    replace_node,
    set_buffer,
    site_matches,
    weight_sites,
)

import memopt.runtime.moe_ops as moe
import memopt.runtime.quant_ops as qops
from memopt.frontend.weights import holds_streamed, is_streamed, materialize, real, release_freed_memory, row_blocks

_ROW_BLOCK_BYTES = 8 * 2**20  # row-wise quantizers run on blocks of rows of at most this many float32 bytes


def quantized_weight_bytes(gm) -> int:
    """Bytes of every weight a `memopt::` op reads (packed values, scales, zeros, outliers, codes)."""
    seen, total = set(), 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "memopt":
            continue
        for arg, spec in zip(node.args, node.target._schema.arguments):
            if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and spec.name not in NON_STORAGE_ARGS \
                    and arg.target not in seen:
                seen.add(arg.target)
                total += get_attr_path(gm, arg.target).nbytes
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
            return {s.target: self.config for s in sites if site_matches(s, self.include) and not site_matches(s, self.skip)}
        if plan is None or not getattr(plan, "decisions", ()):
            raise ValueError("QuantizePass needs a config, or a plan whose decisions give per-layer weight formats")
        formats = {d.name: d.weight_format for d in plan.decisions}
        out = {}
        for s in sites:
            fmt = formats.get(s.layer, formats.get(s.target))
            if fmt not in KEEP_FORMATS and not site_matches(s, self.skip):
                out[s.target] = parse_quantize_spec(fmt)
        return out

    def __call__(self, gm, plan=None) -> PassResult:
        from memopt.passes.lossless import LosslessPass

        if isinstance(self.config, LosslessConfig):
            materialize(gm)  # streamed weights (memopt/frontend/weights.py): the codec reads them all
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
            why = _unsupported(s, cfg, get_attr_path(gm, s.target))
            if why:
                notes.append(f"kept {s.layer}: {why}")
                continue
            todo.append((s, cfg))
            if _tied_int4(s, cfg):
                notes.append(f"{s.layer}: tied to an embedding, stored as int8 rows (int4 has no gather kernel)")
            given[s.target] = reused.get(s, _site_format(s, cfg), INT_SUFFIXES, required=("q", "scale"))
            if isinstance(cfg, Int4WeightConfig) and cfg.needs_calibration and given[s.target] is None \
                    and not _tied_int4(s, cfg):
                stats_nodes += [n.name for n in s.linears]
        if not todo and not lossless and (self.config is not None or configs):
            what = self.config.spec if self.config is not None else "the plan's formats"
            raise ValueError(f"quantize {what}: no weight of this graph could be quantized"
                             + (": " + "; ".join(notes[:6]) if notes else " (no linear, embedding or expert weight "
                                "matched include/skip)"))
        if stats_nodes and holds_streamed(gm):
            materialize(gm)  # calibration runs the graph: every weight read now
        stats = self._calibrate(gm, todo, stats_nodes)
        notes += _thin_calibration(todo, stats) + _rtn_experts(todo)
        record = gm.meta.setdefault("memopt_weights", {})
        aliases = WeightAliases(gm)
        for s, cfg in todo:
            w = get_attr_path(gm, s.target)
            streamed = given[s.target] is None and is_streamed(w)  # given: reused tensors, the weight is not read
            if given[s.target] is None and not (streamed and _rowwise(s, cfg)):
                w = real(w)  # a streamed weight (memopt/frontend/weights.py) is read whole here, else block by block
            w = w if is_streamed(w) else w.detach()
            fmt = _rewrite_site(gm, s, cfg, w, _merge([stats[n.name] for n in s.linears if n.name in stats]),
                                given[s.target])
            record[s.layer] = {"weight": s.target, "format": fmt, "fp_bytes": w.nbytes,
                               "bytes": _site_bytes(gm, s.target)}
            delete_weight(gm, s, aliases)
            if streamed:  # its float copy and the quantizer's temporaries are garbage now: return them
                del w
                release_freed_memory()
        if todo:
            _share_rotations(gm)
            gm.graph.lint()
            gm.recompile()
            fp = sum(record[s.layer]["fp_bytes"] for s, _ in todo)
            q = sum(record[s.layer]["bytes"] for s, _ in todo)
            notes.insert(0, f"quantized {len(todo)} weights: {fp / 2**20:.2f} MiB -> {q / 2**20:.2f} MiB")
        if lossless:
            materialize(gm)
            sub = LosslessPass(configs[lossless[0]], include=lossless, reuse=self.reuse)(gm, None)
            return PassResult(gm, bool(todo) or sub.modified, notes + sub.notes)
        materialize(gm)  # streamed weights no format rewrote (norms, skipped layers): bound now, once per tensor
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
    if s.embeddings and not cfg.embeddings and not _tied_int4(s, cfg):
        return "embedding tables are not quantized by this config (embeddings=False)" + \
            (" and this one is tied to a linear" if s.linears else "")
    if isinstance(cfg, Int4WeightConfig) and s.linears and not s.embeddings and w.shape[1] % cfg.group_size:
        return f"in_features {w.shape[1]} is not divisible by group_size {cfg.group_size}"
    return ""


def _tied_int4(s: WeightSite, cfg) -> bool:
    """A table read by an embedding and a linear (a tied LM head) under an int4 config: int4 has no gather
    kernel, so the one copy both read is stored as int8 rows (`embedding_int8` and `linear_int8`)."""
    return isinstance(cfg, Int4WeightConfig) and bool(s.linears) and bool(s.embeddings)


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
    if isinstance(cfg, Int8WeightConfig) or s.embeddings:
        return "int8:dyn" if isinstance(cfg, Int8WeightConfig) and cfg.dynamic_activations else "int8"
    return cfg.spec


def _rewrite_site(gm, s: WeightSite, cfg, w: torch.Tensor, stats: LinearStats | None,
                  given: dict[str, torch.Tensor] | None = None) -> str:
    """Quantize `w` (or take the `given` tensors, {suffix: tensor}) and rewire the site's ops to them."""
    if s.grouped:
        return _rewrite_experts(gm, s, cfg, w, given)
    if isinstance(cfg, Int8WeightConfig) or s.embeddings:  # int8, or an int4 config's (tied) embedding table
        if given:
            q, scales = given["q"], given["scale"]
        else:
            q, scales = _by_rows(qops.quantize_int8_rows, w)
            scales = scales.to(w.dtype) if s.embeddings else scales
        q_node = set_buffer(gm, s.target + "_q", q, s.attr)
        s_node = set_buffer(gm, s.target + "_scale", scales, q_node)
        dyn = isinstance(cfg, Int8WeightConfig) and cfg.dynamic_activations
        for lin in s.linears:
            replace_node(gm, lin, torch.ops.memopt.linear_int8.default,
                     (lin.args[0], q_node, s_node, lin.args[2] if len(lin.args) > 2 else None, dyn))
        for emb in s.embeddings:
            replace_node(gm, emb, torch.ops.memopt.embedding_int8.default, (q_node, s_node, emb.args[1]))
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
    elif keep is None:
        packed, scales, zeros = _by_rows(lambda rows: qops.quantize_int4_groups(rows.float(), g), w)
    else:
        w_final = w.float().clone()
        w_final[:, keep] = 0.0
        packed, scales, zeros = qops.quantize_int4_groups(w_final, g)
        w_final = w.float()
    tensors = [packed, scales, zeros]
    if keep is not None:
        tensors += [keep, w_final[:, keep].to(torch.bfloat16)]
    return _wire_int4(gm, s, g, tensors, cfg.spec, rot)


def _rowwise(s: WeightSite, cfg) -> bool:
    """Whether the site's quantizer reads its weight a block of rows at a time (`_by_rows`): int8 rows, and int4
    round-to-nearest without a rotation or outliers (both read whole columns)."""
    if s.grouped:
        return False
    if isinstance(cfg, Int8WeightConfig) or s.embeddings:
        return True
    return cfg.method != "gptq" and not cfg.hadamard and not cfg.outlier_fraction


def _by_rows(quantize, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`quantize(w)` for a quantizer whose every output row depends on its input row alone (int8 per row, int4 per
    group), run on blocks of rows written into the outputs: the same tensors, without full-size float temporaries
    (and for a streamed weight without its whole float copy: blocks are read from the file one at a time)."""
    step = max(1, _ROW_BLOCK_BYTES // max(1, 4 * w[0].numel()))
    if w.shape[0] <= step and not is_streamed(w):
        return quantize(w)
    outs = None
    for i, block in zip(range(0, w.shape[0], step), row_blocks(w, step)):
        parts = quantize(block)
        if outs is None:
            outs = tuple(torch.empty((w.shape[0], *p.shape[1:]), dtype=p.dtype) for p in parts)
        for out, part in zip(outs, parts):
            out[i:i + part.shape[0]] = part
        del block, parts
        release_freed_memory()  # the block's temporaries, before the next block's (malloc would keep them all)
    return outs


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
        nodes.append(set_buffer(gm, s.target + suffix, t, nodes[-1]))
    nodes = nodes[1:]
    for gmm, via in s.grouped:
        if isinstance(cfg, Int8WeightConfig):
            args = (gmm.args[0], *nodes, grouped_offsets(gmm), cfg.dynamic_activations)
            replace_node(gm, gmm, torch.ops.memopt.grouped_linear_int8.default, args)
        else:
            args = (gmm.args[0], *nodes, cfg.group_size, grouped_offsets(gmm))
            replace_node(gm, gmm, torch.ops.memopt.grouped_linear_int4.default, args)
        if via is not None:
            gm.graph.erase_node(via)
    return _site_format(s, cfg)


def _wire_int4(gm, s: WeightSite, group_size: int, tensors: list[torch.Tensor], spec: str, rot: int = 0) -> str:
    """Register [packed, scales, zeros(, outlier_idx, outlier)] and point the site's linears at linear_int4
    (`rot`: the input Hadamard block the weights are stored rotated by, 0 for none; `_share_rotations`
    then gives the marked linears their rotated input)."""
    nodes = [s.attr]
    for suffix, t in zip(("_q", "_scale", "_zero", "_outlier_idx", "_outlier"), tensors):
        nodes.append(set_buffer(gm, s.target + suffix, t, nodes[-1]))
    nodes = nodes[1:]
    extra = (nodes[3], nodes[4]) if len(nodes) == 5 else (None, None)
    for lin in s.linears:
        bias = lin.args[2] if len(lin.args) > 2 else None
        new = replace_node(gm, lin, torch.ops.memopt.linear_int4.default,
                       (lin.args[0], *nodes[:3], group_size, bias, *extra))
        if rot:
            new.meta[_ROTATION] = rot
    return spec


__all__ = ["QuantizePass", "quantized_weight_bytes", "weight_sites", "WeightSite", "parse_quantize_spec"]
