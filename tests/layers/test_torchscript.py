"""TorchScript: the layers refuse torch.jit.script with a message that says what works (folding, then
jit.trace / ONNX export, or torch.compile); the folded model, BCN's group part included, scripts and
traces with the eval outputs of the unfolded layer."""
import pytest
import torch
from torch import nn

from layer_blocks import build_layer
from d2_smallbn.layers import CenteredConv2d, GroupNormPerGroupAffine, WSConv2d, fold_conv_norm

ADVICE = r"torch\.jit\.script does not support {}: .*fold_conv_norm.*torch\.jit\.trace or torch\.onnx\.export"


def trained(kind):
    layer = build_layer(kind)
    for _ in range(3):
        layer(torch.randn(2, 4, 6, 6)).square().mean().backward()
    return layer.eval()


def test_scripting_a_layer_or_a_model_holding_one_refuses_and_points_to_folding(kind):
    layer = build_layer(kind)
    norm_name = type(layer.norm).__name__
    with pytest.raises(RuntimeError, match=ADVICE.format(norm_name)):
        torch.jit.script(layer.norm)
    with pytest.raises(RuntimeError, match=ADVICE.format(r"\w+")):  # the conv (centring, WS) or its norm
        torch.jit.script(nn.Sequential(layer, nn.ReLU()))


@pytest.mark.parametrize("conv_class", [WSConv2d, CenteredConv2d])
def test_scripting_a_weight_transform_conv_refuses_and_points_to_folding(conv_class):
    with pytest.raises(RuntimeError, match=ADVICE.format(conv_class.__name__)):
        torch.jit.script(conv_class(4, 8, 3))


def test_the_folded_layer_scripts_and_traces_with_the_eval_outputs(kind):
    layer = trained(kind)
    folded = fold_conv_norm(layer)
    if kind == "bcn":
        assert isinstance(folded.norm, GroupNormPerGroupAffine)
    x = torch.randn(3, 4, 7, 5)
    with torch.no_grad():
        expected = layer(x)
        scripted = torch.jit.script(folded)
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
        traced = torch.jit.trace(folded, x)
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-5)


def test_scripted_group_part_keeps_fp32_statistics_and_the_one_value_per_group_check():
    part = GroupNormPerGroupAffine(8, num_groups=4)
    with torch.no_grad():
        part.weight.uniform_(0.5, 1.5)
        part.bias.uniform_(-1, 1)
    scripted = torch.jit.script(part)
    x = torch.randn(2, 8, 5, 5) * 300
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        out = scripted(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out, part(x.to(dtype)), rtol=0, atol=0)
    with pytest.raises(Exception, match="one value per group"):
        torch.jit.script(GroupNormPerGroupAffine(8, num_groups=8))(torch.randn(2, 8, 1, 1))
