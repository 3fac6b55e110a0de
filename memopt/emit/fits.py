"""Does the compiled model fit? The bytes its programs really hold on the device, against the budget and the plan.

    promised = promise(budget_plan)        # plain JSON, kept in the Plan's predictions["budget"]["promise"]
    held = resident_bytes({"program": gm, "generate": generator}, layer_names(promised))
    check_fits(held, promised)             # raises BudgetExceeded (one line: the gap and its cause) when over

After `memopt compile --budget` the pipeline's "fits" stage runs this on the emitted programs: every distinct
tensor storage either program holds (a weight both programs share counts once), minus what the offload passes
keep in host memory, sorted into what the budget plan priced:

  weights   each planned layer's tensors (quantized parts, norms, biases), by the plan's layer names
  kv        the KV caches (static or compressed stores)
  arena     the activation arena
  staging   the offload passes' device slots (streamed weights, host-resident KV caches)
  other     what no planned layer holds (final norm, rotary tables, the caches' position counters)

The plan promises `predicted_peak_bytes <= budget - reserve`; a compiled model over that is an error naming
the gap, each category against the plan, and the layers whose bytes differ most. The arena is planned on the
forward program before its weight passes, so it can only shrink: their custom ops allocate their results
outside it, as eager PyTorch would (passes/arena.py); everything else is the plan's exact bytes. Torch is needed only to
read the programs' tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memopt.frontend.units import fmt_bytes
from memopt.names import ARENA_PREFIX, HOST_PREFIX, OFFLOAD_PREFIX, is_kv

CATEGORIES = ("weights", "kv", "arena", "staging", "other")
_LAYER = re.compile(r"(?:^|_)(?:cache|length)_(\d+)(?:_|$)")  # key_cache_3, kv_cache_3_g0_res_k, cumulative_length_3


class BudgetExceeded(ValueError):
    """The compiled model holds more than the budget allows. `resident` and `planned`: bytes per category."""

    def __init__(self, message: str, *, resident: dict, planned: dict):
        super().__init__(message)
        self.resident, self.planned = resident, planned


@dataclass(frozen=True)
class Resident:
    """Device bytes of compiled programs: per tensor (name, category, bytes) and per category."""

    tensors: tuple[tuple[str, str, int], ...]
    host_bytes: int  # what the offload passes keep in host memory (not counted)

    @property
    def total_bytes(self) -> int:
        return sum(b for _, _, b in self.tensors)

    def by_category(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for _, cat, b in self.tensors:
            out[cat] += b
        return out


def _named_tensors(program) -> list:
    """(name, tensor) of an ExportedProgram (state dict and constants) or a module (parameters, buffers and
    tensor attributes its graph reads)."""
    import torch

    if hasattr(program, "graph_signature"):
        return [(n, t) for table in (program.state_dict, program.constants) for n, t in table.items()
                if isinstance(t, torch.Tensor)]
    out = [*program.named_parameters(remove_duplicate=False), *program.named_buffers(remove_duplicate=False)]
    graph = getattr(program, "graph", None)
    known = {n for n, _ in out}
    for node in (graph.nodes if graph is not None else ()):
        if node.op == "get_attr" and node.target not in known:
            obj = program
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.Tensor):
                out.append((node.target, obj))
    return out


def _category(name: str, layers: list[str]) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf.startswith(ARENA_PREFIX):
        return "arena"
    if leaf.startswith(OFFLOAD_PREFIX):
        return "staging"
    if is_kv(leaf):
        return "kv"
    return "weights" if _layer_of(name, layers) else "other"


def _layer_of(name: str, layers: list[str]) -> str | None:
    """The longest planned layer name that is a dotted part of tensor `name`."""
    dotted = f".{name}."
    return max((layer for layer in layers if f".{layer}." in dotted), key=len, default=None)


def resident_bytes(programs: dict, layers: list[str] = ()) -> Resident:
    """The device bytes of `programs` ({name: GraphModule or ExportedProgram}; None entries skipped): every
    distinct storage once, host buffers of the offload passes apart. `layers`: the planned layers' names,
    which tell a layer's weights from the tensors no layer holds."""
    seen: dict[int, tuple[str, str, int]] = {}
    host = 0
    for program in programs.values():
        if program is None:
            continue
        for name, t in _named_tensors(program):
            storage = t.untyped_storage()
            key = storage.data_ptr() if t.device.type != "meta" else id(storage)
            if key in seen:
                continue
            nbytes = storage.nbytes()
            if HOST_PREFIX in name:
                host += nbytes
                seen[key] = (name, "host", nbytes)
                continue
            seen[key] = (name, _category(name, list(layers)), nbytes)
    return Resident(tuple(v for v in seen.values() if v[1] != "host"), host)


