"""memopt: a compiler for memory. Give it a PyTorch model and a target GPU; get a module that fits.

The top-level names are imported lazily so that `memopt.solvers` and `memopt.planning.plan` stay
importable without torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "resolve_source": ("memopt.frontend.sources", "resolve_source"),
    "capture": ("memopt.capture", "capture"),
    "analyze": ("memopt.analysis.accounting", "analyze"),
    "get_target": ("memopt.frontend.targets", "get_target"),
    "inspect_model": ("memopt.analysis.inspect", "inspect_model"),
    "Plan": ("memopt.planning.plan", "Plan"),
    "compile": ("memopt.pipeline", "compile"),
    "compile_model": ("memopt.pipeline", "compile_model"),
    "OptimizedModule": ("memopt.emit.module", "OptimizedModule"),
    "CompileConfig": ("memopt.config", "CompileConfig"),
    "save": ("memopt.emit.artifact", "save"),
    "load": ("memopt.emit.artifact", "load"),
    "verify": ("memopt.emit.artifact", "verify"),
    "ArtifactError": ("memopt.emit.artifact", "ArtifactError"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'memopt' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["__version__"]
