"""Plan every intermediate of a model into one preallocated arena, and check nothing changed.

    python examples/arena_mlp.py
"""

import torch
from torch import nn

import memopt


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 1024), nn.GELU(), nn.Linear(1024, 10))

    def forward(self, x):
        return self.net(x)


torch.manual_seed(0)
model, x = MLP().eval(), torch.randn(32, 256)

# capture with torch.export, plan the arena with the ILP (CBC), rewrite ops to write into it
opt = memopt.compile(model, (x,), target="cpu", passes=["arena"])

arena = opt.plan.arena
print(f"arena: {arena.size_bytes} bytes for {len(arena.offsets)} intermediates")
print(f"live-set lower bound: {arena.lower_bound_bytes} bytes; greedy best-fit: {arena.greedy_size_bytes} bytes")
print(f"solver: {arena.solver.name}, {arena.solver.status}, gap {arena.solver.gap:.2%}")
for name, offset in sorted(arena.offsets.items(), key=lambda kv: kv[1]):
    print(f"  {name:<12} at byte {offset:>8}  ({arena.sizes[name]} bytes)")

with torch.no_grad():
    torch.testing.assert_close(opt(x), model(x))
print("outputs match the original model")
