"""The main job on the built-in dataset: generate it, train a quickstart Mask R-CNN, evaluate it
with COCO evaluation (box and mask) against the same model untrained, and write the results.

    d2-smallbn-quickstart [--norm cbn|mabn|bcn_ws|brn|gn|bn|syncbn | --config-file FILE] [--iters N]
        [--num-gpus G] [--output-dir DIR] [KEY VALUE ...]

``--config-file`` trains another YAML config on the built-in dataset the same way (a path, or a name
under the package's configs/, e.g. ``pretrained/mask_rcnn_R18_FPN_frozenbn_cbn.yaml``).

Outputs in the output directory: metrics.json (detectron2's training log), results.json (AP of the
trained and untrained model), predictions.png (validation images with predictions, drawn with
detectron2's Visualizer), curves.png (losses and learning rate), and the model checkpoint.
"""
import argparse
import json
import logging
import math
import os
import sys
import time

import numpy as np

from .norms import add_norm_module_flag, import_requested_norm_modules

NORM_CONFIGS = {n: f"quickstart/mask_rcnn_R18_FPN_{n}.yaml" for n in ("cbn", "mabn", "bcn_ws", "brn", "gn", "bn", "syncbn")}
BASE_CONFIG = "quickstart/Base-Quickstart.yaml"  # what a norm of the table without a config of its own trains with
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TOP_PREDICTIONS = 5  # drawn per image, with their scores: a short run is not yet confident
STATS_ERROR_PERIOD = 20  # detectron2's writer period
logger = logging.getLogger("d2_smallbn.quickstart")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norm", default="cbn",
                   help=f"quickstart config: {', '.join(sorted(NORM_CONFIGS))} (default: cbn); or any norm of the "
                        "table by its name (e.g. one registered by a --norm-module), in backbone, FPN and both heads "
                        f"of {BASE_CONFIG}")
    p.add_argument("--config-file", default=None,
                   help="train this YAML config instead of --norm's (a path, or a name under the package's configs/); "
                        "it must train on the built-in dataset as the quickstart configs do")
    p.add_argument("--iters", type=int, default=None,
                   help="training iterations (default: the config's); the LR steps and every norm's own iteration "
                        "counts (CBN's burn-in, MABN's warmups, BRN's ramp) are scaled with it, none below what its "
                        "running estimates need (d2_smallbn.norms.scale_phases); the log lists each value")
    p.add_argument("--output-dir", default=None, help="default: ./output/quickstart_<norm or config name>")
    p.add_argument("--data-root", default=None, help="dataset folder (default: see d2_smallbn.data)")
    p.add_argument("--num-train", type=int, default=None, help="generated training images (default: dataset default)")
    p.add_argument("--num-val", type=int, default=None, help="generated validation images")
    p.add_argument("--hue-spread", type=int, default=None, help="generated dataset's hue spread (default: dataset default)")
    p.add_argument("--num-vis", type=int, default=6, help="validation images drawn in predictions.png")
    p.add_argument("--no-untrained", action="store_true", help="skip evaluating the untrained model")
    p.add_argument("--num-gpus", type=int, default=1,
                   help="processes (detectron2's launch; on CPU, gloo): each computes its norms' statistics "
                        "on its own images, as one GPU would; SOLVER.IMS_PER_BATCH is split over them (default: 1)")
    p.add_argument("--dist-url", default="auto", help="detectron2's launch URL with --num-gpus > 1 (default: a free "
                                                        "local port)")
    add_norm_module_flag(p, "so that --norm takes them")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = p.parse_args(argv)
    import_requested_norm_modules(p, args.norm_module)
    if args.config_file is None and args.norm not in NORM_CONFIGS and table_norm(args.norm) is None:
        from .norms import NORMS

        p.error(f"--norm {args.norm!r} is neither a quickstart config ({', '.join(sorted(NORM_CONFIGS))}) nor a norm "
                f"of the table ({', '.join(NORMS)}). Fix: choose one of those; for a norm of your own, name the module "
                "that registers it with --norm-module MODULE")
    return args


