"""BCN against Algorithm 1 written out with plain tensor ops, F.group_norm, and its estimator's
fixed point."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from d2_smallbn.layers import BatchChannelNorm2d

C, G = 8, 4


def make(rate=None):
    norm = BatchChannelNorm2d(C, num_groups=G).double()
    with torch.no_grad():
        for p in (norm.weight, norm.group_weight):
            p.uniform_(0.5, 1.5)
        for p in (norm.bias, norm.group_bias):
            p.uniform_(-0.5, 0.5)
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    if rate is not None:
        norm.set_update_rate(rate)
    return norm


def group_part_reference(x, group_weight, group_bias, eps):
    n, c, h, w = x.shape
    xg = x.reshape(n, G, -1)
    xg = (xg - xg.mean(-1, keepdim=True)) / torch.sqrt(xg.var(-1, unbiased=False, keepdim=True) + eps)
    return xg.reshape(n, G, c // G, h, w).mul(group_weight.view(1, G, 1, 1, 1)).add(
        group_bias.view(1, G, 1, 1, 1)).reshape(n, c, h, w)


def test_group_step_equals_f_group_norm_with_per_group_affine():
    norm = make(rate=0.0)
    with torch.no_grad():
        norm.weight.fill_(1.0), norm.bias.fill_(0.0), norm.running_mean.zero_(), norm.running_var.fill_(1 - norm.eps)
    x = torch.randn(2, C, 5, 6, dtype=torch.float64)
    expected = F.group_norm(x, G, norm.group_weight.repeat_interleave(C // G),
                            norm.group_bias.repeat_interleave(C // G), norm.eps)
    torch.testing.assert_close(norm(x), expected)


def reference_step(norm, x, rate):
    """Algorithm 1 for one call, from the layer's current estimates; returns (out, new estimates)."""
    shape = (1, -1, 1, 1)
    mu_old, var_old = norm.running_mean.clone(), norm.running_var.clone()
    m_b = x.detach().mean((0, 2, 3))
    v_b = (x.detach() - mu_old.view(shape)).pow(2).mean((0, 2, 3))
    mu, var = mu_old + rate * (m_b - mu_old), var_old + rate * (v_b - var_old)
    x1 = norm.weight.view(shape) * (x - mu.view(shape)) / torch.sqrt(var.view(shape) + norm.eps) \
        + norm.bias.view(shape)
    return group_part_reference(x1, norm.group_weight, norm.group_bias, norm.eps), mu, var


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_training_step_matches_algorithm1(rate):
    norm = make(rate=rate)
    x = (torch.randn(2, C, 5, 6, dtype=torch.float64) * 2 + 1).requires_grad_()
    mu_old, var_old = norm.running_mean.clone(), norm.running_var.clone()
    m_b = x.detach().mean((0, 2, 3))
    v_b = (x.detach() - mu_old.view(1, -1, 1, 1)).pow(2).mean((0, 2, 3))
    expected, mu_new, var_new = reference_step(norm, x, rate)
    out = norm(x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(norm.running_mean, mu_new)
    torch.testing.assert_close(norm.running_var, var_new)
    if rate == 1.0:  # the estimates are the batch mean and the spread about the OLD mean
        torch.testing.assert_close(norm.running_mean, m_b)
        torch.testing.assert_close(norm.running_var, v_b)
    if rate == 0.0:
        torch.testing.assert_close(norm.running_mean, mu_old)
        torch.testing.assert_close(norm.running_var, var_old)
    g = torch.randn_like(out)
    params = (x, norm.weight, norm.bias, norm.group_weight, norm.group_bias)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g)):
        torch.testing.assert_close(a, b)


def test_each_sample_output_does_not_depend_on_other_samples_through_autograd():
    norm = make(rate=0.5)
    x = torch.randn(2, C, 4, 4, dtype=torch.float64, requires_grad=True)
    out = norm(x)
    (grad,) = torch.autograd.grad(out[0].pow(2).sum(), x)
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0


def test_with_rate_zero_a_sample_output_ignores_other_samples():
    norm = make(rate=0.0)
    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    out_a = norm(x)[0]
    x[1] = 10 * torch.randn_like(x[1])
    torch.testing.assert_close(norm(x)[0], out_a)


def test_estimates_converge_to_the_mean_and_variance_of_iid_data():
    norm = make(rate=0.02)
    mean = torch.linspace(-2, 2, C, dtype=torch.float64).view(1, -1, 1, 1)
    std = torch.linspace(0.5, 3, C, dtype=torch.float64).view(1, -1, 1, 1)
    for _ in range(600):
        norm(torch.randn(2, C, 8, 8, dtype=torch.float64) * std + mean)
    torch.testing.assert_close(norm.running_mean, mean.flatten(), atol=0.05, rtol=0)
    torch.testing.assert_close(norm.running_var, std.flatten() ** 2, rtol=0.05, atol=0)


def test_rate_from_a_shared_tensor_and_warning_when_never_set():
    norm = make()
    with pytest.warns(UserWarning, match="update rate 0"):
        norm(torch.randn(2, C, 3, 3, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        norm(torch.randn(2, C, 3, 3, dtype=torch.float64))  # warns once only
    norm.set_update_rate(torch.tensor(0.25))
    assert float(norm.update_rate) == 0.25
    with pytest.raises(ValueError, match="update rate"):
        norm.set_update_rate(-1.0)
    with pytest.raises(ValueError, match="0-dim"):
        norm.set_update_rate(torch.ones(2))


def test_bad_group_count_has_a_clear_error():
    with pytest.raises(ValueError, match="divide"):
        BatchChannelNorm2d(10, num_groups=4)


def test_two_calls_in_one_iteration_each_get_the_gradient_of_the_estimates_they_used():
    norm = make(rate=0.5)
    xs = [torch.randn(2, C, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    outs, expected = [], []
    for x in xs:
        out_ref, mu, var = reference_step(norm, x, 0.5)
        outs.append(norm(x))  # updates the estimates in place before the first call's backward
        expected.append(out_ref)
        torch.testing.assert_close(norm.running_mean, mu)
        torch.testing.assert_close(norm.running_var, var)
    g = [torch.randn_like(o) for o in outs]
    params = (*xs, norm.weight, norm.bias, norm.group_weight, norm.group_bias)
    got = torch.autograd.grad(outs, params, g)
    for a, b in zip(got, torch.autograd.grad(expected, params, g)):
        torch.testing.assert_close(a, b)


def test_parameter_gradients_without_an_input_gradient():
    norm = make(rate=0.5)
    x = torch.randn(2, C, 4, 5, dtype=torch.float64)
    expected, _, _ = reference_step(norm, x, 0.5)
    out = norm(x)
    g = torch.randn_like(out)
    params = (norm.weight, norm.bias, norm.group_weight, norm.group_bias)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(expected, params, g)):
        torch.testing.assert_close(a, b)
