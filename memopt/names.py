"""The names memopt gives things in a graph, in one place: host and staging buffers of the offload passes,
KV-cache state, and how a block (a decoder layer) and its index are read from a module path. Torch-free."""

from __future__ import annotations

import re

OFFLOAD_PREFIX = "_memopt_offload"
HOST_PREFIX = OFFLOAD_PREFIX + "_host_"  # `_memopt_offload_host_<block>`: a block's weights in host memory
KV_HOST_PREFIX = HOST_PREFIX + "kv"  # `_memopt_offload_host_kv<i>`: layer i's KV cache in host memory
SLOT_PREFIX = OFFLOAD_PREFIX + "_slot"  # `_memopt_offload_slot<i>`: a device staging slot
KV_SLOT_PREFIX = OFFLOAD_PREFIX + "_kv_cache_slot"  # `_memopt_offload_kv_cache_slot<i>`: a KV staging slot
ARENA_PREFIX = "_memopt_arena"

KV_NAME = re.compile(r"(key|value)_cache|past_key|past_value|kv_cache")  # any tensor of a KV cache
BLOCK_NAME = re.compile(r"^(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)(?:\.|$)")  # the block a path is in
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")  # its index
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks?)\.(\d+)$")  # a plan row that names a whole layer


def is_kv(name: str) -> bool:
    """`name` is a KV-cache tensor (or its state): key/value caches, compressed stores, host copies."""
    return bool(KV_NAME.search(name))


def is_state(name: str) -> bool:
    """`name` is state a program writes while it runs, never a weight: KV caches and their fill counters
    (`cumulative_length_<i>`), host KV copies and offload staging slots."""
    return is_kv(name) or name.startswith(("cumulative_length", SLOT_PREFIX, KV_HOST_PREFIX))


def is_offload(name: str) -> bool:
    """`name` is a buffer of the offload passes (host copies and device staging slots)."""
    return OFFLOAD_PREFIX in name
