"""End-to-end two-process training with detectron2's ``launch`` on CPU (gloo) and ``SmallBNTrainer``.

One ``launch`` of two processes trains the tiny Mask R-CNN R18-FPN of ``tiny_detector.tiny_cfg`` for a
few iterations with each norm in turn (CBN, MABN, BCN in the backbone, FPN, box head and mask
head): starting the processes costs far more than the training. SOLVER.IMS_PER_BATCH = 4, so
every process gets 2 images per iteration; detectron2's TrainingSampler shards one shared
permutation by rank, so the ranks see different images (recorded and checked).

The trainer wraps the model in DDP with ``broadcast_buffers=False`` (through d2_smallbn's
``create_ddp_model``, which drops ``device_ids`` for CPU models). Checked for every norm:

1. training completed on both ranks: 3 iterations, finite losses on each rank, and rank 0's
   ``total_loss`` history is the mean of the two ranks' losses (detectron2 gathers them);
2. every parameter is bit-identical across the ranks (DDP averaged the gradients), and training
   moved the parameters away from their (broadcast) initial values, so the agreement is not
   trivial;
3. the norms' statistics (running_mean / running_var for CBN and BCN, running_sqmean for MABN)
   differ across the ranks in every trainable norm layer: each process keeps statistics of its
   own data, nothing synchronizes them;
4. CBN and MABN count 3 steps (``num_steps``) on both ranks;
5. after training, rank 1 holds rank 0's buffers (SmallBNHook.after_train), so the final sharded
   evaluation sees the checkpointed model.

Results come back from the workers through ``torch.save`` files.
"""
import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
from generated_images import make_images
from processes import local_url
from tiny_detector import register, tiny_cfg

