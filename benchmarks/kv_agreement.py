"""Top-1 agreement and cache bytes of KV policies on SmolLM2, through the rewritten decode graph.

    python benchmarks/kv_agreement.py kivi:k4v4:g32:r128:s4:pre kivi:k2v2:g16:r128:s4:pre:had

The sample of `tests/test_kv.py`: 1024 tokens of held-out text, 512 prefilled by the eager model into the
compressed cache, 512 teacher-forced through the decode step; agreement of the next-token argmax with the
full-cache model over the 513 predicted positions. Bytes: the graph's KV buffers (checked equal to the
policy's accounting) against an fp16 cache. About a minute per spec on one thread. Prints one line per spec
and writes the table to benchmarks/results/kv_agreement.md (without specs: the two above).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from memopt.capture import capture  # noqa: E402
from memopt.eval.evaluate import heldout_text  # noqa: E402
from memopt.serve.generate import teacher_forced_logits  # noqa: E402
from memopt.kv import fp16_cache_bytes, parse_kv_spec  # noqa: E402
from memopt.passes.kv import KVCompressionPass, kv_buffer_bytes  # noqa: E402
from memopt.frontend.sources import resolve_source  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, table, write  # noqa: E402

DEFAULT_SPECS = ["kivi:k4v4:g32:r128:s4:pre", "kivi:k2v2:g16:r128:s4:pre:had"]


def main(specs: list[str]) -> None:
    specs = specs or DEFAULT_SPECS
    torch.set_num_threads(1)
    rows = []
    src = resolve_source("smollm2")
    ids = src.tokenizer(heldout_text(n_chars=8000), return_tensors="pt").input_ids[:, :1024]
    with torch.no_grad():
        want = src.model(ids).logits[:, 511:].argmax(-1)
    captured = capture(src, phase="decode", cache_len=1024)
    shape = dict(batch=1, context=1024, layers=30, kv_heads=3, head_dim=64)
    for spec in specs:
        t0 = time.time()
        policy = parse_kv_spec(spec)
        gm = captured.module()
        KVCompressionPass(policy)(gm, None)
        got = teacher_forced_logits(gm, ids, 512, model=src.model).argmax(-1)
        same = int((got == want).sum())
        nbytes = kv_buffer_bytes(gm)
        assert nbytes == policy.cache_bytes(**shape)
        print(f"{spec:36s} top-1 {same / got.numel():.4f} ({same}/{got.numel()})  "
              f"x fp16 {nbytes / fp16_cache_bytes(**shape):.4f}  {time.time() - t0:.0f} s", flush=True)
        rows.append([f"`{spec}`", f"{same / got.numel():.4f} ({same}/{got.numel()})",
                     f"{nbytes / fp16_cache_bytes(**shape):.4f}", f"{time.time() - t0:.0f}"])
    write("kv_agreement.md", f"""# KV policies on SmolLM2: top-1 agreement with the full cache

{environment()}

Command: `python benchmarks/kv_agreement.py {' '.join(specs)}`

1024 tokens of held-out text: 512 prefilled by the eager model into the compressed cache, 512 teacher-forced
through the rewritten decode step; agreement of the next-token argmax with the full-cache model over the
513 predicted positions. Bytes: the graph's KV buffers against an fp16 cache of the same context.

{table(["policy", "top-1 agreement", "cache x fp16", "seconds"], rows)}
""")


if __name__ == "__main__":
    main(sys.argv[1:])
