"""edgepack: a Hugging Face transformer in, a verified int8 bundle per edge target out."""

__version__ = "0.1.0"
