"""Compile the real all-MiniLM-L6-v2 to fit a budget, save it, load it back, and compare embeddings.

    python examples/compile_minilm.py
"""

import tempfile

import torch

import memopt
from memopt.pipeline import compile_model

# one call: capture, plan formats for the budget (ILP), quantize, plan the arena, emit
sentences = ["memopt makes models fit", "a compiler for memory", "the cat sat on the mat"]
result = compile_model("minilm", target="rtx-4090", budget="40MiB", batch=len(sentences), seq=32)
opt = result.module
print(f"weights {result.plan.predictions['weights_bytes_before'] / 2**20:.1f} MiB -> "
      f"{result.plan.predictions['weights_bytes'] / 2**20:.1f} MiB; arena {opt.plan.arena.size_bytes / 2**20:.2f} MiB")
for note in result.notes:
    print(" ", note)

enc = result.source.tokenizer(sentences, padding="max_length", max_length=32, return_tensors="pt")
args = (enc["input_ids"], enc["attention_mask"])
reference = result.source.traceable()(*args).float()

with tempfile.TemporaryDirectory() as tmp:
    memopt.save(opt, f"{tmp}/minilm", report=result)  # report.html + memory.png beside the program
    loaded = memopt.load(f"{tmp}/minilm")  # checksums verified; no model code needed
    emb = loaded(*args).float()

cos = torch.nn.functional.cosine_similarity(emb, reference)
print("cosine similarity to the original, per sentence:", [round(c, 4) for c in cos.tolist()])
