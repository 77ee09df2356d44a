"""Two inputs every layer must handle (issue 14, items 4 and 5):

- a model cast as a whole with ``.to(torch.bfloat16)`` or ``.to(torch.float16)``: every norm and conv
  runs, in training and in eval, its output has the model's dtype, and its statistics stay float32
  (methods.md: statistics in fp32), so they match the float32 layer fed the same data;
- one value per channel (batch 1, a 1x1 map). torch's BatchNorm raises. Decided per layer:
  CBN raises (its current-batch variance is 0, and its running variance would collapse to 0);
  MABN raises while it uses batch statistics (warmup: the output would be sign(x) and the gradient
  0) and is well defined once its moving averages take over; BCN's estimates stay well defined
  (they move towards the sample about the old estimate) and only a group with a single value
  (C/G = 1 and a 1x1 map) raises; a centred or "var"-standardized conv with one weight per filter
  (its effective weight would be 0) is refused when built.
"""
import copy

import pytest
import torch

from layer_blocks import KINDS, build_layer
from d2_smallbn.layers import (BatchChannelNorm2d, CBNConv2d, CenteredConv2d, CrossIterationBatchNorm2d,
                               GroupNormPerGroupAffine, MovingAverageBatchNorm2d, WSConv2d, fold_conv_norm,
                               standardize_weight)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LOW = [torch.bfloat16, torch.float16]
STEPS = 6  # past CBN's burn-in and window fill, MABN's warmup, ring fill and clipping onset (conftest)


def float_buffers(module):
    return {n: b for n, b in module.named_buffers() if b.is_floating_point()}


def inputs(steps, seed=3, shape=(2, 4, 6, 6)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) * 2 + 0.5 for _ in range(steps)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_a_model_cast_to_low_precision_trains_and_evaluates_with_fp32_statistics(kind, dtype, device):
    reference = build_layer(kind).to(device)
    cast = copy.deepcopy(reference).to(device=device, dtype=dtype)
    assert all(p.dtype == dtype for p in cast.parameters())
    assert all(b.dtype == torch.float32 for b in float_buffers(cast).values()), \
        {n: b.dtype for n, b in float_buffers(cast).items()}
    for x in inputs(STEPS):
        x = x.to(device=device, dtype=dtype)
        out = cast(x.requires_grad_())
        assert out.dtype == dtype and torch.isfinite(out.float()).all()
        out.float().square().mean().backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
        assert all(p.grad.dtype == dtype and torch.isfinite(p.grad.float()).all() for p in cast.parameters())
        reference(x.detach().float())  # same (rounded) data through the float32 layer
    for name, buf in float_buffers(cast).items():
        assert buf.dtype == torch.float32, name
        assert torch.isfinite(buf).all(), name
        # weights rounded to bf16/fp16 move the statistics by about that rounding, not more
        torch.testing.assert_close(buf, float_buffers(reference)[name], rtol=0.05, atol=0.05, msg=name)
    cast.eval()
    reference.eval()
    x = inputs(1, seed=9)[0].to(device=device, dtype=dtype)
    with torch.no_grad():
        out = cast(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference(x.float()), rtol=0.05, atol=0.1)
        folded = fold_conv_norm(cast)
        assert folded.weight.dtype == dtype
        torch.testing.assert_close(folded(x).float(), out.float(), rtol=0.05, atol=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_weight_transforms_are_computed_in_fp32_in_a_cast_model(dtype, device):
    ws = WSConv2d(8, 16, 3).to(device=device, dtype=dtype)
    centred = CenteredConv2d(8, 16, 3).to(device=device, dtype=dtype)
    w = ws.weight.detach().float()
    torch.testing.assert_close(ws.effective_weight(), standardize_weight(w).to(dtype), rtol=0, atol=0)
    c = centred.weight.detach().float()
    expected = (c - c.mean(dim=(1, 2, 3), keepdim=True)).to(dtype)
    torch.testing.assert_close(centred.effective_weight(), expected, rtol=0, atol=0)
    for conv in (ws, centred, CBNConv2d(8, 16, 3).to(device=device, dtype=dtype)):
        x = torch.randn(2, 8, 5, 5, device=device, dtype=dtype, requires_grad=True)
        out = conv(x)
        assert out.dtype == dtype
        out.float().sum().backward()
        assert conv.weight.grad.dtype == dtype and torch.isfinite(conv.weight.grad.float()).all()


def test_float64_layers_keep_float64_statistics():
    layer = build_layer("mabn").double()
    assert all(b.dtype == torch.float64 for b in float_buffers(layer).values())
    layer(torch.randn(2, 4, 6, 6, dtype=torch.float64)).sum().backward()


# ---- one value per channel ----------------------------------------------------------------------

def single_values(steps, seed=5, channels=4):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, channels, 1, 1, generator=gen) * 3 + 2 for _ in range(steps)]


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("steps_before", [0, 4], ids=["burn-in", "window"])
def test_cbn_refuses_one_value_per_channel_in_training_and_changes_nothing(steps_before):
    layer = build_layer("cbn")
    for x in inputs(steps_before):
        layer(x)
    before = state(layer)
    with pytest.raises(ValueError, match=r"one value per channel.*\(1, 8, 1, 1\).*Fix:"):
        layer(single_values(1)[0])
    assert_same_state(state(layer), before)
    layer(inputs(1)[0])  # the layer still trains afterwards (no pending iteration left behind)
    layer.eval()
    out = layer(single_values(1)[0])  # eval is a per-channel affine map: fine at any size
    assert out.shape == (1, 8, 1, 1) and torch.isfinite(out).all()


