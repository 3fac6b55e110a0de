"""Weights read one tensor at a time, so a compile never holds the whole model in full precision.

A streamed source's model has *fake* parameters (`FakeTensor`s on the CPU: shapes and dtypes, no storage), each
tagged with the file tensor it stands for, and real buffers (rotary tables). torch.export traces it exactly as it
traces the loaded model: the fake parameters say "cpu", so every device- and stride-dependent choice is the same
and the graphs are equal node for node (a model on the meta device traces differently: meta SDPA returns another
layout, and `device=meta` lands in the graph). The compile then reads each weight when a pass needs it:
`QuantizePass` reads, quantizes and drops one weight at a time (`real`), and `materialize` binds the weights no
pass rewrote (norms, tables kept in full precision) once, the same tensor object for both programs of a decoder.

`load_parameters` is the eager twin: every parameter read at once, the way `resolve_source` loads a GGUF file (the
model transformers' own loader builds, tensor for tensor, in a third of its time).

Providers read one tensor per call, by the model's own state-dict name, in the dtype asked:
  GGUFWeights         a llama.cpp file, dequantized by the gguf package row block by row block, named and
                      un-permuted as transformers' GGUF loader does (`modeling_gguf_pytorch_utils.
                      load_gguf_checkpoint`), so each tensor equals the loaded model's (tests/test_streamed_compile.py)
  SafetensorsWeights  a Hugging Face directory whose *.safetensors keys are the model's own names
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

_TAG = "_memopt_streamed"  # attribute of a fake parameter: (provider, name)
_CHUNK_BYTES = 4 * 2**20  # dequantize at most this many float32 bytes at a time


class WeightProvider:
    """One named tensor per `read`. `shared` remembers what `materialize` bound (weakly), so a weight bound into
    two programs is one tensor."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.shared: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def reads_rows(self, name: str) -> bool:
        """Whether `read_rows` can read rows of `name` alone."""
        return False

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows `start:stop` (first dimension) of `name`, as `read(name)[start:stop]` gives them."""
        raise NotImplementedError


class GGUFWeights(WeightProvider):
    """The tensors of a GGUF file under the names transformers loads them as (`model.layers.0.self_attn.q_proj.weight`)."""

    def __init__(self, path: str | Path, model: nn.Module):
        from memopt.frontend.gguf import read_gguf_layout

        super().__init__(path)
        info, offsets = read_gguf_layout(path)
        self._table = {name: (type_name, shape, nbytes, offsets[name]) for name, type_name, shape, nbytes in info.tensors}
        self._names = _gguf_names(model)
        self._heads = _permuted_heads(info)

    def has(self, name: str) -> bool:
        return self._names.get(name) in self._table

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        gguf_name = self._names[name]
        type_name, shape, nbytes, offset = self._table[gguf_name]
        w = _dequantize(_read_bytes(self.path, offset, nbytes), type_name, shape)
        if self._permuted(gguf_name):
            w = _unpermute(w, self._heads[0] if ".attn_q." in gguf_name else self._heads[1])
        return w.to(dtype)

    def reads_rows(self, name: str) -> bool:
        gguf_name = self._names.get(name)
        return gguf_name in self._table and len(self._table[gguf_name][1]) >= 2 and not self._permuted(gguf_name)

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        type_name, shape, nbytes, offset = self._table[self._names[name]]
        row_bytes = nbytes // shape[0]  # a row is whole ggml blocks: rows dequantize alone
        raw = _read_bytes(self.path, offset + start * row_bytes, (stop - start) * row_bytes)
        return _dequantize(raw, type_name, (stop - start, *shape[1:])).to(dtype)

    def _permuted(self, gguf_name: str) -> bool:
        return self._heads is not None and (".attn_q." in gguf_name or ".attn_k." in gguf_name)


class SafetensorsWeights(WeightProvider):
    """The tensors of a Hugging Face directory's *.safetensors files, by their keys."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        super().__init__(directory)
        self._files: dict[str, Path] = {}
        for file in sorted(Path(directory).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                self._files.update(dict.fromkeys(f.keys(), file))

    def has(self, name: str) -> bool:
        return name in self._files

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[name], "pt") as f:
            return f.get_tensor(name).to(dtype)

    def reads_rows(self, name: str) -> bool:
        return name in self._files

    def read_rows(self, name: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[name], "pt") as f:
            return f.get_slice(name)[start:stop].to(dtype)

    def float_dtypes(self) -> set[torch.dtype]:
        """The dtypes of the floating tensors in the files (read from their headers)."""
        from safetensors import safe_open

        names = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        found = set()
        for file in sorted(set(self._files.values())):
            with safe_open(file, "pt") as f:
                found |= {names[d] for d in (f.get_slice(k).get_dtype() for k in f.keys()) if d in names}
        return found


# ---------------------------------------------------------------- the streamed model


