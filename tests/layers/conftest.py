import pytest
import torch

from d2_smallbn.layers import (BatchChannelNorm2d, CBNConv2d, CenteredConv2d, CrossIterationBatchNorm2d,
                               MovingAverageBatchNorm2d, WSConv2d)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device"))]


@pytest.fixture(autouse=True, params=DEVICES)
def device(request):
    """Every layer test runs on each device: tensors and modules the test creates land on it (torch's
    default device), against the same references with the same tolerances. TF32 is off on CUDA: it
    is a precision mode (10-bit mantissa products), not part of the math these tests check."""
    dev = torch.device(request.param)
    if dev.type == "cpu":
        yield dev
        return
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_default_device(dev)
    try:
        yield dev
    finally:
        torch.set_default_device("cpu")
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def build_layer(kind, cin=4, cout=8):
    """A conv + norm block of each method, with small windows so that a few steps reach the
    steady-state regime (window full, moving averages and clipping active)."""
    if kind == "cbn":
        return CBNConv2d(cin, cout, 3, padding=1, norm=CrossIterationBatchNorm2d(cout, window_size=3, burnin_iters=1))
    if kind == "mabn":
        norm = MovingAverageBatchNorm2d(cout, buffer_size=2, warmup_iters=2, clip_warmup_iters=3)
        return CenteredConv2d(cin, cout, 3, padding=1, norm=norm)
    if kind == "bcn":
        layer = WSConv2d(cin, cout, 3, padding=1, norm=BatchChannelNorm2d(cout, num_groups=4))
        layer.norm.set_update_rate(0.1)
        return layer
    if kind == "brn":
        from d2_smallbn.layers import NormActConv2d
        from d2_smallbn.layers.brn import BatchRenorm2d
        return NormActConv2d(cin, cout, 3, padding=1, bias=False,
                             norm=BatchRenorm2d(cout, warmup_iters=1, r_max_iters=3, d_max_iters=2))
    raise ValueError(kind)


KINDS = ("cbn", "mabn", "bcn", "brn")


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param
