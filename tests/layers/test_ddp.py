"""Two-process gloo DistributedDataParallel training with each norm layer of d2_smallbn.layers.

The layers keep per-rank statistics (no cross-rank sync): DDP is built with
``broadcast_buffers=False``, so every rank's norm buffers (running estimates, MABN's rings,
CBN's history) must be computed from that rank's data only, while the weights stay identical
across ranks because DDP averages the gradients.

Each test trains a tiny conv net for a few SGD steps in two spawned processes, each rank on its
own data, and compares with a reference built in the test process without DDP: two replicas
from the same initial state, each run on one rank's data, with their gradients averaged by
hand before both take the same SGD step. Checked against that reference, step by step:

- the loss of every rank (forward on that rank's data with that rank's buffers);
- the averaged gradient DDP leaves in ``.grad`` on each rank;
- the final weights (and, bit for bit, that both ranks hold the same weights);
- every buffer of every rank against the replica of that rank, and the data-dependent buffers
  differ between the two ranks.

A replica that saw the other rank's data, or buffers that DDP synchronized (broadcast_buffers=True,
or an all-reduce of the statistics), fails these checks from the second step on: the losses and
then everything else diverge. For MABN the reference also checks that the SMA backward (psi_buffer,
written during backward) and the clipping of r were exercised.

All kinds train in one spawn of two processes (a module fixture): starting the processes costs far
more than the training.

Results come back through ``torch.save`` files in the test's tmp_path.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from d2_smallbn.layers import (
    BatchChannelNorm2d,
    CBNConv2d,
    CenteredConv2d,
    CrossIterationBatchNorm2d,
    MovingAverageBatchNorm2d,
    NormActConv2d,
    NormStateDriver,
    WSConv2d,
)
from d2_smallbn.layers.brn import BatchRenorm2d
from processes import free_port

pytestmark = [pytest.mark.slow,  # processes of their own (make test-fast leaves it out)
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with the gloo backend is not available")]

WORLD_SIZE = 2
STEPS = 6
BATCH = 2  # images per rank
SIZE = 8  # 8x8 images
CHANNELS = (3, 8, 8)
NUM_CLASSES = 3
LR = 0.1
MOMENTUM = 0.9
BCN_RATE = 0.1
# Rank r's images are N(DATA_SHIFT[r], DATA_SCALE[r]^2): very different statistics per rank. With
# these, MABN's unclipped r = chi_bar / chi_hat (EMA starting at 1) is in [1/5, 5] for some channels
# and below 1/5 for others (rank 0, conv2), so the clamp really acts; the test checks both.
DATA_SCALE = (1.0, 20.0)
DATA_SHIFT = (0.0, 3.0)

KINDS = ("cbn", "mabn", "bcn", "brn")

# Buffers whose values depend on the data, so they must differ between the two ranks.
DATA_BUFFERS = {
    "cbn": ("running_mean", "running_var", "hist_mean", "hist_sqmean", "hist_mean_proj", "hist_sqmean_proj",
            "hist_dmean", "hist_dsqmean"),
    "mabn": ("running_sqmean", "sqmean_buffer", "psi_buffer"),
    "bcn": ("running_mean", "running_var"),
    "brn": ("running_mean", "running_var"),
}


def assert_close(got, want, what):
    """Tight comparison, relative to the tensor's scale (MABN's psi_buffer is ~1e-4, BCN's
    running_var ~1e3). In practice DDP and the reference agree bit for bit."""
    atol = 1e-5 * want.abs().max().item()
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def make_conv(kind, cin, cout):
    if kind == "cbn":
        return CBNConv2d(cin, cout, 3, padding=1,
                         norm=CrossIterationBatchNorm2d(cout, window_size=3, burnin_iters=1))
    if kind == "mabn":
        return CenteredConv2d(cin, cout, 3, padding=1,
                              norm=MovingAverageBatchNorm2d(cout, warmup_iters=2, buffer_size=2, clip_warmup_iters=3))
    if kind == "bcn":
        return WSConv2d(cin, cout, 3, padding=1, norm=BatchChannelNorm2d(cout, num_groups=4))
    if kind == "brn":
        return NormActConv2d(cin, cout, 3, padding=1, bias=False,
                             norm=BatchRenorm2d(cout, warmup_iters=1, r_max_iters=3, d_max_iters=2))
    raise ValueError(kind)


class TinyNet(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.conv1 = make_conv(kind, CHANNELS[0], CHANNELS[1])
        self.conv2 = make_conv(kind, CHANNELS[1], CHANNELS[2])
        self.fc = nn.Linear(CHANNELS[2], NUM_CLASSES)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def norms(model):
    return [model.conv1.norm, model.conv2.norm]


def prepare_step(model, step):
    """What a trainer does before iteration ``step``: drive the step counters, set BCN's rate."""
    NormStateDriver(model, update_rate=BCN_RATE).before_step(step)


