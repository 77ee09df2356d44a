"""Moving Average Batch Normalization (MABN paper, eq. 15-20) and weight-centralized conv (eq. 18).

With chi^2 = mean over N*H*W of x^2 (no mean subtraction), per channel:

    forward (eq. 19):  out = gamma * r * x / chi_bar + beta,  chi_bar^2 = SMA of chi^2 over m iterations
                       r = clip(chi_bar / chi_hat, 1/lambda, lambda),  chi_hat^2 = EMA, r constant
    backward (eq. 20): g = dL/dout * gamma * r,  z = x / chi_bar,  Psi = mean(g * z)
                       dL/dx = (g - z * Psi_bar) / chi_bar,  Psi_bar = SMA of Psi over m iterations

chi_bar includes eps: chi_bar = sqrt(chi_bar^2 + eps), and r = sqrt((chi_bar^2 + eps) / (chi_hat^2 + eps)),
so that an unclipped training step normalizes by the EMA exactly as eval does.

Schedule of the released code (iteration t is 1-based):
- batch statistics replace both SMAs while t < warmup_iters or t <= buffer_size; then the backward
  above is the exact gradient of y = gamma*r*x/sqrt(mean x^2 + eps) + beta;
- r = 1 while t <= max(clip_warmup_iters, warmup_iters);
- the EMA tracks the chi_bar^2 actually used, and r uses the EMA from before this step's update.

Mixed precision: with a GradScaler the incoming gradient is the loss scale S times the true one, so
Psi is too. The ring stores Psi / S and the backward uses S * Psi_bar, so the SMA mixes no scales when
S changes (``set_loss_scaler``; d2_smallbn's trainer hook passes AMP's scaler). A Psi that is not
finite (an overflowed fp16 step, which the scaler skips) leaves its slot as it was.

Eval: out = gamma * x / sqrt(chi_hat^2 + eps) + beta, foldable into the conv.
Cost: forward one fp32 reduction and one multiply-add; backward one pass for sum(grad*x) and
sum(grad), and one pass for dx = a*grad - b*x.
"""
import torch
from torch import nn

from ._common import (StepCounter, channel_affine, check_float, check_int, outside_compiled_graphs, refuse_scripting,
                      stat_dtype)
from .conv import NormActConv2d


class MovingAverageBatchNorm2d(StepCounter):
    """MABN with the released code's defaults: EMA momentum 0.98, SMA over 16 iterations,
    batch statistics for the first 100 iterations, r = 1 until iteration 1000, then clipped to [1/5, 5].

    ``warmup_iters`` is a plain attribute so that a trainer can set it per scope (the paper warms
    up detection heads for 10k iterations). Buffers: ``running_sqmean`` (the EMA chi_hat^2),
    ``sqmean_buffer`` and ``psi_buffer`` (the m-slot rings).
    """

    def __init__(self, num_features, momentum=0.98, buffer_size=16, warmup_iters=100, clip_lambda=5.0,
                 clip_warmup_iters=1000, eps=1e-5):
        super().__init__()
        self.num_features = check_int("num_features", num_features, 1)
        self.momentum = check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        self.buffer_size = check_int("buffer_size", buffer_size, 1)
        self.warmup_iters = check_int("warmup_iters", warmup_iters, 0)
        self.clip_lambda = check_float("clip_lambda", clip_lambda, 1.0, float("inf"))
        self.clip_warmup_iters = check_int("clip_warmup_iters", clip_warmup_iters, 0)
        self.eps = check_float("eps", eps, 0.0, float("inf"), low_open=True)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_sqmean", torch.ones(num_features))
        self.register_buffer("sqmean_buffer", torch.zeros(buffer_size, num_features))
        self.register_buffer("psi_buffer", torch.zeros(buffer_size, num_features))
        self.loss_scaler = None

    own_state = ("num_steps", "running_sqmean", "sqmean_buffer", "psi_buffer")

    @staticmethod
    def map_bn_state(state_dict, prefix):
        mean = state_dict.pop(prefix + "running_mean")
        var = state_dict.pop(prefix + "running_var")
        state_dict.pop(prefix + "num_batches_tracked", None)
        state_dict[prefix + "running_sqmean"] = (var.double() + mean.double() ** 2).to(var.dtype)
        return "running_sqmean = running_var + running_mean^2, i.e. E[x^2]"

    def set_loss_scaler(self, scaler):
        """The ``torch.amp.GradScaler`` that scales the loss this layer's gradients come from (None: no scaling)."""
        self.loss_scaler = scaler

    def priming_steps(self):
        return max(self.buffer_size, self.warmup_iters, self.clip_warmup_iters)

    def steady(self, iteration):
        t = iteration + 1  # the layer's 1-based step
        return not self.uses_batch_statistics(t) and self.clips(t)

    def uses_batch_statistics(self, t):
        return t < self.warmup_iters or t <= self.buffer_size

    def clips(self, t):
        return t > max(self.clip_warmup_iters, self.warmup_iters)

    @outside_compiled_graphs("training")
    def forward(self, x):
        out = self.output_without_step(x)
        if out is not None:
            return out
        t = self._steps + 1
        batch = self.uses_batch_statistics(t)
        if x.numel() == x.shape[1] and (batch or self.buffer_size == 1):
            raise ValueError(
                f"MovingAverageBatchNorm2d({self.num_features}) got one value per channel in training (input shape "
                f"{tuple(x.shape)}) at iteration {t} of its batch statistics (warmup_iters={self.warmup_iters}, "
                f"buffer_size={self.buffer_size}): x / sqrt(mean x^2) of a single value is its sign, and no gradient "
                "flows. Fix: more than one image per process or a larger feature map during warmup, or freeze the "
                "layer (eval)")
        self._begin_step()
        slot = (t - 1) % self.buffer_size
        with torch.no_grad():
            count = x.numel() // x.shape[1]
            dims = (0,) + tuple(range(2, x.dim()))
            sqmean = torch.linalg.vector_norm(x, 2, dim=dims, dtype=stat_dtype(self)).square_().div_(count)
            self.sqmean_buffer[slot] = sqmean
            used = sqmean if batch else self.sqmean_buffer.mean(0)
            if self.clips(t):
                ratio = ((used + self.eps) / (self.running_sqmean + self.eps)).sqrt_()
                r = ratio.clamp_(1.0 / self.clip_lambda, self.clip_lambda)
            else:
                r = torch.ones_like(used)
            self.running_sqmean.lerp_(used, 1.0 - self.momentum)
            inv_chi = torch.rsqrt(used + self.eps)
        self._end_step()
        return _MABNFunction.apply(x, self.weight, self.bias, inv_chi, r, self.psi_buffer, slot, batch,
                                   self.loss_scaler)

    def eval_scale_shift(self):
        """Per-channel (scale, shift) with eval(x) = x * scale + shift."""
        return self.weight * torch.rsqrt(self.running_sqmean + self.eps), self.bias

    def extra_repr(self):
        return (f"{self.num_features}, momentum={self.momentum}, buffer_size={self.buffer_size}, "
                f"warmup_iters={self.warmup_iters}, clip_lambda={self.clip_lambda}, "
                f"clip_warmup_iters={self.clip_warmup_iters}, eps={self.eps}")


