"""HFModel -> fp32 OnnxModel with optimum's exporter, validated against PyTorch."""

from edgepack.export.convert import export_cached, export_onnx, io_signature, labels_of
from edgepack.export.validate import validate

__all__ = ["export_cached", "export_onnx", "io_signature", "labels_of", "validate"]
