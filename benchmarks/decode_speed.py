"""Decode speed on SmolLM2-135M: memopt's generation programs against transformers eager and llama.cpp.

    python benchmarks/decode_speed.py            # writes benchmarks/results/decode_speed.md
    python benchmarks/decode_speed.py --quick    # one round, 8 steps: a smoke run

Greedy decoding, batch 1, `torch.set_num_threads(1)` (llama.cpp: n_threads=1): CPU time (`time.process_time`)
and wall time of each decode step after a prompt of ~200 and ~1,500 tokens of held-out text, the median over
every step of every round; systems and contexts are interleaved round by round (A/B), so a busy machine slows
all of them alike. Rows: transformers eager fp32 (and bf16) stepping a `DynamicCache`; memopt plain / int8 /
int4 / KIVI (`kivi:k4v4:g32:r128`) through the generation program as `OptimizedModule.generate` runs it
(`memopt.serve.decode_program.decode_program`, a static 2,048-slot cache; KIVI: `memopt.serve.generate`, whose
prefill takes the prompt in one call); llama.cpp through llama-cpp-python (the `bench` extra, built from
source; on this machine its default build's AMX kernels crash in `ggml_backend_amx_mul_mat`, so it was built with
`CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"`; a build that crashes is detected and skipped)
on the same GGUF file (Q4_1) when that package is importable and runs here. "prefill s" is the CPU
time of the 1,500-token prompt (time to first token). A second table runs KIVI against memopt's full cache
at 1k and 4k tokens of context (both programs compiled with a 4,160-token cache).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from common import environment, table, write  # noqa: E402

import memopt  # noqa: E402
from memopt.eval.evaluate import heldout_text  # noqa: E402
from memopt.frontend.sources import resolve_source  # noqa: E402
from memopt.runtime import native  # noqa: E402
from memopt.serve.decode_program import decode_program  # noqa: E402
from memopt.serve.generate import decode_step, prefill  # noqa: E402

CONTEXTS = (200, 1500)
KV_CONTEXTS, KV_CACHE = (1000, 4000), 4160
KIVI = "kivi:k4v4:g32:r128"
LLAMA_CPP = "llama.cpp (llama-cpp-python), Q4_1"
MIB = 2**20


def hf_stepper(model):
    """(prefill(ids) -> logits, step(token, pos) -> logits) for a transformers model with a DynamicCache."""
    from transformers import DynamicCache

    state = {}

    def start(ids):
        state["cache"] = DynamicCache(config=model.config)
        out = model(ids, past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def step(token, pos):
        return model(token, past_key_values=state["cache"], use_cache=True).logits[:, -1]

    return start, step


def memopt_stepper(opt):
    """The same two callables through `opt`'s generation program, as `opt.generate` runs it."""
    gen = opt.generator
    if "memopt_kv" in gen.meta:  # a compressed cache: memopt.serve.generate's prefill and decode step
        return (lambda ids: prefill(gen, ids)), (lambda token, pos: decode_step(gen, token, pos))
    program = decode_program(gen)

    def start(ids, chunk=512):
        for lo in range(0, ids.shape[1], chunk):
            part = ids[:, lo:lo + chunk]
            logits = program(input_ids=part, cache_position=torch.arange(lo, lo + part.shape[1]))
        return logits[:, -1]

    return start, (lambda token, pos: program(input_ids=token, cache_position=torch.tensor([pos]))[:, -1])


