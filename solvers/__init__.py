"""ILP formulations and their greedy baselines. Installed as `memopt.solvers`. Never imports torch."""

from memopt.solvers.memgraph import MemGraph, MemOp, MemTensor

__all__ = ["MemGraph", "MemOp", "MemTensor"]
