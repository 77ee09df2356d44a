"""Batch Renormalization against an independent reference: the forward written out from Ioffe's
formulas (float64, r and d detached) and its gradient by autograd and in closed form; the EMA
recursion, the r_max/d_max schedule, and the conventions every layer shares."""
import copy

import pytest
import torch
import torch.nn.functional as F

from d2_smallbn.layers import NormActConv2d, fold_conv_norm
from d2_smallbn.layers.brn import BatchRenorm2d

EPS = 1e-5


def reference(x, gamma, beta, mean_hat, var_hat, r_max, d_max, eps=EPS):
    """y = gamma * ((x - mu_B) / sigma_B * r + d) + beta, r and d clipped and stop-gradient."""
    dims = (0, 2, 3)
    mu = x.mean(dims, keepdim=True)
    var = ((x - mu) ** 2).mean(dims, keepdim=True)  # biased
    sigma = torch.sqrt(var + eps)
    sigma_hat = torch.sqrt(var_hat.view(1, -1, 1, 1) + eps)
    r = (sigma.detach() / sigma_hat).clamp(1 / r_max, r_max)
    d = ((mu.detach() - mean_hat.view(1, -1, 1, 1)) / sigma_hat).clamp(-d_max, d_max)
    y = gamma.view(1, -1, 1, 1) * ((x - mu) / sigma * r + d) + beta.view(1, -1, 1, 1)
    return y, r.flatten(), d.flatten(), mu.flatten(), var.flatten()


def make(c=5, **kw):
    kw = {"warmup_iters": 2, "r_max_iters": 6, "d_max_iters": 4, **kw}
    layer = BatchRenorm2d(c, **kw).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def test_schedule_is_plain_bn_then_linear_ramps():
    layer = BatchRenorm2d(3, r_max=3.0, d_max=5.0, warmup_iters=10, r_max_iters=50, d_max_iters=30)
    assert layer.limits(0) == layer.limits(9) == (1.0, 0.0)
    assert layer.limits(10) == (1.0, 0.0)
    assert layer.limits(30) == pytest.approx((1.0 + 2.0 * 20 / 40, 5.0))
    assert layer.limits(20) == pytest.approx((1.0 + 2.0 * 10 / 40, 5.0 * 10 / 20))
    assert layer.limits(50) == layer.limits(10 ** 6) == (3.0, 5.0)


def test_forward_and_gradient_match_the_reference_with_clipping_active():
    torch.manual_seed(0)
    layer = make()
    with torch.no_grad():  # running estimates far from the batch: r and d both hit their limits
        layer.running_mean.copy_(torch.tensor([3.0, -3.0, 0.0, 0.1, -0.1], dtype=torch.float64))
        layer.running_var.copy_(torch.tensor([100.0, 0.01, 1.0, 4.0, 0.25], dtype=torch.float64))
    clipped_r = clipped_d = False
    for step in range(8):  # warmup (plain BN), ramps, then the final limits
        layer.set_iteration(step)
        x = (torch.randn(2, 5, 4, 3, dtype=torch.float64) * 2 + 0.5).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        gamma = layer.weight.detach().clone().requires_grad_()
        beta = layer.bias.detach().clone().requires_grad_()
        r_max, d_max = layer.limits(step)
        mean_hat, var_hat = layer.running_mean.clone(), layer.running_var.clone()
        y_ref, r, d, mu, var = reference(x_ref, gamma, beta, mean_hat, var_hat, r_max, d_max)
        y = layer(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        g = torch.randn_like(y)
        layer.weight.grad = layer.bias.grad = None
        y.backward(g)
        y_ref.backward(g)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-9, atol=1e-10)
        # closed form: BN's backward with batch statistics and weight gamma * r
        xhat = (x_ref - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
        dims = (0, 2, 3)
        dx = (gamma * r).view(1, -1, 1, 1) / torch.sqrt(var.view(1, -1, 1, 1) + EPS) * (
            g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
        torch.testing.assert_close(x.grad, dx.detach(), rtol=1e-9, atol=1e-10)
        # the EMA recursion (momentum 0.98: the estimate keeps 98 % of itself)
        torch.testing.assert_close(layer.running_mean, 0.98 * mean_hat + 0.02 * mu.detach())
        torch.testing.assert_close(layer.running_var, 0.98 * var_hat + 0.02 * var.detach())
        if step < 2:
            assert torch.equal(r, torch.ones_like(r)) and torch.equal(d, torch.zeros_like(d))
        clipped_r |= bool(((r - r_max).abs() < 1e-12).any() or ((r - 1 / r_max).abs() < 1e-12).any()) and r_max > 1
        clipped_d |= bool(((d.abs() - d_max).abs() < 1e-12).any()) and d_max > 0
    assert clipped_r and clipped_d
    assert int(layer.num_steps) == 8


def test_warmup_is_batchnorm_with_batch_statistics():
    layer = make(warmup_iters=5)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    expected = F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, EPS)
    torch.testing.assert_close(layer(x), expected)


def test_eval_uses_the_running_estimates_changes_nothing_and_folds():
    torch.manual_seed(1)
    conv = NormActConv2d(3, 5, 3, padding=1, norm=make(), bias=False).double()
    for step in range(4):
        conv.norm.set_iteration(step)
        conv(torch.randn(2, 3, 6, 6, dtype=torch.float64))
    conv.eval()
    before = copy.deepcopy(conv.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = conv(x)
    n = conv.norm
    z = F.conv2d(x, conv.weight, padding=1)
    expected = (z - n.running_mean.view(1, -1, 1, 1)) / torch.sqrt(n.running_var.view(1, -1, 1, 1) + EPS)
    expected = expected * n.weight.view(1, -1, 1, 1) + n.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected)
    assert all(torch.equal(before[k], v) for k, v in conv.state_dict().items())
    torch.testing.assert_close(fold_conv_norm(conv)(x), y)


def test_empty_input_fp16_and_frozen():
    layer = BatchRenorm2d(4)
    out = layer(torch.zeros(0, 4, 3, 3, requires_grad=True))
    assert out.shape == (0, 4, 3, 3) and int(layer.num_steps) == 0
    assert torch.equal(layer.running_var, torch.ones(4))
    x = (torch.randn(2, 4, 5, 5) * 300).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.isfinite(layer.running_var).all() and layer.running_var.max() > 100
    frozen = BatchRenorm2d(4).freeze()
    frozen.train()
    state = copy.deepcopy(frozen.state_dict())
    frozen(torch.randn(2, 4, 3, 3))
    assert all(torch.equal(state[k], v) for k, v in frozen.state_dict().items())


def test_state_dict_round_trip_gives_the_same_next_step():
    torch.manual_seed(2)
    a = make()
    for step in range(3):
        a.set_iteration(step)
        a(torch.randn(2, 5, 4, 4, dtype=torch.float64))
    b = make()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    a.set_iteration(3)
    b.set_iteration(3)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = make()  # not driven by a trainer: the step counter comes from the checkpoint
    c.load_state_dict(a.state_dict())
    assert c.limits(c._begin_step()) == a.limits(4)


def test_loads_batchnorm_statistics():
    bn = torch.nn.BatchNorm2d(4)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    layer = BatchRenorm2d(4)
    missing, unexpected = layer.load_state_dict(bn.state_dict(), strict=False)
    assert missing == [] and unexpected == []
    assert torch.equal(layer.running_mean, bn.running_mean) and torch.equal(layer.running_var, bn.running_var)
