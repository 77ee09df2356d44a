"""Cross-Iteration Batch Normalization (CBN paper, eq. 7-8; appendix Algorithm 1 and eq. 13-15).

At iteration t a CBN layer after a bias-free conv with weight W has the current statistics
mu_t = mean(y), nu_t = mean(y^2) over N*H*W, and stored entries of the previous k-1 iterations.
Each entry is compensated to the current weight with a first-order Taylor step (eq. 7-8):

    mu_{t-tau}(W_t) = mu_{t-tau} + rho * <d mu_{t-tau}/dW, W_t - W_{t-tau}>   (per output channel)

and likewise nu. Then (Algorithm 1, lines 6-10):

    mu_bar  = mean_tau mu_{t-tau}(W_t)
    nu_bar  = mean_tau max(nu_{t-tau}(W_t), mu_{t-tau}(W_t)^2)
    var_bar = max(nu_bar - mu_bar^2, 0)
    out     = gamma * (y - mu_bar) / sqrt(var_bar + eps) + beta

Gradients flow only through the current mu_t, nu_t and y. The Jacobians are block-diagonal
(appendix B): d mu_j/dW[j] is the mean input patch (one per conv group) and
d nu_j/dW[j] = (2/M) sum_i y_ij patch_i, one weight-gradient convolution of x with 2y/M.

Storage trick: <d, W_t - W_old> = <d, W_t> - <d, W_old>, and <d, W_old> is known when the entry
is stored, so the history keeps that projection instead of the old weight.

Burn-in: while the iteration is below ``burnin_iters`` the window is 1 and the layer is exactly
BN. After it, the history fills one entry per iteration up to k-1 entries, oldest dropped first.
Eval uses an EMA (``momentum``) of the statistics used in training, like BN, and can be folded.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_weight

from ._common import (StepCounter, batch_mean_var, channel_affine, check_float, check_int, full_precision,
                      outside_compiled_graphs, stat_dtype)
from .conv import NormActConv2d

_HISTORY = ("hist_mean", "hist_sqmean", "hist_mean_proj", "hist_sqmean_proj", "hist_dmean", "hist_dsqmean")


class CrossIterationBatchNorm2d(StepCounter):
    needs_conv_input = True  # forward(y, x, conv): the conv's input and weight feed the window

    """CBN over a window of ``window_size`` iterations (the paper's k, counting the current one).

    Args:
        num_features: channels C.
        window_size: k; the paper suggests k * images_per_gpu ~= 16.
        burnin_iters: iterations (trainer's, 0-based) during which CBN is plain BN.
        rho: weight of the Taylor compensation; 0 gives the paper's "Naive CBN".
        eps, momentum, affine: as in ``torch.nn.BatchNorm2d``.

    The layer needs the conv that produces its input; build it inside ``CBNConv2d``.
    """

    def __init__(self, num_features, window_size=4, burnin_iters=0, rho=1.0, eps=1e-5, momentum=0.1, affine=True):
        super().__init__()
        self.num_features = check_int("num_features", num_features, 1)
        self.window_size = check_int("window_size", window_size, 1)
        self.burnin_iters = check_int("burnin_iters", burnin_iters, 0)
        self.rho = check_float("rho", rho, 0.0, float("inf"))
        self.eps = check_float("eps", eps, 0.0, float("inf"), low_open=True)
        self.momentum = check_float("momentum", momentum, 0.0, 1.0, low_open=True)
        self.affine = bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_stored", torch.zeros((), dtype=torch.long))
        self._num_stored = 0
        self._conv_shape = None

    own_state = ("num_steps", "num_stored") + _HISTORY

    # ---- history ------------------------------------------------------------------------

    def attach(self, conv_weight_shape, groups=1):
        """Allocates the history for a conv of weight shape [C, Cin/groups, kh, kw]."""
        cout, cin_g, kh, kw = conv_weight_shape
        if cout != self.num_features:
            raise ValueError(f"CBN has {self.num_features} features but the conv has {cout} output channels")
        self._conv_shape = (tuple(conv_weight_shape), groups)
        slots, dev = self.window_size - 1, self.running_mean.device
        shapes = {
            "hist_mean": (slots, cout), "hist_sqmean": (slots, cout),
            "hist_mean_proj": (slots, cout), "hist_sqmean_proj": (slots, cout),
            "hist_dmean": (slots, groups, cin_g, kh, kw), "hist_dsqmean": (slots, cout, cin_g, kh, kw),
        }
        for name, shape in shapes.items():
            self.register_buffer(name, torch.zeros(shape, device=dev, dtype=self.running_mean.dtype))

    def priming_steps(self):
        return self.burnin_iters + self.window_size - 1  # the burn-in, then a full window

    def steady(self, iteration):
        return self.history_length == self.window_size - 1

    @property
    def history_length(self):
        """Number of stored past iterations (at most window_size - 1)."""
        return min(self._num_stored, self.window_size - 1)

    def compensated_history(self, weight):
        """The stored (mu, nu) of the past iterations, compensated to ``weight``: two [n, C] tensors."""
        with full_precision(weight):
            return self._compensated_history(weight.detach().to(self.hist_mean.dtype))

    def _compensated_history(self, w):
        n = self.history_length
        (cout, cin_g, kh, kw), groups = self._conv_shape
        if n == 0:  # reshape cannot infer -1 from 0 elements
            return self.hist_mean[:0], self.hist_sqmean[:0]
        mean_now = torch.einsum("ngk,gok->ngo", self.hist_dmean[:n].reshape(n, groups, -1),
                                w.reshape(groups, cout // groups, -1)).reshape(n, cout)
        sqmean_now = torch.einsum("nok,ok->no", self.hist_dsqmean[:n].reshape(n, cout, -1), w.reshape(cout, -1))
        mean = self.hist_mean[:n] + self.rho * (mean_now - self.hist_mean_proj[:n])
        sqmean = self.hist_sqmean[:n] + self.rho * (sqmean_now - self.hist_sqmean_proj[:n])
        return mean, sqmean

    @torch.no_grad()
    def _store(self, x, y, conv, mean, sqmean):
        with full_precision(y):
            self._store_entry(x, y, conv, mean, sqmean)

    def _store_entry(self, x, y, conv, mean, sqmean):
        dtype = self.hist_mean.dtype
        n, _, h, w_ = y.shape
        m = n * h * w_
        (cout, cin_g, kh, kw), groups = self._conv_shape
        args = (conv.stride, conv.padding, conv.dilation)
        # in the statistics dtype: an fp16 weight gradient overflows (and would poison the history)
        x, y = x.to(dtype), y.to(dtype)
        dsqmean = conv2d_weight(x, conv.weight.shape, y * (2.0 / m), *args, groups)
        dmean = _mean_patch(x, (kh, kw), *args, (h, w_)).view(groups, cin_g, kh, kw)
        wt = conv.weight.detach().to(dtype)
        slot = self._num_stored % (self.window_size - 1)
        self.hist_mean[slot] = mean
        self.hist_sqmean[slot] = sqmean
        self.hist_dmean[slot] = dmean
        self.hist_dsqmean[slot] = dsqmean
        self.hist_mean_proj[slot] = torch.einsum(
            "gk,gok->go", dmean.reshape(groups, -1), wt.reshape(groups, cout // groups, -1)).reshape(cout)
        self.hist_sqmean_proj[slot] = torch.einsum("ok,ok->o", dsqmean.reshape(cout, -1), wt.reshape(cout, -1))
        self._num_stored += 1
        self.num_stored.fill_(self._num_stored)

    def reset_history(self):
        self._num_stored = 0
        self.num_stored.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._num_stored = int(self.num_stored)

    # ---- forward ------------------------------------------------------------------------

    @outside_compiled_graphs("training")
    def forward(self, y, x=None, conv=None):
        out = self.output_without_step(y)
        if out is not None:
            return out
        if y.numel() == y.shape[1]:  # like torch's BatchNorm; shapes only, no host sync
            raise ValueError(
                f"CrossIterationBatchNorm2d({self.num_features}) got one value per channel in training (input shape "
                f"{tuple(y.shape)}): the current batch's variance is 0, so the output would not depend on the input "
                "and the running variance would collapse to 0. Fix: more than one image per process or a larger "
                "feature map, or freeze the layer (eval)")
        step = self._begin_step()
        in_window = self.window_size > 1 and step >= self.burnin_iters
        if in_window and (conv is None or x is None or self._conv_shape is None):
            raise RuntimeError("CrossIterationBatchNorm2d with window_size > 1 needs the conv's input and "
                               "weight: build it as CBNConv2d(..., norm=CrossIterationBatchNorm2d(...))")
        n = self.history_length if in_window else 0
        if n > 0:
            hist_mean, hist_sqmean = self.compensated_history(conv.weight)
            hist_sums = (hist_mean.sum(0), torch.maximum(hist_sqmean, hist_mean * hist_mean).sum(0))
        else:
            hist_sums = None
        out, mean, sqmean, mean_w, var_w = _CBNFunction.apply(y, self.weight, self.bias, hist_sums, n + 1, self.eps,
                                                              stat_dtype(self))
        with torch.no_grad():
            self.running_mean.lerp_(mean_w, self.momentum)
            self.running_var.lerp_(var_w, self.momentum)
            if in_window:
                self._store(x, y, conv, mean, sqmean)
        self._end_step()
        return out

    def eval_scale_shift(self):
        """Per-channel (scale, shift) with eval(y) = y * scale + shift."""
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.affine:
            shift = shift + self.bias
        return scale, shift

    def extra_repr(self):
        return (f"{self.num_features}, window_size={self.window_size}, burnin_iters={self.burnin_iters}, "
                f"rho={self.rho}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}")


def _mean_patch(x, kernel_size, stride, padding, dilation, out_size):
    """The mean input patch of a convolution, [Cin, kh, kw]: d mu / dW for every output channel
    (appendix eq. 15). Summing the batch first makes it kh*kw strided sums over one image."""
    total = F.pad(x.sum(0), (padding[1], padding[1], padding[0], padding[0]))
    (kh, kw), (ho, wo) = kernel_size, out_size
    sums = [total[:, i * dilation[0]: i * dilation[0] + stride[0] * (ho - 1) + 1: stride[0],
                  j * dilation[1]: j * dilation[1] + stride[1] * (wo - 1) + 1: stride[1]].sum((1, 2))
            for i in range(kh) for j in range(kw)]
    return torch.stack(sums, dim=1).view(-1, kh, kw) / (x.shape[0] * ho * wo)


class CBNConv2d(NormActConv2d):
    """Conv2d whose ``norm`` may be a ``CrossIterationBatchNorm2d``; that norm receives the
    conv's input and weight. Arguments are ``torch.nn.Conv2d``'s plus ``norm`` and ``activation``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=False, norm=None, activation=None, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, norm=norm, activation=activation, **kwargs)
        if getattr(norm, "needs_conv_input", False):
            if bias:
                raise ValueError("CBNConv2d: bias=True with a CrossIterationBatchNorm2d norm is not supported; "
                                 "the bias is cancelled by the normalization anyway, so pass bias=False")
            if self.padding_mode != "zeros" or isinstance(self.padding, str):
                raise ValueError("CBNConv2d with a CrossIterationBatchNorm2d norm supports only "
                                 f"padding_mode='zeros' and integer padding, got {self.padding_mode!r}, "
                                 f"padding={self.padding!r}")
            norm.attach(self.weight.shape, self.groups)

    def apply_norm(self, y, x):
        if getattr(self.norm, "needs_conv_input", False):
            return self.norm(y, x, self)
        return self.norm(y)


class _CBNFunction(torch.autograd.Function):
    """Algorithm 1, lines 1 and 6-10, with a BN-style backward: the window's past entries
    (``hist_sums``: sums of the compensated mu and of max(nu, mu^2)) are constants, and the
    gradient flows through the current mu_t = mean(y), nu_t = mean(y^2) and y.

    With a = gamma / sqrt(var_bar + eps), out = a * (y - mu_bar) + beta, and S = sum g * (y - mu_bar):
        d var_bar = -S * a / (2 (var_bar + eps))      (0 where the variance was clamped)
        d mu_bar  = -a * sum g - 2 mu_bar * d var_bar
        dy = g * a + (d mu_bar + 2 mu_t * d var_bar) / (k M) + 2 (y - mu_t) * d var_bar / (k M)
    Returns (out, mu_t, nu_t, mu_bar, var_bar); only ``out`` is differentiable.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, hist_sums, count, eps, dtype):
        mean, var = batch_mean_var(y, dtype)
        sqmean = var + mean * mean
        if hist_sums is None:  # plain BN: the exact variance, no cancellation
            mean_w, var_w, clamped = mean, var, None
        else:
            mean_w = (mean + hist_sums[0]) / count
            var_w = (sqmean + hist_sums[1]) / count - mean_w * mean_w
            clamped = var_w < 0
            var_w = var_w.clamp_min(0.0)
        inv_std = torch.rsqrt(var_w + eps)
        scale = inv_std if weight is None else inv_std * weight.to(dtype)
        shift = -mean_w * scale if bias is None else bias.to(dtype) - mean_w * scale
        out = channel_affine(y, scale, shift)
        ctx.save_for_backward(y, weight, mean, mean_w, inv_std, scale, clamped)
        ctx.count = count
        ctx.mark_non_differentiable(mean, sqmean, mean_w, var_w)
        return out, mean, sqmean, mean_w, var_w

    @staticmethod
    def backward(ctx, grad_out, *unused):
        y, weight, mean, mean_w, inv_std, scale, clamped = ctx.saved_tensors
        dtype = mean.dtype
        dims = (0, 2, 3)
        m = y.numel() // y.shape[1]
        sum_g = grad_out.sum(dims, dtype=dtype)
        sum_gy = (grad_out * y).sum(dims, dtype=dtype)
        centred = sum_gy - mean_w * sum_g  # S = sum g * (y - mu_bar)
        d_var = -0.5 * centred * scale * inv_std * inv_std
        if clamped is not None:
            d_var = d_var.masked_fill(clamped, 0.0)
        d_mean_w = -scale * sum_g - 2.0 * mean_w * d_var
        km = ctx.count * m
        shape = (1, -1, 1, 1)
        slope = (2.0 * d_var / km).to(y.dtype).view(shape)
        offset = ((d_mean_w + 2.0 * mean * d_var) / km).to(y.dtype).view(shape)
        grad_y = torch.addcmul(offset, grad_out, scale.to(y.dtype).view(shape))
        grad_y.addcmul_(y - mean.to(y.dtype).view(shape), slope)
        grad_weight = grad_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (centred * inv_std).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = sum_g.to(grad_out.dtype)
        return grad_y, grad_weight, grad_bias, None, None, None, None
