"""Composing KV techniques: one cache per group of heads, groups per layer, layers per model.

    KVCachePolicy     eviction (StreamingConfig | H2OConfig | SnapKVConfig | None) x quantization
                      (KIVIConfig | None) x key-channel pruning (ThinKConfig | None) x storage dtype
    PerHeadKVPolicy   KV heads split into groups, each with its own KVCachePolicy and its own buffers
                      (DuoAttention / RazorAttention: retrieval heads full, streaming heads sinks + window)
    PerLayerKVPolicy  a default policy and overrides per layer index

Every policy resolves to `Layout`s once shapes are known and reports its true bytes with
`cache_bytes(batch, context, layers, kv_heads, head_dim)`: packed data, scales and zeros, full-precision
residual and sinks, scores and kept-channel indices, exactly the buffers the pass registers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping, Union

from memopt.kv.config import KVConfig, check_int
from memopt.kv.h2o import H2OConfig
from memopt.kv.kivi import KIVIConfig
from memopt.kv.layout import FP_DTYPES, Layout
from memopt.kv.snapkv import SnapKVConfig
from memopt.kv.streaming import StreamingConfig
from memopt.kv.think import ThinKConfig

EVICTIONS = (StreamingConfig, H2OConfig, SnapKVConfig)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@dataclass(frozen=True)
class KVCachePolicy(KVConfig):
    """One compressed cache. `dtype`: storage of the full-precision parts (sinks, residual, unquantized store).
    With every field None it is the plain cache of `context` tokens."""

    kind: ClassVar[str] = "kv_cache"
    eviction: Union[StreamingConfig, H2OConfig, SnapKVConfig, None] = None
    quant: KIVIConfig | None = None
    channels: ThinKConfig | None = None
    dtype: str = "float16"

    def __post_init__(self):
        if self.eviction is not None and not isinstance(self.eviction, EVICTIONS):
            raise ValueError(f"KVCachePolicy.eviction must be StreamingConfig, H2OConfig, SnapKVConfig or None, "
                             f"got {self.eviction!r}")
        if self.quant is not None and not isinstance(self.quant, KIVIConfig):
            raise ValueError(f"KVCachePolicy.quant must be a KIVIConfig or None, got {self.quant!r}")
        if self.channels is not None and not isinstance(self.channels, ThinKConfig):
            raise ValueError(f"KVCachePolicy.channels must be a ThinKConfig or None, got {self.channels!r}")
        if self.dtype not in FP_DTYPES:
            raise ValueError(f"KVCachePolicy.dtype must be one of {', '.join(FP_DTYPES)}, got {self.dtype!r}")
        e, q = self.eviction, self.quant
        if q is not None and (q.pre_rope or q.hadamard) and self.channels is not None:
            raise ValueError("KIVIConfig pre_rope / hadamard rotate key channels that ThinKConfig would prune; "
                             "drop channels or set pre_rope=False, hadamard=False")
        if q is not None and q.pre_rope and isinstance(e, (H2OConfig, SnapKVConfig)):
            raise ValueError(f"KIVIConfig.pre_rope needs the positions of stored blocks, which {type(e).__name__} "
                             f"reorders; set pre_rope=False or use StreamingConfig")
        if isinstance(e, StreamingConfig) and q is not None and e.window < q.residual:
            raise ValueError(f"StreamingConfig.window {e.window} < KIVIConfig.residual {q.residual}: nothing would "
                             f"be quantized; lower the residual or widen the window")
        if isinstance(e, StreamingConfig) and q is None and self.channels is not None:
            raise ValueError("ThinKConfig prunes the keys of the store, and StreamingConfig without KIVIConfig "
                             "keeps every token in the full-precision window: add quant=KIVIConfig(...) or drop channels")
        if isinstance(e, (H2OConfig, SnapKVConfig)):
            floor = self._sinks() + self._recent()
            if e.budget_tokens < floor:
                raise ValueError(f"{type(e).__name__}.budget_tokens {e.budget_tokens} < sinks {self._sinks()} + recent "
                                 f"window {self._recent()} (KIVI residual rounded to its groups); raise the budget "
                                 f"to at least {floor}")

    def fixed_tokens(self) -> tuple[tuple[str, int], ...]:
        """The parts of this cache sized by the policy, not by the context: (name, tokens) pairs."""
        e, q = self.eviction, self.quant
        if isinstance(e, StreamingConfig):
            return (("sinks", self._sinks()), ("window", e.window))
        if e is not None:
            return (("budget_tokens", e.budget_tokens),)
        return () if q is None else (("sinks", q.sinks), ("residual", q.residual))

    def _sinks(self) -> int:
        return max(getattr(self.eviction, "sinks", 0), getattr(self.quant, "sinks", 0))

    def _recent(self) -> int:
        e, q = self.eviction, self.quant
        recent = e.recent if isinstance(e, H2OConfig) else e.window
        return recent if q is None else _round_up(max(recent, q.residual), q.group_size)

    def layout(self, heads: tuple[int, ...], head_dim: int, context: int) -> Layout:
        """The storage of this policy for KV heads `heads` and a cache sized for `context` tokens."""
        e, q, c = self.eviction, self.quant, self.channels
        spec = dict(heads=tuple(heads), head_dim=head_dim, dtype=self.dtype)
        group = 1
        if q is not None:
            group = q.group_size
            value_group = min(group, head_dim)
            if head_dim % value_group or (head_dim * q.value_bits) % 8:
                raise ValueError(f"KIVIConfig.group_size {group} does not divide head_dim {head_dim}; "
                                 f"use a group_size that divides it")
            spec.update(group=group, key_bits=q.key_bits, value_bits=q.value_bits, value_group=value_group,
                        pre_rope=q.pre_rope and q.key_bits < 16, hadamard=q.hadamard)
        sinks = self._sinks()
        if e is None:
            if q is None:
                spec.update(blocks=context)
            else:
                spec.update(sinks=sinks, residual=q.residual,
                            blocks=-(-max(0, context - sinks - q.residual) // group))
        elif isinstance(e, StreamingConfig):
            spec.update(sinks=sinks, bounded=True)
            if q is None:
                spec.update(residual=e.window)
            else:
                spec.update(residual=q.residual, blocks=-(-(e.window - q.residual) // group))
        else:
            recent = self._recent()
            spec.update(sinks=sinks, residual=recent, blocks=(e.budget_tokens - sinks - recent) // group,
                        evict="score", bounded=True)
            if isinstance(e, H2OConfig):
                spec.update(score=e.score, prefill_score=e.score)
            else:
                spec.update(score="h2o", prefill_score="snapkv", window=e.window, kernel=e.kernel)
        if c is not None:
            multiple = 8 // q.key_bits if q is not None and q.key_bits < 16 else 1
            spec.update(key_channels=c.kept_channels(head_dim, multiple), channel_window=c.window)
        return Layout(**spec)

    def layer_layouts(self, layer: int, kv_heads: int, head_dim: int, context: int) -> tuple[Layout, ...]:
        return (self.layout(tuple(range(kv_heads)), head_dim, context),)

    def cache_bytes(self, batch: int, context: int, layers: int, kv_heads: int, head_dim: int) -> int:
        return _cache_bytes(self, batch, context, layers, kv_heads, head_dim)


@dataclass(frozen=True)
class HeadGroup(KVConfig):
    """KV heads `heads` (indices within a layer) cached under `policy`."""

    kind: ClassVar[str] = "head_group"
    heads: tuple[int, ...] = ()
    policy: KVCachePolicy = field(default_factory=KVCachePolicy)

    def __post_init__(self):
        object.__setattr__(self, "heads", tuple(self.heads))
        if not self.heads:
            raise ValueError("HeadGroup.heads must name at least one KV head")
        for h in self.heads:
            check_int("HeadGroup", "heads", h, minimum=0)
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"HeadGroup.heads repeats a head: {list(self.heads)}")
        if not isinstance(self.policy, KVCachePolicy):
            raise ValueError(f"HeadGroup.policy must be a KVCachePolicy, got {self.policy!r}")


@dataclass(frozen=True)
class PerHeadKVPolicy(KVConfig):
    """A layer's KV heads split into groups with their own policies (and their own storage)."""

    kind: ClassVar[str] = "per_head"
    groups: tuple[HeadGroup, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        if not self.groups or not all(isinstance(g, HeadGroup) for g in self.groups):
            raise ValueError(f"PerHeadKVPolicy.groups must be a non-empty sequence of HeadGroup, got {self.groups!r}")
        seen = [h for g in self.groups for h in g.heads]
        if len(set(seen)) != len(seen):
            raise ValueError(f"PerHeadKVPolicy: a KV head is in two groups: {sorted(seen)}")

    def layer_layouts(self, layer: int, kv_heads: int, head_dim: int, context: int) -> tuple[Layout, ...]:
        heads = sorted(h for g in self.groups for h in g.heads)
        bad = [h for h in heads if h >= kv_heads]
        if bad:
            raise ValueError(f"head index {bad[0]} out of range in layer {layer}: the model has {kv_heads} KV heads "
                             f"(0..{kv_heads - 1})")
        if len(heads) != kv_heads:
            missing = sorted(set(range(kv_heads)) - set(heads))
            raise ValueError(f"layer {layer}: KV heads {missing} have no group; every head needs exactly one")
        return tuple(g.policy.layout(g.heads, head_dim, context) for g in self.groups)

    def cache_bytes(self, batch: int, context: int, layers: int, kv_heads: int, head_dim: int) -> int:
        return _cache_bytes(self, batch, context, layers, kv_heads, head_dim)


LayerPolicy = Union[KVCachePolicy, PerHeadKVPolicy]


@dataclass(frozen=True)
class PerLayerKVPolicy(KVConfig):
    """`default` for every layer, `layers[i]` where given."""

    kind: ClassVar[str] = "per_layer"
    default: LayerPolicy = field(default_factory=KVCachePolicy)
    layers: Mapping[int, LayerPolicy] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.default, (KVCachePolicy, PerHeadKVPolicy)):
            raise ValueError(f"PerLayerKVPolicy.default must be a KVCachePolicy or PerHeadKVPolicy, got {self.default!r}")
        layers = {}
        for key, policy in dict(self.layers).items():
            index = int(key) if isinstance(key, str) and key.isdigit() else key
            check_int("PerLayerKVPolicy", "layers key", index, minimum=0)
            if not isinstance(policy, (KVCachePolicy, PerHeadKVPolicy)):
                raise ValueError(f"PerLayerKVPolicy.layers[{index}] must be a KVCachePolicy or PerHeadKVPolicy, "
                                 f"got {policy!r}")
            layers[index] = policy
        object.__setattr__(self, "layers", layers)

    def for_layer(self, layer: int) -> LayerPolicy:
        return self.layers.get(layer, self.default)

    def layer_layouts(self, layer: int, kv_heads: int, head_dim: int, context: int) -> tuple[Layout, ...]:
        return self.for_layer(layer).layer_layouts(layer, kv_heads, head_dim, context)

    def check_layers(self, n_layers: int) -> None:
        bad = sorted(i for i in self.layers if i >= n_layers)
        if bad:
            raise ValueError(f"layer index {bad[0]} out of range: the model has {n_layers} layers (0..{n_layers - 1})")

    def cache_bytes(self, batch: int, context: int, layers: int, kv_heads: int, head_dim: int) -> int:
        self.check_layers(layers)
        return _cache_bytes(self, batch, context, layers, kv_heads, head_dim)