def test_mabn_refuses_one_value_per_channel_while_it_uses_batch_statistics():
    layer = build_layer("mabn")  # batch statistics at steps 1-2 (warmup 2, ring of 2)
    before = state(layer)
    with pytest.raises(ValueError, match=r"one value per channel.*batch statistics.*Fix:"):
        layer(single_values(1)[0])
    assert_same_state(state(layer), before)
    ring_of_one = CenteredConv2d(4, 8, 3, padding=1, norm=MovingAverageBatchNorm2d(8, buffer_size=1, warmup_iters=0))
    for x in inputs(3):
        ring_of_one(x)  # a ring of one is the current batch at every step
    with pytest.raises(ValueError, match="one value per channel"):
        ring_of_one(single_values(1)[0])


def test_mabn_is_well_defined_with_one_value_per_channel_after_warmup():
    layer = build_layer("mabn")
    for x in inputs(4):  # past warmup: the moving averages over the ring are used
        layer(x).square().mean().backward()
    for x in single_values(30):
        x.requires_grad_()
        out = layer(x)
        out.square().mean().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        assert x.grad.abs().sum() > 0  # not the zero gradient of a one-value batch normalization
    sqmean = layer.norm.running_sqmean
    with torch.no_grad():
        y = torch.cat([torch.nn.functional.conv2d(x, layer.effective_weight(), padding=1) for x in single_values(200)])
    expected = y.square().mean((0, 2, 3))
    assert torch.isfinite(sqmean).all() and (sqmean > 0.1 * expected).all()  # no collapse towards 0
    layer.eval()
    assert torch.isfinite(layer(single_values(1)[0])).all()


def test_bcn_estimates_stay_well_defined_with_one_value_per_channel():
    norm = BatchChannelNorm2d(8, num_groups=4)  # two channels per group: the GN part is defined
    norm.set_update_rate(0.05)
    gen = torch.Generator().manual_seed(0)
    mean, std = torch.linspace(-2, 2, 8).view(1, 8, 1, 1), torch.linspace(0.5, 3, 8).view(1, 8, 1, 1)
    for _ in range(600):
        x = (torch.randn(1, 8, 1, 1, generator=gen) * std + mean).requires_grad_()
        out = norm(x)
        out.square().sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    # the estimates converge to the data's mean and variance instead of collapsing
    torch.testing.assert_close(norm.running_mean, mean.flatten(), rtol=0, atol=0.6)
    torch.testing.assert_close(norm.running_var.sqrt(), std.flatten(), rtol=0.35, atol=0)
    assert x.grad.abs().sum() > 0
    norm.eval()
    assert torch.isfinite(norm(torch.randn(1, 8, 1, 1))).all()


@pytest.mark.parametrize("training", [True, False])
def test_a_group_with_a_single_value_is_refused(training):
    norm = BatchChannelNorm2d(4, num_groups=4).train(training)
    norm.set_update_rate(0.1)
    before = state(norm)
    with pytest.raises(ValueError, match=r"one value per group.*num_groups=4.*Fix:"):
        norm(torch.randn(2, 4, 1, 1))
    assert_same_state(state(norm), before)
    norm(torch.randn(2, 4, 2, 1))  # two values per group: fine
    with pytest.raises(ValueError, match="one value per group"):
        GroupNormPerGroupAffine(4, num_groups=4)(torch.randn(1, 4, 1, 1))


def test_convs_with_one_weight_per_filter_are_refused_where_their_transform_leaves_zero():
    with pytest.raises(ValueError, match="one weight per filter.*Fix:"):
        CenteredConv2d(1, 8, 1)
    with pytest.raises(ValueError, match="one weight per filter.*Fix:"):
        WSConv2d(1, 8, 1, ws_mode="var")
    with pytest.raises(ValueError, match="ws_mode='std'"):
        WSConv2d(4, 8, 1, groups=4)  # one weight per filter through groups
    conv = CBNConv2d(1, 8, 1, norm=CrossIterationBatchNorm2d(8, window_size=2))  # CBN has no weight transform
    assert torch.isfinite(conv(torch.randn(2, 1, 3, 3))).all()