def table_norm(name):
    """The table's name of norm ``name`` (any case), or None."""
    from .norms import NORMS

    return next((n for n in NORMS if n.lower() == name.lower()), None)


def build_cfg(args, data_root):
    from .engine.defaults import build_config

    cfg = build_config(config_file(args), norm_overrides(args) + list(args.opts))
    if args.iters is not None:
        if args.iters < 1:
            raise ValueError(f"--iters must be >= 1, got {args.iters}")
        scale = args.iters / cfg.SOLVER.MAX_ITER
        cfg.SOLVER.MAX_ITER = args.iters
        cfg.SOLVER.STEPS = tuple(max(1, int(s * scale)) for s in cfg.SOLVER.STEPS if int(s * scale) < args.iters)
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, args.iters - 1)
        for line in scale_norm_phases(cfg, scale):
            logger.info("--iters %d: %s", args.iters, line)
    cfg.OUTPUT_DIR = output_dir(args)
    cfg.freeze()
    return cfg


def scale_norm_phases(cfg, factor):
    """Scales the iteration counts of every norm the config uses by ``factor``, by the one rule
    (``d2_smallbn.norms.scale_phases``); returns a line per value set."""
    from .config import norm_names
    from .norms import NORMS, resolve, scale_phases

    s, lines = resolve(cfg), []
    for name in sorted(norm_names(cfg) & set(NORMS)):
        section = cfg.MODEL.SMALLBN[name]
        counts = {p.key: section[p.key] for p in NORMS[name].phases(s[name])} if NORMS[name].phases else {}
        for key, (value, how) in scale_phases(name, s[name], counts, factor).items():
            section[key] = value
            lines.append(f"MODEL.SMALLBN.{name}.{key} {value} ({how})")
    return lines


def config_file(args):
    return args.config_file or NORM_CONFIGS.get(args.norm, BASE_CONFIG)


def norm_overrides(args):
    """KEY VALUE pairs that put a --norm without a quickstart config of its own in every normed place."""
    if args.config_file or args.norm in NORM_CONFIGS:
        return []
    return [x for key in NORM_KEYS for x in (key, table_norm(args.norm))]


def run_name(args):
    """What the run trains: the --norm, or the --config-file's name."""
    return os.path.splitext(os.path.basename(args.config_file))[0] if args.config_file else args.norm


def output_dir(args):
    return os.path.abspath(args.output_dir or os.path.join("output", f"quickstart_{run_name(args)}"))


def coco_ap(results):
    """Box and mask AP from detectron2's evaluation results; None where COCO gives none (nan: no
    prediction at all; a task missing: no prediction had that output)."""
    def finite(value):
        return None if value is None or math.isnan(value) else float(value)

    return {task: {k: finite(results.get(task, {}).get(k)) for k in AP_KEYS} for task in ("bbox", "segm")}


def ap_table(rows):
    """rows: {name: coco_ap(...)} -> a markdown table with box and mask AP."""
    header = "| model | " + " | ".join(f"box {k}" for k in AP_KEYS) + " | mask AP | mask AP50 |"
    lines = [header, "|" + "---|" * (len(AP_KEYS) + 3)]
    for name, ap in rows.items():
        cell = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        box = " | ".join(cell(ap["bbox"][k]) for k in AP_KEYS)
        lines.append(f"| {name} | {box} | {cell(ap['segm']['AP'])} | {cell(ap['segm']['AP50'])} |")
    return "\n".join(lines)


