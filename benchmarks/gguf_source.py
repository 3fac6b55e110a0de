"""GGUF: planning from the header vs loading the model, and the quality harness on SmolLM2 (fp32).

    python benchmarks/gguf_source.py        # writes benchmarks/results/gguf_source.md

SmolLM2's weights in this file were quantized to Q4_1 before we see them: a real trained decoder for
perplexity, pass-key retrieval and planning, but a biased model for judging weight quantization.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import environment, table, write  # noqa: E402

from memopt.eval.evaluate import heldout_text, passkey_accuracy, perplexity  # noqa: E402
from memopt.frontend.gguf import kv_cache_bytes, load_gguf_model, read_gguf_header, smollm2_path  # noqa: E402
from memopt.analysis.inspect import inspect_model  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    path = smollm2_path()
    read_gguf_header(path)  # warm the page cache so both columns read from memory
    info, header_s = timed(lambda: read_gguf_header(path))
    report, inspect_s = timed(lambda: inspect_model(str(path), target="rtx-4090", seq=2048))
    (model, tokenizer), load_s = timed(lambda: load_gguf_model(path))
    timing = [
        ["read the GGUF header (memopt.frontend.gguf.read_gguf_header)", f"{header_s * 1000:.1f} ms",
         f"weights {info.weights_bytes} B; KV at 2k = {kv_cache_bytes(info, 1, 2048)} B"],
        ["full memopt inspect from the header (meta-device capture, prefill + decode, arena plan)",
         f"{inspect_s:.2f} s", f"fits rtx-4090: {report.to_json()['fits']}"],
        ["load the full model through transformers (dequantized to fp32) + tokenizer", f"{load_s:.2f} s",
         f"{sum(p.numel() for p in model.parameters())} parameters"],
    ]
    rows = []
    for tokens in (1000, 2000):
        text = heldout_text(n_chars=8 * tokens)
        ppl, ppl_s = timed(lambda: perplexity(model, tokenizer, text, max_tokens=tokens))
        acc, acc_s = timed(lambda: passkey_accuracy(model, tokenizer, tokens, n_samples=5, seed=0))
        rows.append(["smollm2 (fp32, full cache)", tokens, f"{ppl:.2f}", f"{acc:.0%} (5 seeded samples)",
                     f"{ppl_s + acc_s:.0f} s"])
        print(rows[-1], flush=True)
    text = (f"# GGUF source and the quality harness\n\n{environment()}\n\nCommand: `python benchmarks/gguf_source.py`\n\n"
            f"## Planning from the header vs loading ({path.name}, {path.stat().st_size / 2**20:.1f} MiB)\n\n"
            + table(["step", "time", "result"], timing)
            + "\n\n## Quality harness (memopt.eval.evaluate) on SmolLM2-135M-Instruct\n\n"
            + table(["model", "context tokens", "perplexity (held-out pydoc text)", "pass-key accuracy", "time"], rows)
            + "\n\n" + (__doc__ or "").split("\n\n")[2].strip() + "\n")
    write("gguf_source.md", text)


if __name__ == "__main__":
    main()
