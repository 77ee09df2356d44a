"""Eval-time folding: conv (plain, centred or WS) followed by an affine-in-eval norm becomes one
plain conv with identical outputs.

Foldable norms expose ``eval_scale_shift()`` (CBN, MABN, BCN's batch part); torch's BatchNorm and
frozen-BN-like modules (``weight``, ``bias``, ``running_mean``, ``running_var``, ``eps``) fold too.
A norm with a part that is not affine returns it from ``unfolded_part()``, and the folded conv keeps it
as its norm (BCN's group part).
"""
import torch

from .conv import NormActConv2d


def eval_scale_shift(norm):
    """Per-channel (scale, shift) such that norm(y) == y * scale + shift in eval mode, or None."""
    if hasattr(norm, "eval_scale_shift"):
        return norm.eval_scale_shift()
    if all(hasattr(norm, a) for a in ("running_mean", "running_var", "eps")) and norm.running_mean is not None:
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if getattr(norm, "weight", None) is not None:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale
        if getattr(norm, "bias", None) is not None:
            shift = shift + norm.bias
        return scale, shift
    return None


def is_foldable(norm):
    return norm is not None and eval_scale_shift(norm) is not None


@torch.no_grad()
def fold_conv_norm(conv, norm=None):
    """Returns a ``NormActConv2d`` with a plain weight equal in eval mode to ``conv`` followed by
    ``norm`` (default: ``conv.norm``) and ``conv.activation``.

    The folded conv's norm is None, or BCN's group part. A conv whose norm is not affine in
    eval (e.g. GroupNorm) keeps that norm and only loses its weight transform.
    """
    norm = getattr(conv, "norm", None) if norm is None else norm
    weight = conv.effective_weight() if hasattr(conv, "effective_weight") else conv.weight
    weight = weight.detach().clone()
    bias = conv.bias.detach().clone() if conv.bias is not None else torch.zeros(weight.shape[0], device=weight.device)
    remaining = norm
    if norm is not None and is_foldable(norm):
        if norm.training:
            raise ValueError(f"fold_conv_norm needs an eval-mode norm; call .eval() first ({type(norm).__name__})")
        scale, shift = (t.detach().to(weight.dtype) for t in eval_scale_shift(norm))
        weight.mul_(scale.view(-1, 1, 1, 1))
        bias = bias.to(weight.dtype) * scale + shift
        remaining = norm.unfolded_part() if hasattr(norm, "unfolded_part") else None
    folded = NormActConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                           padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True,
                           padding_mode=conv.padding_mode, norm=remaining,
                           activation=getattr(conv, "activation", None),
                           device=weight.device, dtype=weight.dtype)
    folded.weight.copy_(weight)
    folded.bias.copy_(bias)
    return folded.eval()
