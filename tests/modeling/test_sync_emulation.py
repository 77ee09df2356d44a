"""The per-GPU study's emulation is exact: G CPU processes (detectron2's ``launch``, gloo), each with
n images, DDP and detectron2's naiveSyncBN, are BN in one process over the same G*n images.

A small conv net (conv, naiveSyncBN, ReLU, conv, naiveSyncBN) with a plain mean loss trains 3 SGD
steps (momentum 0.9). In every step each process's outputs are the reference's rows for its images,
each process's averaged gradients are the reference's, and so are the parameters after each step;
running_mean is the reference BN's. naiveSyncBN keeps the biased batch variance in running_var (torch's
BN keeps the unbiased one), so running_var is checked against that EMA computed from the reference's
batch statistics. Per-process BN (no sync) is checked to differ, so the agreement is not trivial.
"""
import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn
from processes import local_url

pytestmark = [pytest.mark.slow,  # processes of their own (make test-fast leaves it out)
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with the gloo backend is not available")]
G, N, STEPS, LR, MOMENTUM = 2, 3, 3, 0.1, 0.9


def make_net(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1, bias=False), norm(4))


def all_images():
    torch.manual_seed(1)
    return torch.randn(G * N, 3, 10, 12) * 2 + 0.5


def train(net, images, wrap=lambda m: m):
    """Outputs, gradients and parameters of each step, and the final buffers."""
    model = wrap(net)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    record = {"outputs": [], "grads": [], "params": []}
    for _ in range(STEPS):
        optimizer.zero_grad()
        out = model(images)
        out.mean().backward()
        optimizer.step()
        record["outputs"].append(out.detach().clone())
        record["grads"].append([p.grad.clone() for p in net.parameters()])
        record["params"].append([p.detach().clone() for p in net.parameters()])
    record["buffers"] = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    return record


def _worker(folder, sync):
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    rank = comm.get_rank()
    net = make_net(NaiveSyncBatchNorm if sync else nn.BatchNorm2d)
    images = all_images()[rank * N:(rank + 1) * N]
    record = train(net, images, lambda m: DistributedDataParallel(m, device_ids=None, broadcast_buffers=False))
    torch.save(record, f"{folder}/rank{rank}_{'sync' if sync else 'local'}.pt")


def biased_running_var(net, images):
    """running_var of each BN layer of ``net`` if it were updated with the biased batch variance."""
    batch_vars = {}

    def capture(name):
        return lambda module, inputs: batch_vars.setdefault(name, []).append(
            inputs[0].detach().var((0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]
    train(net, images)
    for h in handles:
        h.remove()
    expected = {}
    for name, variances in batch_vars.items():
        running = torch.ones_like(variances[0])
        for v in variances:
            running = running + 0.1 * (v - running)
        expected[f"{name}.running_var"] = running
    return expected


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from detectron2.engine import launch

    folder = tmp_path_factory.mktemp("sync_emulation")
    for sync in (True, False):
        launch(_worker, G, dist_url=local_url(), args=(str(folder), sync),
               timeout=datetime.timedelta(minutes=3))
    load = lambda name: [torch.load(folder / f"rank{r}_{name}.pt") for r in range(G)]  # noqa: E731
    return load("sync"), load("local")


def test_sync_bn_over_processes_is_bn_over_the_whole_batch(runs):
    sync, _ = runs
    images = all_images()
    reference = train(make_net(nn.BatchNorm2d), images)
    for step in range(STEPS):
        outputs = torch.cat([r["outputs"][step] for r in sync])
        torch.testing.assert_close(outputs, reference["outputs"][step], rtol=1e-5, atol=1e-5)
        for r in sync:
            for got, want in zip(r["grads"][step], reference["grads"][step]):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            for got, want in zip(r["params"][step], reference["params"][step]):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    expected_var = biased_running_var(make_net(nn.BatchNorm2d), images)
    for r in sync:
        for key, value in r["buffers"].items():
            if key.endswith("running_mean"):
                torch.testing.assert_close(value, reference["buffers"][key], rtol=1e-5, atol=1e-6)
            elif key.endswith("running_var"):
                torch.testing.assert_close(value, expected_var[key], rtol=1e-5, atol=1e-6)


def test_per_process_bn_is_not_bn_over_the_whole_batch(runs):
    _, local = runs
    reference = train(make_net(nn.BatchNorm2d), all_images())
    outputs = torch.cat([r["outputs"][0] for r in local])
    assert (outputs - reference["outputs"][0]).abs().max() > 1e-2  # each process normalizes by its own images
    assert not torch.allclose(local[0]["buffers"]["1.running_mean"], local[1]["buffers"]["1.running_mean"])
