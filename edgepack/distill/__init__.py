"""Distillation: train a shallower student from the teacher (soft labels with temperature, hard
labels, hidden states), or train a pruned model back toward the unpruned one.
"""

from edgepack.distill.causal import (
    CAUSAL_DISTILL_VERSION,
    CausalDistillSettings,
    distill_decoder,
)
from edgepack.distill.causal import (
    RECORD as DECODER_DISTILL_RECORD,
)
from edgepack.distill.data import read_data
from edgepack.distill.layers import LAYER_CHOICES
from edgepack.distill.stage import DISTILL_VERSION, DistillSettings, distill

__all__ = [
    "CAUSAL_DISTILL_VERSION",
    "DECODER_DISTILL_RECORD",
    "DISTILL_VERSION",
    "LAYER_CHOICES",
    "CausalDistillSettings",
    "DistillSettings",
    "distill",
    "distill_decoder",
    "read_data",
]
