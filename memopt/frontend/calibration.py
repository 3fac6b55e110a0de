"""Calibration inputs from text: what GPTQ and the outlier choice see instead of random token ids.

GPTQ minimizes each layer's output error under the Hessian E[x^T x] of its inputs, so the inputs must
look like what the model will be run on, and there must be enough of them: a layer with K input
channels needs well over K token rows, or the Hessian is rank-deficient and GPTQ fits the
calibration tokens instead of the model (all-MiniLM-L6-v2, int4 g64 GPTQ + 2.5% outliers: 32
sentences / 395 tokens give mean cosine 0.988 on unseen sentences; the bundled 146 lines / 2.8k
tokens give 0.992; see benchmarks/results/quantize.md).

`default_texts()` is a bundled English text (memopt/data/calibration.txt: short sentences on varied
topics, questions, a few code lines and other languages, some paragraphs), one sample per line.
`text_calibration` turns texts into args tuples for an exported program:
- encoders take `(input_ids, attention_mask)`: lines are batched as the program's batch and padded to
  its sequence length (or, for a program with a dynamic sequence, to the longest line of the batch);
  `masks` marks the real tokens, so padding rows are left out of the statistics;
- decoders take `(input_ids,)`: the lines are joined into one token stream and cut into windows of
  the program's sequence length (wrapping around when the text is shorter than one batch).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

DEFAULT_WINDOW = 128  # decoder window when the program's sequence length is dynamic
MAX_INPUTS = 256  # forward runs at most, whatever the text's length


class CalibrationSet(list):
    """A list of args tuples for a program, with `masks`: for each, a bool `[batch, seq]` of the token
    positions whose activation rows count (None: all of them)."""

    def __init__(self, inputs: Sequence[tuple] = (), masks: Sequence[Tensor | None] | None = None):
        super().__init__(inputs)
        self.masks = list(masks) if masks is not None else [None] * len(self)
        if len(self.masks) != len(self):
            raise ValueError(f"CalibrationSet: {len(self)} inputs but {len(self.masks)} masks")


def default_texts() -> list[str]:
    """The bundled calibration text, one sample per non-blank line."""
    return _lines(resources.files("memopt").joinpath("data/calibration.txt").read_text(encoding="utf-8"))


def read_texts(path: str | Path) -> list[str]:
    """A user's calibration text file: one sample per non-blank line (UTF-8)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"calibration file {str(path)!r} does not exist; give a UTF-8 text file with one "
                         "sample per line")
    try:
        lines = _lines(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"calibration file {str(path)!r} is not UTF-8 text ({e.reason}); give a UTF-8 text "
                         "file with one sample per line") from e
    if not lines:
        raise ValueError(f"calibration file {str(path)!r} has no non-blank lines; give one sample per line")
    return lines


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def text_calibration(tokenizer, texts: Sequence[str], *, family: str, batch: int = 1, seq: int | None = None,
                     device: torch.device | str = "cpu") -> CalibrationSet:
    """Args tuples for a program of `family` ("encoder" or "causal_lm") taking `batch` rows of `seq`
    tokens (`seq=None`: the program's sequence length is dynamic)."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("text_calibration needs at least one non-blank text")
    if batch < 1 or (seq is not None and seq < 1):
        raise ValueError(f"text_calibration: batch and seq must be >= 1, got batch={batch}, seq={seq}")
    if family == "encoder":
        return _encoder_inputs(tokenizer, texts, batch, seq, device)
    if family == "causal_lm":
        return _decoder_inputs(tokenizer, texts, batch, seq or DEFAULT_WINDOW, device)
    raise ValueError(f"text calibration covers encoders and decoder LMs, not family {family!r}; pass "
                     "calibration inputs (args tuples) instead")


def _encoder_inputs(tokenizer, texts, batch, seq, device) -> CalibrationSet:
    out = CalibrationSet()
    for i in range(0, min(len(texts), MAX_INPUTS * batch), batch):
        group = list(texts[i:i + batch])
        group += texts[: batch - len(group)] if len(group) < batch else []  # a full last batch
        group += [group[0]] * (batch - len(group))
        enc = tokenizer(group, return_tensors="pt", truncation=True,
                        padding="max_length" if seq else True, max_length=seq)
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out.append((ids, mask))
        out.masks.append(mask.bool())
    return out


def _decoder_inputs(tokenizer, texts, batch, seq, device) -> CalibrationSet:
    stream = tokenizer("\n".join(texts), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if stream.numel() == 0:
        raise ValueError("the calibration text tokenizes to nothing; give non-empty text")
    per_call = batch * seq
    calls = max(1, min(stream.numel() // per_call, MAX_INPUTS))
    need = calls * per_call
    reps = -(-need // stream.numel())
    ids = stream.repeat(reps)[:need].reshape(calls, batch, seq).to(device)
    out = CalibrationSet()
    for window in ids:
        out.append((window,))
        out.masks.append(None)
    return out


__all__ = ["CalibrationSet", "default_texts", "read_texts", "text_calibration"]
