"""Weight Standardization (BCN+WS paper, eq. 5-7).

    W_hat[o] = (W[o] - mean(W[o])) / (std(W[o]) + eps)      ws_mode="std" (released checkpoints)
    W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)  ws_mode="var" (paper eq. 7)

mean/std/var are taken per output filter over (in/groups, kh, kw); "std" is the unbiased
standard deviation, "var" the biased variance. There is no affine and the bias is untouched.
The choice must match the checkpoint being loaded.
"""
import torch

from ._common import check_float, refuse_scripting
from .conv import NormActConv2d

WS_MODES = ("std", "var")


def standardize_weight(weight, eps=1e-5, mode="std"):
    """The standardized weight, in ``weight``'s dtype; mean and std are computed in float32 (or float64)."""
    flat = weight.flatten(1).to(torch.promote_types(weight.dtype, torch.float32))
    if mode == "std":
        std, mean = torch.std_mean(flat, dim=1, keepdim=True)
        flat = (flat - mean) / (std + eps)
    elif mode == "var":
        var, mean = torch.var_mean(flat, dim=1, correction=0, keepdim=True)
        flat = (flat - mean) * torch.rsqrt(var + eps)
    else:
        raise ValueError(f"ws_mode must be one of {WS_MODES}, got {mode!r}")
    return flat.view_as(weight).to(weight.dtype)


class WSConv2d(NormActConv2d):
    """Conv2d with weight standardization; same arguments as ``torch.nn.Conv2d`` plus
    ``norm``, ``activation``, ``ws_eps`` and ``ws_mode``.

    The standardized weight is recomputed every call (a weight-sized op, negligible next to the
    convolution); for deployment ``fold_conv_norm`` bakes it into a plain conv once.
    """

    def __init__(self, *args, ws_eps=1e-5, ws_mode="std", **kwargs):
        super().__init__(*args, **kwargs)
        if ws_mode not in WS_MODES:
            raise ValueError(f"ws_mode must be one of {WS_MODES} ('std': released checkpoints, "
                             f"'var': paper eq. 7), got {ws_mode!r}")
        self.ws_eps = check_float("ws_eps", ws_eps, 0.0, float("inf"), low_open=True)
        self.ws_mode = ws_mode
        fan_in = self.weight[0].numel()
        if fan_in < 2:
            raise ValueError(f"WSConv2d(ws_mode={ws_mode!r}) has one weight per filter (fan-in = in_channels / "
                             f"groups x kernel = {fan_in}): its unbiased std is undefined and its standardized "
                             "value is 0, so the conv would output only its bias. Fix: use a plain conv here "
                             "(MODEL.SMALLBN.CONV plain, or no norm on this conv)")

    def effective_weight(self):
        return standardize_weight(self.weight, self.ws_eps, self.ws_mode)

    def __prepare_scriptable__(self):
        refuse_scripting(self, "its weight standardization is Python code (modes, float32 statistics)")

    def extra_repr(self):
        return super().extra_repr() + f", ws_eps={self.ws_eps}, ws_mode={self.ws_mode!r}"
