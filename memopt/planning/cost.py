"""Roofline cost model: bytes, FLOPs and seconds of a decoder's prefill and decode, per layer and format.

After the theoretical peak analysis of long-context serving: every op takes
`max(bytes moved / target.bandwidth, flops / target.flops_for(dtype))`; a layer whose weights live on
the host is streamed over the host link one block ahead of use, so its time is
`max(compute, bytes / target.host_link)` (transfer overlaps the previous block's compute). A KV cache on
the host (FlexGen, Sheng et al. 2023; ShadowKV, Sun et al. 2024) is streamed in one layer ahead the same
way, over the same link: `max(compute, (weight bytes + cache bytes) / target.host_link)`; the step's new
rows go back the other way (the link is per direction) and are not charged.

Inputs are plain data: a `ModelShape` (read from a transformers config by `model_shape`) and the
per-layer weights (`layer_weights(shape)`: each layer's matrices, hence its bytes in every format).
Torch-free. Units: bytes, FLOPs, seconds. `batch` sequences decode in lockstep: one decode step
emits `batch` tokens; `context` is the number of tokens in the KV cache.

Formats (bytes per parameter of a weight matrix with `in` input features):
  bf16       2                                  the native 16-bit weights
  int8       1 + 2 / in                         per-output-channel fp16 scale (LLM.int8() without outliers)
  int4:gG    0.5 + 2 * 2 / G                    asymmetric groups of G inputs, fp16 scale and zero each
  lossless   0.7 * 2                            entropy-coded bf16 exponents (DFloat11, ~11 bits, bit-exact)
Norms and biases stay 16-bit in every format.

Mixture-of-experts blocks (Mixtral, Qwen2-MoE, OLMoE): every expert's matrices are stored (all count
toward bytes), a decode step reads only the experts its tokens are routed to (`experts_per_token` of
`experts` per token; for `rows` tokens the expected number of distinct experts is
E * (1 - (1 - k/E)^rows)), plus the router and any shared expert.

Several devices: `tensor_parallel_shape` is what one device of a tensor-parallel group holds and computes
(Megatron-LM, Shoeybi et al. 2019: heads, KV heads, MLP columns and the vocabulary split `degree` ways);
`allreduce_time_s` and `send_time_s` price the links (alpha-beta model: latency + bytes / bandwidth; a
ring all-reduce over d devices takes 2(d-1) steps moving 2(d-1)/d of the bytes).

Decode overhead (`DECODE_OVERHEAD`, a modeling choice, not a measurement): the factor by which a
format's weight read is slower than its byte count at peak bandwidth, because the dequantizing kernel
does not stream at peak: bf16 1.0; int8 1.1; int4:g64 1.25 (Marlin-class GEMV kernels reach ~80% of
peak at batch 1); lossless 1.6 (the entropy decoder runs as its own pass before the matmul, so a
decompressed layer costs ~1.12x its bf16 read). Quantized KV caches likewise (`KV_OVERHEAD`: 8 bits 1.1,
4 bits 1.2, 2 bits 1.3, for KIVI-style fused dequantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple, Sequence

from memopt.frontend.targets import Link, Target

FORMATS = ("bf16", "int8", "int4:g64", "lossless")
KV_BITS = (16, 8, 4, 2)
LOSSLESS_RATIO = 0.7
DECODE_OVERHEAD = {"bf16": 1.0, "int8": 1.1, "int4": 1.25, "lossless": 1.6}
KV_OVERHEAD = {16: 1.0, 8: 1.1, 4: 1.2, 2: 1.3}
ACT_BYTES = 2  # activations and 16-bit weights
LOGIT_BYTES = 4  # logits are computed in fp32
_GATED = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "olmoe", "gemma", "gemma2",
          "gemma3", "gemma3_text", "phi3", "olmo", "olmo2", "cohere", "granite", "smollm3", "deepseek_v3"}
_ENCODERS = {"bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2", "mpnet"}


# ---------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a transformer: sizes only, no weights."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    weight_dtype_bytes: int = 2  # as loaded; the planner's "bf16" format is always 2 bytes
    tied_embeddings: bool = False
    gated_mlp: bool = True  # gate, up and down projections (SwiGLU) rather than fc and proj
    decoder: bool = True  # causal LM with a KV cache; False: an encoder (one forward, no cache)
    qkv_bias: bool = False
    linear_bias: bool = False  # every linear has a bias (GPT-2, BERT)
    layernorm_bias: bool = False  # LayerNorm (weight and bias) rather than RMSNorm
    extra_embed_params: int = 0  # position and token-type embeddings (GPT-2, BERT)
    pooler: bool = False  # BERT's pooler (a hidden x hidden linear)
    max_positions: int = 0
    compute_dtype: str = "bf16"
    block_prefix: str = "model.layers"
    embed_name: str = "model.embed_tokens"
    experts: int = 0  # routed experts per block (MoE); 0: a dense MLP of `intermediate`
    experts_per_token: int = 0  # top-k routing
    expert_intermediate: int = 0  # each routed expert's MLP width
    shared_expert_intermediate: int = 0  # an always-on shared expert (Qwen2-MoE), 0: none
    shared_expert_gate: bool = False  # the shared expert's sigmoid gate (a 1 x hidden matrix)
    qk_norm_params: int = 0  # RMSNorm weights on q and k (OLMoE: whole projections; Qwen3: per head)

    def __post_init__(self):
        for key in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "weight_dtype_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{key} must be a positive int, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelShape.heads ({self.heads}) must be a multiple of kv_heads, got {self.kv_heads}")
        for key in ("experts", "experts_per_token", "expert_intermediate", "shared_expert_intermediate"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"ModelShape.{key} must be an int >= 0, got {getattr(self, key)!r}")
        if not isinstance(self.qk_norm_params, int) or self.qk_norm_params < 0:
            raise ValueError(f"ModelShape.qk_norm_params must be an int >= 0, got {self.qk_norm_params!r}")
        if self.experts and not (1 <= self.experts_per_token <= self.experts and self.expert_intermediate >= 1):
            raise ValueError(f"ModelShape with {self.experts} experts needs 1 <= experts_per_token <= experts and "
                             f"expert_intermediate >= 1, got {self.experts_per_token} and {self.expert_intermediate}")

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _get(config, *keys, default=None):
    for key in keys:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if value is not None:
            return value
    return default


def _dtype_bytes(dtype) -> tuple[int, str]:
    s = str(dtype or "bfloat16").replace("torch.", "").lower()
    if s in ("float32", "fp32", "float"):
        return 4, "bf16"
    if s in ("float16", "fp16", "half"):
        return 2, "fp16"
    return 2, "bf16"


def model_shape(config, *, name: str = "") -> ModelShape:
    """A `ModelShape` from a transformers config (or its dict): Llama, Mistral, Qwen2, GPT-2 and BERT
    field names are read; missing fields fall back to the usual defaults (head_dim = hidden / heads,
    kv_heads = heads, intermediate = 4 * hidden)."""
    model_type = str(_get(config, "model_type", default="")).lower()
    hidden = int(_get(config, "hidden_size", "n_embd", "d_model", "dim", default=0))
    heads = int(_get(config, "num_attention_heads", "n_head", "num_heads", default=0))
    layers = int(_get(config, "num_hidden_layers", "n_layer", "num_layers", default=0))
    if not (hidden and heads and layers):
        raise ValueError(f"config of {name or model_type or 'the model'} lacks hidden_size/num_attention_heads/"
                         f"num_hidden_layers (got {hidden}, {heads}, {layers}); the budget planner needs a transformer")
    kv_heads = int(_get(config, "num_key_value_heads", "n_kv_heads", default=heads))
    head_dim = int(_get(config, "head_dim", default=0) or hidden // heads)
    intermediate = int(_get(config, "intermediate_size", "n_inner", "ffn_dim", default=0) or 4 * hidden)
    archs = list(_get(config, "architectures", default=None) or [])
    decoder = bool(_get(config, "is_decoder", default=False)) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) or model_type in _GATED | {"gpt2", "gpt_neox", "opt"}
    if model_type in _ENCODERS and not any(a.endswith("ForCausalLM") for a in archs):
        decoder = False
    gated = model_type in _GATED or (model_type not in _ENCODERS | {"gpt2", "gpt_neox", "opt"}
                                     and str(_get(config, "hidden_act", default="")) in ("silu", "swiglu"))
    dtype_bytes, compute = _dtype_bytes(_get(config, "dtype", "torch_dtype"))
    gpt2, bert = model_type == "gpt2", model_type in _ENCODERS
    positions = int(_get(config, "max_position_embeddings", "n_positions", "n_ctx", default=0))
    extra = 0
    if gpt2:
        extra = positions * hidden
    elif bert:
        extra = (positions + int(_get(config, "type_vocab_size", default=2))) * hidden
    prefix, embed = ("transformer.h", "transformer.wte") if gpt2 else (
        ("encoder.layer", "embeddings") if bert else ("model.layers", "model.embed_tokens"))
    qk_norm = {"olmoe": heads * head_dim + kv_heads * head_dim, "qwen3": 2 * head_dim,
               "qwen3_moe": 2 * head_dim}.get(model_type, 0)
    experts = int(_get(config, "num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    moe = {}
    if experts:
        width = int(_get(config, "moe_intermediate_size", default=0) or intermediate)
        shared = int(_get(config, "shared_expert_intermediate_size", default=0) or 0) or (
            int(_get(config, "n_shared_experts", default=0) or 0) * width)
        moe = dict(experts=experts, experts_per_token=min(experts, int(_get(
            config, "num_experts_per_tok", "moe_topk", "top_k", default=2) or 2)), expert_intermediate=width,
            shared_expert_intermediate=shared, shared_expert_gate=bool(shared) and model_type == "qwen2_moe")
    return ModelShape(
        name=name or str(_get(config, "name_or_path", "_name_or_path", default="") or model_type),
        layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        vocab=int(_get(config, "vocab_size", default=32000)), weight_dtype_bytes=dtype_bytes,
        tied_embeddings=bool(_get(config, "tie_word_embeddings", default=False)) and decoder,
        gated_mlp=gated, decoder=decoder,
        qkv_bias=model_type in ("qwen2", "qwen2_moe") or bool(_get(config, "attention_bias", default=False)),
        linear_bias=gpt2 or bert, layernorm_bias=gpt2 or bert, extra_embed_params=extra,
        pooler=bert and not decoder, max_positions=positions, compute_dtype=compute, block_prefix=prefix,
        embed_name=embed, qk_norm_params=qk_norm, **moe,
    )


# ---------------------------------------------------------------- weights per format
def _group(fmt: str) -> int:
    if fmt == "int4":
        return 64
    if fmt.startswith("int4:g") and fmt[6:].isdigit() and int(fmt[6:]) > 0:
        return int(fmt[6:])
    raise ValueError(f"weight format {fmt!r} is not known; choose one of {', '.join(FORMATS)} (or int4:g32/int4:g128)")


def _check_format(fmt: str) -> None:
    if fmt not in ("bf16", "native", "int8", "lossless"):
        _group(fmt)


def matrix_bytes(fmt: str, rows: int, cols: int) -> int:
    """Bytes of one (rows = out_features, cols = in_features) weight matrix stored in `fmt`."""
    n = rows * cols
    if fmt in ("bf16", "native"):
        return 2 * n
    if fmt == "int8":
        return n + 2 * rows
    if fmt == "lossless":
        return math.ceil(LOSSLESS_RATIO * 2 * n)
    g = _group(fmt)
    return math.ceil(n / 2) + rows * math.ceil(cols / g) * 2 * 2


def bytes_per_param(fmt: str, *, in_features: int = 4096) -> float:
    """Bytes per weight parameter in `fmt` for matrices with `in_features` inputs (scales included):
    bf16 2, int8 1 + 2/in, int4:g64 0.5 + 4/64, lossless 1.4."""
    _check_format(fmt)
    return matrix_bytes(fmt, 1024, in_features) / (1024 * in_features)


def decode_overhead(fmt: str) -> float:
    _check_format(fmt)
    return DECODE_OVERHEAD["int4" if fmt.startswith("int4") else ("bf16" if fmt == "native" else fmt)]


@dataclass(frozen=True)
class LayerWeights:
    """One planned unit. `kind`: "block" (a transformer layer), "embed" (a table read by row),
    "head" (the LM head or pooler, read whole) or "embed+head" (tied: both)."""

    name: str
    kind: str
    matrices: tuple[tuple[int, int], ...]  # (out_features, in_features) of each quantizable matrix
    other_params: int = 0  # norms and biases, kept 16-bit
    experts: int = 0  # MoE: `experts` copies of `expert_matrices`, each token routed to `experts_per_token`
    expert_matrices: tuple[tuple[int, int], ...] = ()
    experts_per_token: int = 0
    # from the captured programs (memopt/planning/captured.py), exact; empty: the formulas above
    stored: tuple[tuple[str, int], ...] = ()  # (format, device bytes) for each format the layer can take
    staged: tuple[tuple[str, int], ...] = ()  # (format, bytes of its offload staging slot) when on the host
    kv: tuple[tuple[int, int], ...] = ()  # (KV bits, bytes of its cache) for each cache it can keep

    @property
    def params(self) -> int:
        return (sum(r * c for r, c in self.matrices) + self.experts * sum(r * c for r, c in self.expert_matrices)
                + self.other_params)

    def offers(self, fmt: str) -> bool:
        """Whether the layer can be stored in `fmt` (a captured layer lists its formats; formulas take any)."""
        return not self.stored or fmt in dict(self.stored)

    def bytes(self, fmt: str) -> int:
        if self.stored:
            if fmt not in dict(self.stored):
                raise ValueError(f"{self.name} cannot be stored as {fmt}; it takes {', '.join(dict(self.stored))}")
            return dict(self.stored)[fmt]
        if self.kind == "embed+head" and fmt.startswith("int4"):
            fmt = "int8"  # no int4 gather kernel: the quantize pass stores a tied table as int8 rows
        return (sum(matrix_bytes(fmt, r, c) for r, c in self.matrices) + 2 * self.other_params
                + self.experts * self.expert_bytes(fmt))

    def expert_bytes(self, fmt: str) -> int:
        """One routed expert's bytes (0 for a dense layer)."""
        return sum(matrix_bytes(fmt, r, c) for r, c in self.expert_matrices)