def promise(budget_plan) -> dict:
    """What a budget plan promises, as plain JSON (kept in the Plan's predictions, so a loaded artifact can be
    checked too): the budget and reserve, the predicted bytes, per category and per planned layer."""
    b = budget_plan.breakdown
    return {"budget_bytes": budget_plan.budget_bytes, "reserve_bytes": budget_plan.reserve_bytes,
            "predicted_bytes": budget_plan.predicted_peak_bytes,
            "by_category": {"weights": b["weights_bytes"], "kv": b["kv_bytes"],
                            "arena": b.get("arena_bytes", b["fixed_bytes"]),
                            "staging": b["prefetch_bytes"] + b.get("kv_staging_bytes", 0),
                            "other": b.get("other_bytes", 0)},
            "layers": [{"name": d.name.split(" (")[0], "weight_bytes": d.weight_bytes, "kv_bytes": d.kv_bytes,
                        "kv": d.kv_bits is not None} for d in budget_plan.decisions]}


def layer_names(promised: dict) -> list[str]:
    return [row["name"] for row in promised["layers"]]


def layer_differences(resident: Resident, promised: dict) -> list[tuple[str, str, int, int]]:
    """(layer, "weights" | "kv", planned bytes, held bytes) for each planned layer whose bytes differ, the
    largest difference first. A host-placed layer plans 0 device bytes of weights."""
    names = layer_names(promised)
    index = {}
    for row in promised["layers"]:
        m = re.search(r"(?:^|\.)(?:layers|layer|h|blocks?)\.(\d+)$", row["name"])
        if m and row["kv"]:
            index[int(m.group(1))] = row["name"]
    held: dict[tuple[str, str], int] = {}
    for tname, cat, b in resident.tensors:
        if cat == "weights":
            key = (_layer_of(tname, names), "weights")
        elif cat == "kv" and (m := _LAYER.search(tname.rsplit(".", 1)[-1])) and int(m.group(1)) in index:
            key = (index[int(m.group(1))], "kv")
        else:
            continue
        held[key] = held.get(key, 0) + b
    out = []
    for row in promised["layers"]:
        for what, planned in (("weights", row["weight_bytes"]), ("kv", row["kv_bytes"])):
            got = held.get((row["name"], what), 0)
            if got != planned and (what == "weights" or row["kv"]):
                out.append((row["name"], what, planned, got))
    return sorted(out, key=lambda r: -abs(r[3] - r[2]))


def measured_json(resident: Resident, promised: dict) -> dict:
    """What the plan's predictions record: bytes held per category and in all, against the promise."""
    return {"total_bytes": resident.total_bytes, "predicted_bytes": promised["predicted_bytes"],
            "by_category": resident.by_category(), "planned_by_category": dict(promised["by_category"]),
            "host_bytes": resident.host_bytes,
            "layers_differing": [list(r) for r in layer_differences(resident, promised)[:8]]}


def check_fits(resident: Resident, promised: dict) -> None:
    """Raise `BudgetExceeded` (one line) when `resident` holds more than the budget minus its reserve (the
    `promise` of a budget plan): the gap, each category held against planned, and the layers that differ most."""
    usable = promised["budget_bytes"] - promised["reserve_bytes"]
    total = resident.total_bytes
    if total <= usable:
        return
    held, planned = resident.by_category(), dict(promised["by_category"])
    parts = ", ".join(f"{c} {fmt_bytes(held[c])} (planned {fmt_bytes(planned[c])})" for c in CATEGORIES
                      if held[c] or planned[c])
    diffs = layer_differences(resident, promised)[:3]
    worst = "; ".join(f"{name} {what} {fmt_bytes(got)}, planned {fmt_bytes(want)}" for name, what, want, got in diffs)
    reserve = f" minus its {fmt_bytes(promised['reserve_bytes'])} reserve" if promised["reserve_bytes"] else ""
    raise BudgetExceeded(
        f"the compiled model holds {fmt_bytes(total)} on the device, {fmt_bytes(total - usable)} over the budget "
        f"{fmt_bytes(promised['budget_bytes'])}{reserve} (the plan predicted {fmt_bytes(promised['predicted_bytes'])}):"
        f" {parts}" + (f"; differing most: {worst}" if worst else "")
        + "; this is a memopt accounting bug, please report it; meanwhile pass a smaller --budget",
        resident=held, planned=planned)


__all__ = ["BudgetExceeded", "Resident", "CATEGORIES", "resident_bytes", "promise", "layer_names",
           "layer_differences", "measured_json", "check_fits"]