pytestmark = [pytest.mark.slow,  # processes of their own (make test-fast leaves it out)
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with the gloo backend is not available")]

HERE = os.path.dirname(os.path.abspath(__file__))
NORMS = ("CBN", "MABN", "BCN")
WORLD_SIZE = 2
ITERS = 3
IMS_PER_BATCH = 4  # 2 images per process
NUM_IMAGES = 4
DATASET = "smallbn_tiny_ddp_launch"
STAT_KEYS = {"CBN": ("running_mean", "running_var"), "MABN": ("running_sqmean",),
             "BCN": ("running_mean", "running_var")}
# Normed convs per part of the tiny model (R18: stem + 16 + 3 shortcuts; FPN: 4 lateral + 4 output;
# 4conv1fc box head; 4-conv mask head), as tests/modeling/test_build.py counts them.
PARTS = {"backbone.bottom_up.": 20, "backbone.fpn_": 8, "roi_heads.box_head.": 4, "roi_heads.mask_head.": 4}


class _RecordImageIds:
    """Wraps the train loader: records the image ids of every batch this process trains on."""

    def __init__(self, loader, seen):
        self.loader, self.seen = loader, seen

    def __iter__(self):
        for batch in self.loader:
            self.seen.append([d["image_id"] for d in batch])
            yield batch


def _train_one(norm, records, workdir):
    from detectron2.utils import comm
    from torch.nn.parallel import DistributedDataParallel

    from detectron2.engine import HookBase

    from d2_smallbn.engine import SmallBNTrainer
    from d2_smallbn.norms import NORM_TYPES as SMALLBN_NORM_TYPES

    rank = comm.get_rank()
    register(DATASET, records)
    cfg = tiny_cfg(backbone=norm, fpn=norm, box=norm, mask=norm, dataset=DATASET, iters=ITERS,
                           output_dir=os.path.join(workdir, f"out_{norm}"))
    cfg.SOLVER.IMS_PER_BATCH = IMS_PER_BATCH

    seen = []

    class Trainer(SmallBNTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return _RecordImageIds(super().build_train_loader(cfg), seen)

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    ddp = trainer.model
    assert isinstance(ddp, DistributedDataParallel), type(ddp)
    model = ddp.module
    losses = []

    def record_loss(module, args, output):
        if module.training:
            losses.append(float(sum(output.values()).detach()))

    handle = model.register_forward_hook(record_loss)
    init_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained_buffers = {}

    class KeepTrainedBuffers(HookBase):  # the buffers as training left them, before after_train
        def after_step(self):
            if self.trainer.iter == self.trainer.max_iter - 1:
                trained_buffers.update({n: b.detach().clone() for n, b in model.named_buffers()})

    trainer.register_hooks([KeepTrainedBuffers()])
    trainer.train()
    handle.remove()

    history = None
    if comm.is_main_process():  # detectron2 puts the gathered losses in rank 0's storage only
        history = [(float(v), int(i)) for v, i in trainer.storage.history("total_loss").values()]
    torch.save({
        "world_size": comm.get_world_size(),
        "iter": trainer.iter,
        "broadcast_buffers": ddp.broadcast_buffers,
        "device_ids": ddp.device_ids,
        "image_ids": seen,
        "losses": losses,
        "total_loss_history": history,
        "init_params": init_params,
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "buffers": trained_buffers,
        "buffers_after_train": {n: b.detach().clone() for n, b in model.named_buffers()},
        "norms": {n: (type(m).__name__, bool(m.frozen)) for n, m in model.named_modules()
                  if isinstance(m, SMALLBN_NORM_TYPES)},
    }, os.path.join(workdir, f"{norm}_rank{rank}.pt"))
    comm.synchronize()


def worker(records, workdir, norms):
    """Runs in each process started by ``launch``: trains every norm in turn."""
    torch.set_num_threads(1)
    for norm in norms:
        _train_one(norm, records, workdir)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Trains every norm in one ``launch`` of two processes; {norm: [result of rank r]}."""
    from detectron2.engine import launch

    workdir = tmp_path_factory.mktemp("ddp_launch")
    images = workdir / "images"
    images.mkdir()
    records = make_images(str(images), count=NUM_IMAGES)
    launch(worker, num_gpus_per_machine=WORLD_SIZE, dist_url=local_url(),
           args=(records, str(workdir), NORMS), timeout=datetime.timedelta(minutes=5))
    results = {}
    for norm in NORMS:
        paths = [workdir / f"{norm}_rank{r}.pt" for r in range(WORLD_SIZE)]
        missing = [str(p) for p in paths if not p.exists()]
        assert not missing, f"{norm}: training did not complete on every rank, missing {missing}"
        results[norm] = [torch.load(p) for p in paths]
    return results


@pytest.mark.parametrize("norm", NORMS)
def test_training_completes_on_both_ranks_with_distinct_data(norm, launched):
    ranks = launched[norm]
    for r, res in enumerate(ranks):
        assert res["world_size"] == WORLD_SIZE
        assert res["broadcast_buffers"] is False, "per-process statistics need broadcast_buffers=False"
        assert res["device_ids"] is None, "a CPU model under gloo must be wrapped without device_ids"
        assert res["iter"] == ITERS, res["iter"]  # train() leaves iter at max_iter
        assert len(res["losses"]) == ITERS, f"rank {r} ran {len(res['losses'])} training forwards"
        assert all(math.isfinite(v) for v in res["losses"]), f"rank {r} losses {res['losses']}"
        assert len(res["image_ids"]) == ITERS
        assert all(len(ids) == IMS_PER_BATCH // WORLD_SIZE for ids in res["image_ids"]), res["image_ids"]

    # The sampler shards one shared permutation: in every iteration the ranks train on different images.
    for it, per_rank in enumerate(zip(*(res["image_ids"] for res in ranks))):
        first, second = map(set, per_rank)
        assert not first & second, f"iteration {it}: both ranks trained on images {sorted(first & second)}"

    assert ranks[1]["total_loss_history"] is None
    assert ranks[0]["total_loss_history"] is not None
    history = [v for v, _ in ranks[0]["total_loss_history"]]
    assert [i for _, i in ranks[0]["total_loss_history"]] == list(range(ITERS))
    assert all(math.isfinite(v) for v in history)
    # detectron2 gathers the ranks' loss terms and logs their mean on rank 0.
    means = [sum(vals) / WORLD_SIZE for vals in zip(*(res["losses"] for res in ranks))]
    assert history == pytest.approx(means, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_parameters_identical_across_ranks(norm, launched):
    first, second = launched[norm]
    assert first["params"].keys() == second["params"].keys()
    assert first["trainable"] == second["trainable"] and first["trainable"]
    differing = [n for n in first["params"] if not torch.equal(first["params"][n], second["params"][n])]
    assert not differing, f"parameters differ across ranks: {differing[:10]}"
    # DDP broadcast rank 0's initial weights: both ranks started from the same point ...
    for n in first["init_params"]:
        assert torch.equal(first["init_params"][n], second["init_params"][n]), n
    # ... and training moved them, so the agreement above is not that of untouched weights.
    moved = [n for n in first["trainable"] if not torch.equal(first["params"][n], first["init_params"][n])]
    assert len(moved) >= 0.9 * len(first["trainable"]), \
        f"only {len(moved)} of {len(first['trainable'])} trainable parameters changed"


@pytest.mark.parametrize("norm", NORMS)
def test_norm_statistics_are_per_process(norm, launched):
    first, second = launched[norm]
    assert first["norms"] == second["norms"]
    trainable = [n for n, (kind, frozen) in first["norms"].items() if not frozen]
    kinds = {kind for kind, _ in first["norms"].values()}
    assert len(kinds) == 1, kinds
    for prefix, count in PARTS.items():
        assert sum(n.startswith(prefix) for n in trainable) == count, f"{norm} norms under {prefix}"

    same = []
    for name in trainable:
        for key in STAT_KEYS[norm]:
            full = f"{name}.{key}"
            assert full in first["buffers"], f"{full} missing"
            a, b = first["buffers"][full], second["buffers"][full]
            assert torch.isfinite(a).all() and torch.isfinite(b).all(), full
            if torch.equal(a, b):
                same.append(full)
    # Every trainable norm sees different activations on the two ranks (different images), and
    # nothing synchronizes its statistics, so none may agree bit for bit.
    assert not same, f"{len(same)} statistics buffers are identical across ranks: {same[:10]}"


@pytest.mark.parametrize("norm", NORMS)
def test_after_training_every_process_holds_the_main_processs_buffers(norm, launched):
    """So that the final evaluation, sharded over the processes, evaluates the checkpointed model."""
    first, second = launched[norm]
    assert first["buffers_after_train"].keys() == first["buffers"].keys()
    for name, value in first["buffers"].items():
        assert torch.equal(first["buffers_after_train"][name], value), name  # rank 0 keeps its own
        assert torch.equal(second["buffers_after_train"][name], value), name  # rank 1 takes rank 0's


@pytest.mark.parametrize("norm", ["CBN", "MABN"])
def test_step_counters(norm, launched):
    for r, res in enumerate(launched[norm]):
        counters = {n: int(b) for n, b in res["buffers"].items() if n.endswith(".num_steps")}
        assert len(counters) == sum(PARTS.values()), f"rank {r}: {len(counters)} step counters"
        wrong = {n: v for n, v in counters.items() if v != ITERS}
        assert not wrong, f"rank {r}: num_steps != {ITERS}: {wrong}"
