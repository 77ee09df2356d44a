"""Any PyTorch model: ``d2_smallbn.convert_batchnorm(model, norm)`` turns torchvision's ResNet-18 into
CBN, MABN, BCN or BRN (with each norm's conv class), carries the BatchNorm statistics over, trains in
a plain loop driven by NormStateDriver, evaluates, and round-trips through a state_dict;
``convert_model``, the detectron2 call, warns on such a model and names ``convert_batchnorm``."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import d2_smallbn
from d2_smallbn.layers import (BatchChannelNorm2d, CBNConv2d, CenteredConv2d, CrossIterationBatchNorm2d,
                               MovingAverageBatchNorm2d, NormStateDriver, WSConv2d)
from d2_smallbn.layers.brn import BatchRenorm2d

# Small phases, so that 4 iterations cross them: CBN's burn-in and window, MABN's warmup, moving
# averages and clipping, BRN's ramps.
SETTINGS = {
    "CBN": ({"window_size": 2, "burnin_iters": 1}, CrossIterationBatchNorm2d, CBNConv2d),
    "MABN": ({"warmup_iters": 1, "buffer_size": 2, "clip_warmup_iters": 2}, MovingAverageBatchNorm2d,
             CenteredConv2d),
    "BCN": ({}, BatchChannelNorm2d, WSConv2d),
    "BRN": ({"warmup_iters": 1, "r_max_iters": 3, "d_max_iters": 2}, BatchRenorm2d, nn.Conv2d),
}
STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bn_resnet():
    """torchvision's ResNet-18 (random init) whose BatchNorms hold statistics and affine maps of their own."""
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def batchnorm_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]


def converted_norm(model, bn_name):
    """The norm that replaced BatchNorm ``bn_name``: in its place, or inside the conv before it."""
    parent_name, _, child = bn_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    replacement = getattr(parent, child)
    if not isinstance(replacement, nn.Identity):
        return replacement
    conv_name = {"bn1": "conv1", "bn2": "conv2", "1": "0"}[child]  # torchvision's names; downsample = (conv, bn)
    return getattr(parent, conv_name).norm


def train_steps(model, x, target, first, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    driver = NormStateDriver(model, optimizer)  # BCN's update rate follows the learning rate
    model.train()
    losses = []
    for i in range(first, first + steps):
        driver.before_step(i)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_convert_model_on_a_plain_pytorch_model_warns_and_names_convert_batchnorm():
    model = torchvision.models.resnet18()
    state = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match=r"convert_model\(ResNet\): nothing to convert.*20 torch BatchNorm2d "
                                         r"layer\(s\).*d2_smallbn\.convert_batchnorm\(model, 'CBN'\)"):
        assert d2_smallbn.convert_model(model, None) is model
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("norm", list(SETTINGS))
def test_torchvision_resnet_converts_carries_bn_statistics_trains_and_round_trips(norm):
    kwargs, layer_class, conv_class = SETTINGS[norm]
    torch.manual_seed(0)
    bn_model = bn_resnet().eval()
    bn_names = batchnorm_names(bn_model)
    model = d2_smallbn.convert_batchnorm(copy.deepcopy(bn_model), norm, **kwargs)

    # every BatchNorm is the norm now, and every conv feeding one has the norm's conv class
    assert batchnorm_names(model) == []
    norms = {name: converted_norm(model, name) for name in bn_names}
    assert all(type(n) is layer_class for n in norms.values()) and len(norms) == 20
    assert sum(type(m) is conv_class for m in model.modules()) == 20  # BRN keeps plain convs

    # the BatchNorm statistics and affine carried over, as each layer maps a BN checkpoint
    for name, new in norms.items():
        bn = bn_model.get_submodule(name)
        torch.testing.assert_close(new.weight, bn.weight, rtol=0, atol=0)
        torch.testing.assert_close(new.bias, bn.bias, rtol=0, atol=0)
        if norm == "MABN":
            torch.testing.assert_close(new.running_sqmean, bn.running_var + bn.running_mean ** 2)
        else:
            torch.testing.assert_close(new.running_mean, bn.running_mean, rtol=0, atol=0)
            torch.testing.assert_close(new.running_var, bn.running_var, rtol=0, atol=0)
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([1, 7])
    if norm in ("CBN", "BRN"):  # their eval is BN's with the running statistics: the BN model's outputs
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), bn_model(x), rtol=1e-4, atol=1e-4)

    # a plain training loop, driven by NormStateDriver
    losses = train_steps(model, x, target, 0, STEPS)
    assert all(torch.isfinite(torch.tensor(losses)))
    if norm == "BCN":
        assert all(float(n.update_rate) == pytest.approx(0.01) for n in norms.values())
    else:
        assert all(int(n.num_steps) == STEPS for n in norms.values())
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all() and torch.equal(model(x), out)  # eval changes no state

    # the state_dict round trip into a freshly converted model: the same eval outputs and the same next step
    fresh = d2_smallbn.convert_batchnorm(torchvision.models.resnet18(num_classes=10), norm, **kwargs)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    x_next = torch.randn(2, 3, 64, 64)
    next_outputs = []
    for m in (model, fresh):
        m.train()
        NormStateDriver(m, torch.optim.SGD(m.parameters(), lr=0.01)).before_step(STEPS)
        next_outputs.append(m(x_next))
    torch.testing.assert_close(next_outputs[1], next_outputs[0], rtol=0, atol=0)


def test_plain_convs_on_request_and_frozen_batchnorms_become_frozen_norms():
    bn_model = bn_resnet()
    bn_model.layer4.requires_grad_(False)  # e.g. a frozen stage
    model = d2_smallbn.convert_batchnorm(bn_model, "mabn", conv="plain")  # BN-pretrained weights: no centring
    assert not any(isinstance(m, (CenteredConv2d, nn.BatchNorm2d)) for m in model.modules())
    frozen = [m.frozen for m in model.modules() if isinstance(m, MovingAverageBatchNorm2d)]
    assert len(frozen) == 20 and sum(frozen) == 5  # layer4: 2 blocks x 2 + the downsample


def test_cbn_refuses_batchnorms_that_no_conv_feeds_and_leaves_the_model_as_it_was():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"CBN needs the conv that feeds it.*not fed directly by an nn.Conv2d.*: 0\. "
                                         r"Fix: convert the submodules"):
        d2_smallbn.convert_batchnorm(model, "CBN")
    assert [type(m) for m in model] == [nn.BatchNorm2d, nn.Conv2d, nn.BatchNorm2d]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match=r"no conv feeds 1 BatchNorm2d layer\(s\) directly \(0\): they become BRN"):
        d2_smallbn.convert_batchnorm(model, "BRN", conv="ws")
    assert [type(m) for m in model] == [BatchRenorm2d, WSConv2d, nn.Identity]
