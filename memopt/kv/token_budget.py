"""Budgets in bytes: the largest token budget whose true cache bytes fit.

A token budget is what eviction policies take; a memory budget is what a deployment has. `fit_tokens`
binary-searches the token count of a policy family (a function tokens -> policy) against
`cache_bytes`, so a budget can be given per model (`layers` = all of them), per layer (`layers=1`) or
per head (`kv_heads=1`) and the answer counts every byte the policy stores.

    fit_tokens(lambda t: KVCachePolicy(eviction=StreamingConfig(4, t - 4), quant=KIVIConfig(4, 4)),
               budget_bytes=8 << 20, batch=1, context=4096, layers=30, kv_heads=3, head_dim=64)
"""

from __future__ import annotations

from typing import Callable

from memopt.kv.config import check_int


def fit_tokens(make: Callable[[int], object], budget_bytes: int, *, batch: int, context: int, layers: int,
               kv_heads: int, head_dim: int, min_tokens: int = 1) -> tuple[int, object]:
    """(tokens, policy): the largest `tokens` in [min_tokens, context] with
    `make(tokens).cache_bytes(batch, context, layers, kv_heads, head_dim) <= budget_bytes`."""
    check_int("fit_tokens", "budget_bytes", budget_bytes, minimum=1)
    check_int("fit_tokens", "min_tokens", min_tokens, minimum=1)
    if min_tokens > context:
        raise ValueError(f"min_tokens {min_tokens} > context {context}")

    def cost(tokens: int) -> int:
        return make(tokens).cache_bytes(batch, context, layers, kv_heads, head_dim)

    smallest = cost(min_tokens)
    if smallest > budget_bytes:
        raise ValueError(f"budget {budget_bytes} bytes is below this policy's minimum of {smallest} bytes "
                         f"({min_tokens} tokens, batch {batch}, {layers} layers x {kv_heads} KV heads x "
                         f"head_dim {head_dim}); raise the budget or pick a smaller policy")
    lo, hi = min_tokens, context
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo, make(lo)
