"""LosslessPass: bf16 linear / embedding weights -> DFloat11-style entropy-coded storage, decoded at call.

DFloat11 (Zhang et al., 2025): the 8 exponent bits of trained bf16 weights hold ~2.6 bits of
information; Huffman-coding them and keeping sign+mantissa raw stores a weight in ~10.7 bits instead
of 16, bit-exact. The codec and the `memopt::linear_dfloat11` / `memopt::embedding_dfloat11` ops are in
`memopt.runtime.dfloat11`; each linear decodes its weight just before its matmul (the decoded bf16
weight lives only for that op), an embedding decodes only the blocks holding the rows it looks up.
Decoding at each call pays off where decode is fast (DFloat11 decodes on the GPU); on CPU it costs
~30 ns per weight, so `decompress_lossless(gm)` decodes everything once (at load) instead.
Like `QuantizePass`, it rewrites `gm` in place, stores the parts as buffers beside the weight
(`<weight>_sm`, `_stream`, `_offsets`, `_codes`), deletes the bf16 weight, and records each layer in
`gm.meta["memopt_weights"]`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from memopt.passes.base import Pass, PassResult
from memopt.passes.quant_config import LosslessConfig
from memopt.passes.weight_sites import (
    ReusedWeights,
    WeightAliases,
    delete_attr,
    delete_weight,
    get_attr_path,
    replace_node,
    set_buffer,
    site_matches,
    weight_sites,
)

import memopt.runtime.dfloat11 as df11

# buffer `<weight FQN>_<suffix>` -> the part of df11.encode_bf16's output it holds
_PARTS = {"sm": "sign_mantissa", "stream": "stream", "offsets": "block_offsets", "codes": "code_lengths"}


class LosslessPass(Pass):
    """Compress the selected bf16 weights. With `config=None` the layers come from `plan.decisions`
    whose `weight_format` is "lossless"; otherwise every layer matching `include` and not `skip`."""

    name = "lossless"

    def __init__(self, config: LosslessConfig | None = None, include: Sequence[str] = ("*",),
                 skip: Sequence[str] = (), use_plan: bool = False, reuse: torch.nn.Module | None = None):
        if config is not None and not isinstance(config, LosslessConfig):
            raise ValueError(f"LosslessPass takes a LosslessConfig, got {config!r}")
        if isinstance(include, str) or isinstance(skip, str):
            raise ValueError(f"include and skip take a sequence of names/patterns, got {include!r} / {skip!r}")
        self.config = config or LosslessConfig()
        self.include, self.skip, self.use_plan = tuple(include), tuple(skip), use_plan or config is None
        self.reuse = reuse  # a module already compressed from the same weights: its tensors are taken

    def _selected(self, sites, plan) -> list:
        if self.use_plan and plan is not None and getattr(plan, "decisions", ()):
            wanted = {d.name for d in plan.decisions if d.weight_format == "lossless"}
            return [s for s in sites if (s.layer in wanted or s.target in wanted) and not site_matches(s, self.skip)]
        return [s for s in sites if site_matches(s, self.include) and not site_matches(s, self.skip)]

    def __call__(self, gm, plan=None) -> PassResult:
        sites, notes = weight_sites(gm)
        cfg, done = self.config, []
        record = gm.meta.setdefault("memopt_weights", {})
        reused = ReusedWeights(self.reuse)
        aliases = WeightAliases(gm)
        for s in self._selected(sites, plan):
            w = get_attr_path(gm, s.target)
            if w.dtype != torch.bfloat16 or w.dim() != 2:
                notes.append(f"kept {s.layer}: weight is {tuple(w.shape)} {w.dtype}; lossless compresses 2-D bf16 "
                             "weights (cast the model to bf16 first)")
                continue
            if s.embeddings and not cfg.embeddings:
                notes.append(f"kept {s.layer}: embeddings=False")
                continue
            given = reused.get(s, "lossless", tuple(_PARTS), required=tuple(_PARTS))
            if given is not None:
                parts = {key: given[suffix] for suffix, key in _PARTS.items()}
            else:
                parts = df11.encode_bf16(w.detach(), cfg.block_size, cfg.max_code_bits)
            nodes, anchor = [], s.attr
            for suffix, key in _PARTS.items():
                anchor = set_buffer(gm, f"{s.target}_{suffix}", parts[key].to(w.device), anchor)
                nodes.append(anchor)
            for lin in s.linears:
                bias = lin.args[2] if len(lin.args) > 2 else None
                replace_node(gm, lin, torch.ops.memopt.linear_dfloat11.default, (lin.args[0], *nodes, cfg.block_size, bias))
            for emb in s.embeddings:
                replace_node(gm, emb, torch.ops.memopt.embedding_dfloat11.default, (*nodes, cfg.block_size, emb.args[1]))
            record[s.layer] = {"weight": s.target, "format": "lossless", "fp_bytes": w.nbytes,
                               "bytes": df11.compressed_bytes(parts)}
            delete_weight(gm, s, aliases)
            done.append(s.layer)
        if done:
            gm.graph.lint()
            gm.recompile()
            before = sum(record[k]["fp_bytes"] for k in done)
            after = sum(record[k]["bytes"] for k in done)
            notes.insert(0, f"lossless: {len(done)} bf16 weights {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
                            f"({after / before:.3f}x, bit-exact)")
        return PassResult(gm, bool(done), notes)


def decompress_lossless(gm):
    """Undo `LosslessPass` in place: decode every compressed weight once (e.g. at load, where decoding at
    each call is too slow: on CPU it costs ~30 ns per weight) and restore plain `aten.linear` /
    `aten.embedding` nodes reading a bf16 weight named as before. Returns `gm`."""
    ops = {torch.ops.memopt.linear_dfloat11.default, torch.ops.memopt.embedding_dfloat11.default}
    decoded: dict[str, object] = {}
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]:
        is_linear = node.target is torch.ops.memopt.linear_dfloat11.default
        parts = node.args[1:5] if is_linear else node.args[0:4]
        target = parts[0].target.removesuffix("_sm")
        if target not in decoded:
            w = df11.decode_bf16(*(get_attr_path(gm, p.target) for p in parts), node.args[5 if is_linear else 4])
            owner_path, _, name = target.rpartition(".")
            (gm.get_submodule(owner_path) if owner_path else gm).register_parameter(
                name, torch.nn.Parameter(w, requires_grad=False))
            with gm.graph.inserting_before(parts[0]):
                decoded[target] = gm.graph.get_attr(target)
            decoded[target].meta = dict(parts[0].meta)
            if "val" in parts[0].meta:
                decoded[target].meta["val"] = parts[0].meta["val"].to(torch.bfloat16)
        w_node = decoded[target]
        args = (node.args[0], w_node, node.args[6]) if is_linear else (w_node, node.args[5])
        replace_node(gm, node, torch.ops.aten.linear.default if is_linear else torch.ops.aten.embedding.default, args)
        for p in parts:
            if not p.users:
                delete_attr(gm, p.target)
                gm.graph.erase_node(p)
    for rec in gm.meta.get("memopt_weights", {}).values():
        if rec["format"] == "lossless" and rec["weight"] in decoded:
            rec.update(format="bf16 (decompressed)", bytes=rec["fp_bytes"])
    gm.graph.lint()
    gm.recompile()
    return gm


def lossless_ratio(gm) -> float:
    """Compressed bytes / bf16 bytes over the weights LosslessPass compressed in `gm`."""
    recs = [r for r in gm.meta.get("memopt_weights", {}).values() if r["format"] == "lossless"]
    if not recs:
        raise ValueError("no lossless weights in this GraphModule; run LosslessPass first")
    return sum(r["bytes"] for r in recs) / sum(r["fp_bytes"] for r in recs)


__all__ = ["LosslessPass", "lossless_ratio", "decompress_lossless"]