def _mlp(s: ModelShape, width: int) -> tuple[tuple[int, int], ...]:
    up, down = (width, s.hidden), (s.hidden, width)
    return (up, up, down) if s.gated_mlp else (up, down)


def layer_weights(shape: ModelShape) -> tuple[LayerWeights, ...]:
    """Embedding, the blocks in order, then the LM head (with the final norm) or pooler."""
    s, h = shape, shape.hidden
    attn = ((s.q_dim, h), (s.kv_dim, h), (s.kv_dim, h), (h, s.q_dim))
    mlp = _mlp(s, s.intermediate) if not s.experts else (
        ((s.experts, h),) + (_mlp(s, s.shared_expert_intermediate) if s.shared_expert_intermediate else ())
        + (((1, h),) if s.shared_expert_gate else ()))
    norm = 2 * h * (2 if s.layernorm_bias else 1) + s.qk_norm_params
    bias = (s.q_dim + 2 * s.kv_dim) * (s.qkv_bias or s.linear_bias)
    if s.linear_bias:
        bias += h + (s.intermediate * (2 if s.gated_mlp else 1)) + h
    experts = dict(experts=s.experts, expert_matrices=_mlp(s, s.expert_intermediate),
                   experts_per_token=s.experts_per_token) if s.experts else {}
    blocks = [LayerWeights(f"{s.block_prefix}.{i}", "block", attn + mlp, norm + bias, **experts)
              for i in range(s.layers)]
    final_norm = h * (2 if s.layernorm_bias else 1)
    embed_other = s.extra_embed_params + (final_norm if not s.decoder else 0)
    if s.tied_embeddings:
        return (LayerWeights(f"{s.embed_name} (tied lm_head)", "embed+head", ((s.vocab, h),),
                             embed_other + final_norm),) + tuple(blocks)
    out = [LayerWeights(s.embed_name, "embed", ((s.vocab, h),), embed_other)] + blocks
    if s.decoder:
        out.append(LayerWeights("lm_head", "head", ((s.vocab, h),), final_norm))
    elif s.pooler:
        out.append(LayerWeights("pooler", "head", ((h, h),), h))
    return tuple(out)


