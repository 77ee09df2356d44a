"""The statistics error at evaluation: for trained runs, how far each norm's running estimates (what
it normalizes with in eval) are from the statistics of the inputs it sees when the run's final model
evaluates the validation set (``d2_smallbn.engine.statistics_error.eval_statistics_error``).

The training-time instrument compares the statistics a norm used with the whole batch's; this one
asks whether what training left in the running estimates fits the trained network. A run whose
training loss is fine but whose AP is low, with large errors here, loses its accuracy at evaluation.

Usage: python -m d2_smallbn.bench.eval_statistics RUN_DIR [RUN_DIR ...] [--data-root DIR] [--images N]
           [--out FILE]
RUN_DIR: a quickstart or study run folder (config.yaml and model_final.pth). Prints, per run, the
errors averaged over the norms of each part (FPN, box head, mask head, backbone) and writes JSON
(default: eval_statistics.json in the first RUN_DIR's parent).
"""
import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

PARTS = (("backbone", "backbone.bottom_up."), ("fpn", "backbone."), ("box_head", "roi_heads.box_head."),
         ("mask_head", "roi_heads.mask_head."), ("other", ""))


def part_of(name):
    return next(part for part, prefix in PARTS if name.startswith(prefix))


def measure_run(folder, data_root, images):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import build_detection_test_loader

    from ..data import default_root, register_shapes
    from ..engine import SmallBNTrainer
    from ..engine.defaults import build_config
    from ..engine.statistics_error import eval_statistics_error

    config, weights = folder / "config.yaml", folder / "model_final.pth"
    for path in (config, weights):
        if not path.is_file():
            raise SystemExit(f"eval_statistics: {path} is missing; RUN_DIR must be a finished run folder "
                             "(config.yaml and model_final.pth)")
    register_shapes(data_root or default_root())
    cfg = build_config(str(config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = SmallBNTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TEST[0])
    per_layer = eval_statistics_error(model, itertools.islice(loader, images))
    parts = {}
    for name, errors in per_layer.items():
        parts.setdefault(part_of(name), []).append(errors)
    summary = {part: {key: statistics.fmean(e[key] for e in rows) for key in ("mean", "var", "input_abs_mean")}
               for part, rows in parts.items()}
    return {"run": str(folder), "images": images, "layers": per_layer, "parts": summary}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders")
    p.add_argument("--data-root", default=None, help="the built-in dataset's folder (default: see d2_smallbn.data)")
    p.add_argument("--images", type=int, default=50, help="validation images to measure over (default 50)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: eval_statistics.json beside the runs)")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images must be >= 1, got {args.images}")
    out = args.out or args.runs[0].resolve().parent / "eval_statistics.json"
    if any(out.resolve() == (r / name).resolve() for r in args.runs for name in ("config.yaml", "model_final.pth")):
        p.error(f"--out {out} is a file of a run; choose another path")
    results = [measure_run(folder, args.data_root, args.images) for folder in args.runs]
    print("| run | part | norms | mean error | var error | input: mean abs(mean) |\n|---|---|---|---|---|---|")
    for r in results:
        counts = {}
        for name in r["layers"]:
            counts[part_of(name)] = counts.get(part_of(name), 0) + 1
        for part, e in r["parts"].items():
            print(f"| {Path(r['run']).name} | {part} | {counts[part]} | {e['mean']:.3f} | {e['var']:.3f} | "
                  f"{e['input_abs_mean']:.3g} |")
    out.write_text(json.dumps({"command": sys.argv, "runs": results}, indent=1))
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
