"""Static int8 quantization of the exported graph, inside an accuracy-aware search, behind the cache;
weight-only int4/int8 for decoders."""

from edgepack.quantize.importance import activation_power
from edgepack.quantize.settings import QuantSettings
from edgepack.quantize.stage import derived, quantize_stage
from edgepack.quantize.weight_only import WEIGHT_ONLY_VERSION, WeightOnlySettings, quantize_weights

__all__ = [
    "WEIGHT_ONLY_VERSION",
    "QuantSettings",
    "WeightOnlySettings",
    "activation_power",
    "derived",
    "quantize_stage",
    "quantize_weights",
]
