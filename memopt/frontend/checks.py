"""Every user-given spec of `compile_model`, checked before any capture: one ValueError that names the bad
value and says what to do.

`check_specs` needs only the arguments (sizes, --quantize, --kv, --offload, --offload-kv, --calibration,
--budget); `check_source` runs once the model is resolved (its family, context length and shapes), still
before anything is captured or a cache allocated.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from memopt.frontend.units import fmt_bytes, parse_bytes

_SIZES = {"batch": "a batch size", "seq": "a sequence length in tokens", "max_cache": "a KV-cache capacity in tokens"}


def check_specs(*, batch: Any, seq: Any, max_cache: Any, time_limit_s: Any, arena_solver: str,
                quantize: str | None, kv: str | None, offload: Sequence[str], offload_kv: Sequence,
                calibration: Any, budget: Any, objective: str, max_quality_loss: Any) -> None:
    """Parse and validate every spec that needs no model."""
    from memopt.passes.arena import ArenaConfig

    for name, value in (("batch", batch), ("seq", seq), ("max_cache", max_cache)):
        if (value is not None or name == "batch") and (isinstance(value, bool) or not isinstance(value, int)
                                                       or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}; pass {_SIZES[name]}")
    if isinstance(time_limit_s, bool) or not isinstance(time_limit_s, (int, float)) \
            or not (math.isfinite(time_limit_s) and time_limit_s > 0):
        raise ValueError(f"time_limit_s must be a finite number of seconds > 0, got {time_limit_s!r}; "
                         "pass e.g. --time-limit 10")
    ArenaConfig(time_limit_s=float(time_limit_s), solver=arena_solver)
    _check_formats(quantize, kv, offload, offload_kv, calibration)
    if budget is not None:
        _check_budget(budget, batch, seq, objective, max_quality_loss)


def _check_formats(quantize: str | None, kv: str | None, offload: Sequence[str], offload_kv: Sequence,
                   calibration: Any) -> None:
    from memopt.frontend.calibration import read_texts
    from memopt.kv.policy import parse_kv_spec
    from memopt.passes.kv_offload import KVOffloadConfig
    from memopt.passes.offload import OffloadConfig
    from memopt.passes.quant_config import parse_quantize_spec

    if quantize:
        parse_quantize_spec(quantize)
    if kv:
        parse_kv_spec(kv)
    if offload:
        OffloadConfig(blocks=tuple(offload))
    if offload_kv:
        KVOffloadConfig(layers=tuple(offload_kv))
    if isinstance(calibration, (str, Path)):
        read_texts(calibration)


def _check_budget(budget: Any, batch: int, seq: int | None, objective: str, max_quality_loss: Any) -> None:
    from memopt.planning.budget import BudgetConfig

    budget_bytes = parse_bytes(budget, what="budget")
    if budget_bytes <= 0:
        raise ValueError(f"budget {budget!r} is not a positive byte count; pass e.g. --budget 20GiB")
    BudgetConfig(budget_bytes, batch, seq, objective, max_quality_loss)


def generation_cache_tokens(src, *, max_cache: int | None, seq: int | None, budget: Any) -> int:
    """The KV-cache capacity of a decoder's generation program (compile_model's rule): `max_cache`, else the
    context of the forward program with a budget, else min(2048, the model's context)."""
    if max_cache:
        return max_cache
    return (seq or min(128, src.max_seq)) if budget is not None else min(2048, src.max_seq)


def check_source(src, *, batch: int, seq: int | None, max_cache: int | None, budget: Any, kv: str | None,
                 offload_kv: Sequence, generation: bool, quantize: str | None, calibration: Any) -> None:
    """Validate what depends on the resolved model: its context, family, layers and KV-cache size."""
    if src.fixed_inputs is None and seq and seq > src.max_seq:
        raise ValueError(f"seq {seq} exceeds {src.name}'s context length {src.max_seq}; pass --seq <= {src.max_seq}")
    decoder = generation and src.family == "causal_lm"
    if (kv or offload_kv) and not decoder:
        flag = "--kv" if kv else "--offload-kv"
        raise ValueError(f"{flag} needs a decoder LM's generation program, which {src.name} ({src.family}) does not "
                         f"have: drop {flag}")
    if budget is None:
        _check_calibration(src, quantize, calibration)
    if not decoder:
        return
    cache = generation_cache_tokens(src, max_cache=max_cache, seq=seq, budget=budget)
    if cache > src.max_seq:
        raise ValueError(f"max_cache {cache} exceeds {src.name}'s context length {src.max_seq}; "
                         f"pass --max-cache <= {src.max_seq}")
    dims = _kv_dims(src)
    if kv:
        _check_kv(kv, cache, batch, dims)
    if offload_kv:
        _check_offload_kv(src, offload_kv)
    _check_cache_memory(src, batch, cache, dims)


def _check_calibration(src, quantize: str | None, calibration: Any) -> None:
    from memopt.passes.quant_config import parse_quantize_spec

    texts = isinstance(calibration, (str, Path)) or (isinstance(calibration, (list, tuple)) and calibration
                                                     and all(isinstance(c, str) for c in calibration))
    needs = bool(quantize) and getattr(parse_quantize_spec(quantize), "needs_calibration", False)
    if texts and needs and (src.tokenizer is None or src.fixed_inputs is not None):
        raise ValueError(f"calibration text needs a model with a tokenizer; {src.name} has none: pass "
                         "calibration as a list of args tuples for the model (Python API), or drop --calibration")


def _kv_dims(src) -> tuple[int, int, int] | None:
    """(layers, kv_heads, head_dim) from the config, or None when it does not say."""
    cfg = src.config
    layers, heads = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int) or heads < 1:
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size", 0) // heads
    return (layers, kv_heads, head_dim) if isinstance(kv_heads, int) and head_dim else None


