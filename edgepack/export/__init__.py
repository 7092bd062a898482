"""HFModel -> fp32 OnnxModel with optimum's exporter, validated against PyTorch."""

from edgepack.export.check import validate
from edgepack.export.convert import export_cached, export_onnx, io_signature, labels_of

__all__ = ["export_cached", "export_onnx", "io_signature", "labels_of", "validate"]