def draw_predictions(cfg, model, dataset_name, path, count):
    """A grid of validation images with the model's predictions."""
    import cv2
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data import transforms as T
    from detectron2.utils.visualizer import Visualizer

    records = DatasetCatalog.get(dataset_name)[:count]
    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    tiles = []
    model.eval()
    for record in records:
        bgr = cv2.imread(record["file_name"])
        image = resize.get_transform(bgr).apply_image(bgr)
        with torch.no_grad():
            tensor = torch.as_tensor(image.transpose(2, 0, 1).astype("float32"))
            out = model([{"image": tensor, "height": bgr.shape[0], "width": bgr.shape[1]}])[0]["instances"]
        out = out[out.scores.argsort(descending=True)[:TOP_PREDICTIONS]].to("cpu")
        vis = Visualizer(bgr[:, :, ::-1], MetadataCatalog.get(dataset_name))
        tiles.append(vis.draw_instance_predictions(out).get_image())
    height = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0)), constant_values=255) for t in tiles]
    rows = [np.concatenate(padded[i:i + 3], axis=1) for i in range(0, len(padded), 3)]
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    cv2.imwrite(path, grid[:, :, ::-1])
    return path


def training_entries(metrics_json, key="total_loss"):
    """The training entries (those with ``key``: losses by default) of detectron2's metrics.json, as
    the latest run saw them.

    detectron2 appends to metrics.json, so a folder trained twice holds both runs, and a resumed
    run repeats iterations after its checkpoint. An entry replaces every earlier one at the same or
    a later iteration: a rerun from scratch drops the whole previous run, a resume only the part
    after the checkpoint."""
    with open(metrics_json) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    kept = []
    for entry in (e for e in entries if key in e):
        while kept and kept[-1]["iteration"] >= entry["iteration"]:
            kept.pop()
        kept.append(entry)
    if not kept:
        raise ValueError(f"{metrics_json} has no training entries with {key} (was training interrupted?)")
    return kept


