"""Does a compressed KV cache lower the *measured* memory of decoding, not only the accounted bytes?

    python benchmarks/kv_peak.py        # writes benchmarks/results/kv_peak.md

A random-init Llama (4 layers, hidden 1024, 16 query / 8 KV heads, head_dim 128) captured for a 4096-token
cache; each policy's decode graph (`KVCompressionPass`) is prefilled with 4088 random tokens by the eager
model, then decodes 8 tokens. Per row:
- accounted: `policy.cache_bytes(...)`, what the planner prices;
- resident: the distinct storages of the graph's KV buffers after the pass (the full cache is gone, not
  masked);
- decode transient: the peak of the allocator's records over the 8 decode steps beyond what existed before
  (`memopt.eval.measure.cpu_peak_bytes`: dequantized blocks, attention scores, logits);
- measured peak = resident + transient: the memory decoding holds at its worst moment, KV-wise.
CPU only (no GPU lent): on CUDA the same quantities come from `torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from common import environment, table, write  # noqa: E402

from memopt.capture import capture  # noqa: E402
from memopt.serve.generate import prefill  # noqa: E402
from memopt.kv import KIVIConfig, KVCachePolicy, StreamingConfig, fp16_cache_bytes  # noqa: E402
from memopt.kv.policy import HeadGroup, PerHeadKVPolicy  # noqa: E402
from memopt.eval.measure import cpu_peak_bytes  # noqa: E402
from memopt.passes.kv import KVCompressionPass, kv_buffer_bytes  # noqa: E402
from memopt.frontend.sources import ModelSource  # noqa: E402

CONTEXT, LAYERS, KV_HEADS, HEAD_DIM, STEPS = 4096, 4, 8, 128, 8
MIB = 2**20


def policies() -> dict:
    streaming = KVCachePolicy(eviction=StreamingConfig(4, 252))
    half = PerHeadKVPolicy((HeadGroup((0, 1, 2, 3), KVCachePolicy()), HeadGroup((4, 5, 6, 7), streaming)))
    kivi2 = KVCachePolicy(quant=KIVIConfig(2, 2, 64, 128, sinks=4, pre_rope=True, hadamard=True))
    quarter_q = PerHeadKVPolicy((HeadGroup((0, 1), KVCachePolicy(quant=KIVIConfig(4, 4, 64, 128, pre_rope=True))),
                                 HeadGroup((2, 3, 4, 5, 6, 7), streaming)))
    return {"fp16 (full cache)": KVCachePolicy(),
            "per-head: 4 heads full, 4 heads sinks 4 + window 252": half,
            "per-head: 2 heads KIVI-4 pre-RoPE, 6 heads 4 + 252": quarter_q,
            "StreamingLLM 4 + 1020": KVCachePolicy(eviction=StreamingConfig(4, 1020)),
            "KIVI K2V2 g64 r128 +4 sinks, pre-RoPE + Hadamard": kivi2}


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=LAYERS,
                      num_attention_heads=16, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      max_position_embeddings=16384)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    captured = capture(ModelSource("llama-4x1024-random", model, "causal_lm", cfg), phase="decode", cache_len=CONTEXT)
    ids = torch.randint(3, 32000, (1, CONTEXT - STEPS))
    fp16 = fp16_cache_bytes(1, CONTEXT, LAYERS, KV_HEADS, HEAD_DIM)
    rows, base = [], None
    for name, policy in policies().items():
        gm = captured.module()
        KVCompressionPass(policy)(gm, None)
        accounted = policy.cache_bytes(1, CONTEXT, LAYERS, KV_HEADS, HEAD_DIM)
        buffers = [getattr(gm, n) for n in _kv_names(gm)]
        storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in buffers}
        resident = sum(storages.values())
        assert resident == kv_buffer_bytes(gm) == accounted, (name, resident, kv_buffer_bytes(gm), accounted)
        logits = prefill(gm, ids, model)

        def decode(logits=logits):
            for i in range(STEPS):
                token = logits.argmax(-1, keepdim=True)
                logits = gm(input_ids=token, cache_position=torch.tensor([ids.shape[1] + i]))[:, -1]
            return logits

        transient = cpu_peak_bytes(decode)
        peak = resident + transient
        base = base or peak
        rows.append([name, f"{accounted / MIB:.1f}", f"{accounted / fp16:.3f}", f"{resident / MIB:.1f}",
                     f"{transient / MIB:.1f}", f"{peak / MIB:.1f}", f"{peak / base:.3f}"])
        print(rows[-1], flush=True)
        del gm
    text = f"""# KV cache: measured decode memory

{environment()}

Command: `python benchmarks/kv_peak.py`

{__doc__.split(chr(10), 3)[3].strip()}

{table(["policy", "accounted MiB", "x fp16", "resident MiB", "decode transient MiB", "measured peak MiB",
        "peak x fp16 row"], rows)}
"""
    write("kv_peak.md", text)


def _kv_names(gm) -> list[str]:
    meta = gm.meta.get("memopt_kv", {})
    return [b for layer in meta.get("layers", {}).values() for b in layer["buffers"]]


if __name__ == "__main__":
    main()
