"""Distillation loss terms; importing this package registers them all in `LOSSES`."""

from kd.losses import composite, embeddings, features, logits
from kd.losses.base import LOSSES, DistillBatch, LossContext, feature_paths
from kd.losses.composite import CompositeLoss, build_composite
from kd.losses.logits import kd_loss

__all__ = [
    "LOSSES",
    "CompositeLoss",
    "DistillBatch",
    "LossContext",
    "build_composite",
    "composite",
    "embeddings",
    "feature_paths",
    "features",
    "kd_loss",
    "logits",
]
