"""What the user names as a model (package, folder, hub id) -> a checked ``HFModel`` record."""

from edgepack.load.gguf import RECORD as GGUF_RECORD
from edgepack.load.gguf_blocks import BLOCK, BLOCKS, Blocks, SourceBlocks
from edgepack.load.gguf_blocks import found as has_gguf_blocks
from edgepack.load.model import display_name, load_model

__all__ = [
    "BLOCK",
    "BLOCKS",
    "GGUF_RECORD",
    "Blocks",
    "SourceBlocks",
    "display_name",
    "has_gguf_blocks",
    "load_model",
]
