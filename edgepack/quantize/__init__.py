"""Static int8 quantization of the exported graph, inside an accuracy-aware search, behind the cache;
weight-only int4/int8 for decoders."""

from edgepack.quantize.decoder_stage import weight_only_stage
from edgepack.quantize.importance import activation_power
from edgepack.quantize.kv_cache import KV_CACHE_VERSION, kv_ranges, quantize_kv_cache
from edgepack.quantize.settings import QuantSettings
from edgepack.quantize.stage import derived, quantize_stage
from edgepack.quantize.weight_only import (
    KEEP,
    WEIGHT_ONLY_VERSION,
    WeightOnlySettings,
    quantize_weights,
)

__all__ = [
    "KEEP",
    "KV_CACHE_VERSION",
    "WEIGHT_ONLY_VERSION",
    "QuantSettings",
    "WeightOnlySettings",
    "activation_power",
    "derived",
    "kv_ranges",
    "quantize_kv_cache",
    "quantize_stage",
    "quantize_weights",
    "weight_only_stage",
]