def llama_cpp_stepper(gguf_path: str):
    """llama-cpp-python's eval loop on the same GGUF file (one thread), or (None, why) when it cannot run here:
    not installed, or a smoke test in a child process fails (a native crash would take this process with it)."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None, "llama-cpp-python is not installed (pip install -e '.[bench]'; it builds from source)"
    smoke = ("from llama_cpp import Llama; import sys\n"
             f"llm = Llama(model_path={gguf_path!r}, n_ctx=64, n_threads=1, n_threads_batch=1, verbose=False)\n"
             "llm.eval([1, 2, 3]); print(llm.n_tokens)")
    out = subprocess.run([sys.executable, "-c", smoke], capture_output=True, text=True, timeout=300, check=False)
    if out.returncode or out.stdout.strip() != "3":
        why = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        return None, f"llama-cpp-python is installed but fails on {os.path.basename(gguf_path)} here: {why}"
    import numpy as np

    llm = Llama(model_path=gguf_path, n_ctx=2048, n_threads=1, n_threads_batch=1, n_batch=512, verbose=False)

    def logits():  # the last token's (Llama.scores holds nothing unless logits_all=True)
        return torch.from_numpy(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy())

    def start(ids):
        llm.reset()
        llm.eval(ids[0].tolist())
        return logits().unsqueeze(0)

    def step(token, pos):
        llm.eval([int(token[0, 0])])
        return logits().unsqueeze(0)

    return (start, step), ""


def measure(stepper, ids: torch.Tensor, steps: int) -> tuple[float, list[float], list[float]]:
    """(prefill CPU s, per-step CPU s, per-step wall s) for greedy decoding of `steps` tokens after `ids`."""
    start, step = stepper
    with torch.inference_mode():
        t0 = time.process_time()
        logits = start(ids)
        prefill_s = time.process_time() - t0
        token, pos, cpu, wall = logits.argmax(-1, keepdim=True), ids.shape[1], [], []
        for _ in range(steps):
            t0, w0 = time.process_time(), time.perf_counter()
            logits = step(token, pos)
            cpu.append(time.process_time() - t0)
            wall.append(time.perf_counter() - w0)
            token, pos = logits.argmax(-1, keepdim=True), pos + 1
    return prefill_s, cpu, wall


def interleaved(systems: dict, prompts: dict, rounds: int, steps: int) -> tuple[dict, dict, dict]:
    """Every system at every context, round by round: (CPU s per step, wall s per step, prefill CPU s), each
    {(system, context): [values]}."""
    cpu, wall, prefills = ({(s, c): [] for s in systems for c in prompts} for _ in range(3))
    for r in range(rounds):
        for c, ids in prompts.items():
            for name, (stepper, _) in systems.items():
                p, t, w = measure(stepper, ids, steps)
                prefills[name, c].append(p)
                cpu[name, c] += t
                wall[name, c] += w
                print(f"round {r + 1}/{rounds} context {c}: {name}: {steps / sum(t):.1f} tok/s, prefill {p:.2f} s",
                      flush=True)
    return cpu, wall, prefills


def build(src, quick: bool) -> tuple[dict, str]:
    """(name -> (stepper, weight bytes or None) in table order, why llama.cpp has no row or "")."""
    systems = {"transformers eager fp32": (hf_stepper(src.model), sum(p.nbytes for p in src.model.parameters()))}
    if not quick:
        bf16 = copy.deepcopy(src.model).to(torch.bfloat16)
        systems["transformers eager bf16"] = (hf_stepper(bf16), sum(p.nbytes for p in bf16.parameters()))
    for name, kw in (("plain", {}), ("int8", {"quantize": "int8"}), ("int4", {"quantize": "int4"}),
                     (f"KIVI {KIVI}", {"kv": KIVI})):
        print(f"compiling memopt {name} ...", flush=True)
        opt = memopt.compile(src, passes=("quantize",) if "quantize" in kw else (), **kw)
        opt.generate(torch.tensor([[1, 2, 3]]), 1)  # as a first generate() does: int4 weights into the kernel layout
        systems[f"memopt {name}"] = (memopt_stepper(opt), opt.plan.predictions["weights_bytes"])
    from memopt.frontend.gguf import smollm2_path

    gguf = str(smollm2_path())
    cpp, why = llama_cpp_stepper(gguf)
    if cpp is None:
        print(f"llama.cpp: {why}; skipped")
    else:
        systems[LLAMA_CPP] = (cpp, os.path.getsize(gguf))
    return systems, why


def kv_section(src, text_ids: torch.Tensor, rounds: int, steps: int) -> str:
    """KIVI against memopt's full cache at KV_CONTEXTS tokens: a markdown paragraph and table."""
    systems = {}
    for name, kw in (("plain (full cache)", {}), (f"KIVI {KIVI}", {"kv": KIVI})):
        print(f"compiling memopt {name} with a {KV_CACHE}-token cache ...", flush=True)
        opt = memopt.compile(src, max_cache=KV_CACHE, **kw)
        systems[f"memopt {name}"] = (memopt_stepper(opt), None)
    cpu, wall, _ = interleaved(systems, {c: text_ids[:, :c] for c in KV_CONTEXTS}, rounds, steps)
    full, kivi = (f"memopt {x}" for x in ("plain (full cache)", f"KIVI {KIVI}"))
    rows = []
    for name in systems:
        row = [name]
        for c in KV_CONTEXTS:
            row += [f"{1 / statistics.median(cpu[name, c]):.1f}", f"{1 / statistics.median(wall[name, c]):.1f}",
                    f"{statistics.median(cpu[full, c]) / statistics.median(cpu[name, c]):.2f}"]
        rows.append(row)
    headers = ["system"] + [h for c in KV_CONTEXTS for h in (f"tok/s @{c}", f"wall tok/s @{c}", f"x full @{c}")]
    return (f"## KIVI vs the full cache at {' and '.join(f'{c:,}' for c in KV_CONTEXTS)} tokens\n\n"
            f"Both programs compiled with a {KV_CACHE:,}-token cache; {rounds} rounds x {steps} steps, interleaved. "
            f"The KIVI step reads its packed store with memopt's C kernels (`memopt/runtime/kivi_kernels.c`, "
            f"{'built here' if native.kernels() is not None else 'NOT built here: ' + native.why_not()}).\n\n"
            + table(headers, rows) + "\n\n"
            + "KIVI decode vs memopt's full cache (CPU): "
            + ", ".join(f"{statistics.median(cpu[full, c]) / statistics.median(cpu[kivi, c]):.2f}x @{c}"
                        for c in KV_CONTEXTS) + ".\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round of 8 steps, no bf16 row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds, steps = (1, 8) if args.quick else (3, 32)
    src = resolve_source("smollm2")
    text_ids = src.tokenizer(heldout_text(n_chars=20000), return_tensors="pt").input_ids
    systems, why_no_cpp = build(src, args.quick)
    cpu, wall, prefills = interleaved(systems, {c: text_ids[:, :c] for c in CONTEXTS}, rounds, steps)
    rate = {k: 1.0 / statistics.median(v) for k, v in cpu.items()}
    wall_rate = {k: 1.0 / statistics.median(v) for k, v in wall.items()}
    base = "transformers eager fp32"
    headers = ["system", "weights MiB"] + [h for c in CONTEXTS for h in (f"tok/s @{c}", f"wall tok/s @{c}",
                                                                           f"x HF @{c}")] + \
        [f"prefill s @{CONTEXTS[-1]}"]
    rows = []
    for name, (_, nbytes) in systems.items():
        row = [name, f"{nbytes / MIB:.1f}" if nbytes else "n/a"]
        for c in CONTEXTS:
            row += [f"{rate[name, c]:.1f}", f"{wall_rate[name, c]:.1f}", f"{rate[name, c] / rate[base, c]:.2f}"]
        rows.append(row + [f"{statistics.median(prefills[name, CONTEXTS[-1]]):.2f}"])
    kv_vs_full = {c: rate[f"memopt KIVI {KIVI}", c] / rate["memopt plain", c] for c in CONTEXTS}
    if LLAMA_CPP in systems:
        cpp = "memopt vs llama.cpp (CPU tok/s ratio): " + "; ".join(
            f"{q} " + ", ".join(f"{rate[f'memopt {q}', c] / rate[LLAMA_CPP, c]:.2f}x @{c}" for c in CONTEXTS)
            for q in ("int4", "int8")) + ".\n"
    else:
        cpp = (f"\nllama.cpp: no row ({why_no_cpp}). DESIGN.md's anchor on this machine, measured once with "
               "llama-cpp-python 0.3.36: ~55 tok/s at 200 tokens, ~47 at 1.5k.\n")
    text = (f"# Decode speed: SmolLM2-135M, greedy, batch 1, one thread\n\n{environment()}\n\n"
            f"Command: `python benchmarks/decode_speed.py{' --quick' if args.quick else ''}`\n\n"
            f"{__doc__.split(chr(10) + chr(10), 2)[2].strip()}\n\n"
            f"{rounds} rounds x {steps} steps per system and context; tok/s = 1 / median step CPU time, wall tok/s "
            "= 1 / median step wall time.\n\n"
            + table(headers, rows) + "\n\n"
            + "KIVI decode vs memopt's full (plain) cache: "
            + ", ".join(f"{kv_vs_full[c]:.2f}x @{c}" for c in CONTEXTS) + ".\n" + cpp + "\n"
            + kv_section(src, text_ids, rounds, steps))
    write("decode_speed.md", text)


if __name__ == "__main__":
    main()
