"""Model families: what differs between kinds of transformer, one module each.

A stage asks ``family_of(model_type)`` instead of testing the model type itself. Encoders (embedders,
classifiers, taggers) and generative decoders; ``is_generative`` tells the build which path a
model takes.
"""

from __future__ import annotations

from types import ModuleType

from edgepack.errors import UserError
from edgepack.families import decoder, encoder

FAMILIES: tuple[ModuleType, ...] = (encoder, decoder)
SUPPORTED_MODEL_TYPES = tuple(t for family in FAMILIES for t in family.MODEL_TYPES)


def family_of(model_type: str, where: str = "") -> ModuleType:
    """The family module serving ``model_type``; one clear line naming the supported ones if none."""
    for family in FAMILIES:
        if model_type in family.MODEL_TYPES:
            return family
    raise UserError(
        f"unsupported architecture {model_type or '(none)'!r}{' in ' + where if where else ''}. "
        f"Supported model types are: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )


def is_generative(model_type: str) -> bool:
    """Decoders export with their KV cache, quantize weight-only and are judged by generation."""
    return bool(getattr(family_of(model_type), "GENERATIVE", False))


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "decoder", "encoder", "family_of", "is_generative"]
