"""CBN against independent references: BN, BN over concatenated batches, recomputed statistics
after a weight change, autograd Jacobians, and Algorithm 1 written out directly."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import jacobian

from d2_smallbn.layers import CBNConv2d, CrossIterationBatchNorm2d


def make(cin=3, cout=4, k=3, window=4, burnin=0, rho=1.0, dtype=torch.float64, **conv_kw):
    conv_kw.setdefault("padding", k // 2)
    norm = CrossIterationBatchNorm2d(cout, window_size=window, burnin_iters=burnin, rho=rho)
    conv = CBNConv2d(cin, cout, k, norm=norm, **conv_kw).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return conv


def conv_out(conv, x, weight=None):
    return F.conv2d(x, conv.weight if weight is None else weight, None, conv.stride, conv.padding,
                    conv.dilation, conv.groups)


def bn_reference(conv, x):
    y = conv_out(conv, x)
    return F.batch_norm(y, None, None, conv.norm.weight, conv.norm.bias, True, 0.0, conv.norm.eps)


@pytest.mark.parametrize("window,burnin", [(1, 0), (4, 3)])
def test_equals_bn_with_window_one_or_during_burnin(window, burnin):
    conv = make(window=window, burnin=burnin)
    ref = make(window=1)
    ref.load_state_dict({k: v for k, v in conv.state_dict().items() if not k.startswith("norm.hist")},
                        strict=False)
    for _ in range(max(burnin, 2)):
        x = torch.randn(2, 3, 7, 9, dtype=torch.float64, requires_grad=True)
        out = conv(x)
        expected = bn_reference(conv, x)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, conv.weight, conv.norm.weight, conv.norm.bias), g)
        ref_grads = torch.autograd.grad(expected, (x, conv.weight, conv.norm.weight, conv.norm.bias), g)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (2, 2, 1), (1, 1, 2)])
def test_unchanged_weights_equals_bn_over_concatenation(groups, stride, dilation):
    conv = make(cin=4, window=3, groups=groups, stride=stride, dilation=dilation, padding=dilation)
    xs = [torch.randn(2, 4, 8, 8, dtype=torch.float64) for _ in range(5)]
    for i, x in enumerate(xs):
        out = conv(x)
        window = xs[max(0, i - 2): i + 1]
        y = conv_out(conv, torch.cat(window))
        expected = F.batch_norm(y, None, None, conv.norm.weight, conv.norm.bias, True, 0.0, conv.norm.eps)
        torch.testing.assert_close(out, expected[-2:])


@pytest.mark.parametrize("groups,stride,dilation", [(1, 1, 1), (2, 2, 1), (1, 1, 2)])
def test_compensation_is_exact_for_mean_and_short_by_square_of_delta_for_sqmean(groups, stride, dilation):
    conv = make(cin=4, window=2, groups=groups, stride=stride, dilation=dilation, padding=dilation)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    conv(x)
    delta = 0.05 * torch.randn_like(conv.weight)
    new_weight = conv.weight.detach() + delta
    mean_c, sqmean_c = conv.norm.compensated_history(new_weight)
    y_new = conv_out(conv, x, new_weight)
    torch.testing.assert_close(mean_c[0], y_new.mean((0, 2, 3)), rtol=0, atol=1e-12)
    shortfall = conv_out(conv, x, delta).pow(2).mean((0, 2, 3))
    torch.testing.assert_close(sqmean_c[0], y_new.pow(2).mean((0, 2, 3)) - shortfall, rtol=0, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 2])
def test_stored_gradients_equal_autograd_jacobians(groups):
    conv = make(cin=4, cout=4, k=3, window=2, groups=groups, stride=2)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    conv(x)
    w = conv.weight.detach()
    j_mean = jacobian(lambda w_: conv_out(conv, x, w_).mean((0, 2, 3)), w)
    j_sqmean = jacobian(lambda w_: conv_out(conv, x, w_).pow(2).mean((0, 2, 3)), w)
    per_group = 4 // groups
    for j in range(4):
        others = [q for q in range(4) if q != j]
        torch.testing.assert_close(j_sqmean[j, j], conv.norm.hist_dsqmean[0, j])
        torch.testing.assert_close(j_mean[j, j], conv.norm.hist_dmean[0, j // per_group])
        assert j_sqmean[j, others].abs().max() == 0 and j_mean[j, others].abs().max() == 0


def algorithm1(y, history, weight, bias, eps):
    """Lines 6-10 of Algorithm 1, with the (already compensated) history as constants."""
    mean, sqmean = y.mean((0, 2, 3)), y.pow(2).mean((0, 2, 3))
    means = [mean] + [m for m, _ in history]
    sqmeans = [sqmean] + [torch.maximum(s, m * m) for m, s in history]
    mean_bar = torch.stack(means).mean(0)
    var_bar = (torch.stack(sqmeans).mean(0) - mean_bar ** 2).clamp_min(0)
    shape = (1, -1, 1, 1)
    return (y - mean_bar.view(shape)) / torch.sqrt(var_bar.view(shape) + eps) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("rho", [0.0, 0.5, 1.0])
def test_training_matches_algorithm1_with_recomputed_taylor_terms(rho):
    """Real SGD steps; the reference keeps the raw past (x, W) and computes each Taylor term from
    them directly, independently of the layer's stored closed-form gradients."""
    conv = make(window=3, burnin=1, rho=rho)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    past = []  # (x, W) of iterations in the window
    for it in range(6):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
        w_now = conv.weight.detach().clone()
        history = []
        for x_old, w_old in past[-2:]:
            y_old = conv_out(conv, x_old, w_old)
            dy = conv_out(conv, x_old, w_now - w_old)
            history.append((y_old.mean((0, 2, 3)) + rho * dy.mean((0, 2, 3)),
                            y_old.pow(2).mean((0, 2, 3)) + rho * 2 * (y_old * dy).mean((0, 2, 3))))
        y = conv_out(conv, x)
        expected = algorithm1(y, history, conv.norm.weight, conv.norm.bias, conv.norm.eps)
        out = conv(x)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out)
        params = (x, conv.weight, conv.norm.weight, conv.norm.bias)
        for a, b in zip(torch.autograd.grad(out, params, g, retain_graph=True), torch.autograd.grad(expected, params, g)):
            torch.testing.assert_close(a, b)
        if it >= 1:  # stored only after burn-in
            past.append((x.detach(), w_now))
        opt.zero_grad()
        (out * g).sum().backward()
        opt.step()