def _check_kv(kv: str, cache: int, batch: int, dims: tuple[int, int, int] | None) -> None:
    """The policy's fixed sizes fit the cache, and its layout fits the model's heads (computed, not allocated)."""
    from memopt.kv.policy import check_kv_capacity, parse_kv_spec

    policy = parse_kv_spec(kv)
    check_kv_capacity(policy, cache, what=f"--kv {kv!r}")
    if dims is not None:
        layers, kv_heads, head_dim = dims
        try:
            policy.cache_bytes(batch, cache, layers, kv_heads, head_dim)
        except ValueError as e:
            raise ValueError(f"--kv {kv!r} does not fit this model: {e}") from None


def _check_offload_kv(src, offload_kv: Sequence) -> None:
    """Each index is a layer of the model and each pattern names one of its blocks."""
    from memopt.analysis.accounting import BLOCK_NAME
    from memopt.passes.host_stream import matches

    blocks = sorted({m.group(1) for name, _ in src.model.named_modules() if (m := BLOCK_NAME.match(name))},
                    key=lambda b: (len(b), b))
    for key in offload_kv:
        if isinstance(key, int):
            hit = key < len(blocks)
        else:  # the generation program wraps the model: its blocks are named "model." + these
            hit = any(matches(b, key) or matches(f"model.{b}", key) for b in blocks)
        if not hit:
            shown = f"0..{len(blocks) - 1}" if blocks else "none"
            raise ValueError(f"--offload-kv {key!r} matches no layer of {src.name}; give a layer index ({shown}) or "
                             f"a pattern of its block names, e.g. {blocks[0] if blocks else 'layers.0'!r}")


def _check_cache_memory(src, batch: int, cache: int, dims: tuple[int, int, int] | None) -> None:
    """The generation program holds a static (uncompressed) cache: refuse one this machine cannot allocate."""
    from memopt.frontend.targets import _host_memory_bytes

    if dims is None or src.device.type != "cpu":
        return
    layers, kv_heads, head_dim = dims
    need = 2 * layers * batch * kv_heads * cache * head_dim * src.dtype.itemsize
    have = _host_memory_bytes()
    if need > have:
        raise ValueError(f"the generation program's static KV cache needs {fmt_bytes(need)} (batch {batch} x {cache} "
                         f"tokens x {layers} layers), more than this machine's {fmt_bytes(have)}; lower --batch or "
                         "--max-cache")
