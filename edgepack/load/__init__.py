"""What the user names as a model (package, folder, hub id) -> a checked ``HFModel`` record."""

from edgepack.load.gguf import RECORD as GGUF_RECORD
from edgepack.load.model import display_name, load_model

__all__ = ["GGUF_RECORD", "display_name", "load_model"]
