"""What ``d2-smallbn-train`` runs for a YAML config, kept in the package so that every tool shares it:
config setup (config files by path or by model-zoo name), training, and ``--eval-only``."""
import os

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import load_yaml_config
from ..model_zoo import get_config_file
from .checkpoint import explain_unreadable_checkpoint
from .trainer import SmallBNTrainer


def resolve_config_file(path):
    """A config path, or a name relative to ``configs/`` (works from any working directory)."""
    return path if os.path.isfile(path) else get_config_file(path)


def build_config(config_file, opts=()):
    """The validated yacs config of a YAML file (path or model-zoo name) and command-line ``opts``."""
    return load_yaml_config(resolve_config_file(config_file), opts)


def setup_smallbn_logger(output_dir=None):
    """Sets up the ``d2_smallbn`` logger as detectron2's ``default_setup`` sets up its own: the same
    format, stdout on the main process, and ``output_dir/log.txt`` (``log.txt.rankN`` on rank N).
    Call it wherever detectron2's loggers are set up, so that our warnings and notes reach the log."""
    return setup_logger(output_dir, distributed_rank=comm.get_rank(), name="d2_smallbn")


def setup(args):
    args.config_file = resolve_config_file(args.config_file)  # detectron2's default_setup reads it
    cfg = build_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_smallbn_logger(cfg.OUTPUT_DIR)
    return cfg


def main(args):
    """Entry point for ``detectron2.engine.launch`` (one call per process)."""
    from ..data import register_shapes

    register_shapes()  # the built-in dataset's names (files are checked when it is loaded)
    cfg = setup(args)
    if args.eval_only:
        model = SmallBNTrainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        with explain_unreadable_checkpoint(checkpointer, cfg.MODEL.WEIGHTS, args.resume):
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = SmallBNTrainer.test(cfg, model)
        verify_results(cfg, results)
        return results
    trainer = SmallBNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()
