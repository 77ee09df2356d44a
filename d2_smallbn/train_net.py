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
from detectron2.engine import default_argument_parser, launch

EPILOG = __doc__.split("\n\n")[1]


def entry_point(config_file):
    """The per-process main for a config file: the LazyConfig one for ``.py``, else the yacs one."""
    if config_file.endswith(".py"):
        from .engine.lazy import main
    else:
        from .engine.defaults import main
    return main


def main(argv=None):
    parser = default_argument_parser(epilog=EPILOG)
    args = parser.parse_args(argv)
    if not args.config_file:
        parser.error("--config-file is required: a YAML/.py config path or a name such as "
                     "mask_rcnn_R50_FPN_cbn.yaml (d2_smallbn.model_zoo.list_configs() lists them)")
    print("Command Line Args:", args)
    launch(entry_point(args.config_file), args.num_gpus, num_machines=args.num_machines,
           machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
