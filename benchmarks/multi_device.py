"""Several GPUs: memopt's split plans next to a llama.cpp-style greedy split and accelerate's device map.

    python benchmarks/multi_device.py      # writes benchmarks/results/multi_device.md

Models: the `llama-3-70b` preset and a Mixtral-8x7B-size MoE (a config-only HF directory written here from
MixtralConfig: hidden 4096, 32 layers, 8 experts top-2, intermediate 14336, vocab 32000), both built from
their configs alone (meta device, no weights). GPUs: 1, 2, 4, 8 x A100-80GB (NVLink) and RTX 4090 (PCIe, no
peer-to-peer), and 2 nodes x 4 of each; batch 1, context 8192 (plus the 32k case of the issue).

memopt: `memopt.planning.split.plan_split` (objective latency, each GPU's budget = its memory, reserve 1 GiB; host
streaming allowed). Baselines, for the same usable bytes per GPU (budget - reserve), their layers placed by
their own rule, then every device's KV cache and activation arena added (what they do not plan for):
- greedy: llama.cpp-style "layers until full" (`-ngl` / `--tensor-split` filled in order): each layer's
  weights on the current GPU while they fit, else the next; what is left stays on the CPU. Weights in the
  formats memopt's plan chose, KV at the plan's bits: only the split differs.
- accelerate: `accelerate.infer_auto_device_map` itself, run offline on the meta-device model with
  `max_memory` = the usable bytes per GPU (and unlimited CPU) and `no_split_module_classes` = the model's
  decoder layer: once with the plan's formats as `special_dtypes` (int8 -> torch.int8, int4 -> accelerate's
  CustomDtype.INT4 at 0.5 byte/parameter, scales not counted; lossless counted as bf16), once in bf16 (how
  `device_map="auto"` loads the checkpoint). KV cache in 16 bits for the bf16 run.
Predicted tokens/s of a baseline that fits: the same roofline model, its layers in sequence on their GPUs.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(__file__))

from common import environment, table, write  # noqa: E402

from memopt.planning import cost  # noqa: E402
from memopt.planning.budget import _shape_of  # noqa: E402
from memopt.planning.split import plan_split  # noqa: E402
from memopt.frontend.targets import parse_cluster  # noqa: E402

GIB = 2**30
SEQ = 8192
KINDS = ("a100-80gb", "rtx-4090")


def mixtral_dir(root: str) -> str:
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=4096, num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2,
                           intermediate_size=14336, vocab_size=32000, num_attention_heads=32, num_key_value_heads=8,
                           max_position_embeddings=32768, dtype="bfloat16")
    config.architectures = ["MixtralForCausalLM"]
    path = os.path.join(root, "mixtral-8x7b-config")
    config.save_pretrained(path)
    return path


def cases() -> list[tuple[str, dict]]:
    out = []
    for kind in KINDS:
        out += [(f"{n}x{kind}" if n > 1 else kind, {}) for n in (1, 2, 4, 8)]
        out.append((f"4x{kind}", {"nodes": 2}))
    return out


# ---------------------------------------------------------------- baselines
def _usable(plan, cluster) -> list[int]:
    if plan.devices:
        return [d.budget_bytes - d.reserve_bytes for d in plan.devices]
    return [plan.budget_bytes - plan.reserve_bytes] * len(cluster.devices)


def greedy_fill(units, formats, usable) -> list:
    """llama.cpp-style: layers in order onto GPU 0 until its weights are full, then GPU 1, ...; the rest on CPU."""
    place, used, dev = [], [0] * len(usable), 0
    for u in units:
        w = u.bytes(formats[u.name][0])
        while dev < len(usable) and used[dev] + w > usable[dev]:
            dev += 1
        place.append(dev if dev < len(usable) else "cpu")
        if dev < len(usable):
            used[dev] += w
    return place


def accelerate_map(model, units, formats, usable, bf16: bool) -> list:
    """accelerate.infer_auto_device_map on the meta model; each unit's device (an int or "cpu"/"disk")."""
    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import CustomDtype

    special = {}
    if not bf16:
        dtype_of = {"bf16": torch.bfloat16, "lossless": torch.bfloat16, "int8": torch.int8,
                    "int4:g64": CustomDtype.INT4}
        for name, p in model.named_parameters():
            unit = next((u for u in units if name.startswith(u.name + ".") or name == u.name + ".weight"), None)
            if unit is not None and p.dim() >= 2:
                special[name] = dtype_of[formats[unit.name][0]]
    max_memory = {i: b for i, b in enumerate(usable)}
    max_memory["cpu"] = 2**50
    dm = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules,
                               dtype=torch.bfloat16, special_dtypes=special or None)
    out = []
    for u in units:
        keys = [k for k in dm if k == "" or u.name == k or u.name.startswith(k + ".")]
        out.append(dm[max(keys, key=len)])
    return out


