"""The budget planner's layers read from the captured programs: every byte it charges is a tensor they hold.

    model = captured_model(fwd, gen, analysis, kv_policy=..., arena=ArenaConfig())
    plan = plan_budget(src, budget_bytes=..., captured=model)

`cost.layer_weights(model_shape(config))` is a second model of the network, drawn from the transformers
config: it guesses module names (`model.layers`), which weights exist (biases, norms, rotary tables), how the
quantize pass stores each format and what the offload pass stages, and is wrong wherever a family differs.
Here each planned unit is what the passes act on, named as the passes name it:

  - a unit is a block (`model.layers.3`, `gpt_neox.layers.3`, `transformer.h.3`: `names.BLOCK_NAME`) or, outside
    blocks, the module owning a quantizable weight (`model.embed_tokens`, `lm_head`); a table read both by a
    gather and a matmul (a tied LM head) is one "embed+head" unit;
  - its bytes in each format are those of the tensors the quantize / lossless passes register for each weight
    site (`passes/weight_sites.py`: linears, Conv1D matmuls, embedding tables, fused experts), the site kept as
    it is where the pass keeps it (int4 of an untied table or of in_features not divisible by the group: 16-bit;
    int4 of a tied table: int8 rows), plus the unit's other tensors (norms, biases) as they are;
  - its staging bytes on the host are the offload pass's packed block (each tensor at `ALIGN_BYTES`);
  - a block's KV bytes per bits are the generation program's static cache (16) or the layouts the KV pass would
    register under the planner's KIVI policy (`passes/kv.py:planned_cache_bytes`, sliding windows included);
  - what no unit holds (the final norm, rotary tables, the caches' position counters, ...) is fixed bytes,
    and the activation arena is the arena solver's plan of the forward program.

Names are the programs' without the source's wrapper (`model.`), so `model.model.layers.3` plans as
`model.layers.3`; decisions match the programs by dotted tail, as the passes read them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from memopt.names import BLOCK_INDEX, BLOCK_NAME
from memopt.planning.cost import FORMATS, KV_BITS, LayerWeights

INT4_GROUP = 64  # the planner's int4 format is int4:g64
_STATIC_CACHE = re.compile(r"^(key|value)_cache_(\d+)$")  # the generation program's static cache of layer i


@dataclass(frozen=True)
class CapturedModel:
    """The planner's units with exact bytes, the bytes no unit holds, and the arena."""

    layers: tuple[LayerWeights, ...]
    fixed: tuple[tuple[str, int], ...]  # (tensor name, bytes) held whatever the plan: always on the device
    arena_bytes: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fixed_bytes(self) -> int:
        return sum(b for _, b in self.fixed)


def _tensors(ep) -> dict:
    import torch

    return {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}


def _owner(name: str) -> str:
    m = BLOCK_NAME.match(name)
    return m.group(1) if m else name.rsplit(".", 1)[0]


def _wrapper(names) -> str:
    """The source's wrapper prefix (`model.`) when every tensor name has it."""
    names = list(names)
    return "model." if names and all(n.startswith("model.") for n in names) else ""


# ---------------------------------------------------------------- one weight site in each format
def _int8(n: int, k: int, scale_bytes: int, experts: int = 1) -> list[int]:
    return [experts * n * k, experts * n * scale_bytes]


