"""Parsing and printing of byte counts, bandwidths and FLOP rates."""

from __future__ import annotations

import math
import re

MAX_BYTES = 2**60  # 1 EiB: no device, host or budget comes near it; larger is a typo
MAX_RATE = 1e21  # 1 zetta-(byte or FLOP)/s: far above any device
_BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}
_RATE_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_NUM = r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*"


def parse_bytes(text: str | int, *, what: str = "size") -> int:
    """'24GiB' -> 25769803776, '1.5GB' -> 1500000000, 1024 -> 1024."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(_NUM + r"([a-zA-Z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _BYTE_UNITS:
            raise ValueError(f"{what} {text!r} is not a byte count; write e.g. 24GiB, 1.5GB, 512MiB or 1000000")
        value = float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()]
    if not 0 <= value <= MAX_BYTES:  # also refuses inf and nan
        raise ValueError(f"{what} {text!r} is out of range: a byte count is between 0 and 2**60 (1 EiB); "
                         "write e.g. 24GiB")
    return text if isinstance(text, int) else int(value)


def parse_rate(text: str | float, *, what: str = "rate", unit: str = "B/s") -> float:
    """'1TB/s' -> 1e12, '3.35T' -> 3.35e12, '989TFLOPS' -> 9.89e14."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = re.sub(r"(?i)(b/s|bps|flop/s|flops|/s)$", "", str(text).strip())
        m = re.fullmatch(_NUM + r"([kKmMgGtTpP]?)\s*", s)
        if not m:
            raise ValueError(f"{what} {text!r} is not a rate; write e.g. 1TB/s, 900GB/s or 3.35e12 ({unit})")
        value = float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
    if not (math.isfinite(value) and 0 <= value <= MAX_RATE):
        raise ValueError(f"{what} {text!r} is out of range: a rate is between 0 and 1e21 {unit}; "
                         f"write e.g. 1TB/s or 3.35e12")
    return value


def fmt_bytes(n: float) -> str:
    """Human-readable binary units: 1536 -> '1.50 KiB'."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.2f} {unit}"
        n /= 1024
    return f"{sign}{n:.2f} TiB"


def fmt_rate(x: float, unit: str = "B/s") -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"