class _MABNFunction(torch.autograd.Function):
    """out = x * (gamma * r * inv_chi) + beta, with the eq. 20 backward.

    ``inv_chi`` and ``r`` are constants. With ``batch`` the backward uses this step's Psi, which
    makes it the exact gradient through the batch chi; otherwise the SMA of ``psi_buffer``.
    ``scaler`` is read in backward: its scale tensor exists only once the loss has been scaled.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, inv_chi, r, psi_buffer, slot, batch, scaler):
        ctx.save_for_backward(x, weight, inv_chi, r)
        ctx.psi_buffer, ctx.slot, ctx.batch, ctx.scaler = psi_buffer, slot, batch, scaler
        return channel_affine(x, weight * r * inv_chi, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, inv_chi, r = ctx.saved_tensors
        dims = (0,) + tuple(range(2, x.dim()))
        count = x.numel() // x.shape[1]
        dtype = inv_chi.dtype
        sum_gx = (grad_out * x).sum(dims, dtype=dtype)
        sum_g = grad_out.sum(dims, dtype=dtype)
        weight32 = weight.detach().to(dtype)
        psi = weight32 * r * inv_chi * sum_gx / count  # in units of the loss scale
        scale = _loss_scale(ctx.scaler)
        stored = psi if scale is None else psi / scale
        ctx.psi_buffer[ctx.slot] = torch.where(torch.isfinite(stored), stored, ctx.psi_buffer[ctx.slot])
        psi_bar = psi if ctx.batch else ctx.psi_buffer.mean(0)
        if scale is not None and not ctx.batch:
            psi_bar = psi_bar * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        a = (weight32 * r * inv_chi).to(x.dtype).view(shape)
        b = (inv_chi * inv_chi * psi_bar).to(x.dtype).view(shape)
        grad_x = torch.addcmul(grad_out * a, x, b, value=-1.0)
        grad_weight = (sum_gx * r * inv_chi).to(weight.dtype)
        return grad_x, grad_weight, sum_g.to(weight.dtype), None, None, None, None, None, None


def _loss_scale(scaler):
    """The GradScaler's current scale as a device tensor (``get_scale()`` would sync the host), or None."""
    if scaler is None or not scaler.is_enabled():
        return None
    return getattr(scaler, "_scale", None)


class CenteredConv2d(NormActConv2d):
    """Weight-centralized conv (MABN eq. 18): W_c[o] = W[o] - mean(W[o]) over (in/groups, kh, kw).
    No division by the std; gradients flow through the centring. Arguments are
    ``torch.nn.Conv2d``'s plus ``norm`` and ``activation``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.weight[0].numel() < 2:
            raise ValueError(f"CenteredConv2d has one weight per filter (fan-in = in_channels / groups x kernel "
                             f"= {self.weight[0].numel()}): centring leaves 0, so the conv would output only its "
                             "bias. Fix: use a plain conv here (MODEL.SMALLBN.CONV plain, or no norm on this conv)")

    def effective_weight(self):
        """W - mean(W) per filter, the mean in float32 (or float64), in the weight's dtype."""
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        return (w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True)).to(self.weight.dtype)

    def __prepare_scriptable__(self):
        refuse_scripting(self, "its weight centring is Python code (float32 statistics over a dynamic tuple of dims)")
