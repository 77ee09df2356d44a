"""Normalization layers for micro-batch training, in pure PyTorch (no detectron2 import).

- ``CrossIterationBatchNorm2d`` + ``CBNConv2d``: Cross-Iteration BN.
- ``MovingAverageBatchNorm2d`` + ``CenteredConv2d``: Moving Average BN with weight centralization.
- ``BatchChannelNorm2d`` + ``WSConv2d``: Batch-Channel Norm with Weight Standardization.
- ``fold_conv_norm``: eval-time folding of a conv and its norm into one plain conv.
- ``NormStateDriver``: sets every layer's iteration and update rate before each training step.
"""
from .bcn import BatchChannelNorm2d, GroupNormPerGroupAffine, group_norm_per_group_affine
from .cbn import CBNConv2d, CrossIterationBatchNorm2d
from .conv import NormActConv2d
from .fold import eval_scale_shift, fold_conv_norm, is_foldable
from .mabn import CenteredConv2d, MovingAverageBatchNorm2d
from .state import NormStateDriver
from .ws import WSConv2d, standardize_weight

__all__ = [
    "BatchChannelNorm2d", "CBNConv2d", "CenteredConv2d", "CrossIterationBatchNorm2d", "GroupNormPerGroupAffine",
    "MovingAverageBatchNorm2d", "NormActConv2d", "NormStateDriver", "WSConv2d", "eval_scale_shift", "fold_conv_norm",
    "group_norm_per_group_affine", "is_foldable", "standardize_weight",
]
