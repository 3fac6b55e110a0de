"""The pass contract: a small object with one job, `__call__(gm, plan) -> PassResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class PassResult:
    """`gm` is the rewritten GraphModule (a new one or the input), `modified` says whether
    anything changed, `notes` are short human-readable facts for the report."""

    gm: Any
    modified: bool
    notes: list[str] = field(default_factory=list)
    plan: Any = None  # a pass may refine the plan (e.g. the arena pass adds offsets)


class Pass:
    """Base class: subclasses set `name` and implement `__call__`."""

    name: str = "pass"

    def __call__(self, gm, plan) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError
