"""HFModel -> fp32 OnnxModel with optimum's exporter, validated against PyTorch."""

from edgepack.export.check import validate
from edgepack.export.convert import export_cached, export_onnx, io_signature, labels_of
from edgepack.export.decoder import (
    VALIDATION_VERSION,
    export_decoder_cached,
    torch_greedy,
    validate_generation,
)

__all__ = [
    "VALIDATION_VERSION",
    "export_cached",
    "export_decoder_cached",
    "export_onnx",
    "io_signature",
    "labels_of",
    "torch_greedy",
    "validate",
    "validate_generation",
]