# ---------------------------------------------------------------- KV cache
@dataclass(frozen=True)
class KVPolicy:
    """How a quantized cache is laid out (KIVI, Liu et al., 2024): keys quantized per channel over
    groups of `group_size` tokens, values per token over groups of `group_size` channels, each group
    with an fp16 scale and zero; the most recent `residual` tokens stay 16-bit. `window` (StreamingLLM,
    Xiao et al., 2024): keep only `sinks` + `window` tokens; None keeps every token."""

    group_size: int = 32
    residual: int = 128
    window: int | None = None
    sinks: int = 4

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"KVPolicy.group_size must be a positive int, got {self.group_size!r}")
        if not isinstance(self.residual, int) or self.residual < 0:
            raise ValueError(f"KVPolicy.residual must be an int >= 0, got {self.residual!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"KVPolicy.window must be None or a positive int, got {self.window!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"KVPolicy.sinks must be an int >= 0, got {self.sinks!r}")

    def tokens(self, context: int) -> int:
        return context if self.window is None else min(context, self.sinks + self.window)


def _check_bits(bits: int) -> None:
    if bits not in KV_BITS:
        raise ValueError(f"KV bits must be one of {KV_BITS}, got {bits!r}")


def kv_layer_bytes(shape: ModelShape, batch: int, context: int, bits: int = 16, policy: KVPolicy = KVPolicy()) -> int:
    """One layer's cache: keys and values, (batch, kv_heads, context, head_dim) each."""
    _check_bits(bits)
    if not shape.decoder:
        return 0
    t, d, rows = policy.tokens(context), shape.head_dim, batch * shape.kv_heads
    if bits == 16:
        return 2 * rows * t * d * 2
    resid = min(policy.residual, t)
    q, g = t - resid, policy.group_size
    keys = math.ceil(q * d * bits / 8) + math.ceil(q / g) * d * 2 * 2
    values = math.ceil(q * d * bits / 8) + q * math.ceil(d / g) * 2 * 2
    return rows * (keys + values + 2 * resid * d * 2)


def kv_bytes(shape: ModelShape, batch: int, context: int, bits: int = 16, policy: KVPolicy = KVPolicy()) -> int:
    """The whole cache. 16-bit: 2 * layers * kv_heads * head_dim * context * batch * 2 bytes.
    2/4/8 bits: KIVI's packed data + fp16 scale and zero per group + a 16-bit residual window."""
    return shape.layers * kv_layer_bytes(shape, batch, context, bits, policy)


# ---------------------------------------------------------------- roofline
def op_time_s(bytes_moved: float, flops: float, target: Target, dtype: str = "bf16") -> float:
    """Roofline: an op is bound by memory or by compute, whichever takes longer."""
    return max(bytes_moved / target.bandwidth, flops / target.flops_for(dtype) if flops else 0.0)


def _matmul_s(shape: ModelShape, layer: LayerWeights, fmt: str, target: Target, rows: int) -> float:
    """Every matrix of `layer` applied to `rows` token vectors: weights read once, activations in and out."""
    ovh, total = decode_overhead(fmt), 0.0
    for r, c in layer.matrices:
        moved = matrix_bytes(fmt, r, c) * ovh + rows * (r + c) * ACT_BYTES
        total += op_time_s(moved, 2.0 * rows * r * c, target, shape.compute_dtype)
    if layer.experts:  # the routed experts: only those some token is routed to are read
        e, k = layer.experts, layer.experts_per_token
        touched = e * (1.0 - (1.0 - k / e) ** rows)
        acts = rows * k * sum(r + c for r, c in layer.expert_matrices) * ACT_BYTES
        moved = touched * layer.expert_bytes(fmt) * ovh + acts
        macs = sum(r * c for r, c in layer.expert_matrices)
        total += op_time_s(moved, 2.0 * rows * k * macs, target, shape.compute_dtype)
    return total + op_time_s(2 * layer.other_params + 4 * rows * shape.hidden * ACT_BYTES, 0, target)


def weights_time_s(shape: ModelShape, layer: LayerWeights, fmt: str, target: Target, batch: int,
                   tokens: int = 1, *, head: bool = True) -> float:
    """Device time of `layer`'s weight ops for `tokens` new tokens of each of `batch` sequences.
    An embedding reads only the rows it looks up; the LM head (or pooler) runs on one token per
    sequence, and only when `head` (a prefill chunk before the last computes no logits)."""
    rows = batch * tokens
    if layer.kind == "block":
        return _matmul_s(shape, layer, fmt, target, rows)
    row_bytes = shape.hidden * (bytes_per_param(fmt, in_features=shape.hidden) * decode_overhead(fmt) + ACT_BYTES)
    gather = op_time_s(rows * row_bytes, 0, target)
    if layer.kind == "embed" or not head:
        return gather if layer.kind != "head" else 0.0
    return _matmul_s(shape, layer, fmt, target, batch) + (gather if layer.kind == "embed+head" else 0.0)


def stream_bytes(shape: ModelShape, layer: LayerWeights, fmt: str, batch: int, tokens: int = 1, *,
                 head: bool = True) -> int:
    """Bytes a host-resident layer sends to the device per use, which is also its staging slot: its weights as
    passes/offload.py packs them (`layer.staged` when captured), an embedding table whole (the pass streams the
    table, not the rows looked up)."""
    if layer.kind == "head" and not head:
        return 0
    return dict(layer.staged)[fmt] if layer.staged else layer.bytes(fmt)


def transfer_time_s(nbytes: float, target: Target) -> float:
    if target.host_link <= 0:
        return math.inf
    return nbytes / target.host_link


def attention_time_s(shape: ModelShape, target: Target, batch: int, tokens: int, past: int, bits: int = 16,
                     policy: KVPolicy = KVPolicy()) -> float:
    """One layer's attention for `tokens` new tokens after `past` cached ones (causal; an encoder attends
    to all `tokens`): read the cache in its format, QK^T and PV at 4 * heads * head_dim FLOPs per pair."""
    if shape.decoder:
        keys_seen = tokens * policy.tokens(past) + tokens * (tokens + 1) // 2
        cache = kv_layer_bytes(shape, batch, policy.tokens(past + tokens), bits, policy) * KV_OVERHEAD[bits]
    else:
        keys_seen, cache = tokens * tokens, 2 * batch * tokens * shape.kv_dim * ACT_BYTES
    moved = cache + 2 * batch * tokens * shape.q_dim * ACT_BYTES
    return op_time_s(moved, 4.0 * batch * shape.heads * shape.head_dim * keys_seen, target, shape.compute_dtype)


def kv_decode_time_s(shape: ModelShape, target: Target, batch: int, context: int, bits: int = 16,
                     policy: KVPolicy = KVPolicy()) -> float:
    """One layer's attention in one decode step with `context` tokens cached."""
    return attention_time_s(shape, target, batch, 1, max(context - 1, 0), bits, policy)


def kv_transfer_time_s(shape: ModelShape, target: Target, batch: int, context: int, bits: int = 16,
                       policy: KVPolicy = KVPolicy()) -> float:
    """Host link time of one layer's host-resident cache per step: the cache (its staging size) goes to
    the device; the new rows come back on the other direction, concurrently, and are not charged."""
    return transfer_time_s(kv_layer_bytes(shape, batch, context, bits, policy), target)


# ---------------------------------------------------------------- activations and whole-model predictions
def arena_bytes(shape: ModelShape, batch: int, seq: int, *, prefill_chunk: int = 2048, logits: bool = True) -> int:
    """Activation arena of a chunked prefill (decoders: `prefill_chunk` tokens at a time, flash attention,
    logits for the last token only; encoders: the whole sequence at once). The peak of one block: the
    residual, its normed copy and either q, k, v and the attention output or the MLP's intermediates
    (MoE: each token's `experts_per_token` experts, the shared expert and the router logits).
    `logits=False`: a pipeline stage without the LM head."""
    s = shape
    rows = batch * (min(seq, prefill_chunk) if s.decoder else seq)
    width = (3 if s.gated_mlp else 2)
    mlp = width * s.intermediate if not s.experts else (
        width * (s.experts_per_token * s.expert_intermediate + s.shared_expert_intermediate) + s.experts)
    attn = 2 * s.q_dim + 2 * s.kv_dim
    block = rows * (2 * s.hidden + max(mlp, attn)) * ACT_BYTES
    out = (batch * s.vocab * LOGIT_BYTES if logits else 0) if s.decoder else rows * s.hidden * ACT_BYTES
    return block + out


# ---------------------------------------------------------------- several devices
def tensor_parallel_shape(shape: ModelShape, degree: int) -> ModelShape:
    """What one device of a tensor-parallel group of `degree` devices holds and computes (Megatron-LM,
    Shoeybi et al. 2019): q/k/v columns and o rows by heads, MLP (and every expert's) columns and rows,
    the embedding and LM head by vocabulary rows; norms and the router replicated. KV heads must divide."""
    if not isinstance(degree, int) or degree < 1:
        raise ValueError(f"tensor-parallel degree must be a positive int, got {degree!r}")
    if degree == 1:
        return shape
    if shape.kv_heads % degree:
        raise ValueError(f"tensor-parallel degree {degree} does not divide {shape.name}'s {shape.kv_heads} KV heads; "
                         f"use a divisor of {shape.kv_heads}")
    part = lambda n: -(-n // degree)  # noqa: E731
    return replace(shape, heads=shape.heads // degree, kv_heads=shape.kv_heads // degree,
                   intermediate=part(shape.intermediate), expert_intermediate=part(shape.expert_intermediate),
                   shared_expert_intermediate=part(shape.shared_expert_intermediate), vocab=part(shape.vocab))


def send_time_s(nbytes: float, link: Link | None) -> float:
    """One message of `nbytes` over `link` (None: the same device, free)."""
    return 0.0 if link is None or nbytes <= 0 else link.latency_s + nbytes / link.bandwidth


def allreduce_time_s(nbytes: float, degree: int, link: Link | None) -> float:
    """Ring all-reduce of `nbytes` on each of `degree` devices: 2(d-1) steps, each moving nbytes/d."""
    if degree <= 1 or nbytes <= 0:
        return 0.0
    if link is None:
        raise ValueError(f"an all-reduce over {degree} devices needs a link between them")
    return 2 * (degree - 1) * (link.latency_s + nbytes / degree / link.bandwidth)


def allgather_time_s(nbytes_per_device: float, degree: int, link: Link | None) -> float:
    """Ring all-gather: d-1 steps, each moving one device's `nbytes_per_device`."""
    if degree <= 1 or nbytes_per_device <= 0:
        return 0.0
    if link is None:
        raise ValueError(f"an all-gather over {degree} devices needs a link between them")
    return (degree - 1) * (link.latency_s + nbytes_per_device / link.bandwidth)


def tp_block_comm_s(shape: ModelShape, degree: int, link: Link | None, batch: int, tokens: int = 1) -> float:
    """A tensor-parallel block's communication: one all-reduce of the hidden states after attention and one
    after the MLP, (batch * tokens, hidden) 16-bit values each."""
    return 2 * allreduce_time_s(batch * tokens * shape.hidden * ACT_BYTES, degree, link)


class Choice(NamedTuple):
    """One layer's decision: weight format, placement ("device" | "host"), KV bits and KV placement
    (both ignored off blocks)."""

    format: str = "bf16"
    placement: str = "device"
    kv_bits: int = 16
    kv_placement: str = "device"


@dataclass(frozen=True)
class Prediction:
    peak_bytes: int
    weights_device_bytes: int
    kv_bytes: int
    arena_bytes: int
    prefetch_bytes: int
    prefill_s: float
    decode_s_per_token: float | None  # seconds per decode step (batch tokens); None for encoders
    tokens_per_s: float | None
    kv_staging_bytes: int = 0  # device buffers a host-resident KV cache is streamed into


def layer_decode_s(shape: ModelShape, layer: LayerWeights, choice: Choice, target: Target, batch: int,
                   context: int, policy: KVPolicy = KVPolicy()) -> float:
    """One layer in one decode step; a host layer (or host KV cache) overlaps its transfer with compute."""
    compute = weights_time_s(shape, layer, choice.format, target, batch)
    transfer = 0.0
    if layer.kind == "block":
        compute += kv_decode_time_s(shape, target, batch, context, choice.kv_bits, policy)
        if choice.kv_placement == "host":
            transfer += kv_transfer_time_s(shape, target, batch, context, choice.kv_bits, policy)
    if choice.placement == "host":
        transfer += transfer_time_s(stream_bytes(shape, layer, choice.format, batch), target)
    return max(compute, transfer)


def prefill_s(shape: ModelShape, layers: Sequence[LayerWeights], choices: Sequence[Choice], target: Target,
              batch: int, seq: int, *, prefill_chunk: int = 2048, policy: KVPolicy = KVPolicy()) -> float:
    """Chunked prefill of `seq` tokens (decoders; encoders: one forward): per chunk and layer,
    max(compute, transfer) for host layers, which are streamed again for every chunk (a host KV cache:
    the tokens cached before the chunk)."""
    chunk = min(seq, prefill_chunk) if shape.decoder else seq
    total = 0.0
    for start in range(0, seq, chunk):
        n, last = min(chunk, seq - start), start + chunk >= seq
        for layer, c in zip(layers, choices):
            t = weights_time_s(shape, layer, c.format, target, batch, n, head=last)
            transfer = 0.0
            if layer.kind == "block":
                t += attention_time_s(shape, target, batch, n, start, c.kv_bits, policy)
                if c.kv_placement == "host" and start:
                    transfer += kv_transfer_time_s(shape, target, batch, start, c.kv_bits, policy)
            if c.placement == "host":
                transfer += transfer_time_s(stream_bytes(shape, layer, c.format, batch, n, head=last), target)
            total += max(t, transfer)
    return total


def predict(shape: ModelShape, layers: Sequence[LayerWeights], choices: Sequence[Choice], target: Target, *,
            batch: int, seq: int, arena: int | None = None, prefill_chunk: int = 2048,
            prefetch_buffers: int = 2, policy: KVPolicy = KVPolicy()) -> Prediction:
    """Peak memory (device weights + KV at `seq` tokens + arena + prefetch buffers), prefill time at
    (batch, seq) and decode time per step at (batch, context = seq)."""
    if len(layers) != len(choices):
        raise ValueError(f"predict needs one choice per layer: {len(layers)} layers, {len(choices)} choices")
    dev = sum(l.bytes(c.format) for l, c in zip(layers, choices) if c.placement == "device")
    blocks = [c for l, c in zip(layers, choices) if l.kind == "block"]
    kv = sum(kv_layer_bytes(shape, batch, seq, c.kv_bits, policy) for c in blocks if c.kv_placement != "host")
    staging = prefetch_buffers * max((kv_layer_bytes(shape, batch, seq, c.kv_bits, policy) for c in blocks
                                      if c.kv_placement == "host"), default=0)
    stream = max((stream_bytes(shape, l, c.format, batch) for l, c in zip(layers, choices) if c.placement == "host"),
                 default=0)
    act = arena_bytes(shape, batch, seq, prefill_chunk=prefill_chunk) if arena is None else arena
    pre = prefill_s(shape, layers, choices, target, batch, seq, prefill_chunk=prefill_chunk, policy=policy)
    decode = tokens = None
    if shape.decoder:
        decode = sum(layer_decode_s(shape, l, c, target, batch, seq, policy) for l, c in zip(layers, choices))
        tokens = batch / decode if decode > 0 else math.inf
    peak = dev + kv + act + prefetch_buffers * stream + staging
    return Prediction(peak, dev, kv, act, prefetch_buffers * stream, pre, decode, tokens, staging)


__all__ = ["FORMATS", "KV_BITS", "DECODE_OVERHEAD", "KV_OVERHEAD", "ModelShape", "model_shape", "matrix_bytes",
           "bytes_per_param", "LayerWeights", "layer_weights", "KVPolicy", "kv_layer_bytes", "kv_bytes", "op_time_s",
           "weights_time_s", "stream_bytes", "transfer_time_s", "attention_time_s", "kv_decode_time_s",
           "kv_transfer_time_s", "arena_bytes", "tensor_parallel_shape", "send_time_s", "allreduce_time_s",
           "allgather_time_s", "tp_block_comm_s",
           "Choice", "Prediction", "layer_decode_s", "prefill_s", "predict"]
