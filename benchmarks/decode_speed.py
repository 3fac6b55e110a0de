"""Decode speed on SmolLM2-135M: memopt's generation programs against transformers eager (and llama.cpp).

    python benchmarks/decode_speed.py            # writes benchmarks/results/decode_speed.md
    python benchmarks/decode_speed.py --quick    # one round, 8 steps: a smoke run

Greedy decoding, batch 1, `torch.set_num_threads(1)`: CPU time (`time.process_time`) of each decode step
after a prompt of ~200 and ~1,500 tokens of held-out text, the median over every step of every round;
systems and contexts are interleaved round by round (A/B), so a busy machine slows all of them alike.
Rows: transformers eager fp32 (and bf16) stepping a `DynamicCache`; memopt plain / int8 / int4 /
KIVI (`kivi:k4v4:g32:r128`) through the generation program as `OptimizedModule.generate` runs it
(`memopt.serve.decode_program.decode_program`, a static 2,048-slot cache; KIVI: `memopt.serve.generate`, whose prefill takes
the prompt in one call). "prefill s" is the CPU time of the 1,500-token prompt (time to first token).
llama.cpp runs through llama-cpp-python on the same GGUF file when that package is importable.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from common import environment, table, write  # noqa: E402

import memopt  # noqa: E402
from memopt.eval.evaluate import heldout_text  # noqa: E402
from memopt.serve.generate import decode_step, prefill  # noqa: E402
from memopt.serve.decode_program import decode_program  # noqa: E402
from memopt.frontend.sources import resolve_source  # noqa: E402

CONTEXTS = (200, 1500)
KIVI = "kivi:k4v4:g32:r128"
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
    """llama-cpp-python's eval loop on the same GGUF file, or None when the package is not importable."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=gguf_path, n_ctx=2048, n_threads=1, n_batch=512, verbose=False)

    def start(ids):
        llm.reset()
        llm.eval(ids[0].tolist())
        return torch.tensor(llm.scores[llm.n_tokens - 1]).unsqueeze(0)

    def step(token, pos):
        llm.eval([int(token[0, 0])])
        return torch.tensor(llm.scores[llm.n_tokens - 1]).unsqueeze(0)

    return start, step


def measure(stepper, ids: torch.Tensor, steps: int) -> tuple[float, list[float]]:
    """(prefill CPU s, per-step CPU s) for greedy decoding of `steps` tokens after `ids`."""
    start, step = stepper
    with torch.inference_mode():
        t0 = time.process_time()
        logits = start(ids)
        prefill_s = time.process_time() - t0
        token, pos, times = logits.argmax(-1, keepdim=True), ids.shape[1], []
        for _ in range(steps):
            t0 = time.process_time()
            logits = step(token, pos)
            times.append(time.process_time() - t0)
            token, pos = logits.argmax(-1, keepdim=True), pos + 1
    return prefill_s, times


def build(src, quick: bool) -> dict:
    """name -> (stepper, weight MiB or None), in table order."""
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
    cpp = llama_cpp_stepper(gguf)
    if cpp is None:
        print("llama.cpp (llama-cpp-python): not installed; skipped")
    else:
        systems["llama.cpp (llama-cpp-python), Q4_1"] = (cpp, os.path.getsize(gguf))
    return systems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round of 8 steps, no bf16 row")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rounds, steps = (1, 8) if args.quick else (3, 32)
    src = resolve_source("smollm2")
    text_ids = src.tokenizer(heldout_text(n_chars=20000), return_tensors="pt").input_ids
    prompts = {c: text_ids[:, :c] for c in CONTEXTS}
    systems = build(src, args.quick)
    times = {(s, c): [] for s in systems for c in CONTEXTS}
    prefills = {(s, c): [] for s in systems for c in CONTEXTS}
    for r in range(rounds):
        for c in CONTEXTS:
            for name, (stepper, _) in systems.items():
                p, t = measure(stepper, prompts[c], steps)
                prefills[name, c].append(p)
                times[name, c] += t
                print(f"round {r + 1}/{rounds} context {c}: {name}: {steps / sum(t):.1f} tok/s, prefill {p:.2f} s",
                      flush=True)
    rate = {k: 1.0 / statistics.median(v) for k, v in times.items()}
    base = "transformers eager fp32"
    headers = ["system", "weights MiB"] + [h for c in CONTEXTS for h in (f"tok/s @{c}", f"x HF @{c}")] + \
        [f"prefill s @{CONTEXTS[-1]}"]
    rows = []
    for name, (_, nbytes) in systems.items():
        row = [name, f"{nbytes / MIB:.1f}" if nbytes else "n/a"]
        for c in CONTEXTS:
            row += [f"{rate[name, c]:.1f}", f"{rate[name, c] / rate[base, c]:.2f}"]
        rows.append(row + [f"{statistics.median(prefills[name, CONTEXTS[-1]]):.2f}"])
    kv_vs_full = {c: rate[f"memopt KIVI {KIVI}", c] / rate["memopt plain", c] for c in CONTEXTS}
    text = (f"# Decode speed: SmolLM2-135M, greedy, batch 1, one thread\n\n{environment()}\n\n"
            f"Command: `python benchmarks/decode_speed.py{' --quick' if args.quick else ''}`\n\n"
            f"{__doc__.split(chr(10) + chr(10), 2)[2].strip()}\n\n"
            f"{rounds} rounds x {steps} steps per system and context; tok/s = 1 / median step CPU time.\n\n"
            + table(headers, rows) + "\n\n"
            + "KIVI decode vs memopt's full (plain) cache: "
            + ", ".join(f"{kv_vs_full[c]:.2f}x @{c}" for c in CONTEXTS) + ".\n"
            + ("" if any(name.startswith("llama.cpp") for name in systems) else
               "\nllama.cpp: llama-cpp-python is not installed here, so no row (DESIGN.md's anchor on this machine, "
               "measured once with llama-cpp-python 0.3.36: ~55 tok/s at 200 tokens, ~47 at 1.5k).\n"))
    write("decode_speed.md", text)


if __name__ == "__main__":
    main()
