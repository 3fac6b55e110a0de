"""KV-cache compression on a real LLM (SmolLM2-135M) and on a larger random-init Llama, side by side.

    python benchmarks/kv.py                      # writes benchmarks/results/kv.md (about an hour on 2 cores)
    python benchmarks/kv.py --samples 2 --tf-tokens 128 --skip-long   # a quick look

SmolLM2 at `--context` tokens (1k): every policy runs through the rewritten decode graph
(`KVCompressionPass` + `memopt.serve.generate`), on the same samples:
  cache bytes     the graph's KV buffers (packed data, scales, zeros, residual, sinks, scores), vs fp16
  pass key        `memopt.eval.evaluate.passkey_prompt` (held-out Python docs, key at a seeded depth); the
                  context is prefilled and compressed first, the question is fed afterwards through the
                  decode step, so no policy sees it while choosing what to keep
  top-1 / ppl     the first half of a held-out text prefilled, the second half teacher-forced through the
                  decode step: top-1 agreement with the full-cache model and perplexity of the true tokens
  ms / token      mean decode-step latency over the teacher-forced half (1 torch thread)
Peers on the same samples: transformers' `QuantizedCache` (quanto backend, group 64, residual 128), at
the bytes its tensors hold at the end of the run. NVIDIA kvpress is not run: see the note in the output.
Second table: pass key at `--context2` (2k) for a subset. Third: a random-init Llama (4 layers, 16 query
heads, 8 KV heads, head_dim 128) at 4k and 8k context, cache bytes and decode latency.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from common import environment, table, write  # noqa: E402

from memopt.eval import evaluate  # noqa: E402
from memopt.capture import capture  # noqa: E402
from memopt.serve.generate import decode_step, generate, prefill  # noqa: E402
from memopt.kv import (  # noqa: E402
    H2OConfig,
    KIVIConfig,
    KVCachePolicy,
    SnapKVConfig,
    StreamingConfig,
    ThinKConfig,
    fp16_cache_bytes,
)
from memopt.kv.duo import duo_attention_policy, retrieval_head_scores  # noqa: E402
from memopt.passes.kv import KVCompressionPass, kv_buffer_bytes  # noqa: E402
from memopt.frontend.sources import resolve_source  # noqa: E402

METHOD = """Every memopt row runs through the rewritten decode graph (`KVCompressionPass`, then `memopt.serve.generate`: the
eager model prefills and the policy compresses layer by layer, then one graph call per token), on the same samples:

- **cache bytes**: the graph's KV buffers (packed data, scales, zeros, residual, sinks, scores, kept-channel
  indices) against an fp16 cache of the same context.
- **pass key**: `memopt.eval.evaluate.passkey_prompt` (held-out Python docs, a 5-digit key at a seeded depth). The
  context is prefilled and compressed first; the question is then fed through the decode step, so no policy
  sees it while choosing what to keep.
- **top-1 / ppl**: the first half of a held-out text prefilled, the second half teacher-forced through the
  decode step; top-1 agreement with the full-cache model's next token and perplexity of the true tokens.
- **decode ms/token**: mean decode-step latency over the teacher-forced half (1 torch thread, 2 shared cores:
  other jobs ran beside it, so compare rows, not absolute numbers).