def _int4(n: int, k: int, group: int, experts: int = 1) -> list[int]:
    return [experts * n * k // 2, experts * n * (k // group) * 2, experts * n * (k // group)]  # bf16 scale, uint8 zero


def _lossless(w, block_size: int = 512, max_code_bits: int = 16) -> list[int] | None:
    """DFloat11's four tensors (memopt.runtime.dfloat11.encode_bf16), sized from the exponent histogram."""
    import numpy as np
    import torch

    from memopt.runtime.dfloat11 import huffman_code_lengths

    if w.device.type == "meta":
        return None
    u = w.detach().cpu().contiguous().view(torch.int16).reshape(-1)
    exps = ((u >> 7) & 0xFF).long()
    counts = torch.bincount(exps, minlength=256).numpy()
    lengths = huffman_code_lengths(counts, max_code_bits).astype(np.int64)
    bits = int((counts * lengths).sum())
    blocks = -(-w.numel() // block_size)
    return [w.numel(), (bits + 7) // 8, blocks * (4 if bits < 2**31 else 8), 256]


def _group(fmt: str) -> int:
    m = re.search(r":g(\d+)", fmt)
    return int(m.group(1)) if m else INT4_GROUP


def site_tensor_bytes(w, fmt: str, *, linear: bool, embedding: bool, grouped: bool = False,
                      transposed: bool = False) -> list[int] | None:
    """The bytes of each tensor the quantize / lossless pass registers for one weight site in `fmt`
    ("bf16": the weight as it is), or None where the pass keeps the weight as it is. `linear` / `embedding`:
    read by a matmul / a gather (both: a tied table); `grouped`: fused experts, stored `[E, N, K]` and read
    through a transpose (`transposed`) or stored `[E, K, N]` and read as they are (N outputs, K inputs)."""
    import torch

    if fmt in ("bf16", "native"):
        return [w.nbytes]
    if not w.is_floating_point():
        return None
    if grouped:
        if w.dim() != 3:
            return None
        e, n, k = (w.shape[0], w.shape[1], w.shape[2]) if transposed else (w.shape[0], w.shape[2], w.shape[1])
        if fmt == "int8":
            return _int8(n, k, 4, e)
        if fmt.startswith("int4"):
            g = _group(fmt)
            return None if k % g else _int4(n, k, g, e)
        return None
    if w.dim() != 2:
        return None
    n, k = w.shape
    if fmt == "int8" or (fmt.startswith("int4") and embedding and linear):  # a tied table: int8 rows either way
        return _int8(n, k, w.element_size() if embedding else 4)
    if fmt.startswith("int4"):
        g = _group(fmt)
        return None if embedding or k % g else _int4(n, k, g)
    if fmt == "lossless":
        return _lossless(w) if w.dtype == torch.bfloat16 else None
    raise ValueError(f"weight format {fmt!r} is not known; choose one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------- units
@dataclass
class _Unit:
    name: str  # as the programs name it
    sites: list = field(default_factory=list)  # (tensor, linear, embedding, grouped, transposed)
    other: list = field(default_factory=list)  # (name, tensor): norms, biases, buffers read in the unit
    linear: bool = False
    embedding: bool = False

    def tensors(self, fmt: str) -> list[int] | None:
        """Bytes of every tensor the unit holds in `fmt`; None when no site changes (the format means nothing)."""
        out, changed = [t.nbytes for _, t in self.other], False
        for w, linear, embedding, grouped, transposed in self.sites:
            got = site_tensor_bytes(w, fmt, linear=linear, embedding=embedding, grouped=grouped,
                                    transposed=transposed)
            changed |= got is not None and fmt not in ("bf16", "native")
            out += got if got is not None else [w.nbytes]
        return out if changed or fmt in ("bf16", "native") else None

    @property
    def kind(self) -> str:
        if BLOCK_NAME.match(self.name + "."):
            return "block"
        return {(True, True): "embed+head", (False, True): "embed"}.get((self.linear, self.embedding), "head")


def _units(fwd) -> tuple[dict[str, _Unit], list[tuple[str, Any]]]:
    """The units of the forward program (in graph order) and the tensors no unit holds."""
    from memopt.passes.weight_sites import get_attr_path, weight_sites

    gm = fwd.module()  # a throwaway module: weight_sites rewrites Conv1D matmuls as linears in it
    sites, _ = weight_sites(gm)
    units: dict[str, _Unit] = {}
    claimed: set[int] = set()
    site_names = {s.target for s in sites}  # a Conv1D weight's site holds its transposed copy under its name
    for s in sites:
        w = get_attr_path(gm, s.target)
        u = units.setdefault(_owner(s.target), _Unit(_owner(s.target)))
        transposed = bool(s.grouped) and s.grouped[0][1] is not None
        u.sites.append((w, bool(s.linears), bool(s.embeddings), bool(s.grouped), transposed))
        u.linear |= bool(s.linears) or bool(s.grouped)
        u.embedding |= bool(s.embeddings)
        claimed.add(w.untyped_storage().data_ptr())
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.users}
    fixed = []
    for name, t in _tensors(fwd.exported).items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in claimed or name in site_names:
            continue
        claimed.add(ptr)
        owner = _owner(name)
        if owner in units and name in read:  # moves with its unit when the offload pass moves it
            units[owner].other.append((name, t))
        else:
            fixed.append((name, t))
    return units, fixed


def _align(sizes: list[int]) -> int:
    from memopt.passes.offload import ALIGN_BYTES

    return max(sum(-(-b // ALIGN_BYTES) * ALIGN_BYTES for b in sizes), 1)


# ---------------------------------------------------------------- KV caches
def _kv_bytes(gen, kv_policy: str | None) -> tuple[dict[int, dict[int, int]], list[str]]:
    """layer -> {bits: cache bytes}: 16 from the static cache, lower bits from the KV pass's own layouts."""
    from memopt.kv.policy import parse_kv_spec
    from memopt.passes.kv import planned_cache_bytes

    tensors = _tensors(gen.exported)
    out: dict[int, dict[int, int]] = {}
    for name, t in tensors.items():
        if m := _STATIC_CACHE.match(name):
            out.setdefault(int(m.group(2)), {16: 0})[16] += t.nbytes
    notes = []
    if kv_policy is None or not out:
        return out, notes
    gm = gen.module()
    for bits in KV_BITS:
        if bits == 16:
            continue
        try:
            per_layer = planned_cache_bytes(gm, parse_kv_spec(kv_policy.format(bits=bits)))
        except ValueError as exc:  # a layer the KV pass refuses: the cache stays 16-bit
            notes.append(f"KV cache kept at 16 bits: {exc}")
            break
        for layer, nbytes in per_layer.items():
            out.setdefault(layer, {})[bits] = nbytes
    return out, notes


# ---------------------------------------------------------------- the model
def captured_model(fwd, gen=None, analysis=None, *, kv_policy: str | None = "kivi:k{bits}v{bits}:g32:r128",
                   arena: Any = None, formats: tuple[str, ...] = FORMATS) -> CapturedModel:
    """The planner's units from the captured forward program `fwd` and generation program `gen` (a
    `Captured` each; `gen` None for encoders), the arena planned on `analysis` (the forward program's) with
    the `arena` config (None: no arena, 0 bytes). `kv_policy`: the KV-cache spec the budget plan writes, with
    `{bits}` for the bits."""
    units, fixed = _units(fwd)
    prefix = _wrapper([*_tensors(fwd.exported), *units])
    kv, notes = _kv_bytes(gen, kv_policy) if gen is not None else ({}, [])
    if gen is not None:  # what only the generation program holds, beside its caches: position counters, ...
        ptrs = {t.untyped_storage().data_ptr() for t in _tensors(fwd.exported).values()}
        for name, t in _tensors(gen.exported).items():
            if t.untyped_storage().data_ptr() not in ptrs and not _STATIC_CACHE.match(name):
                fixed.append((f"generate:{name}", t))
                ptrs.add(t.untyped_storage().data_ptr())
    layers = []
    for u in units.values():
        by_fmt = {f: u.tensors(f) for f in dict.fromkeys(("bf16", *formats))}
        by_fmt = {f: t for f, t in by_fmt.items() if t is not None}
        m = BLOCK_INDEX.search(u.name)
        kv_opts = tuple(sorted(kv.get(int(m.group(1)), {}).items(), reverse=True)) if m and u.kind == "block" else ()
        matrices = tuple((int(w.shape[0]), int(w.shape[1])) for w, _, _, grouped, _ in u.sites if not grouped)
        experts = [(w.shape[0], (int(w.shape[1]), int(w.shape[2])) if transposed else (int(w.shape[2]), int(w.shape[1])))
                   for w, _, _, grouped, transposed in u.sites if grouped and w.dim() == 3]
        name = u.name.removeprefix(prefix)
        if u.kind == "embed+head":
            name += " (tied lm_head)"
        layers.append(LayerWeights(
            name, u.kind, matrices, sum(t.numel() for _, t in u.other),
            experts=int(experts[0][0]) if experts else 0, expert_matrices=tuple(mk for _, mk in experts),
            stored=tuple((f, sum(t)) for f, t in by_fmt.items()),
            staged=tuple((f, _align(t)) for f, t in by_fmt.items()), kv=kv_opts))
    arena_bytes = 0
    if analysis is not None and arena is not None:
        from memopt.passes.arena import plan_arena

        arena_bytes = plan_arena(analysis, arena).size_bytes
    return CapturedModel(tuple(layers), tuple((n.removeprefix(prefix), t.nbytes) for n, t in fixed), arena_bytes,
                         tuple(notes))


__all__ = ["CapturedModel", "captured_model", "site_tensor_bytes"]
