"""Generate (or reuse) the built-in COCO-format dataset ``smallbn_shapes``.

Usage:  d2-smallbn-dataset [--root DIR] [--seed 0] [--num-train 400] [--num-val 100] [--hue-spread 60] [--force]

The default root is $D2_SMALLBN_DATASETS/smallbn_shapes (D2_SMALLBN_DATASETS defaults to
./datasets, relative to the current directory): the same place ``register_shapes()`` looks.
A complete dataset generated with the same parameters is reused; a damaged file in it (an image that
does not decode, an annotation file that does not parse) is named and regenerated; --force
regenerates everything.
Prints where the files are and, per split, images, instances and COCO size classes.
"""
import argparse
import sys
import time
from pathlib import Path

from .checks import DatasetError
from .scene import SceneOptions
from .shapes import default_root, generate_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help=f"output folder (default: {default_root()})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--num-train", type=int, default=400, help="training images (default: 400)")
    parser.add_argument("--num-val", type=int, default=100, help="validation images (default: 100)")
    parser.add_argument("--hue-spread", type=int, default=SceneOptions.hue_spread,
                        help="degrees of hue around each category's hue for a shape's main colour; 360 makes "
                             f"colour independent of the category (default: {SceneOptions.hue_spread})")
    parser.add_argument("--force", action="store_true", help="regenerate even if a complete dataset exists")
    return parser.parse_args(argv)


def split_summary(split, stats):
    count = max(stats["instances"], 1)
    sizes = " / ".join(f"{key} {stats[key]} ({100 * stats[key] / count:.0f}%)" for key in ("small", "medium", "large"))
    return (f"{split}: {stats['images']} images, {stats['instances']} instances "
            f"({stats['instances'] / max(stats['images'], 1):.1f} per image); {sizes}")


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        dataset = generate_dataset(args.root, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                   hue_spread=args.hue_spread, force=args.force)
    except (DatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    action = "reused the complete dataset" if dataset.reused else f"generated in {time.perf_counter() - start:.1f} s"
    if dataset.repaired:
        count = len(dataset.repaired)
        action = f"regenerated {count} damaged file{'s' if count > 1 else ''} in {time.perf_counter() - start:.1f} s"
        for path, problem in dataset.repaired:
            print(f"damaged: {path} {problem}")
    print(f"smallbn_shapes (seed {args.seed}): {action} at {dataset.root}")
    for split, stats in dataset.statistics.items():
        print("  " + split_summary(split, stats))
        print(f"    images:      {dataset.image_dir(split)}")
        print(f"    annotations: {dataset.annotation_file(split)}")
    print(f"Register: from d2_smallbn.data import register_shapes; register_shapes({str(dataset.root)!r})"
          " -> smallbn_shapes_train, smallbn_shapes_val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
