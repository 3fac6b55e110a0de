"""benchmarks/gpu_check.py: the no-CUDA path, and the helpers that run without a GPU (report, status, budget
choice, the model directory builder, the profiler-trace overlap arithmetic, argument parsing)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def tiny_dir(gc, tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-tiny")
    info = gc.build_llama_dir(directory, "tiny", seq=128)
    return directory, info


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the path taken without CUDA")
def test_without_cuda_prints_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results" / "gpu.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                          timeout=60, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert proc.returncode == 0, proc.stderr
    assert len(lines) == 1 and "no CUDA" in lines[0], lines
    assert not out.exists() and not out.parent.exists()


def _step(gc, name, ok: bool):
    results, failures = {}, []
    gc.check(results, failures, f"{name} check", ok, "1.00x" if ok else "0.50x", ">= 1x")
    results["tables"] = [{"title": "numbers", "headers": ["a", "b"], "rows": [["x|y", 1]]}]
    return gc.Step(name, f"step {name}", results, failures, 1.0, 10.0)


def test_report_and_status(gc):
    good, bad = _step(gc, "good", True), _step(gc, "bad", False)
    env = {"device": "NVIDIA H200", "torch": "2.13.0", "cuda": "12.8", "memopt": "0.1.0", "total_s": 12}
    assert gc.exit_status([good]) == 0
    assert gc.exit_status([good, bad]) == 1
    text = gc.render_report([good, bad], env)
    assert text.startswith("# memopt on a GPU: FAIL")
    assert "NVIDIA H200" in text and "torch 2.13.0" in text
    assert "| bad check | 0.50x | >= 1x | FAIL |" in text and "| good check | 1.00x | >= 1x | PASS |" in text
    assert "- bad check: 0.50x (goal >= 1x)" in text
    assert "x\\|y" in text  # a pipe inside a cell does not break the table
    assert gc.render_report([good], env).startswith("# memopt on a GPU: PASS")


def test_a_step_that_raises_is_a_failure_not_the_end(gc):
    def broken(ctx, clock):
        raise RuntimeError("CUDA error: out of memory\nmore")

    step = gc.run_step("x", "X", broken, {}, 5.0)
    assert step.failures == ["RuntimeError: CUDA error: out of memory"] and gc.exit_status([step]) == 1


def test_tiny_model_dir_resolves(gc, tiny_dir):
    from memopt.frontend.sources import resolve_source

    directory, info = tiny_dir
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.safetensors"}
    src = resolve_source(str(directory))
    assert src.family == "causal_lm" and not src.on_meta and src.dtype == torch.bfloat16
    assert sum(p.numel() for p in src.model.parameters()) == info["params"]
    assert info["bf16_bytes"] == 2 * info["params"]
    norm = src.model.model.norm.weight
    assert torch.all(norm == 1) and 0.015 < float(src.model.lm_head.weight.detach().float().std()) < 0.025


def test_budget_choice_offloads_weights_and_kv(gc, tiny_dir):
    directory, info = tiny_dir
    chosen = gc.choose_budget(str(directory), target="h100-80gb", seq=128)
    assert chosen["offloads_both"] and chosen["fits"]
    assert chosen["host_weight_blocks"] > 0 and chosen["host_kv_layers"] > 0
    assert chosen["bf16_weights_bytes"] == info["bf16_bytes"]
    assert chosen["budget_bytes"] == int(chosen["fraction"] * chosen["bf16_weights_bytes"])
    assert chosen["predicted_peak_bytes"] <= chosen["budget_bytes"] - chosen["reserve_bytes"]


def test_offload_only_planner_is_restored(gc):
    import memopt.planning.budget as mb

    original = mb.plan_budget
    with gc.offload_only_planner():
        assert mb.plan_budget is not original and mb.plan_budget.keywords == {"formats": ("bf16",), "kv_bits": (16,)}
    assert mb.plan_budget is original


def _x(cat, name, ts, dur, stream, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream, **args}}


OVERLAPPED = [  # copy i+1 on stream 20 runs while block i's kernels run on stream 7
    _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 100, 20, bytes=10**6),
    _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 100, 100, 20, bytes=10**6),
    _x("kernel", "gemm", 110, 30, 7), _x("kernel", "gemm", 150, 30, 7),
    _x("kernel", "gemm", 210, 30, 7),  # the last block: no copy left to overlap, outside the copy window
    _x("gpu_memcpy", "Memcpy HtoD (Pageable -> Device)", 205, 1, 7, bytes=8),  # cache_position
]
SERIAL = [  # every kernel waits for the copies: no overlap
    _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 0, 100, 20), _x("kernel", "gemm", 100, 30, 7),
    _x("gpu_memcpy", "Memcpy HtoD (Pinned -> Device)", 130, 100, 20), _x("kernel", "gemm", 230, 30, 7),
]


@pytest.mark.parametrize("events, kernel_overlap, copy_overlap", [(OVERLAPPED, 1.0, 0.3), (SERIAL, 0.0, 0.0)])
def test_overlap_stats(gc, events, kernel_overlap, copy_overlap):
    st = gc.overlap_stats(events)
    assert st["compute_stream"] == 7 and st["side_copies"] == 2 and st["pinned_copies"] == 2
    assert st["kernel_overlap"] == pytest.approx(kernel_overlap)
    assert st["copy_overlap"] == pytest.approx(copy_overlap)


def test_overlap_stats_counts_bytes_and_the_copy_on_the_compute_stream(gc):
    st = gc.overlap_stats(OVERLAPPED)
    assert st["compute_stream_copies"] == 1 and st["copy_bytes"] == 2 * 10**6
    assert st["copy_gb_per_s"] == pytest.approx(2e6 / 200 / 1e3) and st["link_busy"] == pytest.approx(1.0)
    assert gc.overlap_stats([])["side_copies"] == 0


def test_prefetch_order(gc):
    from types import SimpleNamespace as T

    ahead = [T(block="b0", issue_index=0, wait_index=2, first_use_index=3),
             T(block="b1", issue_index=1, wait_index=10, first_use_index=11)]
    assert gc.prefetch_order(ahead) == {"transfers": 2, "ahead": 1, "late": []}
    late = [ahead[0], T(block="b1", issue_index=5, wait_index=10, first_use_index=11)]
    assert gc.prefetch_order(late)["late"] == ["b1 issued at 5, after b0's first use at 3"]


def test_issued_ahead(gc):
    def op(name, ts):
        return {"ph": "X", "cat": "cpu_op", "name": f"memopt::{name}", "ts": ts, "dur": 1}

    order = ["offload_prefetch", "offload_prefetch", "offload_wait", "offload_prefetch", "offload_wait", "offload_wait"]
    events = [op(name, ts) for ts, name in enumerate(order)] + [op("kv_offload_wait", 9)]
    assert gc.issued_ahead(events, "memopt::offload_prefetch", "memopt::offload_wait") == {
        "prefetches": 3, "waits": 3, "ahead": 2}
    serial = ["offload_prefetch", "offload_wait"] * 3  # each block fetched only when it is needed
    events = [op(name, ts) for ts, name in enumerate(serial)]
    assert gc.issued_ahead(events, "memopt::offload_prefetch", "memopt::offload_wait")["ahead"] == 0


def test_arguments_and_settings(gc):
    args = gc.parse_args([])
    assert Path(args.out) == gc.DEFAULT_OUT and not args.quick and args.size is None and args.worker is None
    full = gc.Settings.from_args(args, "h200", "/w")
    assert (full.size, full.seq, full.target, full.workdir) == ("1b", 512, "h200", "/w")
    quick = gc.Settings.from_args(gc.parse_args(["--quick", "--out", "x.md"]), "h100-80gb", "/w")
    assert quick.size == "small" and quick.new_tokens < full.new_tokens
    assert gc.Settings.from_args(gc.parse_args(["--quick", "--size", "tiny"]), "h200", "/w").size == "tiny"
    with pytest.raises(SystemExit):
        gc.parse_args(["--size", "huge"])
    assert gc.target_for("NVIDIA H200") == "h200" and gc.target_for("NVIDIA H100 80GB HBM3") == "h100-80gb"
    assert sum(gc.STEP_LIMITS_S.values()) > gc.TOTAL_LIMIT_S  # the total limit binds before the steps' sum


def test_pytest_summary_parsing(gc):
    out = "E   assert 2 passed == 3\n3 passed, 2 skipped, 400 deselected, 1 error in 9.1s\n"
    assert gc.pytest_counts(out) == {"passed": 3, "skipped": 2, "deselected": 400, "errors": 1}
    assert gc.pytest_counts("no tests ran") == {}
    assert gc.missing_modules(("torch", "surely_not_a_module_here")) == ["surely_not_a_module_here"]
    assert gc.cuda_test_count() >= 3


MiB = 2**20


def _fake_workers(plan_peak: int, peak: int, acc_tok_s: float):
    """Canned worker results, shaped as the workers write them (bytes in MiB units)."""
    plan_peak, peak = plan_peak * MiB, peak * MiB
    schedule = {"weight_blocks": 14, "kv_layers": 9, "weights_order": {"transfers": 14, "ahead": 13, "late": []},
                "kv_order": {"transfers": 9, "ahead": 8, "late": []}}
    timing = {"prefill_s": 0.5, "total_s": 1.5, "new_tokens": 32, "decode_tok_s": 31.0}
    plan = {"budget_bytes": 1000 * MiB, "reserve_bytes": 100 * MiB, "fits": True, "predicted_peak_bytes": plan_peak,
            "host_weight_blocks": 14, "host_kv_layers": 9, "layers": 24, "fraction": 0.6, "bf16_weights_bytes": 1666,
            "offloads_both": True, "breakdown": {"weights_bytes": 500, "prefetch_bytes": 300}}
    return {
        "build": {"dir": "d", "params": 833, "bf16_bytes": 1666, "size": "1b", "build_s": 3.0},
        "compile": {"plan": plan, "command": "memopt compile d --budget 1000 --kv-host", "compile_s": 30.0},
        "memopt": {"predicted": {"predicted_peak_bytes": plan_peak, "budget_bytes": 1000 * MiB}, "load_s": 2.0,
                   "base_bytes": 8, "after_load_bytes": peak - 10, "held": {"weights_bytes": 500}, "peak_bytes": peak,
                   "reserved_bytes": peak + 64, "generated": 32, "schedule": schedule, "timing": timing},
        "hf": {"device_map": {"0": 10, "cpu": 14}, "load_s": 5.0, "peak_bytes": 900,
               "timing": {**timing, "decode_tok_s": acc_tok_s}},
        "profile": {"step_s": 0.02, "host_bytes": 1200, "schedule": schedule, "copy_only_s": 0.019,
                    "issued": {"prefetches": 14, "waits": 14, "ahead": 13}, "kv_issued": {"waits": 9, "ahead": 8},
                    "stats": {"side_copies": 23, "pinned_copies": 23, "compute_stream_copies": 1, "kernel_overlap": 0.9,
                              "copy_overlap": 0.1, "link_busy": 0.95, "copy_us": 19000, "kernel_us": 2000,
                              "overlap_us": 1800, "kernels": 400, "copy_bytes": 1200, "copy_gb_per_s": 50.0}},
    }


@pytest.mark.parametrize("peak, acc_tok_s, status, failed", [
    (840, 10.0, 0, []),  # within 5% of the predicted 850, under the budget, 3.1x accelerate
    (1100, 10.0, 1, ["measured peak <= budget | 1100.0 MiB vs 1000.0 MiB", "measured vs predicted peak | +29.4%"]),
    (840, 20.0, 1, ["decode speedup over accelerate offload | 1.55x"]),
])
def test_main_with_canned_workers(gc, monkeypatch, tmp_path, peak, acc_tok_s, status, failed):
    """The steps' bookkeeping on a CPU: main() with CUDA faked and the workers' results canned."""
    canned = _fake_workers(850, peak, acc_tok_s)
    monkeypatch.setattr(gc.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gc, "environment", lambda argv: {"device": "NVIDIA H200", "torch": "2.13.0", "cuda": "12.8"})
    monkeypatch.setattr(gc, "run_worker", lambda kind, spec, limit_s, workdir: (canned[kind], None))
    monkeypatch.setattr(gc, "STEPS", tuple(s if s[0] != "pytest" else (s[0], s[1], lambda ctx, clock: ({}, []))
                                           for s in gc.STEPS))
    monkeypatch.setattr(gc, "missing_modules", lambda names: [])
    out = tmp_path / "gpu.md"
    assert gc.main(["--out", str(out), "--workdir", str(tmp_path / "w")]) == status
    text = out.read_text()
    assert (tmp_path / "gpu.json").is_file() and "NVIDIA H200" in text
    assert "| decode speedup over accelerate offload |" in text and "31.0" in text
    assert "compute overlaps copies | 90% of kernel time in the copy window" in text
    for word in failed:
        assert word in " ".join(line for line in text.splitlines() if "FAIL" in line)
