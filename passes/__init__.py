"""Rewrite passes, listed explicitly. Installed as `memopt.passes`."""

from memopt.passes.base import Pass, PassResult

__all__ = ["Pass", "PassResult"]
