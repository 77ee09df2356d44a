"""A hook any detectron2 trainer can add: it drives the layers' per-iteration state.

- CBN and MABN: ``set_iteration(trainer.iter)`` before every step, so burn-in, windows, warmups
  and clipping follow the trainer's iteration (resume included) and a norm called twice in one
  iteration is caught;
- BCN: the update rate is set to the current learning rate of the layer's own parameters
  (warmup and decay included) from the optimizer's param group: a Python float, no host sync;
- MABN under AMP: the layers get the trainer's GradScaler, so that their moving average of the
  backward statistic is kept free of the loss scale;
- CBN burn-in given in epochs is converted to iterations with the dataset size;
- a loud warning when the images per process differ from the paper's per-GPU batch.
"""
import logging
import math

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..layers import BatchChannelNorm2d, CrossIterationBatchNorm2d, MovingAverageBatchNorm2d
from ..layers._common import StepCounter
from ..modeling.norms import check_converted

logger = logging.getLogger(__name__)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def burnin_iters_from_epochs(cfg, dataset_size):
    return int(math.ceil(cfg.MODEL.SMALLBN.CBN.BURNIN_EPOCHS * dataset_size / cfg.SOLVER.IMS_PER_BATCH))


def check_batch_per_gpu(cfg, world_size):
    """Warns when a process gets a different number of images than the paper's GPUs did."""
    paper = cfg.MODEL.SMALLBN.PAPER_IMS_PER_GPU
    actual = cfg.SOLVER.IMS_PER_BATCH / world_size
    if paper and actual != paper:
        logger.warning(
            "!!! Images per process = SOLVER.IMS_PER_BATCH / world size = %d / %d = %g, but this config "
            "reproduces a paper setting with %d images per GPU. Per-GPU batch is what these norms are about: "
            "the result is not the paper's experiment. Fix: run on IMS_PER_BATCH / %d processes, or set "
            "MODEL.SMALLBN.PAPER_IMS_PER_GPU 0 to silence this for your own setting.",
            cfg.SOLVER.IMS_PER_BATCH, world_size, actual, paper, paper)
        return False
    return True


class SmallBNHook(HookBase):
    def __init__(self, cfg, dataset_size=None):
        self.cfg = cfg
        self.dataset_size = dataset_size

    def before_train(self):
        model = unwrap(self.trainer.model)
        check_converted(model)
        check_batch_per_gpu(self.cfg, comm.get_world_size())
        self._counters = [m for m in model.modules() if isinstance(m, StepCounter) and not m.frozen]
        scaler = getattr(getattr(self.trainer, "_trainer", self.trainer), "grad_scaler", None)  # AMPTrainer's
        for m in self._counters:
            if isinstance(m, MovingAverageBatchNorm2d):
                m.set_loss_scaler(scaler)
        if self.cfg.MODEL.SMALLBN.CBN.BURNIN_EPOCHS > 0:
            if self.dataset_size is None:
                raise ValueError("MODEL.SMALLBN.CBN.BURNIN_EPOCHS needs the dataset size: pass dataset_size to "
                                 "SmallBNHook (SmallBNTrainer does), or give BURNIN_ITERS instead")
            iters = burnin_iters_from_epochs(self.cfg, self.dataset_size)
            logger.info("CBN burn-in: %g epochs x %d images / %d per iteration = %d iterations",
                        self.cfg.MODEL.SMALLBN.CBN.BURNIN_EPOCHS, self.dataset_size, self.cfg.SOLVER.IMS_PER_BATCH,
                        iters)
            for m in self._counters:
                if isinstance(m, CrossIterationBatchNorm2d):
                    m.burnin_iters = iters
        self._rate_groups = []
        if self.cfg.MODEL.SMALLBN.BCN.UPDATE_RATE_MODE == "lr":
            group_of = {id(p): g for g in self.trainer.optimizer.param_groups for p in g["params"]}
            for m in model.modules():
                if isinstance(m, BatchChannelNorm2d) and not m.frozen:
                    if id(m.weight) not in group_of:
                        raise ValueError("a trainable BatchChannelNorm2d's weight is not in the optimizer, so its "
                                         "update rate cannot follow the learning rate")
                    self._rate_groups.append((m, group_of[id(m.weight)]))

    def before_step(self):
        iteration = self.trainer.iter
        for m in self._counters:
            m.set_iteration(iteration)
        for m, group in self._rate_groups:
            m.set_update_rate(float(group["lr"]))
