"""Deployment: fold an eval-mode detector's foldable norms and weight transforms into plain convs."""
import copy

from torch import nn

from ..layers import CenteredConv2d, WSConv2d, fold_conv_norm, is_foldable
from .conversion import PerLevelNorm, replace_module


def _foldable(conv):
    norm = getattr(conv, "norm", None)
    if isinstance(norm, PerLevelNorm):
        return False  # one conv shared by levels with different affine maps
    return is_foldable(norm) or isinstance(conv, (WSConv2d, CenteredConv2d))


def fold_model(model, inplace=False):
    """Returns an eval-mode copy of ``model`` (or ``model`` itself with ``inplace``) in which every
    conv followed by an affine-in-eval norm (CBN, MABN, BN, FrozenBN, BCN's batch part) is one plain
    conv, and WS / centring are baked into the weights. Predictions are unchanged.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and hasattr(child, "norm") and _foldable(child):
                replace_module(parent, name, fold_conv_norm(child))
    return model
