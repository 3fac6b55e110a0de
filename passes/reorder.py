"""Apply an operator order from `memopt.solvers.schedule` to an FX graph, safely.

The solver orders ops by the storages they read and write; FX also has edges the MemGraph does not
carry (e.g. symbolic ints). We therefore rebuild the order with Kahn's algorithm over the FX edges,
always taking the ready node that comes first in the solver's order: the result is the solver's
order whenever that is valid, and the closest valid order otherwise.
"""

from __future__ import annotations

import heapq

import torch.fx as fx


def reorder_graph(gm: fx.GraphModule, op_order: list[str]) -> list[str]:
    """Move `gm`'s call_function nodes into `op_order` (names) as far as FX dependencies allow.
    Returns the order actually applied."""
    graph = gm.graph
    ops = [n for n in graph.nodes if n.op == "call_function"]
    rank = {name: k for k, name in enumerate(op_order)}
    fallback = len(rank)
    pending = {n: sum(1 for a in n.all_input_nodes if a.op == "call_function") for n in ops}
    ready = [(rank.get(n.name, fallback), i, n) for i, n in enumerate(ops) if pending[n] == 0]
    heapq.heapify(ready)
    index = {n: i for i, n in enumerate(ops)}
    applied = []
    while ready:
        _, _, node = heapq.heappop(ready)
        applied.append(node)
        for user in node.users:
            if user in pending:
                pending[user] -= 1
                if pending[user] == 0:
                    heapq.heappush(ready, (rank.get(user.name, fallback), index[user], user))
    if len(applied) != len(ops):
        raise ValueError("graph has a cycle; cannot reorder")
    anchor = graph.output_node()
    for node in applied:
        anchor.prepend(node)
    graph.lint()
    gm.recompile()
    return [n.name for n in applied]