def evaluate(shape, units, formats, place, usable, cluster, batch: int, kv16: bool) -> dict:
    """Peaks with KV and arena counted, fit, and predicted tokens/s of a placement."""
    peaks = [0] * len(usable)
    head_dev = place[-1]
    for u, d in zip(units, place):
        if isinstance(d, int):
            fmt, bits = formats[u.name]
            peaks[d] += u.bytes(fmt if not kv16 else "bf16")
            if u.kind == "block":
                peaks[d] += cost.kv_layer_bytes(shape, batch, SEQ, 16 if kv16 else bits)
    for d in set(p for p in place if isinstance(p, int)):
        peaks[d] += cost.arena_bytes(shape, batch, SEQ, logits=d == head_dev)
    off = sum(not isinstance(d, int) for d in place)
    worst = max(range(len(usable)), key=lambda d: peaks[d] / usable[d])
    fits = off == 0 and all(p <= c for p, c in zip(peaks, usable))
    tps = None
    if fits:
        total = 0.0
        for i, (u, d) in enumerate(zip(units, place)):
            fmt, bits = formats[u.name]
            total += cost.layer_decode_s(shape, u, cost.Choice("bf16" if kv16 else fmt, "device", 16 if kv16 else bits),
                                         cluster.devices[d], batch, SEQ)
            if i and place[i - 1] != d:
                total += cost.send_time_s(batch * shape.hidden * 2, cluster.link(place[i - 1], d))
        tps = batch / total
    counts = Counter(d for u, d in zip(units, place) if u.kind == "block")
    split = "/".join(str(counts.get(d, 0)) for d in range(len(usable))) + (f" +{off} off-GPU" if off else "")
    return {"split": split, "fullest": f"{peaks[worst] / GIB:.1f}/{usable[worst] / GIB:.1f}", "fits": fits,
            "tokens_s": tps}


# ---------------------------------------------------------------- one row
def _blocks_summary(plan) -> str:
    blocks = [d for d in plan.decisions if d.kv_bits is not None]
    w = Counter(f"{d.format}{'@host' if d.placement == 'host' else ''}" for d in blocks)
    kv = Counter(d.kv_bits for d in blocks)
    return (", ".join(f"{n} {k}" for k, n in w.most_common()) + "; KV "
            + " ".join(f"{b}b x{n}" for b, n in sorted(kv.items(), reverse=True)))


def row(name, source, model, spec, kw, seq=SEQ) -> tuple[list, list]:
    t0 = time.perf_counter()
    plan = plan_split(source, target=spec, seq=seq, strict=False, **kw)
    wall = time.perf_counter() - t0
    cluster = parse_cluster(spec, **kw)
    gpus = f"{len(cluster.devices)} x {cluster.devices[0].name}" + (f" ({cluster.nodes} nodes)" if cluster.nodes > 1
                                                                     else "")
    if plan.devices:
        stages = sorted({d.stage for d in plan.devices})
        firsts = [next(d for d in plan.devices if d.stage == s) for s in stages]
        split = " \\| ".join(d.layers for d in firsts)
        peaks = "/".join(f"{d.peak_bytes / GIB:.1f}" for d in firsts) + (
            f" (x{plan.tensor_parallel} each)" if plan.tensor_parallel > 1 else "")
        layout = f"TP{plan.tensor_parallel} x PP{len(stages)}"
    else:
        split, peaks, layout = "all", f"{plan.predicted_peak_bytes / GIB:.1f}", "1 GPU"
    gap = "n/a" if plan.solver.gap != plan.solver.gap else f"{plan.solver.gap:.1%}"
    ours = [name, gpus, layout, split, _blocks_summary(plan), peaks, "yes" if plan.fits else "**no**",
            f"{plan.predicted_tokens_per_s:.1f}", f"{plan.predicted_prefill_s:.2f}", f"{wall:.2f}",
            f"{plan.solver.status} ({gap})"]
    if seq != SEQ:
        return ours, []
    shape = _shape_of(source)
    units = cost.layer_weights(shape)
    formats = {d.name: (d.format, d.kv_bits or 16) for d in plan.decisions}
    usable = _usable(plan, cluster)
    base = [evaluate(shape, units, formats, greedy_fill(units, formats, usable), usable, cluster, 1, False)]
    for bf16 in (False, True):
        place = accelerate_map(model, units, formats, usable, bf16)
        base.append(evaluate(shape, units, formats, place, usable, cluster, 1, bf16))
    cells = [name, gpus, f"{peaks}", f"{plan.predicted_tokens_per_s:.1f}"]
    for b in base:
        cells += [b["split"], b["fullest"], "yes" if b["fits"] else "**no**",
                  "-" if b["tokens_s"] is None else f"{b['tokens_s']:.1f}"]
    return ours, cells


