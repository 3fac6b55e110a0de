"""`memopt inspect`: capture a model, account for every byte, and say whether it fits a target."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from memopt.analysis.accounting import Analysis, analyze
from memopt.capture import capture
from memopt.frontend.sources import ModelSource, resolve_source
from memopt.frontend.targets import Target, get_target
from memopt.frontend.units import fmt_bytes


@dataclass
class InspectReport:
    source: ModelSource
    target: Target
    batch: int
    seq: int
    prefill: Analysis
    decode: Analysis | None = None
    arena: object = None  # ArenaPlan for the prefill graph's activations and outputs
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> int:
        return self.decode.kv_cache_bytes if self.decode else 0

    @property
    def total_bytes(self) -> int:
        a = self.prefill
        act = max(a.activation_peak_bytes, self.decode.activation_peak_bytes if self.decode else 0)
        return a.weights_bytes + a.buffer_bytes + self.kv_cache_bytes + act

    def to_json(self) -> dict:
        a = self.prefill
        return {
            "model": self.source.name,
            "family": self.source.family,
            "dtype": str(self.source.dtype).replace("torch.", ""),
            "batch": self.batch,
            "seq": self.seq,
            "weights_bytes": a.weights_bytes,
            "buffer_bytes": a.buffer_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "activation_peak_bytes": a.activation_peak_bytes,
            "activation_lower_bound_bytes": a.activation_lower_bound_bytes,
            "decode_activation_peak_bytes": self.decode.activation_peak_bytes if self.decode else None,
            "peak_op": a.peak_op,
            "arena_bytes": self.arena.size_bytes if self.arena else None,
            "arena_solver": ({"status": self.arena.solver.status, "time_s": round(self.arena.solver.time_s, 3),
                              "gap": self.arena.solver.gap} if self.arena else None),
            "total_bytes": self.total_bytes,
            "num_nodes": len(a.captured.graph.nodes),
            "num_ops": a.num_ops,
            "num_tensors": len(a.tensors),
            "num_storages": len(a.storages),
            "target": self.target.name,
            "target_memory_bytes": self.target.memory_bytes,
            "fits": self.total_bytes <= self.target.memory_bytes,
            "headroom_bytes": self.target.memory_bytes - self.total_bytes,
            "seconds": round(self.seconds, 3),
            "notes": self.source.notes + self.notes,
        }


def _step(msg: str, quiet: bool) -> float:
    if not quiet:
        print(f"memopt: {msg}", file=sys.stderr, flush=True)
    return time.perf_counter()


def inspect_model(model: str | ModelSource | None = None, *, target: str | Target = "h100-80gb", batch: int = 1,
                  seq: int | None = None, dtype: str | None = None, quiet: bool = True,
                  arena_time_limit_s: float = 5.0) -> InspectReport:
    """Capture `model` (prefill, plus a decode step with a static KV cache for decoder LMs)
    and measure weights, KV cache and activations at (batch, seq) against `target`."""
    t0 = time.perf_counter()
    tgt = get_target(target)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if seq is not None and seq < 1:
        raise ValueError(f"seq must be >= 1, got {seq}")
    _step(f"resolving {model or 'demo'}", quiet)
    src = model if isinstance(model, ModelSource) else resolve_source(model, dtype=dtype, load_weights=False)
    if src.fixed_inputs is not None:
        seq_eff = 0
    else:
        seq_eff = seq or min(512, src.max_seq)
        if seq_eff > src.max_seq:
            raise ValueError(f"seq {seq_eff} exceeds {src.name}'s context length {src.max_seq}; pass --seq <= {src.max_seq}")
    _step(f"capturing {src.name} ({src.family}, batch {batch}, seq {seq_eff})", quiet)
    prefill = analyze(capture(src, batch=batch, seq=seq_eff or None))
    decode = None
    if src.family == "causal_lm":
        _step(f"capturing a decode step with a {seq_eff}-token static KV cache", quiet)
        decode = analyze(capture(src, phase="decode", batch=batch, cache_len=seq_eff))
    from memopt.solvers.arena import solve_arena

    _step("planning the activation arena", quiet)
    arena = solve_arena(prefill.to_memgraph(), kinds=("activation", "output"), time_limit_s=arena_time_limit_s)
    notes = ["activation bytes count op outputs; op-internal scratch (e.g. attention scores in a math-kernel "
             "SDPA) is not included"]
    return InspectReport(src, tgt, batch, seq_eff, prefill, decode, arena, time.perf_counter() - t0, notes)


def format_report(r: InspectReport, top: int = 0) -> str:
    d = r.to_json()
    lines = [
        f"model    {d['model']} ({d['family']}, {d['dtype']}), batch {d['batch']}, seq {d['seq']}",
        f"target   {r.target.name}: {fmt_bytes(r.target.memory_bytes)} ({r.target.description})",
        f"graph    {d['num_nodes']} nodes, {d['num_ops']} ops, {d['num_tensors']} tensors "
        f"({d['num_storages']} storages, the rest views)",
        "",
        f"  {'weights':<34}{fmt_bytes(d['weights_bytes']):>14}",
        f"  {'buffers':<34}{fmt_bytes(d['buffer_bytes']):>14}",
        f"  {'KV cache (batch x seq)':<34}{fmt_bytes(d['kv_cache_bytes']):>14}",
        f"  {'activation peak (prefill)':<34}{fmt_bytes(d['activation_peak_bytes']):>14}   at {d['peak_op']}",
        f"  {'activation live-set lower bound':<34}{fmt_bytes(d['activation_lower_bound_bytes']):>14}",
    ]
    if r.arena is not None:
        lines.append(f"  {'planned arena (one buffer)':<34}{fmt_bytes(r.arena.size_bytes):>14}   "
                     f"{r.arena.solver.status}, gap {r.arena.solver.gap:.2%}")
    if d["decode_activation_peak_bytes"] is not None:
        lines.append(f"  {'activation peak (decode step)':<34}{fmt_bytes(d['decode_activation_peak_bytes']):>14}")
    lines += [f"  {'total':<34}{fmt_bytes(d['total_bytes']):>14}", ""]
    if d["fits"]:
        lines.append(f"fits {r.target.name} with {fmt_bytes(d['headroom_bytes'])} to spare")
    else:
        lines.append(f"does NOT fit {r.target.name}: over by {fmt_bytes(-d['headroom_bytes'])}")
    if top:
        lines += ["", f"largest {top} tensors:", f"  {'name':<28}{'kind':<11}{'bytes':>12}  {'dtype':<9}shape  (scope)"]
        for t in sorted(r.prefill.storages, key=lambda t: -t.bytes)[:top]:
            lines.append(f"  {t.name[:27]:<28}{t.kind:<11}{fmt_bytes(t.bytes):>12}  {t.dtype:<9}{list(t.shape)}  ({t.scope})")
    lines += [""] + [f"note: {n}" for n in d["notes"]] + [f"({d['seconds']:.1f} s)"]
    return "\n".join(lines)


def plot_timeline(r: InspectReport, path: str) -> None:
    """Memory over time (ops of the prefill graph), stacked by kind, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a = r.prefill
    series = dict(a.timeline)
    if r.decode is not None:
        series["kv_cache"] = [r.kv_cache_bytes] * a.num_ops
    order = ["weight", "buffer", "kv_cache", "input", "activation", "output"]
    gib = 2**30
    fig, ax = plt.subplots(figsize=(10, 4.5))
    xs = range(a.num_ops)
    ax.stackplot(xs, *[[v / gib for v in series[k]] for k in order], labels=order, alpha=0.85)
    total = r.total_bytes
    if r.target.memory_bytes < 3 * total:
        ax.axhline(r.target.memory_bytes / gib, color="red", linestyle="--", label=f"{r.target.name} memory")
    ax.set_xlabel("op (graph order)")
    ax.set_ylabel("GiB live")
    ax.set_title(f"{r.source.name}: memory timeline, batch {r.batch}, seq {r.seq}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
