"""The statistics-error instrument (``d2_smallbn.engine.statistics_error``) on 2 processes (gloo),
1 image each, a small conv net with two norms: naiveSyncBN's error is 0 to float tolerance, and
per-process BN's error equals the deviation of each image's statistics from the whole batch's,
computed here independently from the layers' inputs (captured in the run), in two training steps."""
import datetime
from functools import partial

import pytest
import torch
import torch.distributed as dist
from torch import nn
from processes import local_url

pytestmark = [pytest.mark.slow,  # processes of their own (make test-fast leaves it out)
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with the gloo backend is not available")]
G, EPS = 2, 1e-5
LAYERS = {"first": "1", "second": "4"}


def make_net(norm):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1, bias=False), norm(6))


def images(step):
    torch.manual_seed(10 + step)
    return torch.randn(G, 3, 10, 12) * torch.tensor([1.0, 3.0]).view(G, 1, 1, 1) + torch.tensor([0.0, 2.0]).view(G, 1, 1, 1)


def _capture(store, layer, module, args):
    store.setdefault(layer, args[0].detach().clone())  # the first call of the step; returns None: input unchanged


def _worker(folder, sync):
    from detectron2.layers import NaiveSyncBatchNorm
    from detectron2.utils import comm

    from d2_smallbn.engine.statistics_error import StatisticsError

    rank = comm.get_rank()
    net = make_net(NaiveSyncBatchNorm if sync else nn.BatchNorm2d).train()
    probe = StatisticsError(net, LAYERS)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    errors, inputs = [], []
    modules = dict(net.named_modules())
    for step in range(2):
        inputs.append({})
        handles = [modules[name].register_forward_pre_hook(partial(_capture, inputs[-1], layer))
                   for layer, name in LAYERS.items()]
        probe.armed = True
        out = net(images(step)[rank:rank + 1])
        net(images(step)[rank:rank + 1])  # a second forward in the same step is not recorded
        errors.append(probe.measure())
        for handle in handles:
            handle.remove()
        optimizer.zero_grad()
        out.square().mean().backward()
        for p in net.parameters():  # every process takes the same step (as DDP would make it)
            dist.all_reduce(p.grad)
        optimizer.step()
    torch.save({"errors": errors, "inputs": inputs}, f"{folder}/{int(sync)}_{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from detectron2.engine import launch

    folder = tmp_path_factory.mktemp("statistics_error")
    for sync in (True, False):
        launch(_worker, G, dist_url=local_url(), args=(str(folder), sync),
               timeout=datetime.timedelta(minutes=3))
    return {sync: [torch.load(folder / f"{int(sync)}_{r}.pt") for r in range(G)] for sync in (True, False)}


def test_every_process_gets_the_same_errors_at_both_layers(runs):
    for results in runs.values():
        assert results[0]["errors"] == results[1]["errors"]
        assert all(set(e) == set(LAYERS) for e in results[0]["errors"])


def test_naive_sync_bn_has_zero_error(runs):
    for step in runs[True][0]["errors"]:
        for layer, error in step.items():
            assert error["mean"] < 1e-6 and error["var"] < 1e-5 and error["sqmean"] < 1e-5, (layer, error)


def expected_per_process_error(inputs):
    """The per-image deviation from the whole batch's statistics, averaged over channels and processes."""
    whole_mean, whole_var = inputs.mean((0, 2, 3)), inputs.var((0, 2, 3), unbiased=False)
    scale = whole_var + EPS
    whole_sqmean = inputs.square().mean((0, 2, 3))
    errors = {"mean": [], "var": [], "sqmean": []}
    for image in inputs:
        mean, var = image.mean((1, 2)), image.var((1, 2), unbiased=False)
        errors["mean"].append(((mean - whole_mean).abs() / scale.sqrt()).mean())
        errors["var"].append(((var - whole_var).abs() / scale).mean())
        errors["sqmean"].append(((image.square().mean((1, 2)) - whole_sqmean).abs() / (whole_sqmean + EPS)).mean())
    return {key: torch.stack(values).mean().item() for key, values in errors.items()}


def test_per_process_bn_error_is_the_per_image_deviation(runs):
    results = runs[False]
    for step, error in enumerate(results[0]["errors"]):
        for layer in LAYERS:
            inputs = torch.cat([r["inputs"][step][layer] for r in results]).double()
            want = expected_per_process_error(inputs)
            assert want["mean"] > 0.01  # the images differ: the agreement is not trivial
            for key in ("mean", "var", "sqmean"):
                assert error[layer][key] == pytest.approx(want[key], rel=1e-4), (step, layer, key)


def test_eval_statistics_error_compares_running_estimates_with_the_inputs_of_evaluation():
    from d2_smallbn.engine.statistics_error import eval_statistics_error
    from d2_smallbn.layers import CBNConv2d, CrossIterationBatchNorm2d

    torch.manual_seed(0)
    batches = [torch.randn(3, 2, 5, 5) * 2 + 1 for _ in range(4)]
    bn = nn.BatchNorm2d(2)
    cbn_conv = CBNConv2d(2, 2, 1, norm=CrossIterationBatchNorm2d(2, window_size=2))
    model = nn.Sequential(bn, cbn_conv, nn.GroupNorm(1, 2))  # GN: no running estimates, not measured
    x = torch.cat(batches)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    shift = torch.tensor([0.5, -0.25])
    bn.running_mean.copy_(mean + shift * (var + bn.eps).sqrt())  # off by 0.5 and 0.25 sigma
    bn.running_var.copy_(var * 1.5 - 0.5 * bn.eps)  # (var_used - var) / (var + eps) = 0.5
    with torch.no_grad():
        y = cbn_conv._conv_forward(bn.eval()(x), cbn_conv.weight, None)
    cbn_conv.norm.running_mean.copy_(y.mean((0, 2, 3)))
    cbn_conv.norm.running_var.copy_(y.var((0, 2, 3), unbiased=False))
    errors = eval_statistics_error(model, batches)
    assert set(errors) == {"0", "1.norm"} and not model.training
    assert errors["0"]["mean"] == pytest.approx(0.375, rel=1e-5)
    assert errors["0"]["var"] == pytest.approx(0.5, rel=1e-5)
    assert errors["1.norm"]["mean"] == pytest.approx(0.0, abs=1e-5) and errors["1.norm"]["var"] < 1e-5
    assert errors["0"]["input_abs_mean"] == pytest.approx(mean.abs().mean().item(), rel=1e-5)
    assert errors["0"]["input_std"] == pytest.approx(var.sqrt().mean().item(), rel=1e-5)
