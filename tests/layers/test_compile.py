"""torch.compile gives eager's results: every layer, in training and eval, over iterations in which its
state changes (CBN's burn-in and window filling, MABN's warmup / moving averages / clipping, BRN's
ramp, BCN's update rate following the learning rate).

The backends "eager" and "aot_eager" run here. "inductor" compiles C++ on CPU (about 6-30 s per
graph on the 2-core reference machine), so it runs only with D2_SMALLBN_TEST_INDUCTOR=1.
"""
import copy
import os

import pytest
import torch

from layer_blocks import build_layer
from d2_smallbn.layers import NormStateDriver

STEPS = 6  # build_layer's small settings put every phase change of every layer within 6 iterations
BACKENDS = ["eager", "aot_eager", pytest.param("inductor", marks=pytest.mark.skipif(
    os.environ.get("D2_SMALLBN_TEST_INDUCTOR") != "1", reason="slow on CPU; D2_SMALLBN_TEST_INDUCTOR=1 runs it"))]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled_graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class Run:
    """One copy of the layer, called through ``forward`` (the module or its compiled wrapper), trained
    by SGD with a learning rate that changes every iteration and driven by NormStateDriver."""

    def __init__(self, layer, forward):
        self.layer, self.forward = layer, forward
        self.opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        self.driver = NormStateDriver(layer, self.opt)

    def train_step(self, i, x, grad_out):
        self.layer.train()
        self.opt.param_groups[0]["lr"] = 0.1 / (i + 1)  # BCN's update rate follows it
        self.driver.before_step(i)
        x = x.clone().requires_grad_()
        self.opt.zero_grad()
        out = self.forward(x)
        out.backward(grad_out)
        grads = {name: p.grad.clone() for name, p in self.layer.named_parameters()}
        self.opt.step()
        return out.detach(), x.grad, grads

    def eval_output(self, x):
        self.layer.eval()
        with torch.no_grad():
            return self.forward(x)


def assert_same(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_layer_follows_eager_through_state_changes(kind, backend):
    layer = build_layer(kind)
    twin = copy.deepcopy(layer)
    eager, compiled = Run(layer, layer), Run(twin, torch.compile(twin, backend=backend))
    gen = torch.Generator(torch.get_default_device()).manual_seed(3)
    for i in range(STEPS):
        x = torch.randn(2, 4, 6, 6, generator=gen)
        grad_out = torch.randn(2, 8, 6, 6, generator=gen)
        (out, grad_x, grads), (c_out, c_grad_x, c_grads) = eager.train_step(i, x, grad_out), \
            compiled.train_step(i, x, grad_out)
        assert_same(c_out, out, f"{kind} training output at iteration {i}")
        assert_same(c_grad_x, grad_x, f"{kind} input gradient at iteration {i}")
        for name in grads:
            assert_same(c_grads[name], grads[name], f"{kind} gradient of {name} at iteration {i}")
        for name, value in layer.state_dict().items():
            assert_same(twin.state_dict()[name], value, f"{kind} {name} after iteration {i}")
        probe = torch.randn(2, 4, 6, 6, generator=gen)
        assert_same(compiled.eval_output(probe), eager.eval_output(probe), f"{kind} eval output after iteration {i}")
    assert compiled_graphs() > 0, "nothing was compiled: the comparison would be eager against eager"
