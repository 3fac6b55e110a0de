"""Weight-format configs: frozen dataclasses that validate themselves and round-trip through JSON.

Torch-free on purpose, so the CLI and the planner can parse and print formats cheaply.
`parse_quantize_spec` turns the CLI's format strings into these configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar, Union

CONFIG_VERSION = 1
INT4_GROUP_SIZES = (32, 64, 128)
INT4_METHODS = ("rtn", "gptq")
ACCEPTED_SPECS = ("int8", "int8:dyn", "int4", "int4:g32", "int4:g64", "int4:g128", "int4:g64:gptq",
                  "int4:g64:gptq:had", "int4:g64:gptq:o0.025", "int4:g64:gptq:had:o0.025", "lossless")


class _JsonConfig:
    kind: ClassVar[str] = ""

    def to_json(self) -> dict:
        return {"type": self.kind, "version": CONFIG_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, d: dict):
        from memopt.jsonconfig import config_from_json

        return config_from_json(cls, d, cls.kind, CONFIG_VERSION)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Int8WeightConfig(_JsonConfig):
    """Symmetric per-output-channel int8 weights (LLM.int8() without the outlier split).

    `embeddings`: also store embedding tables as int8 rows. `dynamic_activations`: quantize activations
    per row at run time and multiply in int8 (W8A8-dynamic, fastest on CPU but adds activation error).
    """

    kind: ClassVar[str] = "int8"
    embeddings: bool = True
    dynamic_activations: bool = False

    def __post_init__(self):
        _check_bool("embeddings", self.embeddings)
        _check_bool("dynamic_activations", self.dynamic_activations)

    @property
    def spec(self) -> str:
        return "int8:dyn" if self.dynamic_activations else "int8"


@dataclass(frozen=True)
class Int4WeightConfig(_JsonConfig):
    """Asymmetric group-wise int4 weights (groups of `group_size` input channels).

    `outlier_fraction`: the most salient input channels (largest mean |x| on calibration inputs, as in
    AWQ) are kept in bf16 beside the int4 matmul (block quantization with outliers); needs calibration.
    `method`: "rtn" (round to nearest, MSE-searched clipping) or "gptq" (GPTQ, Frantar et al. 2022:
    Hessian-based error compensation from calibration inputs, act-order with static groups).
    `hadamard`: rotate each linear's input channels by a block-diagonal Hadamard matrix (blocks of up to
    128 channels) before quantizing, and its input by the same matrix at run time (QuIP#'s incoherence
    processing, QuaRot's online rotation): outliers are spread over a block, at no stored byte. With GPTQ
    it gains ~+0.002 mean cosine on all-MiniLM-L6-v2 (benchmarks/results/quantize.md); with
    round-to-nearest alone it does not help. Outlier channels are then chosen among rotated channels.
    `embeddings`: store embedding tables as int8 rows (there is no int4 embedding kernel). A table tied to an
    LM head is stored as int8 rows either way: one copy for the gather and the head's matmul.
    """

    kind: ClassVar[str] = "int4"
    group_size: int = 64
    outlier_fraction: float = 0.0
    method: str = "rtn"
    embeddings: bool = False
    hadamard: bool = False

    def __post_init__(self):
        if isinstance(self.group_size, bool) or self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be 32, 64 or 128, got {self.group_size!r}")
        if isinstance(self.outlier_fraction, bool) or not isinstance(self.outlier_fraction, (int, float)) \
                or not 0.0 <= self.outlier_fraction <= 0.25:
            raise ValueError(f"outlier_fraction must be a number in [0, 0.25], got {self.outlier_fraction!r}")
        if self.method not in INT4_METHODS:
            raise ValueError(f"method must be one of {INT4_METHODS}, got {self.method!r}")
        _check_bool("embeddings", self.embeddings)
        _check_bool("hadamard", self.hadamard)

    @property
    def needs_calibration(self) -> bool:
        return self.outlier_fraction > 0 or self.method == "gptq"

    @property
    def spec(self) -> str:
        method = ":gptq" if self.method == "gptq" else ""
        return (f"int4:g{self.group_size}{method}" + (":had" if self.hadamard else "")
                + (f":o{self.outlier_fraction:g}" if self.outlier_fraction else ""))


@dataclass(frozen=True)
class LosslessConfig(_JsonConfig):
    """DFloat11-style lossless bf16 weights: Huffman-coded exponents, raw sign+mantissa bytes.

    `block_size`: elements per independently decodable block (one bit offset stored per block).
    `max_code_bits`: longest Huffman code (<= 16: the decoder reads 24-bit windows and looks the next
    `max_code_bits` bits up in a 2**max_code_bits table; capping at 12-16 costs < 0.1% of the size).
    `embeddings`: also compress bf16 embedding tables (decoding only the blocks of the rows looked up).
    """

    kind: ClassVar[str] = "lossless"
    block_size: int = 512
    max_code_bits: int = 16
    embeddings: bool = True

    def __post_init__(self):
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) \
                or not 32 <= self.block_size <= 1 << 20:
            raise ValueError(f"block_size must be an int in [32, 1048576], got {self.block_size!r}")
        if isinstance(self.max_code_bits, bool) or not isinstance(self.max_code_bits, int) \
                or not 8 <= self.max_code_bits <= 16:
            raise ValueError(f"max_code_bits must be an int in [8, 16], got {self.max_code_bits!r}")
        _check_bool("embeddings", self.embeddings)

    @property
    def spec(self) -> str:
        return "lossless"


WeightConfig = Union[Int8WeightConfig, Int4WeightConfig, LosslessConfig]
_KINDS = {c.kind: c for c in (Int8WeightConfig, Int4WeightConfig, LosslessConfig)}


def config_from_json(d: dict) -> WeightConfig:
    """Any weight config from its `to_json()` form (dispatching on `type`)."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind not in _KINDS:
        raise ValueError(f"unknown weight config type {kind!r}; accepted: {sorted(_KINDS)}")
    return _KINDS[kind].from_json(d)


def parse_quantize_spec(spec: str) -> WeightConfig:
    """'int8' | 'int8:dyn' | 'int4[:gN][:rtn|:gptq][:had][:oF]' | 'lossless'.

    `:had` rotates input channels by a Hadamard matrix first (see Int4WeightConfig). `:oF` keeps the
    fraction F (0 < F <= 0.25) of input channels in bf16 (outliers). The most accurate int4 g64 format
    within 0.15x fp32 bytes is 'int4:g64:gptq:had:o0.025' (see benchmarks/results/quantize.md).
    """
    s = spec.strip().lower() if isinstance(spec, str) else spec
    if s == "int8":
        return Int8WeightConfig()
    if s == "int8:dyn":
        return Int8WeightConfig(dynamic_activations=True)
    if s == "lossless":
        return LosslessConfig()
    if isinstance(s, str) and s.startswith("int4"):
        parts = s.split(":")
        group, method, outliers, had = 64, "rtn", 0.0, False
        ok = parts[0] == "int4" and len(parts) <= 5 and len(set(parts)) == len(parts)
        for p in parts[1:]:
            if p.startswith("g") and p[1:].isdigit() and int(p[1:]) in INT4_GROUP_SIZES:
                group = int(p[1:])
            elif p in INT4_METHODS:
                method = p
            elif p == "had":
                had = True
            elif p.startswith("o") and _is_fraction(p[1:]):
                outliers = float(p[1:])
            else:
                ok = False
        if ok:
            return Int4WeightConfig(group_size=group, method=method, outlier_fraction=outliers, hadamard=had)
    raise ValueError(f"unknown weight format {spec!r}; accepted: {', '.join(ACCEPTED_SPECS)} "
                     f"(int4 takes :g32/:g64/:g128, :rtn/:gptq, :had and :o<fraction of bf16 outlier channels>)")


def _is_fraction(text: str) -> bool:
    try:
        return 0.0 < float(text) <= 0.25
    except ValueError:
        return False
