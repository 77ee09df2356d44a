"""Batch Renormalization (Ioffe 2017; the MABN paper's baseline, its section 4 and Tables 1-3, 5).

With the batch statistics mu_B, sigma_B = sqrt(var_B + eps) (biased variance over N*H*W) and the
running estimates mu_hat, sigma_hat = sqrt(var_hat + eps), per channel:

    r   = clip(sigma_B / sigma_hat, 1/r_max, r_max)          (a constant for autograd)
    d   = clip((mu_B - mu_hat) / sigma_hat, -d_max, d_max)   (a constant for autograd)
    out = gamma * ((x - mu_B) / sigma_B * r + d) + beta

Because r and d are constants, the backward is BatchNorm's with batch statistics and the weight
gamma * r (the g_B and Psi_B that MABN replaces by moving averages). The running estimates are
EMAs of the batch statistics used, updated after r and d are computed:
mu_hat <- momentum * mu_hat + (1 - momentum) * mu_B, and the same for var_hat with var_B
(momentum 0.98 in the MABN paper's COCO runs). Eval: out = gamma * (x - mu_hat) / sigma_hat + beta,
foldable into the conv.

Schedule (Ioffe's): plain BN (r_max = 1, d_max = 0) while the iteration is below ``warmup_iters``;
then r_max rises linearly to ``r_max`` at iteration ``r_max_iters`` and d_max to ``d_max`` at
``d_max_iters``. The iteration is the trainer's (``set_iteration``), saved in checkpoints.
Statistics are per process, like BN.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ._common import StepCounter, batch_mean_var, check_float, check_int, outside_compiled_graphs, stat_dtype


def ramp(iteration, start, end, low, high):
    """``low`` before ``start``, ``high`` from ``end`` on, linear in between."""
    if iteration < start:
        return low
    if iteration >= end:
        return high
    return low + (high - low) * (iteration - start) / (end - start)


class BatchRenorm2d(StepCounter):
    """Batch Renormalization. Buffers: ``running_mean``, ``running_var`` (the EMAs) and the step."""

    def __init__(self, num_features, momentum=0.98, r_max=3.0, d_max=5.0, warmup_iters=5000, r_max_iters=40000,
                 d_max_iters=25000, eps=1e-5):
        super().__init__()
        self.num_features = check_int("num_features", num_features, 1)
        self.momentum = check_float("momentum", momentum, 0.0, 1.0, high_open=True)
        self.r_max = check_float("r_max", r_max, 1.0, float("inf"))
        self.d_max = check_float("d_max", d_max, 0.0, float("inf"))
        self.warmup_iters = check_int("warmup_iters", warmup_iters, 0)
        self.r_max_iters = check_int("r_max_iters", r_max_iters, 0)
        self.d_max_iters = check_int("d_max_iters", d_max_iters, 0)
        self.eps = check_float("eps", eps, 0.0, float("inf"), low_open=True)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    own_state = ("num_steps",)

    def limits(self, iteration):
        """(r_max, d_max) in force at ``iteration`` (0-based)."""
        start = self.warmup_iters
        return (ramp(iteration, start, max(start, self.r_max_iters), 1.0, self.r_max),
                ramp(iteration, start, max(start, self.d_max_iters), 0.0, self.d_max))

    @outside_compiled_graphs("training")
    def forward(self, x):
        out = self.output_without_step(x)
        if out is not None:
            return out
        r_max, d_max = self.limits(self._begin_step())
        dtype = stat_dtype(self)
        with torch.no_grad():
            mean, var = batch_mean_var(x, dtype)
            inv_hat = torch.rsqrt(self.running_var.to(dtype) + self.eps)
            r = (torch.sqrt(var + self.eps) * inv_hat).clamp_(1.0 / r_max, r_max)
            d = ((mean - self.running_mean.to(dtype)) * inv_hat).clamp_(-d_max, d_max)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), 1.0 - self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), 1.0 - self.momentum)
        self._end_step()
        # gamma * (r * x_hat + d) + beta is BN with weight gamma * r and bias beta + gamma * d;
        # batch_norm's backward (batch statistics, r and d constant) is exactly BRN's.
        compute = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(compute)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = F.batch_norm(x.to(compute), None, None, weight * r.to(compute),
                               self.bias.to(compute) + weight * d.to(compute), True, 0.0, self.eps)
        return out.to(x.dtype)

    def eval_scale_shift(self):
        """Per-channel (scale, shift) with eval(x) = x * scale + shift."""
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def extra_repr(self):
        return (f"{self.num_features}, momentum={self.momentum}, r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_iters={self.warmup_iters}, r_max_iters={self.r_max_iters}, "
                f"d_max_iters={self.d_max_iters}, eps={self.eps}")
