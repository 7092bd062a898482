"""Distillation: train a shallower student from the teacher (soft labels with temperature, hard
labels, hidden states), or train a pruned model back toward the unpruned one.
"""

from edgepack.distill.data import read_data
from edgepack.distill.layers import LAYER_CHOICES
from edgepack.distill.stage import DISTILL_VERSION, DistillSettings, distill

__all__ = ["DISTILL_VERSION", "LAYER_CHOICES", "DistillSettings", "distill", "read_data"]
