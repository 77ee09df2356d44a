"""A hook any detectron2 trainer can add (``SimpleTrainer``, ``DefaultTrainer``, the LazyConfig
loop): a thin wrapper of ``d2_smallbn.layers.NormStateDriver``.

- before training: checks the model was converted, gives each norm of the table what it needs
  from the run (its ``before_train``: CBN's burn-in given in epochs, with the dataset size), warns
  when the images per process differ from the paper's per-GPU batch or when a norm's phase is
  shorter than its running estimates need (``d2_smallbn.norms.short_phases``), and builds the
  driver from the trainer's model and optimizer (the rate its norms' ``update_rate`` asks for);
- before every step: ``driver.before_step(trainer.iter)`` (iterations of CBN/MABN/BRN, BCN's
  update rate = its param group's current learning rate);
- after training, with several processes: every process takes the main process's buffers, so
  the final (sharded) evaluation sees the checkpointed model;
- a GradScaler (detectron2's AMPTrainer) is handed to the layers that keep gradient statistics
  (MABN), so that their moving average of the backward statistic stays free of the loss scale.
"""
import logging

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..batchnorm_conversion import converted_settings
from ..layers import NormStateDriver
from ..modeling.conversion import check_converted
from ..norms import NORMS, Run, driver_update_rate, resolve, short_phases, spec_of

logger = logging.getLogger(__name__)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def model_settings(model, settings=None):
    """The settings ``model``'s norms were built with (resolved once, by ``convert_model``); for a
    model that was not converted from settings, ``settings`` resolved."""
    return converted_settings(unwrap(model)) or resolve(settings)


def layers_by_norm(model, include_frozen=True):
    """{norm name: [its layers in ``model``]} for the table's norms."""
    found = {}
    for m in model.modules():
        spec = spec_of(m)
        if spec is not None and (include_frozen or not getattr(m, "frozen", False)):
            found.setdefault(spec.name, []).append(m)
    return found


def check_phases(s, model, prefix="MODEL.SMALLBN"):
    """Warns for every phase of the model's (unfrozen) norms that settings ``s`` set shorter than the
    rule in ``d2_smallbn.norms`` allows; ``prefix`` names the settings in the config's language.
    Returns the short phases."""
    used = sorted(layers_by_norm(model, include_frozen=False))
    short = short_phases(s, used)
    for name, key, value, least, reason in short:
        logger.warning("!!! %s.%s.%s = %d is too short: %s. Shorter, the layer relies on an estimate that still "
                       "reflects its start, which its paper's schedule never does. Fix: set it to at least %d "
                       "(d2_smallbn.norms.scale_phases scales a schedule by this rule).", prefix, name, key, value, reason,
                       least)
    return short


def check_batch_per_gpu(paper_ims_per_gpu, ims_per_batch, world_size, batch_key="images per iteration",
                        silence="MODEL.SMALLBN.PAPER_IMS_PER_GPU 0"):
    """Warns when a process gets a different number of images than the paper's GPUs did.
    ``batch_key`` names where the images per iteration come from, ``silence`` the setting that turns
    the check off, both in the user's config language."""
    actual = ims_per_batch / world_size
    if paper_ims_per_gpu and actual != paper_ims_per_gpu:
        logger.warning(
            "!!! Images per process = %s / world size = %d / %d = %g, but this config reproduces a paper "
            "setting with %d images per GPU. Per-GPU batch is what these norms are about: the result is not "
            "the paper's experiment. Fix: run on %d / %d processes, or set %s to silence this for your own "
            "setting.", batch_key, ims_per_batch, world_size, actual, paper_ims_per_gpu, ims_per_batch,
            paper_ims_per_gpu, silence)
        return False
    return True


def check_precise_bn(settings, model):
    """Raises when a yacs config asks for detectron2's PreciseBN and the model trains any of the
    table's norms: that hook recomputes torch BatchNorm statistics only, so these norms would keep
    their training estimates while the setting reads as applied."""
    test = settings.get("TEST") if isinstance(settings, dict) else None
    if not (test and test.get("PRECISE_BN") and test.PRECISE_BN.get("ENABLED")):
        return
    trained = layers_by_norm(model, include_frozen=False)
    if trained:
        found = ", ".join(f"{len(layers)} {name}" for name, layers in sorted(trained.items()))
        raise ValueError(
            f"TEST.PRECISE_BN.ENABLED is True, but detectron2's PreciseBN recomputes only torch BatchNorm "
            f"statistics, and this model trains {found} norm layers: they would keep their training "
            f"estimates. These norms evaluate with the running estimates they keep in training, as their "
            f"papers do. Fix: set TEST.PRECISE_BN.ENABLED False.")


class SmallBNHook(HookBase):
    """``SmallBNHook(settings, ims_per_batch=None, dataset_size=None)``.

    ``settings``: any config ``d2_smallbn.convert_model`` accepts (a yacs config also gives
    ``SOLVER.IMS_PER_BATCH``). ``ims_per_batch``: images per iteration over all processes, for the
    per-GPU batch check and the norms' ``before_train`` (CBN's burn-in in epochs). ``dataset_size``:
    needed only where a norm's ``needs_dataset_size`` says so (``CBN.BURNIN_EPOCHS``).
    """

    def __init__(self, settings=None, ims_per_batch=None, dataset_size=None):
        self.settings = settings
        self.batch_keys = {}  # how the batch check names the config's keys
        self.settings_prefix = "MODEL.SMALLBN"
        if ims_per_batch is None and settings is not None and "SOLVER" in settings:
            ims_per_batch = settings["SOLVER"]["IMS_PER_BATCH"]
            self.batch_keys = {"batch_key": "SOLVER.IMS_PER_BATCH"}
        elif settings is not None and "dataloader" in settings:  # a LazyConfig
            self.batch_keys = {"batch_key": "dataloader.train.total_batch_size",
                               "silence": "smallbn.PAPER_IMS_PER_GPU=0"}
            self.settings_prefix = "smallbn"
        self.ims_per_batch = ims_per_batch
        self.dataset_size = dataset_size

    def before_train(self):
        model = unwrap(self.trainer.model)
        check_converted(model)
        check_precise_bn(self.settings, model)
        self.s = model_settings(model, self.settings)
        check_phases(self.s, model, self.settings_prefix)
        if self.ims_per_batch is not None:
            check_batch_per_gpu(self.s.PAPER_IMS_PER_GPU, self.ims_per_batch, comm.get_world_size(),
                                **self.batch_keys)
        layers = layers_by_norm(model)
        run = Run(self.dataset_size, self.ims_per_batch)
        for name in layers:
            before_train = NORMS[name].before_train
            for line in before_train(layers[name], self.s[name], run) if before_train else ():
                logger.info(line)
        scaler = getattr(getattr(self.trainer, "_trainer", self.trainer), "grad_scaler", None)  # AMPTrainer's
        rate = driver_update_rate(self.s, list(layers))
        self.driver = NormStateDriver(model, self.trainer.optimizer, update_rate=rate, loss_scaler=scaler)

    def before_step(self):
        self.driver.before_step(self.trainer.iter)

    def after_train(self):
        """Every process takes the main process's buffers (statistics, windows) once training has
        finished, so that the final evaluation, sharded over the processes, evaluates the one model
        the main process checkpoints instead of a different model per shard."""
        if comm.get_world_size() > 1 and self.trainer.iter + 1 >= self.trainer.max_iter:
            for buffer in unwrap(self.trainer.model).buffers():
                torch.distributed.broadcast(buffer, src=0)