def draw_curves(metrics_json, path):
    """Losses and the learning rate per iteration, from detectron2's metrics.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = training_entries(metrics_json)
    it = [e["iteration"] for e in entries]
    marker = "o" if len(entries) == 1 else None  # a line through a single point is invisible
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted(k for k in entries[0] if k.startswith("loss_") or k == "total_loss"):
        ax_loss.plot(it, [e.get(key, np.nan) for e in entries], label=key, lw=2 if key == "total_loss" else 1,
                     marker=marker)
    ax_loss.set(xlabel="iteration", ylabel="loss", title="training losses", yscale="log")
    ax_loss.legend(fontsize=7)
    ax_lr.plot(it, [e.get("lr", np.nan) for e in entries], marker=marker)
    ax_lr.set(xlabel="iteration", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None, hooks=()):
    """``hooks``: picklable callables, each called in every process to make one more detectron2 hook
    for the trainer (e.g. ``functools.partial`` of a hook class): how a study adds an instrument."""
    from detectron2.engine import launch

    from .data import default_root, generate_dataset
    from .engine.defaults import resolve_config_file
    from .paths import OutputPathError, check_output_paths

    args = parse_args(argv)
    if args.num_gpus < 1:
        raise SystemExit(f"--num-gpus must be >= 1, got {args.num_gpus}")
    try:  # before any process starts
        resolve_config_file(config_file(args))
    except FileNotFoundError as e:
        raise SystemExit(f"d2-smallbn-quickstart: --config-file {e}") from None
    start = time.time()
    root = args.data_root or default_root()
    try:
        check_output_paths([("--output-dir", output_dir(args))], [("--data-root", root)])
    except OutputPathError as e:
        raise SystemExit(f"d2-smallbn-quickstart: {e}") from None
    generation = {k: v for k, v in (("num_train", args.num_train), ("num_val", args.num_val),
                                ("hue_spread", args.hue_spread)) if v is not None}
    generate_dataset(root, **generation)  # once, before any process starts
    launch(run_job, args.num_gpus, dist_url=args.dist_url, args=(args, root, start, tuple(hooks)))
    return 0


def run_job(args, root, start, hooks=()):
    """Train, evaluate and (main process) write the results: one call per process."""
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng
    from detectron2.utils.logger import setup_logger

    from .data import register_shapes
    from .engine import SmallBNTrainer
    from .engine.defaults import setup_smallbn_logger
    from .engine.hooks import unwrap
    from .engine.statistics_error import StatisticsErrorHook

    from .norms import import_norm_modules

    import_norm_modules()  # a launched process: the modules its parent was given (D2_SMALLBN_NORM_MODULES)
    out = output_dir(args)
    os.makedirs(out, exist_ok=True)
    rank = comm.get_rank()
    for name in ("fvcore", "detectron2"):  # as detectron2's default_setup: stdout and OUTPUT_DIR/log.txt
        setup_logger(out, distributed_rank=rank, name=name)
    setup_smallbn_logger(out)
    register_shapes(root)
    cfg = build_cfg(args, root)
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)  # as detectron2's default_setup does

    logger.info("Training %s for %d iterations on %d process(es) -> %s", config_file(args),
                cfg.SOLVER.MAX_ITER, comm.get_world_size(), cfg.OUTPUT_DIR)
    trainer = SmallBNTrainer(cfg)
    if comm.get_world_size() > 1:  # each norm's statistics against the whole batch's, in metrics.json
        trainer.register_hooks([StatisticsErrorHook(period=STATS_ERROR_PERIOD)])
    trainer.register_hooks([make() for make in hooks])
    trainer.resume_or_load(resume=False)
    trainer.train()
    train_seconds = time.time() - start
    results = {"trained": trainer._last_eval_results}
    if not args.no_untrained:
        torch_seed(cfg.SEED)  # the same untrained model in every process
        results["untrained"] = SmallBNTrainer.test(cfg, SmallBNTrainer.build_model(cfg))
    if not comm.is_main_process():
        return
    results = {k: coco_ap(v) for k, v in results.items()}
    files = {
        "results": os.path.join(cfg.OUTPUT_DIR, "results.json"),
        "predictions": draw_predictions(cfg, unwrap(trainer.model), cfg.DATASETS.TEST[0],
                                        os.path.join(cfg.OUTPUT_DIR, "predictions.png"), args.num_vis),
        "curves": draw_curves(os.path.join(cfg.OUTPUT_DIR, "metrics.json"), os.path.join(cfg.OUTPUT_DIR, "curves.png")),
        "training log": os.path.join(cfg.OUTPUT_DIR, "metrics.json"),
        "log": os.path.join(cfg.OUTPUT_DIR, "log.txt"),
        "checkpoint": os.path.join(cfg.OUTPUT_DIR, "model_final.pth"),
        "config": os.path.join(cfg.OUTPUT_DIR, "config.yaml"),
        "dataset": os.path.abspath(root),
    }
    with open(files["config"], "w") as f:
        f.write(cfg.dump())
    summary = {"norm": run_name(args), "config": config_file(args), "iterations": cfg.SOLVER.MAX_ITER,
               "images_per_iteration": cfg.SOLVER.IMS_PER_BATCH, "processes": comm.get_world_size(),
               "seed": cfg.SEED, "wall_seconds": round(time.time() - start, 1),
               "train_and_eval_seconds": round(train_seconds, 1), "results": results}
    with open(files["results"], "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    name = run_name(args)
    labels = {"trained": f"{name}, {cfg.SOLVER.MAX_ITER} iterations", "untrained": f"{name}, untrained"}
    print("\nCOCO evaluation on smallbn_shapes_val:\n" + ap_table({labels[k]: v for k, v in results.items()}))
    print(f"\nTotal time {summary['wall_seconds']:.0f} s. Outputs:")
    for name, path in files.items():
        print(f"  {name:14s} {path}")


def torch_seed(seed):
    import torch

    torch.manual_seed(seed if seed >= 0 else 0)


if __name__ == "__main__":
    sys.exit(main())
