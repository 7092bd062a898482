"""Structured pruning: whole heads, FFN neurons and layers, chosen on calibration texts.

Other stages use only the names below; the modules inside are this stage's own business.
"""

from edgepack.prune.decoder import (
    DECODER_PRUNE_VERSION,
    DecoderPruneSettings,
    check_decoder_prune,
    prune_decoder,
)
from edgepack.prune.decoder import (
    RECORD as DECODER_RECORD,
)
from edgepack.prune.saved import RECORD, export_pruned, is_pruned, load_pruned
from edgepack.prune.settings import (
    ALLOCATION,
    IMPORTANCE,
    PRUNE_VERSION,
    PruneSettings,
    check_settings,
)
from edgepack.prune.stage import prune_model

__all__ = [
    "ALLOCATION",
    "DECODER_PRUNE_VERSION",
    "DECODER_RECORD",
    "IMPORTANCE",
    "PRUNE_VERSION",
    "RECORD",
    "DecoderPruneSettings",
    "PruneSettings",
    "check_decoder_prune",
    "check_settings",
    "export_pruned",
    "is_pruned",
    "load_pruned",
    "prune_decoder",
    "prune_model",
]
