"""Train, resume or evaluate a d2_smallbn model with detectron2's launcher.

    d2-smallbn-train --config-file mask_rcnn_R50_FPN_cbn.yaml --num-gpus 4
    d2-smallbn-train --config-file mask_rcnn_R50_FPN_cbn.yaml --eval-only MODEL.WEIGHTS model_final.pth
    d2-smallbn-train --config-file my_config.yaml --resume
    d2-smallbn-train --config-file lazy/mask_rcnn_R50_FPN_cbn.py --num-gpus 4 train.max_iter=1000

Also ``python -m d2_smallbn.train_net`` and, from a checkout, ``python tools/train_net.py``.
Config files are paths or names under the package's configs/ (``d2_smallbn.model_zoo.list_configs()``),
so this works from any directory. A ``.yaml`` config trains with ``SmallBNTrainer`` (detectron2's
DefaultTrainer with this project's per-iteration hook and COCO evaluation; overrides are
``KEY VALUE`` pairs); a ``.py`` LazyConfig with ``d2_smallbn.engine.lazy`` (overrides are ``key=value``).
"""
import os
import sys

from detectron2.engine import default_argument_parser, launch

from .paths import OutputPathError, same_path

EPILOG = __doc__.split("\n\n")[1]


def entry_point(config_file):
    """The per-process main for a config file: the LazyConfig one for ``.py``, else the yacs one."""
    if config_file.endswith(".py"):
        from .engine.lazy import main
    else:
        from .engine.defaults import main
    return main


def check_config_kept(config_file, opts):
    """Every run writes the merged config to OUTPUT_DIR/config.yaml (detectron2's ``default_setup``).
    When that file is the --config-file, it may be rewritten only if it is such a dump
    itself (``--eval-only`` on a run's own config.yaml, as docs/configs.md shows); a hand-written
    config there would lose its _BASE_, comments and layout. Raises OutputPathError then."""
    if os.path.basename(os.path.realpath(config_file)) != "config.yaml" or not os.path.isfile(config_file):
        return  # not the file a run writes (a LazyConfig, a model-zoo name, another name)
    from .engine.defaults import build_config

    cfg = build_config(config_file, opts)
    written = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if same_path(config_file, written) and not _is_dump(config_file, cfg):
        raise OutputPathError(written, "the --config-file is OUTPUT_DIR/config.yaml, where every run writes its "
                              "merged config: this hand-written config (its _BASE_, comments and layout) would be "
                              "replaced", f"pass another OUTPUT_DIR, or move the config out of {cfg.OUTPUT_DIR}")


def _is_dump(path, cfg):
    """True when the YAML file ``path`` looks like a run's dump of ``cfg``: no _BASE_, and every
    top-level key (MODEL, INPUT, SOLVER, ..., OUTPUT_DIR) set."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)
    return isinstance(data, dict) and "_BASE_" not in data and set(cfg) <= set(data)


def main(argv=None):
    parser = default_argument_parser(epilog=EPILOG)
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config-file is required: a YAML/.py config path or a name such as "
                     "mask_rcnn_R50_FPN_cbn.yaml (d2_smallbn.model_zoo.list_configs() lists them)")
    print("Command Line Args:", args)
    try:
        check_config_kept(args.config_file, args.opts)
    except OutputPathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(entry_point(args.config_file), args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
