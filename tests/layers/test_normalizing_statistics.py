"""``d2_smallbn.layers.statistics.normalizing_statistics``: the (mean, var) each norm normalized
with in a training forward, read back from its input and output, equal the closed form of each
layer's rule computed here from its state before the forward."""
import pytest
import torch
from torch import nn

from d2_smallbn.layers import (BatchChannelNorm2d, CBNConv2d, CrossIterationBatchNorm2d,
                               MovingAverageBatchNorm2d)
from d2_smallbn.layers.brn import BatchRenorm2d
from d2_smallbn.layers.statistics import normalizing_statistics

EPS = 1e-5


def close(got, want):
    torch.testing.assert_close(got, want.double(), rtol=1e-4, atol=1e-5)


def inputs(steps, seed=0):
    torch.manual_seed(seed)
    return [torch.randn(2, 4, 5, 6) * (1 + i) + 0.5 * i for i in range(steps)]


def read_back(layer, x):
    """normalizing_statistics of one training forward of ``layer`` on ``x``."""
    out = layer(x)
    return normalizing_statistics(layer, x, out)


def test_torch_batchnorm_uses_the_batch_mean_and_biased_variance():
    x = inputs(1)[0]
    mean, var = read_back(nn.BatchNorm2d(4).train(), x)
    close(mean, x.mean((0, 2, 3)))
    close(var, x.var((0, 2, 3), unbiased=False))


def test_cbn_uses_the_compensated_window():
    torch.manual_seed(0)
    norm = CrossIterationBatchNorm2d(6, window_size=3)
    conv = CBNConv2d(4, 6, 3, padding=1, norm=norm)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.normal_()
    captured = {}
    norm.register_forward_hook(lambda m, args, out: captured.update(y=args[0].detach(), out=out.detach()))
    for step, x in enumerate(inputs(4)):
        past_mean, past_sqmean = norm.compensated_history(conv.weight)
        conv(x)
        mean, var = normalizing_statistics(norm, captured["y"], captured["out"])
        y = captured["y"].double()
        now_mean, now_sqmean = y.mean((0, 2, 3)), y.square().mean((0, 2, 3))
        k = 1 + len(past_mean)
        assert k == min(step + 1, 3)
        want_mean = (now_mean + past_mean.double().sum(0)) / k
        want_sq = (now_sqmean + torch.maximum(past_sqmean, past_mean.square()).double().sum(0)) / k
        close(mean, want_mean)
        close(var, (want_sq - want_mean.square()).clamp_min(0))
        with torch.no_grad():
            conv.weight.add_(0.05 * torch.randn_like(conv.weight))  # the window must compensate


@pytest.mark.parametrize("clip_lambda", [5.0, 1.05])
def test_mabn_uses_mean_zero_and_its_moving_average_of_x2_over_r2(clip_lambda):
    layer = MovingAverageBatchNorm2d(4, buffer_size=2, warmup_iters=0, clip_warmup_iters=0, clip_lambda=clip_lambda)
    for t, x in enumerate(inputs(5), start=1):
        running, ring = layer.running_sqmean.clone(), layer.sqmean_buffer.clone()
        ring[(t - 1) % 2] = x.square().mean((0, 2, 3))
        used = ring[(t - 1) % 2] if t <= 2 else ring.mean(0)  # batch statistics until the ring is full
        r = ((used + EPS) / (running + EPS)).sqrt().clamp(1 / clip_lambda, clip_lambda)
        mean, var = read_back(layer, x)
        close(mean, torch.zeros(4))
        close(var, (used + EPS) / r.square() - EPS)


def test_brn_uses_its_running_estimates_unclipped_and_the_batchs_in_warmup():
    layer = BatchRenorm2d(4, warmup_iters=2, r_max=100.0, d_max=100.0, r_max_iters=2, d_max_iters=2)
    for step, x in enumerate(inputs(4)):
        running_mean, running_var = layer.running_mean.clone(), layer.running_var.clone()
        mean, var = read_back(layer, x)
        if step < 2:  # plain BN (r_max 1, d_max 0)
            close(mean, x.mean((0, 2, 3)))
            close(var, x.var((0, 2, 3), unbiased=False))
        else:  # r and d within their limits: exactly the running estimates
            close(mean, running_mean)
            close(var, running_var)


def test_bcn_uses_its_estimates_after_this_steps_update():
    layer = BatchChannelNorm2d(4, num_groups=2)
    layer.set_update_rate(0.25)
    for x in inputs(3):
        old_mean, old_var = layer.running_mean.clone(), layer.running_var.clone()
        batch_mean = x.mean((0, 2, 3))
        shifted_var = (x - old_mean.view(1, -1, 1, 1)).square().mean((0, 2, 3))
        mean, var = read_back(layer, x)
        close(mean, old_mean + 0.25 * (batch_mean - old_mean))
        close(var, old_var + 0.25 * (shifted_var - old_var))
