import pytest
import torch

from layer_blocks import KINDS

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


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param
