"""Per-layer quantization sensitivity: how much each linear's error grows in each weight format.

The budget planner trades bytes for quality per layer (mixed precision as in BitMoD / HAWQ-style
allocation); this module measures the quality side on calibration inputs and returns a plain dict
`{layer: {format: sqnr_db}}`, with SQNR = 10 log10(sum y^2 / sum (y - y_q)^2) in dB (higher is better):

- `mode="layer"` (default, one forward): y is that layer's own output x W^T + b on the calibration
  rows that reach it, y_q the same with W replaced by its dequantized format. Cheap; layers are
  measured independently and errors are not propagated.
- `mode="model"`: y is the model's output (all floating outputs, flattened) with *only* that layer's
  weight replaced. One forward per layer and format; closer to what the planner's penalty means.

Formats whose group size does not divide the layer's in_features are left out of that layer's entry.
Layer names are the weight owner's path in the GraphModule (`m.encoder.layer.0.attention.self.query`).
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Sequence

import torch
from torch.utils import _pytree as pytree

import memopt.runtime.quant_ops as qops
from memopt.passes.calibrate import record_linear_inputs
from memopt.passes.gptq import gptq_int4
from memopt.passes.quant_config import (
    Int4WeightConfig,
    Int8WeightConfig,
    parse_quantize_spec,
)
from memopt.passes.weight_sites import get_attr_path, weight_sites

DEFAULT_FORMATS = ("int8", "int4:g32", "int4:g64", "int4:g128")
MAX_SQNR_DB = 200.0  # exact reproduction is reported as this, so the JSON stays finite


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    noise = (ref.double() - approx.double()).pow(2).sum().item()
    signal = ref.double().pow(2).sum().item()
    if noise == 0:
        return MAX_SQNR_DB
    return min(MAX_SQNR_DB, 10 * math.log10(max(signal, 1e-300) / noise))


def weight_bytes(out_features: int, in_features: int, fmt: str) -> int:
    """Stored bytes of one `[out, in]` weight in `fmt` (scales and zero points included)."""
    cfg = parse_quantize_spec(fmt)
    if isinstance(cfg, Int8WeightConfig):
        return out_features * in_features + 4 * out_features
    if isinstance(cfg, Int4WeightConfig):
        groups = out_features * in_features // cfg.group_size
        return out_features * in_features // 2 + 3 * groups  # bf16 scale + uint8 zero per group
    raise ValueError(f"weight_bytes has no closed form for {fmt!r}")


def dequantized_weight(w: torch.Tensor, fmt: str, hessian: torch.Tensor | None = None) -> torch.Tensor | None:
    """`w` `[N, K]` after a round trip through `fmt` (fp32), or None if `fmt` does not apply to its shape."""
    cfg = parse_quantize_spec(fmt)
    if isinstance(cfg, Int8WeightConfig):
        return qops.dequantize_int8(*qops.quantize_int8_rows(w))
    if not isinstance(cfg, Int4WeightConfig):
        raise ValueError(f"sensitivity measures int8 / int4 formats, got {fmt!r}")
    g = cfg.group_size
    if w.shape[1] % g:
        return None
    if cfg.method == "gptq":
        if hessian is None:
            raise ValueError(f"{fmt} needs the layer's calibration Hessian")
        q, scales, zeros, _ = gptq_int4(w, hessian, g)
        return qops.dequantize_int4(qops.pack_int4(q), scales, zeros, g)
    return qops.dequantize_int4(*qops.quantize_int4_groups(w, g), g)


class _SwapWeight(torch.fx.Interpreter):
    def __init__(self, gm, target: str, weight: torch.Tensor):
        super().__init__(gm)
        self.target, self.weight = target, weight

    def fetch_attr(self, target: str):
        return self.weight if target == self.target else super().fetch_attr(target)


def _float_outputs(out) -> torch.Tensor:
    leaves = [t.reshape(-1).double() for t in pytree.tree_leaves(out) if torch.is_tensor(t) and t.is_floating_point()]
    return torch.cat(leaves)


def layer_sensitivity(gm, calibration_inputs: Sequence[Sequence], formats: Iterable[str] = DEFAULT_FORMATS, *,
                      mode: str = "layer", max_rows: int = 1024) -> dict[str, dict[str, float]]:
    """{layer: {format: sqnr_db}} for every linear weight of `gm` (see the module docstring)."""
    formats = tuple(formats)
    if mode not in ("layer", "model"):
        raise ValueError(f"mode must be 'layer' or 'model', got {mode!r}")
    for f in formats:
        parse_quantize_spec(f)
    sites = [s for s in weight_sites(gm)[0] if s.linears and not s.embeddings]
    if not sites:
        raise ValueError("no linear weights (get_attr -> aten.linear) in this GraphModule")
    gptq = any(f.endswith(":gptq") for f in formats)
    names = [n.name for s in sites for n in s.linears]
    stats = record_linear_inputs(gm, calibration_inputs, names, gram=gptq, max_sample_rows=max_rows)
    if mode == "model":
        with torch.no_grad():
            flat = [pytree.tree_flatten((tuple(a), {}))[0] for a in calibration_inputs]
            refs = [_float_outputs(torch.fx.Interpreter(gm).run(*a)) for a in flat]
    table: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for s in sites:
            w = get_attr_path(gm, s.target).detach().float()
            lin = s.linears[0]
            st = stats[lin.name]
            bias_node = lin.args[2] if len(lin.args) > 2 else None
            has_bias = bias_node is not None and bias_node.op == "get_attr"
            bias = get_attr_path(gm, bias_node.target).float() if has_bias else None
            x = st.sample
            entry = {}
            for f in formats:
                wq = dequantized_weight(w, f, st.hessian if st.gram is not None else None)
                if wq is None:
                    continue
                if mode == "layer":
                    entry[f] = sqnr_db(torch.nn.functional.linear(x, w, bias), torch.nn.functional.linear(x, wq, bias))
                else:
                    swap = _SwapWeight(gm, s.target, wq.to(get_attr_path(gm, s.target).dtype))
                    outs = [_float_outputs(swap.run(*a)) for a in flat]
                    entry[f] = sqnr_db(torch.cat(refs), torch.cat(outs))
            table[s.layer] = entry
    return table


def save_sensitivity(table: dict[str, dict[str, float]], path: str) -> None:
    with open(path, "w") as fh:
        json.dump(table, fh, indent=1, sort_keys=True)


def load_sensitivity(path: str) -> dict[str, dict[str, float]]:
    with open(path) as fh:
        table = json.load(fh)
    if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
        raise ValueError(f"{path} is not a sensitivity table ({{layer: {{format: sqnr_db}}}})")
    return table


__all__ = ["layer_sensitivity", "save_sensitivity", "load_sensitivity", "sqnr_db", "weight_bytes",
           "dequantized_weight", "DEFAULT_FORMATS"]
