"""Training and evaluation with LazyConfigs (``.py`` configs), in the style of detectron2's
``tools/lazyconfig_train_net.py``, with this project's per-iteration hook. What
``d2-smallbn-train`` runs for a ``.py`` config.

The config is detectron2's LazyConfig layout (``model``, ``dataloader``, ``optimizer``,
``lr_multiplier``, ``train``) plus an optional ``smallbn`` node with MODEL.SMALLBN's keys
(``smallbn.CBN.WINDOW_SIZE`` ...; missing keys take their defaults). Norms are named as strings
anywhere detectron2 takes a norm (``norm="CBN"``); ``build_model`` instantiates the model, which
this project's configs convert themselves (``d2_smallbn.modeling.conversion.converted``), and
converts a user's model once with ``d2_smallbn.convert_model(model, cfg)``.
"""
import logging
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm

from ..batchnorm_conversion import is_converted
from ..config import available_device
from ..model_zoo import get_config_file
from ..modeling import convert_model
from ..norms import needs_dataset_size
from .ddp import create_ddp_model
from .defaults import setup_smallbn_logger
from .hooks import SmallBNHook, model_settings
from .weights_check import checked_initial_weights

logger = logging.getLogger("d2_smallbn")


def build_model(cfg):
    """``instantiate(cfg.model)`` on ``cfg.train.device``, converted once: by the config itself (this
    project's ``model`` nodes) or here (a user's config naming our norms). A baseline without our
    norms is not a mistake: no warning."""
    model = instantiate(cfg.model)
    if not is_converted(model):
        model = convert_model(model, cfg, expect_norms=False)
    return model.to(cfg.train.device)


def build_optimizer(cfg, model):
    cfg.optimizer.params.model = model
    return instantiate(cfg.optimizer)


def do_test(cfg, model):
    """COCO-style evaluation on ``dataloader.test`` with ``dataloader.evaluator``; {} without one."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    if comm.is_main_process():
        print_csv_format(results)
    return results


def smallbn_hook(cfg, model):
    """The per-iteration hook for a LazyConfig (the dataset size only when a norm of ``model`` needs it:
    CBN's burn-in in epochs)."""
    hook = SmallBNHook(cfg, ims_per_batch=cfg.dataloader.train.total_batch_size)
    if needs_dataset_size(model_settings(model, cfg)):
        hook.dataset_size = len(instantiate(cfg.dataloader.train.dataset))
    return hook


def do_train(cfg, resume=False):
    """Trains ``cfg`` for ``train.max_iter`` iterations (evaluating every ``train.eval_period`` and at
    the end); returns the trainer."""
    model = build_model(cfg)
    logger.info("Model:\n%s", model)
    optimizer = build_optimizer(cfg, model)
    train_loader = instantiate(cfg.dataloader.train)
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main = comm.is_main_process()
    trainer.register_hooks([
        smallbn_hook(cfg, model),
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main else None,
        hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main else None,
    ])
    # a backbone that does not fit init_checkpoint stops here, before training
    with checked_initial_weights(checkpointer, cfg.train.init_checkpoint, resume):
        checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return trainer


def load_config(name_or_path, opts=()):
    """A LazyConfig by path or by this project's model-zoo name, with ``key=value`` overrides."""
    path = name_or_path if os.path.isfile(name_or_path) else get_config_file(name_or_path)
    cfg = LazyConfig.apply_overrides(LazyConfig.load(path), list(opts))
    if "train" in cfg and "device" in cfg.train:
        cfg.train.device = available_device(cfg.train.device, "train.device")
    return cfg


def main(args):
    """Entry point for ``detectron2.engine.launch`` (one call per process)."""
    cfg = load_config(args.config_file, args.opts)
    default_setup(cfg, args)
    setup_smallbn_logger(cfg.train.output_dir)
    if args.eval_only:
        model = build_model(cfg)
        DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    do_train(cfg, resume=args.resume)
