"""Conventions every layer shares: empty inputs, fp16 under autocast, constant channels,
checkpoint round trips, eval purity, folding, and no detectron2 import."""
import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from layer_blocks import build_layer
from d2_smallbn.layers import fold_conv_norm


def train_steps(layer, steps, seed=1):
    gen = torch.Generator(torch.get_default_device()).manual_seed(seed)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x = torch.randn(2, 4, 6, 6, generator=gen)
        opt.zero_grad()
        layer(x).pow(2).mean().backward()
        opt.step()
    return opt


def state_copy(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def assert_finite_state(module):
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), k


def test_empty_input_gives_empty_output_no_state_change_and_zero_grads(kind):
    layer = build_layer(kind)
    train_steps(layer, 4)
    before = state_copy(layer)
    x = torch.randn(0, 4, 6, 6, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 8, 6, 6)
    out.sum().backward()
    assert_states_equal(state_copy(layer), before)
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    layer.eval()
    assert layer(torch.randn(0, 4, 6, 6)).shape == (0, 8, 6, 6)


def test_constant_channels_give_no_nan(kind):
    layer = build_layer(kind)
    for value in (0.0, 3.0, 0.0, 3.0, 1.0, 1.0):
        x = torch.full((2, 4, 6, 6), value, requires_grad=True)
        out = layer(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert_finite_state(layer)
    for p in layer.parameters():
        assert torch.isfinite(p.grad).all()


def test_fp16_under_autocast_keeps_dtype_and_does_not_overflow(kind, device):
    layer = build_layer(kind)
    for step in range(5):
        x = torch.randn(2, 4, 6, 6) * 300  # conv outputs well above 256: x^2 would overflow in fp16
        with torch.autocast(device.type, dtype=torch.float16):
            out = layer(x)
            assert out.dtype == torch.float16
            y = F.conv2d(x, layer.effective_weight(), None, padding=1)
        assert y.abs().max() > 256
        assert torch.isfinite(out).all()
        out.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    assert_finite_state(layer)
    for v in layer.state_dict().values():
        assert v.dtype != torch.float16


def test_state_dict_round_trip_mid_training_gives_an_identical_next_step(kind):
    layer = build_layer(kind)
    opt = train_steps(layer, 5)
    resumed = build_layer(kind)
    resumed.load_state_dict(copy.deepcopy(layer.state_dict()))
    resumed_opt = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    x = torch.randn(2, 4, 6, 6)
    for model, optimizer in ((layer, opt), (resumed, resumed_opt)):
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
    torch.testing.assert_close(resumed(x), layer(x), rtol=0, atol=0)
    for (name, a), b in zip(layer.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)
    assert_states_equal(state_copy(resumed), state_copy(layer))


def test_eval_changes_no_state_and_folding_preserves_outputs(kind):
    layer = build_layer(kind)
    train_steps(layer, 6)
    layer.eval()
    before = state_copy(layer)
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        out = layer(x)
        folded = fold_conv_norm(layer)
        torch.testing.assert_close(folded(x), out, rtol=1e-5, atol=1e-5)
    assert_states_equal(state_copy(layer), before)
    assert type(folded.weight) is torch.nn.Parameter and folded.bias is not None
    if kind != "bcn":
        assert folded.norm is None  # a single plain conv


def test_fold_handles_plain_batchnorm_and_activation():
    from d2_smallbn.layers import NormActConv2d

    layer = NormActConv2d(4, 8, 3, padding=1, bias=True, norm=torch.nn.BatchNorm2d(8), activation=torch.nn.ReLU())
    train_steps(layer, 3)
    layer.eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(fold_conv_norm(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_layers_import_without_detectron2():
    code = ("import sys; sys.modules['detectron2'] = None\n"
            "import d2_smallbn.layers\n"
            "from d2_smallbn.norms import NORMS, resolve\n"  # the table of norms is pure PyTorch too
            "layers = [spec.build(32, resolve()) for spec in NORMS.values()]\n"
            "assert not any(m.startswith('detectron2') and sys.modules[m] is not None for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
