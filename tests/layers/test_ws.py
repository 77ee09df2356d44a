"""Weight Standardization against its closed forms (BCN+WS paper eq. 5-7)."""
import pytest
import torch
import torch.nn.functional as F

from d2_smallbn.layers import WSConv2d


@pytest.mark.parametrize("mode", ["std", "var"])
def test_standardized_weight_has_zero_mean_and_unit_spread_per_filter(mode):
    conv = WSConv2d(4, 6, 3, ws_mode=mode, ws_eps=1e-5).double()
    with torch.no_grad():
        conv.weight.mul_(50).add_(3)
    w = conv.effective_weight().flatten(1)
    torch.testing.assert_close(w.mean(1), torch.zeros(6, dtype=torch.float64))
    spread = w.std(1) if mode == "std" else w.var(1, unbiased=False)
    torch.testing.assert_close(spread, torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["std", "var"])
def test_matches_the_formula_of_each_mode(mode):
    conv = WSConv2d(4, 6, 3, ws_mode=mode, ws_eps=1e-3, padding=1, bias=True).double()
    raw = conv.weight.detach().flatten(1)
    centred = raw - raw.mean(1, keepdim=True)
    if mode == "std":
        expected = centred / (torch.sqrt(centred.pow(2).sum(1, keepdim=True) / (raw.shape[1] - 1)) + 1e-3)
    else:
        expected = centred / torch.sqrt(centred.pow(2).mean(1, keepdim=True) + 1e-3)
    torch.testing.assert_close(conv.effective_weight().flatten(1), expected)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv2d(x, expected.view_as(conv.weight), conv.bias, padding=1))


@pytest.mark.parametrize("mode", ["std", "var"])
def test_output_invariant_to_per_filter_affine_weight_change(mode):
    conv = WSConv2d(4, 6, 3, ws_mode=mode).double()
    with torch.no_grad():
        conv.weight.mul_(100)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    before = conv(x)
    with torch.no_grad():
        a = torch.rand(6, 1, 1, 1, dtype=torch.float64) * 10 + 0.5
        b = torch.randn(6, 1, 1, 1, dtype=torch.float64) * 20
        conv.weight.mul_(a).add_(b)
    torch.testing.assert_close(conv(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["std", "var"])
def test_weight_gradient_sums_to_zero_per_filter(mode):
    conv = WSConv2d(4, 6, 3, ws_mode=mode, groups=2).double()
    conv(torch.randn(2, 4, 7, 7, dtype=torch.float64)).pow(3).sum().backward()
    torch.testing.assert_close(conv.weight.grad.flatten(1).sum(1), torch.zeros(6, dtype=torch.float64))


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="ws_mode"):
        WSConv2d(4, 6, 3, ws_mode="l2")
    with pytest.raises(ValueError, match="fan-in"):
        WSConv2d(2, 2, 1, groups=2, ws_mode="std")