AnyKVPolicy = Union[KVCachePolicy, PerHeadKVPolicy, PerLayerKVPolicy]


def _cache_bytes(policy, batch: int, context: int, layers: int, kv_heads: int, head_dim: int) -> int:
    """True bytes of the whole cache: the sum over layers and head groups of every stored tensor."""
    for name, value in (("batch", batch), ("context", context), ("layers", layers), ("kv_heads", kv_heads),
                        ("head_dim", head_dim)):
        check_int("cache_bytes", name, value, minimum=1)
    return sum(x.nbytes(batch) for i in range(layers) for x in policy.layer_layouts(i, kv_heads, head_dim, context))


def fp16_cache_bytes(batch: int, context: int, layers: int, kv_heads: int, head_dim: int) -> int:
    """The uncompressed fp16 reference: 2 (K and V) x layers x batch x kv_heads x context x head_dim x 2 bytes."""
    return 2 * layers * batch * kv_heads * context * head_dim * 2


def _leaves(policy: AnyKVPolicy) -> list[KVCachePolicy]:
    if isinstance(policy, PerLayerKVPolicy):
        return [p for layer in (policy.default, *policy.layers.values()) for p in _leaves(layer)]
    if isinstance(policy, PerHeadKVPolicy):
        return [g.policy for g in policy.groups]
    return [policy]


