"""Prefill into a compressed cache: run the eager model once over the prompt with full attention, and
hand each layer's keys, values and queries (after RoPE) to the layer's policy as they are computed.

`record_attention(model, sink)` registers a transformers attention function (`AttentionInterface`,
name "memopt_record", with the mask function of the model's own implementation) that computes the model's
attention as usual (SDPA, or its eager function: soft-capping, sliding windows) and calls
`sink(layer, q, k, v, scale)` with q (batch, q_heads, T, head_dim) and k, v (batch, kv_heads, T, head_dim);
the model's own attention implementation is restored on exit. `fill_compressed(gm)` is the sink that scores the prompt (H2O,
Scissorhands, SnapKV, ThinK) and writes the compressed state, one layer at a time, so a full-size cache
never exists. Prompts are one sequence per batch row, without padding.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F

from memopt.kv.layout import layouts_from_str

Sink = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], None]
_SINKS: list[tuple[Sink, str]] = []  # (sink, the model's own attention implementation)
_NAME = "memopt_record"


def _recording_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    sink, previous = _SINKS[-1] if _SINKS else (None, "sdpa")
    own = None if previous == "sdpa" else _attention_function(module, previous)
    if own is not None:  # e.g. Gemma-2's eager attention, which soft-caps its logits
        out = own(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    else:
        causal = attention_mask is None and query.shape[2] == key.shape[2]
        n_rep = query.shape[1] // key.shape[1]  # expanded, so long prompts take SDPA's flash path on CPU too
        k, v = (key, value) if n_rep == 1 else (key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1))
        attn = F.scaled_dot_product_attention(query, k, v, attn_mask=attention_mask, is_causal=causal, scale=scale)
        out = (attn.transpose(1, 2).contiguous(), None)
    if sink is not None:
        sink(module.layer_idx, query, key, value, scale)
    return out


def _attention_function(module, name: str):
    """The attention function `name` as `module`'s model runs it: eager is each model file's own."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name == "eager":
        return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get(name)


@contextmanager
def record_attention(model, sink: Sink):
    """Within the block, `model`'s attention layers call `sink(layer, q, k, v, scale)` (see module doc)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    previous = model.config._attn_implementation
    AttentionInterface.register(_NAME, _recording_attention)
    # the mask the model's own implementation gets (sliding windows included), not none at all
    AttentionMaskInterface.register(_NAME, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(previous, sdpa_mask))
    model.set_attn_implementation(_NAME)
    _SINKS.append((sink, previous))
    try:
        yield
    finally:
        _SINKS.pop()
        model.set_attn_implementation(previous)


def fill_compressed(gm) -> Sink:
    """A sink that writes each layer's prompt keys and values into `gm`'s cache (compressed or static)."""
    from memopt.runtime.kv_ops import fill_state

    meta = gm.meta.get("memopt_kv")

    def sink(layer: int, q, k, v, scale: float) -> None:
        if meta is None:  # an uncompressed static cache: keys and values at their positions
            t = k.shape[2]
            getattr(gm, f"key_cache_{layer}")[:, :, :t] = k
            getattr(gm, f"value_cache_{layer}")[:, :, :t] = v
            return
        entry = meta["layers"].get(layer, meta["layers"].get(str(layer)))
        names = iter(entry["buffers"])
        groups = [(layout, {name: getattr(gm, next(names)) for name in layout.buffer_names()})
                  for layout in layouts_from_str(entry["layouts"])]
        fill_state(groups, q, k, v, scale)

    return sink
