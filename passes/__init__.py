"""Rewrite passes, listed explicitly. Installed as `memopt.passes`.

    ArenaPass      every intermediate in one preallocated buffer (passes/arena.py)
    QuantizePass   int8 / int4 weight-only quantization with real kernels (passes/quantize.py)
    LosslessPass   DFloat11-style entropy-coded bf16 weights (passes/lossless.py)
    OffloadPass    whole blocks' weights on host memory, prefetched one block ahead (passes/offload.py)
    KVOffloadPass  layers' KV caches on host memory, prefetched one layer ahead, new rows written back
                   (passes/kv_offload.py); both stream through passes/host_stream.py
    KVCompressionPass  compressed KV caches in the decode graph: KIVI, StreamingLLM, H2O, SnapKV,
                   per-head (DuoAttention) and ThinK policies (passes/kv.py, memopt/kv/)
"""

from memopt.passes.arena import ArenaConfig, ArenaPass
from memopt.passes.base import Pass, PassResult
from memopt.passes.kv import KVCompressionPass
from memopt.passes.kv_offload import KVOffloadConfig, KVOffloadPass
from memopt.passes.lossless import LosslessPass
from memopt.passes.offload import OffloadConfig, OffloadPass
from memopt.passes.quant_config import Int4WeightConfig, Int8WeightConfig, LosslessConfig, parse_quantize_spec
from memopt.passes.quantize import QuantizePass

__all__ = ["Pass", "PassResult", "ArenaConfig", "ArenaPass", "QuantizePass", "LosslessPass", "Int8WeightConfig",
           "Int4WeightConfig", "LosslessConfig", "parse_quantize_spec", "OffloadConfig", "OffloadPass",
           "KVCompressionPass", "KVOffloadConfig", "KVOffloadPass"]
