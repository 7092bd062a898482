"""HFModel -> fp32 OnnxModel with optimum's exporter, validated against PyTorch."""

from edgepack.export.check import validate
from edgepack.export.convert import export_cached, export_onnx, io_signature, labels_of
from edgepack.export.decoder import (
    VALIDATION_VERSION,
    export_decoder_cached,
    torch_logits,
    validate_generation,
)

__all__ = [
    "VALIDATION_VERSION",
    "export_cached",
    "export_decoder_cached",
    "export_onnx",
    "io_signature",
    "labels_of",
    "torch_logits",
    "validate",
    "validate_generation",
]
