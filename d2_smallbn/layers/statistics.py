"""The statistics a norm normalized with in a training forward, read back from what it did.

Every batch-type norm of this project, and torch's BatchNorm (naiveSyncBN included), maps each
channel of its input x by an affine map in training:

    out = weight * (x - mean) / sqrt(var + eps) + bias

where (mean, var) are the statistics it used: the batch's (BN), the whole batch's over all
processes (SyncBN), the Taylor-compensated window (CBN), the renormalized batch statistics
mu_B - d sigma_B / r and sigma_B^2 / r^2 (BRN), mean 0 and the moving average of x^2 over r^2
(MABN, which divides by the second moment). Given x and out, the slope of the map is
cov(x, out) / var(x) = weight / sqrt(var + eps), so

    var  = (weight / slope)^2 - eps,    mean = mean(x) - (mean(out) - bias) / slope.

A layer whose output is not such a map defines ``normalizing_statistics(x, out)`` itself (BCN:
its running estimates, which step 3 uses before its group normalization).
"""
import torch


def fitted_statistics(x, out, weight, bias, eps):
    """Per-channel (mean, var), float64, of a normalization that produced ``out`` from ``x`` (see the
    module docstring). ``weight``/``bias`` None mean 1 and 0. A channel whose input is constant
    has no slope: its values are nan."""
    dims = (0,) + tuple(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x, out = x.detach().double(), out.detach().double()
    x_mean, out_mean = x.mean(dims), out.mean(dims)
    centred = x - x_mean.view(shape)
    slope = (centred * (out - out_mean.view(shape))).mean(dims) / centred.square().mean(dims)
    gamma = torch.ones_like(slope) if weight is None else weight.detach().double()
    beta = torch.zeros_like(slope) if bias is None else bias.detach().double()
    return x_mean - (out_mean - beta) / slope, (gamma / slope).square() - eps


def normalizing_statistics(module, x, out):
    """The per-channel (mean, var) that norm ``module`` normalized ``x`` with in the training forward
    that returned ``out``: the layer's own ``normalizing_statistics`` if it has one, else read back
    from the affine map (``fitted_statistics``)."""
    own = getattr(module, "normalizing_statistics", None)
    if own is not None:
        return own(x, out)
    return fitted_statistics(x, out, module.weight, module.bias, module.eps)