def check_kv_capacity(policy: AnyKVPolicy, context: int, what: str = "KV policy") -> None:
    """Refuse a policy whose fixed parts (sinks, window, KIVI residual, eviction budget) hold more tokens than
    the `context`-token cache it compresses, before any buffer is allocated (a compressed cache never needs
    more room than the plain one)."""
    check_int("check_kv_capacity", "context", context, minimum=1)
    for leaf in _leaves(policy):
        parts = leaf.fixed_tokens()
        total = sum(n for _, n in parts)
        if total > context:
            detail = " + ".join(f"{name} {n}" for name, n in parts if n)
            raise ValueError(f"{what} keeps {total} tokens ({detail}) but the cache holds {context} tokens; "
                             f"choose sizes that sum to at most {context}, or raise the cache capacity (--max-cache)")


def parse_kv_spec(spec: str) -> KVCachePolicy:
    """A plan's `kv_policy` string: 'full', 'kivi:<bits>' or 'kivi:k<bits>v<bits>' with optional ':g<group>'
    ':r<residual>', ':s<sinks>', ':pre' (pre-RoPE keys) and ':had' (Hadamard rotation),
    'streaming:<sinks>:<window>', 'h2o:<budget>', 'snapkv:<budget>'."""
    parts = spec.strip().lower().split(":") if isinstance(spec, str) else [""]
    head, rest = parts[0], parts[1:]
    try:
        if head in ("full", "fp16", "16") and not rest:
            return KVCachePolicy()
        if head == "kivi" and rest:
            bits = rest[0]
            kb, vb = (int(bits), int(bits)) if bits.isdigit() else map(int, bits[1:].split("v"))
            opts, flags = {"g": 32, "r": 128, "s": 0}, {"pre": False, "had": False}
            for p in rest[1:]:
                if p in flags:
                    flags[p] = True
                elif p[:1] in opts:
                    opts[p[0]] = int(p[1:])
                else:
                    raise ValueError(p)
            if kb == vb == 16:
                return KVCachePolicy()
            return KVCachePolicy(quant=KIVIConfig(kb, vb, opts["g"], opts["r"], opts["s"], pre_rope=flags["pre"],
                                                  hadamard=flags["had"]))
        if head == "streaming" and len(rest) == 2:
            return KVCachePolicy(eviction=StreamingConfig(int(rest[0]), int(rest[1])))
        if head in ("h2o", "snapkv") and len(rest) == 1:
            cls = H2OConfig if head == "h2o" else SnapKVConfig
            return KVCachePolicy(eviction=cls(budget_tokens=int(rest[0])))
    except (ValueError, IndexError) as exc:
        if "must" in str(exc):
            raise
    raise ValueError(f"unknown KV policy {spec!r}; accepted: full, kivi:<2|4|8>, kivi:k4v2[:g32][:r128][:s4][:pre][:had], "
                     f"streaming:<sinks>:<window>, h2o:<budget_tokens>, snapkv:<budget_tokens>")