def stream_parameters(model: nn.Module, provider: WeightProvider) -> str | None:
    """Replace `model`'s meta parameters (tied ones stay one object) by fake CPU tensors tagged with the provider's
    tensor, and load its persistent buffers the provider holds. Returns why it cannot stream (a parameter the
    provider does not have), or None. `model` is built with its parameters on the meta device and real buffers."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    found = _provider_names(model, provider)
    if isinstance(found, str):
        return found
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(p, name):
        with mode:
            value = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="cpu"), requires_grad=p.requires_grad)
        setattr(value, _TAG, (provider, name))
        return value

    _replace_parameters(model, found, fake)
    _load_buffers(model, provider)
    model.register_forward_pre_hook(refuse_real_inputs, with_kwargs=True)
    return None


def load_parameters(model: nn.Module, provider: WeightProvider) -> str | None:
    """`stream_parameters`' eager twin: every parameter read from the provider now (tied ones stay one object),
    giving the model transformers' own loader would build from the same file, tensor for tensor. Returns why it
    cannot (a parameter the provider does not have), or None; nothing is read then."""
    found = _provider_names(model, provider)
    if isinstance(found, str):
        return found

    def read(p, name):
        value = provider.read(name, p.dtype)
        if value.shape != p.shape:
            raise ValueError(f"{provider.path}: tensor {name} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(p.shape)}; the file does not match its own config: re-convert it")
        return nn.Parameter(value, requires_grad=p.requires_grad)

    _replace_parameters(model, found, read)
    _load_buffers(model, provider)
    return None


def _provider_names(model: nn.Module, provider: WeightProvider) -> dict[int, str] | str:
    """id(parameter) -> the provider's name for it (one per tied group), or why a parameter is missing."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    found = {}
    for pid, candidates in names.items():
        name = next((n for n in candidates if provider.has(n)), None)
        if name is None:
            return f"{candidates[0]} is not in {provider.path}"
        found[pid] = name
    return found


def _replace_parameters(model: nn.Module, found: dict[int, str], make) -> None:
    """Each parameter by `make(parameter, provider name)`, once per tied group."""
    made: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for leaf, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in made:
                    made[id(p)] = make(p, found[id(p)])
                module._parameters[leaf] = made[id(p)]


def _load_buffers(model: nn.Module, provider: WeightProvider) -> None:
    for name, b in model.named_buffers():
        if provider.has(name):  # a persistent buffer the file holds (loaded as from_pretrained loads it)
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = provider.read(name, b.dtype)


def refuse_real_inputs(module, args, kwargs):
    """A streamed model is traced, never run: its parameters have no values."""
    from torch._subclasses.fake_tensor import is_fake

    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if tensors and not any(is_fake(a) for a in tensors) and not torch.compiler.is_compiling():
        provider = next((getattr(p, _TAG)[0] for p in module.parameters() if is_streamed(p)), None)
        raise ValueError(f"{type(module).__name__}: this model's weights were streamed from "
                         f"{provider.path if provider else 'its file'} during a compile and never loaded, so it "
                         "cannot run; load it with memopt.frontend.sources.resolve_source(...) to run it")


def is_streamed(t) -> bool:
    """Whether `t` is a streamed weight: a fake tensor standing for a file tensor not read yet."""
    return isinstance(t, torch.Tensor) and hasattr(t, _TAG)


