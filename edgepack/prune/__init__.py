"""Structured pruning: whole heads, FFN neurons and layers, chosen on calibration texts.

Other stages use only the names below; the modules inside are this stage's own business.
"""

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
    "IMPORTANCE",
    "PRUNE_VERSION",
    "RECORD",
    "PruneSettings",
    "check_settings",
    "export_pruned",
    "is_pruned",
    "load_pruned",
    "prune_model",
]
