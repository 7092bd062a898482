"""Static int8 quantization of the exported graph, inside an accuracy-aware search, behind the cache."""

from edgepack.quantize.settings import QuantSettings
from edgepack.quantize.stage import quantize_stage

__all__ = ["QuantSettings", "quantize_stage"]