def real(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, or for a streamed weight its values read from the file now (a new tensor, held by no one)."""
    if not is_streamed(t):
        if _is_fake(t):  # e.g. `streamed.detach()`: the tag is on the parameter object, not on its views
            raise RuntimeError("a fake tensor that is no streamed weight reached a pass: read the weight with "
                               "memopt.frontend.weights.real(...) before taking views of it")
        return t
    provider, name = getattr(t, _TAG)
    value = provider.read(name, t.dtype)
    if value.shape != t.shape:
        raise ValueError(f"{provider.path}: tensor {name} has shape {tuple(value.shape)}, the model's is "
                         f"{tuple(t.shape)}; the file does not match its own config: re-convert it")
    return value


def row_blocks(t: torch.Tensor, rows: int) -> Iterator[torch.Tensor]:
    """`t`, `rows` rows at a time (the last block may be shorter). A streamed weight is read block by block from its
    file where the provider can (so its whole float copy never exists), else read whole once."""
    if is_streamed(t):
        provider, name = getattr(t, _TAG)
        if provider.reads_rows(name):
            for i in range(0, t.shape[0], rows):
                block = provider.read_rows(name, i, min(i + rows, t.shape[0]), t.dtype)
                if block.shape[1:] != t.shape[1:] or block.shape[0] != min(rows, t.shape[0] - i):
                    raise ValueError(f"{provider.path}: tensor {name} rows {i}: shape {tuple(block.shape)}, the "
                                     f"model's weight is {tuple(t.shape)}; the file does not match its own config")
                yield block
            return
    t = real(t)
    for i in range(0, t.shape[0], rows):
        yield t[i:i + rows]


def materialize(*targets) -> int:
    """Bind every streamed weight of `targets` (nn.Modules or ExportedPrograms; None is skipped) to its values, one
    tensor per file tensor across all targets (a parameter stays a parameter). Returns how many bindings changed."""
    count = 0
    for target in targets:
        if target is None:
            continue
        if isinstance(target, torch.export.ExportedProgram):
            tables = [target.state_dict, target.constants]
        else:
            tables = [table for m in target.modules() for table in (m._parameters, m._buffers, m.__dict__)]
        for table in tables:
            for key, t in list(table.items()):
                if is_streamed(t):
                    table[key] = _shared(t)
                    count += 1
                elif _is_fake(t):  # computed from a streamed weight without reading it: it has no values
                    raise RuntimeError(f"{key} is a fake tensor that is no streamed weight: a pass computed it from a "
                                       "streamed weight without reading it (memopt.frontend.weights.real)")
    return count


def holds_streamed(*targets) -> bool:
    """Whether any of `targets` (nn.Modules or ExportedPrograms) still holds a streamed weight."""
    for target in targets:
        if target is None:
            continue
        if isinstance(target, torch.export.ExportedProgram):
            tensors = [*target.state_dict.values(), *target.constants.values()]
        else:
            tensors = [t for m in target.modules() for t in (*m._parameters.values(), *m._buffers.values(),
                                                             *m.__dict__.values())]
        if any(is_streamed(t) for t in tensors):
            return True
    return False


def release_freed_memory() -> None:
    """Give freed heap pages back to the OS now. glibc's malloc keeps them for reuse, so the float copy of each
    streamed weight and the quantizer's temporaries (below its mmap threshold, up to 32 MiB) would otherwise stay
    resident as the heap's high-water mark, several times the largest weight. A no-op off glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, torch.Tensor) and is_fake(t)


def _shared(t: torch.Tensor) -> torch.Tensor:
    provider, name = getattr(t, _TAG)
    value = provider.shared.get(name)
    if value is None:
        value = real(t)
        if isinstance(t, nn.Parameter):
            value = nn.Parameter(value, requires_grad=t.requires_grad)
        provider.shared[name] = value
    return value


# ---------------------------------------------------------------- GGUF reading


def _gguf_names(model: nn.Module) -> dict[str, str]:
    """Model state-dict name -> GGUF tensor name, by gguf-py's tensor name table (the one transformers' own GGUF
    loader reads). Built once: transformers' `get_gguf_hf_weights_map` rebuilds the table for every submodule
    (397 times for SmolLM2, 5.8 s of a 9 s load). A name is looked up whole, then without its leading
    components one at a time (transformers' walk over the submodules), the outermost match winning."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    model_type = model.config.model_type
    arch = next((a for a, name in MODEL_ARCH_NAMES.items() if name == model_type), None)
    if arch is None:
        raise ValueError(f"gguf-py has no tensor names for model type {model_type!r}; upgrade it: pip install -U gguf")
    table = get_tensor_name_map(arch, model.config.num_hidden_layers)
    names: dict[str, str] = {}
    taken: set[str] = set()
    for hf in model.state_dict(keep_vars=True):
        base, suffix = hf.rsplit(".", 1) if hf.endswith((".weight", ".bias")) else (hf, None)
        parts = base.split(".")
        for i in range(len(parts)):
            found = table.get_name(".".join(parts[i:]))
            if found is not None:
                gguf_name = found + ("." + suffix if suffix else "")
                if gguf_name not in taken:
                    names[hf] = gguf_name
                    taken.add(gguf_name)
                break
    return names


def _permuted_heads(info) -> tuple[int, int] | None:
    """`(query heads, key heads)` to undo llama.cpp's rotary permutation of q/k rows by, as transformers does: for
    files of architecture "llama" whose metadata gives both head counts; None otherwise (left as stored)."""
    heads = [info.metadata.get(f"llama.attention.{key}") for key in ("head_count", "head_count_kv")]
    if info.architecture != "llama" or not all(isinstance(h, int) and h > 0 for h in heads):
        return None
    return heads[0], heads[1]


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows `(n_head, 2, dim)` -> `(n_head, dim, 2)` (transformers' `LlamaTensorProcessor._reverse_permute_weights`)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _read_bytes(path: str, offset: int, nbytes: int) -> np.ndarray:
    """One tensor's bytes, read (not memory-mapped: the pages do not stay resident after the tensor is freed)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(buf))
    if got != nbytes:
        raise ValueError(f"{path} is truncated: a tensor at byte {offset} needs {nbytes} bytes, the file has {got} "
                         "there; re-download or re-copy the file")
    return buf


def _dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 values of a tensor stored as ggml `type_name`, dequantized a block of rows at a time into one buffer."""
    from gguf import GGMLQuantizationType, dequantize

    qtype = GGMLQuantizationType[type_name]
    cols = shape[-1] if shape else 1
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    out = torch.empty(shape, dtype=torch.float32)
    flat, blocks = out.view(rows, cols).numpy(), raw.reshape(rows, -1)
    step = max(1, _CHUNK_BYTES // (4 * cols))
    for i in range(0, rows, step):
        flat[i:i + step] = dequantize(blocks[i:i + step], qtype).reshape(-1, cols)
    return out