def test_window_grows_by_one_then_drops_the_oldest():
    conv = make(window=3, burnin=2)
    means = []
    lengths = []
    for _ in range(6):
        x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
        means.append(conv_out(conv, x).mean((0, 2, 3)))
        conv(x)
        lengths.append(conv.norm.history_length)
    assert lengths == [0, 0, 1, 2, 2, 2]
    slots = conv.norm.hist_mean
    if torch.allclose(slots[0], means[5]):
        slots = slots.flip(0)
    torch.testing.assert_close(slots, torch.stack([means[4], means[5]]).detach())


def test_validation_keeps_sqmean_at_least_mean_squared_and_variance_nonnegative():
    """A huge rho makes the compensated nu fall below mu^2; the max() and the clamp keep it sane."""
    conv = make(window=2, rho=50.0)
    conv(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    with torch.no_grad():
        conv.weight.mul_(-3.0)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    mean_c, sqmean_c = conv.norm.compensated_history(conv.weight)
    assert (sqmean_c < mean_c ** 2).any(), "test setup should trigger the validation"
    y = conv_out(conv, x)
    expected = algorithm1(y, [(mean_c[0], sqmean_c[0])], conv.norm.weight, conv.norm.bias, conv.norm.eps)
    out = conv(x)
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(out).all() and torch.isfinite(conv.norm.running_var).all()
    assert (conv.norm.running_var >= 0).all()


def test_eval_uses_ema_of_the_statistics_used_in_training():
    conv = make(window=2)
    running_mean, running_var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    xs = [torch.randn(2, 3, 5, 5, dtype=torch.float64) for _ in range(3)]
    for i, x in enumerate(xs):
        conv(x)
        y = conv_out(conv, torch.cat(xs[max(0, i - 1): i + 1])).detach()  # unchanged weights: window = concat
        running_mean = 0.9 * running_mean + 0.1 * y.mean((0, 2, 3))
        running_var = 0.9 * running_var + 0.1 * y.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(conv.norm.running_mean, running_mean)
    torch.testing.assert_close(conv.norm.running_var, running_var)
    conv.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    expected = F.batch_norm(conv_out(conv, x), running_mean, running_var, conv.norm.weight, conv.norm.bias,
                            False, 0.0, conv.norm.eps)
    torch.testing.assert_close(conv(x), expected)


def test_trainer_driven_iteration_sets_burnin_and_rejects_a_second_call():
    conv = make(window=3, burnin=10)
    conv.norm.set_iteration(9)
    conv(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert conv.norm.history_length == 0  # iteration 9 < burn-in 10
    conv.norm.set_iteration(10)
    conv(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert conv.norm.history_length == 1
    with pytest.raises(RuntimeError, match="called twice"):
        conv(torch.randn(2, 3, 5, 5, dtype=torch.float64))


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="window_size"):
        CrossIterationBatchNorm2d(4, window_size=0)
    with pytest.raises(ValueError, match="momentum"):
        CrossIterationBatchNorm2d(4, momentum=1.5)
    with pytest.raises(ValueError, match="bias=False"):
        CBNConv2d(3, 4, 3, bias=True, norm=CrossIterationBatchNorm2d(4))
    with pytest.raises(ValueError, match="output channels"):
        CBNConv2d(3, 5, 3, norm=CrossIterationBatchNorm2d(4))
    norm = CrossIterationBatchNorm2d(4, window_size=2)
    with pytest.raises(RuntimeError, match="CBNConv2d"):
        norm(torch.randn(2, 4, 3, 3))
