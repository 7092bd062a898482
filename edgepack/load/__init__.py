"""What the user names as a model (package, folder, hub id) -> a checked ``HFModel`` record."""

from edgepack.load.model import display_name, load_model

__all__ = ["display_name", "load_model"]