def main() -> None:
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("accelerate.utils.modeling").setLevel(logging.ERROR)
    from memopt.frontend.sources import resolve_source

    root = tempfile.mkdtemp(prefix="memopt-bench-")
    models = [("Llama-3-70B", "llama-3-70b"), ("Mixtral-8x7B size", mixtral_dir(root))]
    ours, theirs = [], []
    for name, source in models:
        model = resolve_source(source, load_weights=False).model
        for spec, kw in cases():
            a, b = row(name, source, model, spec, kw)
            ours.append(a)
            theirs.append(b)
            print(" | ".join(a), flush=True)
    extra, _ = row("Llama-3-70B, context 32768", "llama-3-70b", None, "4x(rtx-4090)", {}, seq=32768)
    mixtral_gib = sum(u.bytes("bf16") for u in cost.layer_weights(_shape_of(models[1][1]))) / GIB
    text = "\n".join([
        "# Several GPUs: the split ILP vs greedy layer splits",
        "",
        f"Environment: {environment()}. Solver: CBC (bundled with PuLP), 3 s per plan shared by its layouts.",
        "",
        "Predictions come from memopt's roofline model and the links in memopt/data/targets.json, not from runs on "
        "these GPUs (none was used: planning needs configs only). `benchmarks/multi_device.py` reproduces it.",
        f"Batch 1, context {SEQ} tokens. The Mixtral-size model holds {mixtral_gib:.1f} GiB of bf16 weights, every "
        "expert counted (the cost model counted one expert per block before this change: 13.5 GiB).",
        "",
        "## memopt plans",
        "",
        "TP x PP: tensor-parallel degree x pipeline stages. Split: each stage's layers. Peak: each stage's "
        "predicted peak per GPU (GiB; usable 79.0 on A100-80GB, 23.0 on RTX 4090). Planning s: wall time of "
        "`plan_split` (every layout tried, bounds included).",
        "",
        table(["model", "GPUs", "TP x PP", "split", "blocks: weights; KV bits", "peak GiB per GPU", "fits",
               "tokens/s", "prefill s", "planning s", "solver (gap)"], ours + [extra]),
        "",
        "## Baselines for the same budgets",
        "",
        "Layers per GPU (decoder blocks; \"off-GPU\": layers the rule leaves on the CPU), the fullest GPU with its "
        "KV cache and activation arena counted (GiB used/usable), whether every GPU fits, predicted tokens/s.",
        "",
        table(["model", "GPUs", "memopt peak", "memopt tokens/s", "greedy split", "greedy fullest", "fits", "tokens/s",
               "accelerate split", "accelerate fullest", "fits", "tokens/s", "accelerate bf16 split",
               "bf16 fullest", "fits", "tokens/s"], theirs),
        "",
        "Reading it:",
        "- Neither baseline plans for the KV cache or the activations, so where the weights nearly fill the first "
        "GPUs the fullest GPU overflows once they are counted; memopt budgets them per device.",
        "- The greedy split puts no layer on a GPU until the previous one is full, so with room to spare its later "
        "GPUs sit idle and the pipeline is unbalanced; memopt balances the stages by roofline time and, where the "
        "interconnect makes it pay, shares every layer tensor-parallel across a node (decode is bandwidth-bound: "
        "t GPUs read 1/t of the weights each).",
        "- More GPUs do not always mean more tokens/s: the objective is step time + lam x quality penalty, so with "
        "room to spare the planner buys quality (int8 rather than int4 weights, 16-bit rather than 8-bit KV), e.g. "
        "Llama-3-70B on 4 x RTX 4090 runs int8 where 2 x RTX 4090 must run int4. Pipeline stages alone do not speed "
        "up one sequence's decode (its token passes every stage in turn); tensor parallelism does, until the "
        "all-reduces on the link cost more than the weight reads they save (8 x RTX 4090 without peer-to-peer "
        "stops at TP4 x PP2).",
        "- accelerate's int4 sizes leave out the scales (0.5 byte/parameter, memopt's int4:g64 is 0.5625), so its "
        "map of a plan with int4 layers can overflow by those bytes too; its bf16 map offloads to the CPU "
        "whatever does not fit.",
        "",
    ])
    write("multi_device.md", text)


if __name__ == "__main__":
    main()
