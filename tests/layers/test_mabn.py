"""MABN against an independent float64 simulation of its recursions (eq. 19-20 and the released
schedule), against autograd during warmup, and CenteredConv2d against its definition (eq. 18)."""
import pytest
import torch

from d2_smallbn.layers import CenteredConv2d, MovingAverageBatchNorm2d

C = 3


def make(**kw):
    norm = MovingAverageBatchNorm2d(C, **kw).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm


def batch_reference(norm, x):
    sqmean = x.pow(2).mean((0, 2, 3), keepdim=True)
    return norm.weight.view(1, -1, 1, 1) * x / torch.sqrt(sqmean + norm.eps) + norm.bias.view(1, -1, 1, 1)


def test_warmup_is_batch_normalization_without_centring_and_its_exact_gradient():
    norm = make(warmup_iters=10**6)
    x = torch.randn(2, C, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(norm(x), batch_reference(norm, x))
    assert torch.autograd.gradcheck(lambda x_, w, b: norm(x_), (x, norm.weight, norm.bias))


class Simulation:
    """The MABN recursions, step by step, in plain float64 tensor code."""

    def __init__(self, norm):
        self.n = norm
        self.sqmeans, self.psis = [], []
        self.ema = torch.ones(C, dtype=torch.float64)

    def step(self, x, grad_out):
        n, t = self.n, len(self.sqmeans) + 1
        m = n.buffer_size
        sqmean = x.pow(2).mean((0, 2, 3))
        self.sqmeans.append(sqmean)
        batch = t < n.warmup_iters or t <= m
        used = sqmean if batch else torch.stack(self.sqmeans[-m:]).mean(0)
        r = torch.ones(C, dtype=torch.float64)
        if t > max(n.clip_warmup_iters, n.warmup_iters):
            r = torch.sqrt((used + n.eps) / (self.ema + n.eps)).clamp(1 / n.clip_lambda, n.clip_lambda)
        self.ema = n.momentum * self.ema + (1 - n.momentum) * used
        chi = torch.sqrt(used + n.eps).view(1, -1, 1, 1)
        gamma, beta, rr = n.weight.detach().view(1, -1, 1, 1), n.bias.detach().view(1, -1, 1, 1), r.view(1, -1, 1, 1)
        out = gamma * rr * x / chi + beta
        g = grad_out * gamma * rr
        z = x / chi
        psi = (g * z).mean((0, 2, 3))
        self.psis.append(psi)
        psi_bar = psi if batch else torch.stack(self.psis[-m:]).mean(0)
        grad_x = (g - z * psi_bar.view(1, -1, 1, 1)) / chi
        return out, grad_x, r


@pytest.mark.parametrize("kw", [
    dict(buffer_size=4, warmup_iters=3, clip_warmup_iters=6, clip_lambda=1.5, momentum=0.9),
    dict(buffer_size=2, warmup_iters=0, clip_warmup_iters=0, clip_lambda=5.0, momentum=0.5),
    dict(buffer_size=3, warmup_iters=8, clip_warmup_iters=2, clip_lambda=2.0, momentum=0.98),
])
def test_forward_backward_rings_and_ema_follow_eq_19_20_and_the_schedule(kw):
    norm = make(**kw)
    sim = Simulation(norm)
    for step in range(14):
        scale = 4.0 if step == 10 else 1.0  # a jump in scale exercises the clipping of r
        x = (scale * torch.randn(2, C, 4, 5, dtype=torch.float64) + 0.3).requires_grad_()
        grad_out = torch.randn(2, C, 4, 5, dtype=torch.float64)
        out_ref, grad_ref, r = sim.step(x.detach(), grad_out)
        out = norm(x)
        out.backward(grad_out)
        torch.testing.assert_close(out, out_ref)
        torch.testing.assert_close(x.grad, grad_ref)
        torch.testing.assert_close(norm.running_sqmean, sim.ema)
        m = norm.buffer_size
        ring_ref = torch.stack(sim.sqmeans[-m:]) if step + 1 >= m else None
        if ring_ref is not None:  # ring slots in any order: compare sorted per channel
            torch.testing.assert_close(norm.sqmean_buffer.sort(0).values, ring_ref.sort(0).values)
            torch.testing.assert_close(norm.psi_buffer.sort(0).values, torch.stack(sim.psis[-m:]).sort(0).values)
        assert ((r >= 1 / norm.clip_lambda - 1e-12) & (r <= norm.clip_lambda + 1e-12)).all()
    assert int(norm.num_steps) == 14


def test_clipping_actually_binds_on_a_scale_jump():
    norm = make(buffer_size=1, warmup_iters=0, clip_warmup_iters=0, clip_lambda=2.0, momentum=0.99)
    for _ in range(3):
        norm(torch.randn(2, C, 4, 4, dtype=torch.float64))
    x = 100 * torch.randn(2, C, 4, 4, dtype=torch.float64)
    out = norm(x)
    plain = (out - norm.bias.view(1, -1, 1, 1)) / norm.weight.view(1, -1, 1, 1)
    unclipped = x / torch.sqrt(x.pow(2).mean((0, 2, 3), keepdim=True) + norm.eps)
    torch.testing.assert_close(plain, 2.0 * unclipped)  # r hit lambda


def test_lambda_one_buffer_one_momentum_zero_reduces_to_eq_15_16():
    norm = make(buffer_size=1, warmup_iters=0, clip_warmup_iters=0, clip_lambda=1.0, momentum=0.0)
    for _ in range(3):
        x = torch.randn(2, C, 5, 4, dtype=torch.float64, requires_grad=True)
        g = torch.randn_like(x)
        out = norm(x)
        ref = batch_reference(norm, x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_eval_uses_the_ema_and_changes_nothing():
    norm = make(buffer_size=2, warmup_iters=0, clip_warmup_iters=0)
    for _ in range(4):
        norm(torch.randn(2, C, 4, 4, dtype=torch.float64)).sum().backward()
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    norm.eval()
    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    expected = norm.weight.view(1, -1, 1, 1) * x / torch.sqrt(norm.running_sqmean.view(1, -1, 1, 1) + norm.eps) \
        + norm.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    for k, v in norm.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("groups", [1, 2])
def test_centered_conv_has_zero_mean_filters_and_zero_mean_weight_gradients(groups):
    conv = CenteredConv2d(4, 6, 3, padding=1, groups=groups).double()
    with torch.no_grad():
        conv.weight.add_(1.0)
    w = conv.effective_weight()
    torch.testing.assert_close(w.flatten(1).mean(1), torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(w, conv.weight - conv.weight.mean((1, 2, 3), keepdim=True))
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    out = conv(x)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, conv.bias, padding=1, groups=groups))
    out.pow(2).sum().backward()
    torch.testing.assert_close(conv.weight.grad.flatten(1).sum(1), torch.zeros(6, dtype=torch.float64))


def test_trainer_driven_iteration_selects_the_schedule():
    norm = make(buffer_size=2, warmup_iters=50, clip_warmup_iters=0)
    norm.set_iteration(100)  # t = 101: past warmup, moving averages (ring from earlier steps) in use
    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    norm(x)
    assert not norm.uses_batch_statistics(101) and norm.uses_batch_statistics(49)
    with pytest.raises(RuntimeError, match="called twice"):
        norm(x)


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="clip_lambda"):
        MovingAverageBatchNorm2d(4, clip_lambda=0.5)
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageBatchNorm2d(4, momentum=1.0)
    with pytest.raises(ValueError, match="buffer_size"):
        MovingAverageBatchNorm2d(4, buffer_size=0)
