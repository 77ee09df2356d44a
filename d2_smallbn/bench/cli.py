"""The command-line pieces the benchmarks and studies share: where and how a tool runs (``--device``,
``--threads``, ``--out``), a user's norm modules (``--norm-module``), sizes given as HxW, the start
of a run, the head of its report and its closing line; and the flags and the end of the two studies
that train a small net on the shape task.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from .common import command_line, device_info, environment, set_threads, write_json
from ..norms import add_norm_module_flag, import_requested_norm_modules


def add_run_arguments(parser, out, device=None, threads=True):
    """``--device`` (default ``device``; None: cuda when available, else cpu), ``--threads`` (unless
    ``threads`` is False: the tool uses every available core) and ``--out`` (default ``out``)."""
    default = device or ("cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=default)
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every available core)")
    parser.add_argument("--out", type=Path, default=Path(out))


def check_device(parser, args):
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")


def add_norm_modules(parser):
    add_norm_module_flag(parser, "so that they can be measured or trained by name")


def import_requested_norms(parser, args):
    """Imports the modules of ``--norm-module`` and of D2_SMALLBN_NORM_MODULES; a failure is a usage error."""
    import_requested_norm_modules(parser, args.norm_module)


def comma_list(text):
    """An argparse type: the non-empty items of a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


def height_width(text, what, example, minimum=1):
    """``HxW`` as (height, width), each at least ``minimum``; an argparse error naming ``what`` otherwise."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad {what} {text!r}; expected HxW, e.g. {example}")
    if h < minimum or w < minimum:
        raise argparse.ArgumentTypeError(f"{what} {text!r} is too small (at least {minimum}x{minimum})")
    return h, w


def begin(args):
    """Sets torch's threads (``--threads``, or every available core) and makes the output folder;
    returns the device and the start time."""
    set_threads(getattr(args, "threads", None))
    args.out.mkdir(parents=True, exist_ok=True)
    return torch.device(args.device), time.perf_counter()


def report_head(device, detectron2=True):
    """What a report starts with: the command, the device and the versions (detectron2's too, where the
    tool uses it)."""
    return {"command": command_line(), "argv": sys.argv, "device": device_info(device),
            **environment(detectron2=detectron2)}


def finish_study(report, start, out, stem, plot, lines):
    """A study's end: its runtime into the report, the report to DIR/<stem>.json and its chart
    (``plot(report, path)``) to DIR/<stem>.png; then prints ``lines`` (its summary) and the closing line."""
    report["runtime_s"] = time.perf_counter() - start
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    write_json(json_path, report)
    plot(report, png_path)
    print("\n".join(lines))
    print_written(report["runtime_s"], (json_path, png_path))


def learning_line(loss_first, loss_last, accuracy, chance):
    """Whether a study's net learned its task: its loss at the start and the end, its held-out accuracy."""
    return f"loss {loss_first:.3f} -> {loss_last:.3f}, held-out accuracy {accuracy:.2f} (chance {chance:.2f})"


def print_written(runtime_s, paths):
    """The closing line: the run's time and the files it wrote."""
    names = [str(p) for p in paths]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    print(f"runtime {runtime_s:.1f} s; wrote {listed}")


# ---- the studies that train a small net on the shape task (common.shapes_batch) ------------------

def add_shape_task_arguments(parser, out):
    """The flags of such a study: the net's training (--batch, --lr, --weight-decay), the task
    (--colour-cue, --size), the net's --width, --seed, where it runs (--device, default cpu; --threads;
    --out, default ``out``) and --tiny."""
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--colour-cue", type=float, default=0.5, help="weight of the class colour (default 0.5)")
    parser.add_argument("--size", type=int, default=None, help="image side (default 32; 16 with --tiny)")
    parser.add_argument("--width", type=int, default=None, help="channels of the probed layer (default 32; 16 tiny)")
    parser.add_argument("--seed", type=int, default=0)
    add_run_arguments(parser, out, device="cpu")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")


def shape_task_defaults(parser, args):
    """--size and --width by --tiny where not given; --device checked."""
    args.size = args.size or (16 if args.tiny else 32)
    args.width = args.width or (16 if args.tiny else 32)
    check_device(parser, args)
