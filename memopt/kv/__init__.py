"""KV-cache compression policies: frozen, JSON round-tripping configs, one technique per file.

    KIVIConfig        quantized KV, keys per channel, values per token, residual window (kivi.py)
    StreamingConfig   attention sinks + recent window (streaming.py)
    H2OConfig         heavy-hitter / Scissorhands score-based eviction (h2o.py)
    SnapKVConfig      observation-window selection of prompt tokens (snapkv.py)
    ThinKConfig       query-driven key-channel pruning (think.py)
    KVCachePolicy, PerHeadKVPolicy, PerLayerKVPolicy   composition (policy.py)
    retrieval-head calibration and DuoAttention policies (duo.py), byte budgets (budget.py)

`memopt.passes.kv.KVCompressionPass` applies a policy to a captured decode step; `memopt.serve.generate`
runs it (prefill + decode).
"""

from memopt.kv.token_budget import fit_tokens
from memopt.kv.config import KV_CONFIG_VERSION, kv_config_from_json
from memopt.kv.h2o import H2OConfig
from memopt.kv.kivi import KIVIConfig
from memopt.kv.layout import Layout
from memopt.kv.policy import (
    HeadGroup,
    KVCachePolicy,
    PerHeadKVPolicy,
    PerLayerKVPolicy,
    fp16_cache_bytes,
    parse_kv_spec,
)
from memopt.kv.snapkv import SnapKVConfig
from memopt.kv.streaming import StreamingConfig
from memopt.kv.think import ThinKConfig

__all__ = ["KIVIConfig", "StreamingConfig", "H2OConfig", "SnapKVConfig", "ThinKConfig", "KVCachePolicy",
           "HeadGroup", "PerHeadKVPolicy", "PerLayerKVPolicy", "Layout", "fit_tokens", "fp16_cache_bytes",
           "parse_kv_spec", "kv_config_from_json", "KV_CONFIG_VERSION"]