Peers on the same samples: transformers' `QuantizedCache` with the optimum-quanto backend (its defaults: group
64, residual 128), bytes counted from its tensors at the end of the run, when its residual may hold anywhere
from 0 to 128 tokens (memopt's KIVI rows always hold a full 128-token fp16 residual: 0.11x of the 1k row).
"""

KVPRESS_NOTE = ("kvpress 0.5.5 (the current release) pins transformers<5.3; with this environment's transformers "
                "5.24 its attention hook reads kwargs['past_key_values'], which transformers renamed to `cache`, and "
                "fails with KeyError. Installing it would downgrade transformers for the whole project, so it is "
                "not run.")


def smollm2_policies(duo) -> dict[str, KVCachePolicy]:
    return {
        "fp16 (full cache)": KVCachePolicy(),
        "KIVI K4V4 g32 r128": KVCachePolicy(quant=KIVIConfig(4, 4, 32, 128)),
        "KIVI K4V4 g16 r128": KVCachePolicy(quant=KIVIConfig(4, 4, 16, 128)),
        "KIVI K4V2 g32 r128 +4 sinks": KVCachePolicy(quant=KIVIConfig(4, 2, 32, 128, sinks=4)),
        "KIVI K2V2 g32 r128": KVCachePolicy(quant=KIVIConfig(2, 2, 32, 128)),
        "KIVI K2V2 g16 r128 +4 sinks": KVCachePolicy(quant=KIVIConfig(2, 2, 16, 128, sinks=4)),
        "KIVI K4V4 g32 r128 +4 sinks, pre-RoPE keys": KVCachePolicy(quant=KIVIConfig(4, 4, 32, 128, sinks=4,
                                                                                  pre_rope=True)),
        "KIVI K2V2 g32 r128 +4 sinks, pre-RoPE + Hadamard": KVCachePolicy(quant=KIVIConfig(
            2, 2, 32, 128, sinks=4, pre_rope=True, hadamard=True)),
        "KIVI K2V2 g16 r128 +4 sinks, pre-RoPE + Hadamard": KVCachePolicy(quant=KIVIConfig(
            2, 2, 16, 128, sinks=4, pre_rope=True, hadamard=True)),
        "KIVI K4V4 g32 + ThinK 0.5": KVCachePolicy(quant=KIVIConfig(4, 4, 32, 128), channels=ThinKConfig(0.5)),
        "StreamingLLM 4+252": KVCachePolicy(eviction=StreamingConfig(4, 252)),
        "StreamingLLM 4+508, KIVI K4V4": KVCachePolicy(eviction=StreamingConfig(4, 508), quant=KIVIConfig(4, 4, 32, 128)),
        "H2O 256 (recent 64)": KVCachePolicy(eviction=H2OConfig(256, 64, sinks=4)),
        "SnapKV 256 (window 32)": KVCachePolicy(eviction=SnapKVConfig(256, 32, 7, sinks=4)),
        "DuoAttention 25% retrieval, rest 4+60": duo,
    }


# ---------------------------------------------------------------- measurements
def question_tokens(tokenizer) -> int:
    """Tokens of the pass-key question (and answer prefix) that `passkey_prompt` appends after the context."""
    _, suffix = evaluate._chat_frame(tokenizer)
    return len(tokenizer(evaluate._QUESTION + suffix, add_special_tokens=False).input_ids)


def passkey(src, generate_fn, context: int, samples: int) -> float:
    return evaluate.passkey_accuracy(src.model, src.tokenizer, context, n_samples=samples, seed=0,
                                     generate_fn=generate_fn, max_new_tokens=8)


def teacher_forced(logits: torch.Tensor, ids: torch.Tensor, full_logits: torch.Tensor, start: int, seconds: float):
    """(top-1 agreement, perplexity of the true next tokens, ms per decode step) over positions start-1 .. T-2."""
    pred = logits[:, :-1]
    agree = (pred.argmax(-1) == full_logits[:, start - 1 : -1].argmax(-1)).float().mean().item()
    nll = F.cross_entropy(pred[0].float(), ids[0, start:])
    return agree, math.exp(nll.item()), 1000 * seconds / (ids.shape[1] - start)


def run_memopt(src, captured, policy, ids, full_logits, context, samples, q_len, tf_start):
    gm = captured.module()
    KVCompressionPass(policy, context=context)(gm, None)
    row = {"cache bytes": kv_buffer_bytes(gm)}
    fn = lambda p, n: generate(gm, p, n, model=src.model, cached_tokens=p.shape[1] - q_len)  # noqa: E731
    row["pass key"] = passkey(src, fn, context - 8, samples)
    if ids is not None:
        logits = [prefill(gm, ids[:, :tf_start], src.model)]
        t = time.perf_counter()
        with torch.no_grad():
            for pos in range(tf_start, ids.shape[1]):
                logits.append(decode_step(gm, ids[:, pos : pos + 1], pos))
        seconds = time.perf_counter() - t
        row.update(zip(("top-1", "ppl", "ms/token"),
                       teacher_forced(torch.stack(logits, 1), ids, full_logits, tf_start, seconds)))
    return row


def hf_quantized_cache(config, nbits: int):
    from transformers import QuantizedCache

    return QuantizedCache("quanto", config, nbits=nbits, q_group_size=64, residual_length=128)


def _tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor) and type(x) is torch.Tensor:
        return x.nbytes
    inner = [v for k, v in vars(x).items() if isinstance(v, torch.Tensor) or hasattr(v, "_data")] if hasattr(x, "__dict__") else []
    return sum(_tensor_bytes(v) for v in inner)


def hf_cache_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        for name in ("_quantized_keys", "_quantized_values", "keys", "values"):
            value = getattr(layer, name, None)
            if value is not None:
                total += _tensor_bytes(value)
    return total


def hf_step(model, cache, token_ids, position):
    out = model(token_ids, cache=cache, use_cache=True, position_ids=torch.tensor([[position]]))
    return out.logits[:, -1]


def run_hf_quanto(src, nbits, ids, full_logits, context, samples, q_len, tf_start):
    model = src.model

    def generate_fn(prompt, n):
        cache = hf_quantized_cache(model.config, nbits)
        cut = prompt.shape[1] - q_len
        with torch.no_grad():
            logits = model(prompt[:, :cut], cache=cache, use_cache=True).logits[:, -1]
            for t in range(cut, prompt.shape[1]):
                logits = hf_step(model, cache, prompt[:, t : t + 1], t)
            out = []
            for i in range(n):
                token = logits.argmax(-1, keepdim=True)
                out.append(token)
                logits = hf_step(model, cache, token, prompt.shape[1] + i)
        return torch.cat(out, 1)

    row = {"pass key": passkey(src, generate_fn, context - 8, samples)}
    if ids is not None:
        cache = hf_quantized_cache(model.config, nbits)
        with torch.no_grad():
            logits = [model(ids[:, :tf_start], cache=cache, use_cache=True).logits[:, -1]]
            t = time.perf_counter()
            for pos in range(tf_start, ids.shape[1]):
                logits.append(hf_step(model, cache, ids[:, pos : pos + 1], pos))
            seconds = time.perf_counter() - t
        row.update(zip(("top-1", "ppl", "ms/token"),
                       teacher_forced(torch.stack(logits, 1), ids, full_logits, tf_start, seconds)))
        row["cache bytes"] = hf_cache_bytes(cache)
    return row


# ---------------------------------------------------------------- tables
def smollm2_table(src, args, duo) -> str:
    cfg = src.config
    shape = dict(layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=cfg.hidden_size // cfg.num_attention_heads)
    context, q_len = args.context, question_tokens(src.tokenizer)
    text = evaluate.heldout_text(n_chars=8 * context)
    ids = src.tokenizer(text, return_tensors="pt").input_ids[:, :context]
    tf_start = context - args.tf_tokens
    with torch.no_grad():
        full_logits = src.model(ids).logits
    captured = capture(src, phase="decode", cache_len=context)
    fp16 = fp16_cache_bytes(1, context, **shape)
    rows = []
    for name, policy in smollm2_policies(duo).items():
        if args.only and name not in args.only:
            continue
        r = run_memopt(src, captured, policy, ids, full_logits, context, args.samples, q_len, tf_start)
        rows.append([name, "memopt", f"{r['cache bytes'] / 2**20:.2f}", f"{r['cache bytes'] / fp16:.3f}",
                     f"{r['pass key']:.2f}", f"{r['top-1']:.4f}", f"{r['ppl']:.3f}", f"{r['ms/token']:.1f}"])
        print(rows[-1], flush=True)
    if not args.skip_peers and not args.only:
        for nbits in (4, 2):
            r = run_hf_quanto(src, nbits, ids, full_logits, context, args.samples, q_len, tf_start)
            rows.append([f"transformers QuantizedCache quanto {nbits}-bit g64 r128", "transformers + optimum-quanto",
                         f"{r['cache bytes'] / 2**20:.2f}", f"{r['cache bytes'] / fp16:.3f}", f"{r['pass key']:.2f}",
                         f"{r['top-1']:.4f}", f"{r['ppl']:.3f}", f"{r['ms/token']:.1f}"])
            print(rows[-1], flush=True)
    headers = ["policy", "library", "cache MiB", "x fp16", f"pass key ({args.samples})", "top-1 vs full",
               "ppl", "decode ms/token"]
    return table(headers, rows)


def smollm2_long_table(src, args, duo) -> str:
    context, q_len = args.context2, question_tokens(src.tokenizer)
    captured = capture(src, phase="decode", cache_len=context)
    keep = ("fp16 (full cache)", "KIVI K4V2 g32 r128 +4 sinks", "KIVI K2V2 g32 r128",
            "KIVI K2V2 g32 r128 +4 sinks, pre-RoPE + Hadamard", "StreamingLLM 4+252",
            "H2O 256 (recent 64)", "SnapKV 256 (window 32)", "DuoAttention 25% retrieval, rest 4+60")
    rows = []
    for name, policy in smollm2_policies(duo).items():
        if name in keep and (not args.only or name in args.only):
            r = run_memopt(src, captured, policy, None, None, context, args.samples, q_len, 0)
            fp16 = fp16_cache_bytes(1, context, 30, 3, 64)
            rows.append([name, f"{r['cache bytes'] / 2**20:.2f}", f"{r['cache bytes'] / fp16:.3f}", f"{r['pass key']:.2f}"])
            print(rows[-1], flush=True)
    return table(["policy", "cache MiB", "x fp16", f"pass key ({args.samples})"], rows)


def long_random_table(args) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from memopt.frontend.sources import ModelSource

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=16384)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    src = ModelSource("llama-4x1024-random", model, "causal_lm", cfg)
    policies = {"static cache (as captured, fp32)": None, "fp16 (full cache)": KVCachePolicy(),
                "KIVI K4V4 g64 r128": KVCachePolicy(quant=KIVIConfig(4, 4, 64, 128)),
                "KIVI K2V2 g64 r128": KVCachePolicy(quant=KIVIConfig(2, 2, 64, 128)),
                "KIVI K2V2 g128 r128": KVCachePolicy(quant=KIVIConfig(2, 2, 128, 128)),
                "StreamingLLM 4+1020": KVCachePolicy(eviction=StreamingConfig(4, 1020)),
                "StreamingLLM 4+1020, KIVI K4V4": KVCachePolicy(eviction=StreamingConfig(4, 1020), quant=KIVIConfig(4, 4, 64, 128))}
    rows = []
    for context in args.long:
        captured = capture(src, phase="decode", cache_len=context)
        ids = torch.randint(3, 32000, (1, context - 8))
        fp16 = fp16_cache_bytes(1, context, 4, 8, 128)
        for name, policy in policies.items():
            gm = captured.module()
            if policy is not None:
                KVCompressionPass(policy)(gm, None)
            kv = kv_buffer_bytes(gm)
            t = time.perf_counter()
            logits = prefill(gm, ids, model)
            prefill_s = time.perf_counter() - t
            t = time.perf_counter()
            with torch.no_grad():
                for i in range(8):
                    token = logits.argmax(-1, keepdim=True)
                    logits = gm(input_ids=token, cache_position=torch.tensor([ids.shape[1] + i]))[:, -1]
            ms = 1000 * (time.perf_counter() - t) / 8
            rows.append([context, name, f"{kv / 2**20:.1f}", f"{kv / fp16:.3f}", f"{prefill_s:.1f}", f"{ms:.1f}"])
            print(rows[-1], flush=True)
            del gm
    return table(["context", "policy", "KV MiB", "x fp16", "prefill s (eager + compress)", "decode ms/token"], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--context2", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--tf-tokens", type=int, default=512)
    parser.add_argument("--long", type=int, nargs="*", default=[4096, 8192])
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--skip-long", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=[], help="SmolLM2 policy names to run (rows printed, kv.md "
                        "not written)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    src = resolve_source("smollm2")
    if args.only:
        duo = KVCachePolicy()  # placeholder: DuoAttention is not re-run with --only
        print(smollm2_table(src, args, duo))
        if args.context2:
            print(smollm2_long_table(src, args, duo))
        return
    t = time.perf_counter()
    scores = retrieval_head_scores(src.model, src.tokenizer, n_samples=4, context_tokens=512)
    duo = duo_attention_policy(scores, retrieval_fraction=0.25, streaming=KVCachePolicy(eviction=StreamingConfig(4, 60)))
    calibration_s = time.perf_counter() - t
    top = sorted(((s, l, h) for l, row in enumerate(scores.tolist()) for h, s in enumerate(row)), reverse=True)[:6]
    parts = [f"# KV-cache compression\n\n{environment()}\n\nCommand: `python benchmarks/kv.py "
             f"{' '.join(argv if argv is not None else sys.argv[1:])}".rstrip() + f"`\n\n{METHOD}",
             f"DuoAttention calibration ({calibration_s:.0f} s, 4 random-letter pass-key prompts of 512 tokens): "
             f"top KV heads (layer, head, needle mass) "
             + ", ".join(f"({l}, {h}, {s:.2f})" for s, l, h in top) + ".\n",
             f"## SmolLM2-135M-Instruct, {args.context} tokens\n\nTeacher-forced: {args.context - args.tf_tokens} "
             f"tokens prefilled, {args.tf_tokens} decoded.\n\n" + smollm2_table(src, args, duo) + f"\n\n{KVPRESS_NOTE}\n"]
    if args.context2:
        parts.append(f"## SmolLM2-135M-Instruct, pass key at {args.context2} tokens\n\n" + smollm2_long_table(src, args, duo) + "\n")
    if not args.skip_long:
        parts.append("## Random-init Llama (4 layers, hidden 1024, 16 heads / 8 KV heads, head_dim 128)\n\n"
                     "Prefill of context - 8 random tokens through the eager model into the graph's cache, then 8 "
                     "decode steps.\n\n" + long_random_table(args) + "\n")
    write("kv.md", "\n".join(parts))


if __name__ == "__main__":
    main()
