"""A report a person can read: report.html with the plan, and memory.png with the timeline
before and after the passes."""

from __future__ import annotations

import html
from pathlib import Path

from memopt.frontend.units import fmt_bytes


def plot_before_after(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after, plan = result.before, result.analysis, result.plan
    unit, scale = ("GiB", 2**30) if before.weights_bytes > 2**31 else ("MiB", 2**20)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for ax, a, title in ((axes[0], before, "before (eager liveness)"), (axes[1], after, "after memopt")):
        n = a.num_ops
        weights = [plan.predictions.get("weights_bytes" if a is after else "weights_bytes_before", 0) / scale] * n
        if a is after and plan.arena is not None:
            act = [plan.arena.size_bytes / scale] * n
            label = "arena (one buffer)"
        else:
            act = [v / scale for v in a.live_activation_bytes()]
            label = "live activations"
        ax.stackplot(range(n), weights, act, labels=["weights", label], alpha=0.85)
        ax.set_title(title)
        ax.set_xlabel("op (graph order)")
        ax.legend(loc="upper left", fontsize=8)
    axes[0].set_ylabel(f"{unit} live")
    fig.suptitle(f"{plan.model}: memory, batch {plan.batch}, seq {plan.seq}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result, directory: Path) -> None:
    plot_before_after(result, directory / "memory.png")
    plan, p = result.plan, result.plan.predictions
    rows = [("model", plan.model), ("target", plan.target), ("batch x seq", f"{plan.batch} x {plan.seq}"),
            ("passes", ", ".join(plan.passes) or "none"),
            ("weights before", fmt_bytes(p.get("weights_bytes_before", 0))),
            ("weights after", fmt_bytes(p.get("weights_bytes", 0))),
            ("activation peak before", fmt_bytes(p.get("activation_peak_bytes_before", 0))),
            ("activation lower bound", fmt_bytes(p.get("activation_lower_bound_bytes", 0)))]
    if plan.arena is not None:
        a = plan.arena
        rows += [("arena", f"{fmt_bytes(a.size_bytes)} for {len(a.offsets)} intermediates"),
                 ("arena solver", f"{a.solver.name}: {a.solver.status}, {a.solver.time_s:.2f} s, gap {a.solver.gap:.2%}")]
    if p.get("kv_cache_bytes"):
        rows.append(("KV cache (generation program)", fmt_bytes(p["kv_cache_bytes"])))
    if plan.order is not None:
        rows.append(("operator order", f"{len(plan.order)} ops, planned (plan.json: order)"))
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    cells = lambda d: (d.name, d.weight_format, d.placement, d.kv_policy, d.kv_placement, fmt_bytes(d.bytes))  # noqa: E731
    layers = "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells(d)) + "</tr>"
                       for d in plan.decisions)
    notes = "\n".join(f"<li>{html.escape(n)}</li>" for n in result.notes)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>memopt report: {html.escape(plan.model)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
th,td{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>memopt report: {html.escape(plan.model)}</h1>
<table>{table}</table>
<h2>Memory timeline</h2><img src="memory.png" alt="memory before and after" width="100%">
<h2>Per-layer decisions</h2>
<p>A weight or block without a row is native, on the device, with a full KV cache on the device.</p>
<table><tr><th>weight / block</th><th>format</th><th>placement</th><th>KV policy</th><th>KV placement</th><th>bytes</th></tr>
{layers or '<tr><td colspan=6>all weights native, on the device</td></tr>'}</table>
<h2>Notes</h2><ul>{notes}</ul>
</body></html>
"""
    (directory / "report.html").write_text(page)