def train_step(model, optimizer, x, y, step):
    """One step up to the gradients (the optimizer step is left to the caller); returns the loss."""
    prepare_step(model.module if isinstance(model, DistributedDataParallel) else model, step)
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def make_optimizer(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def _worker(rank, world_size, port, workdir, kinds):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for kind in kinds:  # one pair of processes for all kinds: spawning (importing torch) dominates
            setup = torch.load(os.path.join(workdir, f"setup_{kind}.pt"))
            model = TinyNet(kind)
            model.load_state_dict(setup["init"])
            model.train()
            ddp = DistributedDataParallel(model, broadcast_buffers=False)
            optimizer = make_optimizer(ddp)
            xs, ys = setup["x"][rank], setup["y"][rank]
            losses, grads = [], []
            for step in range(STEPS):
                losses.append(train_step(ddp, optimizer, xs[step], ys[step], step))
                grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
                optimizer.step()
            result = {"losses": torch.stack(losses), "grads": grads,
                      "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            torch.save(result, os.path.join(workdir, f"{kind}_rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def make_setup(kind):
    gen = torch.Generator().manual_seed(1234)
    x = torch.stack([torch.randn(STEPS, BATCH, CHANNELS[0], SIZE, SIZE, generator=gen) * DATA_SCALE[r] + DATA_SHIFT[r]
                     for r in range(WORLD_SIZE)])
    y = torch.randint(0, NUM_CLASSES, (WORLD_SIZE, STEPS, BATCH), generator=gen)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in TinyNet(kind).state_dict().items()}
    return {"kind": kind, "init": init, "x": x, "y": y}


class _MABNRatioProbe:
    """Records MABN's unclipped ratio chi_bar / chi_hat on the steps where it clips, recomputed
    from the buffers around the forward: shows that the clipping path ran, and clamped."""

    def __init__(self, norm):
        self.norm, self.ratios = norm, []
        norm.register_forward_pre_hook(self._pre)
        norm.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._ema_before = module.running_sqmean.clone()

    def _post(self, module, args, out):
        t = int(module.num_steps)
        if module.clips(t):
            slot = (t - 1) % module.buffer_size
            used = module.sqmean_buffer[slot] if module.uses_batch_statistics(t) else module.sqmean_buffer.mean(0)
            self.ratios.append(((used + module.eps) / (self._ema_before + module.eps)).sqrt())


def reference_run(setup):
    """The same training without DDP: one replica per rank, gradients averaged by hand."""
    replicas = []
    for _ in range(WORLD_SIZE):
        model = TinyNet(setup["kind"])
        model.load_state_dict(setup["init"])
        replicas.append(model.train())
    optimizers = [make_optimizer(m) for m in replicas]
    probes = [_MABNRatioProbe(n) for m in replicas for n in norms(m) if isinstance(n, MovingAverageBatchNorm2d)]
    losses, grads = [[] for _ in replicas], []
    for step in range(STEPS):
        for rank, (model, opt) in enumerate(zip(replicas, optimizers)):
            losses[rank].append(train_step(model, opt, setup["x"][rank][step], setup["y"][rank][step], step))
        step_grads = {}
        names = [n for n, _ in replicas[0].named_parameters()]
        for name, params in zip(names, zip(*(m.parameters() for m in replicas))):
            mean = torch.stack([p.grad for p in params]).sum(0) / WORLD_SIZE
            for p in params:
                p.grad = mean.clone()
            step_grads[name] = mean.clone()
        grads.append(step_grads)
        for opt in optimizers:
            opt.step()
        for a, b in zip(replicas[0].parameters(), replicas[1].parameters()):
            assert torch.equal(a, b)  # same start, same averaged gradients: same weights
    ratios = torch.cat([torch.stack(p.ratios).flatten() for p in probes]) if probes else None
    return {"losses": [torch.stack(l) for l in losses], "grads": grads,
            "states": [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in replicas],
            "mabn_ratios": ratios}


@pytest.fixture(autouse=True)
def device():
    """CPU only: the ranks are gloo processes (the per-device runs are the other layer tests')."""
    return torch.device("cpu")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Trains every kind under DDP in one spawn; {kind: (setup, [result of rank r])}."""
    workdir = str(tmp_path_factory.mktemp("ddp"))
    setups = {kind: make_setup(kind) for kind in KINDS}
    for kind, setup in setups.items():
        torch.save(setup, os.path.join(workdir, f"setup_{kind}.pt"))
    mp.spawn(_worker, args=(WORLD_SIZE, free_port(), workdir, KINDS), nprocs=WORLD_SIZE, join=True)
    return {kind: (setups[kind], [torch.load(os.path.join(workdir, f"{kind}_rank{r}.pt")) for r in range(WORLD_SIZE)])
            for kind in KINDS}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers, so that reductions run in the same order
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", KINDS)
def test_ddp_per_rank_statistics_and_synchronized_weights(kind, ddp_results, one_thread):
    setup, ddp = ddp_results[kind]
    ref = reference_run(setup)
    param_names = [n for n, _ in TinyNet(kind).named_parameters()]
    buffer_names = [n for n, _ in TinyNet(kind).named_buffers()]

    # Losses: each rank ran its own data through its own buffers.
    for rank in range(WORLD_SIZE):
        assert_close(ddp[rank]["losses"], ref["losses"][rank], f"rank {rank} losses")

    # Gradients after backward: DDP's average, the same on both ranks, equal to the manual average.
    for step in range(STEPS):
        for name in param_names:
            g0, g1 = ddp[0]["grads"][step][name], ddp[1]["grads"][step][name]
            assert torch.equal(g0, g1), f"step {step}: {name}.grad differs between ranks"
            assert_close(g0, ref["grads"][step][name], f"step {step}: averaged grad of {name}")

    # Weights: bitwise identical across ranks, equal to the reference, and trained.
    for name in param_names:
        w0, w1 = ddp[0]["state"][name], ddp[1]["state"][name]
        assert torch.equal(w0, w1), f"weight {name} differs between ranks"
        assert_close(w0, ref["states"][0][name], f"weight {name}")
        assert not torch.allclose(w0, setup["init"][name]), f"weight {name} did not move"

    # Buffers: each rank's equal to its own replica's, i.e. computed from its own data only.
    assert set(ddp[0]["state"]) == set(param_names) | set(buffer_names)
    for rank in range(WORLD_SIZE):
        for name in buffer_names:
            got, want = ddp[rank]["state"][name], ref["states"][rank][name]
            if got.is_floating_point():
                assert_close(got, want, f"rank {rank} buffer {name}")
            else:
                assert torch.equal(got, want), f"rank {rank} buffer {name}: {got} != {want}"

    # ... and the data-dependent ones differ between the ranks (and moved from their initial values).
    checked = 0
    for name in buffer_names:
        if name.rsplit(".", 1)[-1] not in DATA_BUFFERS[kind]:
            continue
        b0, b1 = ddp[0]["state"][name], ddp[1]["state"][name]
        scale = max(b0.abs().max(), b1.abs().max())
        assert (b0 - b1).abs().max() > 1e-2 * scale, f"buffer {name} is (nearly) the same on both ranks"
        for rank in range(WORLD_SIZE):
            assert not torch.equal(ddp[rank]["state"][name], setup["init"][name]), f"rank {rank}: {name} unchanged"
        checked += 1
    assert checked == 2 * len(DATA_BUFFERS[kind])

    # The layers went through their stateful phases.
    for rank in range(WORLD_SIZE):
        state = ddp[rank]["state"]
        for conv in ("conv1", "conv2"):
            if kind in ("cbn", "mabn"):
                assert int(state[f"{conv}.norm.num_steps"]) == STEPS
            if kind == "cbn":
                # burn-in at step 0, then one stored entry per step: the 2-slot window wrapped.
                assert int(state[f"{conv}.norm.num_stored"]) == STEPS - 1
            if kind == "mabn":
                assert (state[f"{conv}.norm.psi_buffer"] != 0).all(), "psi_buffer not written by backward"
    if kind == "mabn":
        ratios = ref["mabn_ratios"]
        clip = MovingAverageBatchNorm2d(1, clip_warmup_iters=3).clip_lambda
        assert ratios is not None and len(ratios) > 0
        assert ((ratios > clip) | (ratios < 1 / clip)).any(), "MABN's clipping never clamped"
        assert ((ratios < clip) & (ratios > 1 / clip)).any(), "MABN's ratio was clamped everywhere"
