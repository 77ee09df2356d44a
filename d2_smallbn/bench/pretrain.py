"""The pretraining stage of the pretrained regime (issue 19): "ImageNet at CPU scale".

The papers' COCO rows fine-tune a backbone pretrained on ImageNet at a large batch. This command
pretrains the quickstart's backbone (ResNet-18: 64-channel stem and res2, basic blocks, as
``configs/quickstart/Base-Quickstart.yaml`` builds it) the same way: as a classifier, in one process,
at ``--batch-size`` >= 16 images per iteration, so that its BN layers learn from the statistics of a
large batch, as an ImageNet backbone's did.

Data, disjoint from the detection fine-tune set: object crops (5 shape categories) of a separately
generated ``smallbn_shapes`` set with its own seed (``--data-seed``, default 1; the built-in
detection set is seed 0) and its own root (``--data-root``, default
``$D2_SMALLBN_DATASETS/smallbn_shapes_pretrain``). Image i of a split is drawn from the random stream
(seed, split, i), so no image of it is one of the detection set's. See ``d2_smallbn.bench.crops``.
Input as torchvision's ImageNet models take it: RGB, (x / 255 - mean) / std with ImageNet's mean and
std, which is what ``d2-smallbn-convert-weights`` tells the fine-tuning config to use.

Variants (``--variants``, default all), one per backbone of the papers' fine-tuning rows:

    bn           plain convs + BN                 CBN Table 4 (a) (FrozenBN) and (b) (BN, SyncBN, CBN)
    gn           plain convs + GN (32 groups)     BCN Tables 9-10 "GN"; CBN Table 4 (b) "GN"
    gnws         WS convs + GN                    BCN Tables 9-10 "GN+WS"
    bcnws        WS convs + BCN (BN, then GN with one affine per group; the authors' layout)
                                                  BCN Tables 9-10 "BCN+WS"
    centered_bn  weight-centralized convs + BN    MABN Table 6 (SyncBN, MABN)

The convs are d2_smallbn's own (``WSConv2d``, ``CenteredConv2d``, chosen by MODEL.SMALLBN.CONV's names),
the norms torch's, in torchvision's ResNet-18 (``torchvision.models.resnet18``), so the checkpoint
has exactly the names of a user's ImageNet checkpoint (conv1.weight, bn1.*, layer1.0.conv1.weight,
..., fc.*). It enters fine-tuning through ``d2-smallbn-convert-weights``, as a user's would; the commands
for each fine-tuning norm are printed and written into the JSON.

Optimizer: SGD, momentum 0.9, weight decay 1e-4, learning rate warmed up linearly over
``--warmup-iters`` then cosine-decayed to 0 at ``--iters``. Seeded: the initial weights from
``--seed``, the batches and their augmentation from (seed, iteration), so a resumed run takes the
same steps as an uninterrupted one.

Outputs, under ``--out`` (default output/pretrain), per variant:

    <variant>/pretrain_state.pth          the resumable state (every --checkpoint-period iterations)
    <variant>/model_final_torchvision.pth the final weights (a plain torchvision state dict), only when done
    <variant>/pretrain.json               status "incomplete" (iteration k of N) or "done" with the
                                          held-out crop accuracy, the command, device and every setting
and ``summary.json`` for the variants of the run. A rerun of the same command continues from the
state (or reports a finished variant as done); different settings for an existing state are
refused. Exit codes: 0 every variant done; 3 some variant stopped early (``--stop-after-iters``, or
interrupted): rerun to continue; 2 unusable arguments.

Defaults (a CPU run): 64-px crops, 32 per iteration, 2,000 iterations at learning rate 0.05, crops of
2,000 generated training images (about 10,000 instances) and 400 held-out images.

Usage: python -m d2_smallbn.bench.pretrain [--variants bn,gn,gnws,bcnws,centered_bn] [--iters 2000]
           [--batch-size 32] [--lr 0.05] [--crop-size 64] [--seed 0] [--out output/pretrain]
           [--data-root DIR] [--data-seed 1] [--train-images 2000] [--val-images 400]
           [--checkpoint-period 200] [--stop-after-iters N] [--device auto|cpu|cuda] [--threads N]
"""
import argparse
import inspect
import math
import os
import shlex
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import CATEGORIES, default_root, generate_dataset
from ..layers import GroupNormPerGroupAffine
from ..norms import CONV_TYPES
from .common import command_line, device_info, environment, finite_or_raise, set_threads, write_json
from .crops import centre_windows, object_crops, training_windows

# torchvision's ImageNet normalization in 0-255 units: the MODEL.PIXEL_MEAN / PIXEL_STD (with
# INPUT.FORMAT RGB) that d2-smallbn-convert-weights names for a torchvision checkpoint.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MIN_BATCH = 16           # the large-batch statistics the stage exists for
MIN_CROP = 32            # res5 has stride 32: at least one position
DETECTION_SEED = inspect.signature(generate_dataset).parameters["seed"].default  # the built-in set's
MODULE_COMMAND = "python -m d2_smallbn.bench.pretrain"
EXIT_DONE, EXIT_BAD_INPUT, EXIT_INCOMPLETE = 0, 2, 3
STATE_FILE, FINAL_FILE, REPORT_FILE = "pretrain_state.pth", "model_final_torchvision.pth", "pretrain.json"


class BatchThenGroupNorm(nn.Module):
    """BCN at a large batch, as the BCN+WS authors' checkpoints store it: ``bn`` (batch statistics in
    training, running statistics in eval), then group normalization with one scale and shift per
    group (``gn.weight`` / ``gn.bias``, length G). ``d2-smallbn-convert-weights`` maps it onto BCN."""

    def __init__(self, channels, groups=32):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.gn = GroupNormPerGroupAffine(channels, groups)

    def forward(self, x):
        return self.gn(self.bn(x))


class Variant(NamedTuple):
    """A pretrained backbone: its convs (a MODEL.SMALLBN.CONV name), its norm (channels, groups) ->
    module, and the conversions that fine-tuning uses: (--target-norm, what it is for)."""
    conv: str
    norm: Callable
    conversions: Tuple[Tuple[str, str], ...]
    doc: str


VARIANTS = {
    "bn": Variant("plain", lambda c, g: nn.BatchNorm2d(c),
                  (("frozenbn", "CBN Table 4 (a): FrozenBN backbone"),
                   ("bn", "CBN Table 4 (b) BN row (FREEZE_AT 2)"), ("syncbn", "CBN Table 4 (b) SyncBN row"),
                   ("cbn", "CBN Table 4 (b) CBN row")), "plain convs + BN"),
    "gn": Variant("plain", lambda c, g: nn.GroupNorm(g, c),
                  (("gn", "BCN Tables 9-10 GN row; CBN Table 4 (b) GN row"),), "plain convs + GN"),
    "gnws": Variant("ws", lambda c, g: nn.GroupNorm(g, c),
                    (("gn", "BCN Tables 9-10 GN+WS row (MODEL.SMALLBN.CONV ws)"),), "WS convs + GN"),
    "bcnws": Variant("ws", lambda c, g: BatchThenGroupNorm(c, g),
                     (("bcn", "BCN Tables 9-10 BCN+WS row"),), "WS convs + BCN (BN, then GN with a per-group affine)"),
    "centered_bn": Variant("centered", lambda c, g: nn.BatchNorm2d(c),
                           (("mabn", "MABN Table 6 MABN row"),
                            ("syncbn", "MABN Table 6 SyncBN row (MODEL.SMALLBN.CONV centered)")),
                           "weight-centralized convs + BN (MABN Table 6's backbone)"),
}


# ---- the model ----------------------------------------------------------------------------------

def build_classifier(variant, num_classes=len(CATEGORIES), groups=32):
    """torchvision's ResNet-18 with ``variant``'s norms and convs (torchvision's initialization)."""
    import torchvision

    spec = VARIANTS[variant]
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes,
                                        norm_layer=partial(spec.norm, g=groups))
    conv_class = CONV_TYPES[spec.conv]
    if conv_class is not None:
        swap_convs(model, conv_class)
    return model


def swap_convs(model, conv_class):
    """Replaces every ``nn.Conv2d`` by ``conv_class`` with the same shape and initial weight."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is nn.Conv2d:
                new = conv_class(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                 padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                                 bias=conv.bias is not None)
                with torch.no_grad():
                    new.weight.copy_(conv.weight)
                setattr(parent, name, new)


# ---- data ---------------------------------------------------------------------------------------

def check_data_arguments(args):
    """None, or why the pretraining data would not be disjoint from the detection set."""
    if Path(args.data_root).expanduser().absolute() == default_root():
        return (f"--data-root {args.data_root} is the detection fine-tune set's folder; the pretraining set "
                "needs its own (default $D2_SMALLBN_DATASETS/smallbn_shapes_pretrain)")
    if args.data_seed == DETECTION_SEED:
        return (f"--data-seed {args.data_seed} is the built-in detection set's seed: its images would be the "
                "fine-tune set's; use another seed")
    return None


def load_data(args):
    """Generates (or reuses) the pretraining scenes and returns their crops:
    {"train": (images, labels), "val": (images, labels)}."""
    dataset = generate_dataset(args.data_root, seed=args.data_seed, num_train=args.train_images,
                               num_val=args.val_images)
    return {split: object_crops(dataset.root, split, args.crop_size) for split in ("train", "val")}


def normalize(images, device):
    """uint8 RGB -> float, torchvision's ImageNet normalization."""
    mean = torch.tensor(PIXEL_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD, device=device).view(1, 3, 1, 1)
    return (images.to(device).float() - mean) / std


def batch_generator(seed, iteration):
    """The generator of iteration ``iteration``'s batch and augmentation (a resumed run draws the same)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + iteration)


def batch_indices(seed, iteration, batch_size, count):
    """Crop indices of an iteration: consecutive slices of one seeded permutation per epoch."""
    positions = range(iteration * batch_size, (iteration + 1) * batch_size)
    perms = {}
    out = []
    for position in positions:
        epoch, offset = divmod(position, count)
        if epoch not in perms:
            perms[epoch] = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(perms[epoch][offset])
    return torch.stack(out)


# ---- training -----------------------------------------------------------------------------------

def learning_rate(settings, iteration):
    """Linear warmup to ``lr`` over ``warmup_iters``, then cosine decay to 0 at ``iters``."""
    base, warmup, total = settings["lr"], settings["warmup_iters"], settings["iters"]
    if iteration < warmup:
        return base * (iteration + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (iteration - warmup) / max(total - warmup, 1)))


def build_optimizer(model, settings):
    """SGD with momentum and weight decay (the learning rate is set every step)."""
    return torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                           weight_decay=settings["weight_decay"])


def train_step(model, optimizer, crops, settings, iteration, device):
    """One SGD step on iteration ``iteration``'s batch; returns its loss (a float)."""
    images, labels = crops
    indices = batch_indices(settings["seed"], iteration, settings["batch_size"], len(labels))
    windows = training_windows(images, indices, settings["crop_size"], batch_generator(settings["seed"], iteration))
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(settings, iteration)
    model.train()
    loss = F.cross_entropy(model(normalize(windows, device)), labels[indices].to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return finite_or_raise(loss.item(), f"the training loss at iteration {iteration}")


@torch.no_grad()
def evaluate(model, crops, crop_size, device, batch_size=256):
    """Held-out accuracy (centre windows, BN in eval mode): overall, per class, and the loss."""
    images, labels = crops
    model.eval()
    windows = centre_windows(images, crop_size)
    predictions, losses = [], []
    for start in range(0, len(labels), batch_size):
        logits = model(normalize(windows[start:start + batch_size], device)).float().cpu()
        predictions.append(logits.argmax(1))
        losses.append(F.cross_entropy(logits, labels[start:start + batch_size], reduction="sum"))
    predicted = torch.cat(predictions)
    correct = predicted == labels
    per_class = {name: (correct[labels == i].float().mean().item() if (labels == i).any() else None)
                 for i, name in enumerate(CATEGORIES)}
    majority = torch.bincount(labels, minlength=len(CATEGORIES)).max().item() / len(labels)
    return {"top1": correct.float().mean().item(), "loss": (sum(losses) / len(labels)).item(),
            "per_class_top1": per_class, "chance_majority_class": majority, "num_crops": len(labels)}


# ---- state on disk ------------------------------------------------------------------------------

def save_atomically(obj, path, save=torch.save):
    """``save(obj, temporary sibling)``, then rename: a killed save never leaves a half-written file."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save(obj, temporary)
    os.replace(temporary, path)


def load_state(folder):
    """The saved training state of a variant's folder, or None."""
    path = folder / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None


def changed_settings(saved, settings):
    """The settings that differ between a saved state and this run: [(key, saved, now)]."""
    keys = sorted(set(saved) | set(settings))
    return [(k, saved.get(k), settings.get(k)) for k in keys if saved.get(k) != settings.get(k)]


def conversions(variant, folder):
    """The d2-smallbn-convert-weights commands that turn the final checkpoint into fine-tuning weights."""
    spec, final = VARIANTS[variant], folder / FINAL_FILE
    return [{"target_norm": target, "for": use, "output": str(folder / f"R18-{target}.pkl"),
             "command": f"d2-smallbn-convert-weights {final} {folder / f'R18-{target}.pkl'} --target-norm {target} "
                        f"--conv {spec.conv}"}
            for target, use in spec.conversions]


def write_report(folder, variant, settings, state, status, args, counts, accuracy=None):
    """Writes (atomically) and returns the variant's report: "done" with the accuracy and the
    conversion commands, or "incomplete" with how to continue."""
    report = {
        "status": status, "variant": variant, "description": VARIANTS[variant].doc,
        "iteration": state["iteration"], "iters": settings["iters"],
        "settings": settings, "command": args.command, "device": device_info(args.torch_device),
        "environment": environment(), "data": counts, "train_wall_s": state["train_wall_s"],
        "history": state["history"],
        "input": {"format": "RGB", "pixel_mean": PIXEL_MEAN, "pixel_std": PIXEL_STD},
    }
    if status == "done":
        report.update(accuracy=accuracy, checkpoint=str(folder / FINAL_FILE), convert=conversions(variant, folder))
    else:
        report["resume"] = "rerun the same command to continue from " + str(folder / STATE_FILE)
    save_atomically(report, folder / REPORT_FILE, save=lambda obj, path: write_json(path, obj))
    return report


# ---- one variant ----------------------------------------------------------------------------------

def run_settings(args, variant):
    """Every setting that changes the result (the state must match them to be resumed)."""
    return {"variant": variant, "seed": args.seed, "iters": args.iters, "batch_size": args.batch_size,
            "lr": args.lr, "momentum": args.momentum, "weight_decay": args.weight_decay,
            "warmup_iters": args.warmup_iters, "crop_size": args.crop_size, "groups": args.groups,
            "data_root": str(Path(args.data_root).expanduser().absolute()), "data_seed": args.data_seed,
            "train_images": args.train_images, "val_images": args.val_images}


def start_or_resume(folder, settings, device):
    """(model, optimizer, state) from the saved state, or new ones seeded by ``settings["seed"]``.
    Raises ValueError when the saved state was made with other settings."""
    torch.manual_seed(settings["seed"])
    model = build_classifier(settings["variant"], groups=settings["groups"]).to(device)
    optimizer = build_optimizer(model, settings)
    saved = load_state(folder)
    if saved is None:
        return model, optimizer, {"iteration": 0, "history": [], "train_wall_s": 0.0}
    changed = changed_settings(saved["settings"], settings)
    if changed:
        listed = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, old, new in changed)
        raise ValueError(f"{folder / STATE_FILE} was made with other settings ({listed}). Fix: rerun with its "
                         "settings to continue it, or pass another --out")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return model, optimizer, {k: saved[k] for k in ("iteration", "history", "train_wall_s")}


def save_state(folder, settings, model, optimizer, state):
    """Everything a rerun needs to continue exactly: settings, weights, optimizer, iteration, history."""
    save_atomically({"settings": settings, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     **state}, folder / STATE_FILE)


def pretrain_variant(variant, args, data):
    """Trains (or continues) one variant; returns its report (status "done" or "incomplete")."""
    folder = Path(args.out) / variant
    folder.mkdir(parents=True, exist_ok=True)
    settings = run_settings(args, variant)
    model, optimizer, state = start_or_resume(folder, settings, args.torch_device)
    counts = data_counts(data)
    stop = settings["iters"] if args.stop_after_iters is None else \
        min(settings["iters"], state["iteration"] + args.stop_after_iters)
    if state["iteration"] < settings["iters"]:
        mark_incomplete(folder, variant, settings, state, args, counts)
    print(f"[{variant}] {VARIANTS[variant].doc}: iterations {state['iteration']} -> {stop} of {settings['iters']}",
          flush=True)
    started, steps = time.perf_counter(), 0
    while state["iteration"] < stop:
        loss = train_step(model, optimizer, data["train"], settings, state["iteration"], args.torch_device)
        state["iteration"], steps = state["iteration"] + 1, steps + 1
        if state["iteration"] % args.log_period == 0 or state["iteration"] == stop:
            log_progress(variant, settings, state, loss, (time.perf_counter() - started) / steps)
        if state["iteration"] % args.checkpoint_period == 0 or state["iteration"] == stop:
            state["train_wall_s"] += time.perf_counter() - started
            started, steps = time.perf_counter(), 0
            save_state(folder, settings, model, optimizer, state)
            if state["iteration"] < settings["iters"]:
                write_report(folder, variant, settings, state, "incomplete", args, counts)
    if state["iteration"] < settings["iters"]:
        return write_report(folder, variant, settings, state, "incomplete", args, counts)
    accuracy = evaluate(model, data["val"], settings["crop_size"], args.torch_device)
    save_atomically({k: v.cpu() for k, v in model.state_dict().items()}, folder / FINAL_FILE)
    return write_report(folder, variant, settings, state, "done", args, counts, accuracy)


def data_counts(data):
    """Crops per split and per class."""
    return {split: {"crops": len(labels), "per_class": dict(zip(CATEGORIES, torch.bincount(
        labels, minlength=len(CATEGORIES)).tolist()))} for split, (_, labels) in data.items()}


def mark_incomplete(folder, variant, settings, state, args, counts):
    """Before training: the report says "incomplete", and a final checkpoint left by an earlier run in
    this folder (this command's own file) is removed, so that nothing there reads as done."""
    write_report(folder, variant, settings, state, "incomplete", args, counts)
    (folder / FINAL_FILE).unlink(missing_ok=True)


def log_progress(variant, settings, state, loss, seconds_per_iter):
    state["history"].append({"iter": state["iteration"], "loss": loss,
                             "lr": learning_rate(settings, state["iteration"] - 1)})
    print(f"[{variant}] iter {state['iteration']}/{settings['iters']} loss {loss:.4f} "
          f"({seconds_per_iter:.3f} s/iter)", flush=True)


# ---- command line -------------------------------------------------------------------------------

def variant_list(text):
    """argparse type of --variants: known names, in order, without repeats."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown or text!r}; valid: {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=MODULE_COMMAND, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=variant_list, default=list(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--iters", type=int, default=2000, help="SGD iterations per variant (default 2000)")
    p.add_argument("--batch-size", type=int, default=32, help=f"crops per iteration, at least {MIN_BATCH} (default 32)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--warmup-iters", type=int, default=100, help="linear learning-rate warmup (default 100)")
    p.add_argument("--crop-size", type=int, default=64, help=f"training crop side, at least {MIN_CROP} (default 64)")
    p.add_argument("--groups", type=int, default=32, help="GN/BCN groups (default 32, detectron2's GN)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batches and augmentation (default 0)")
    p.add_argument("--data-root", default=str(default_root().with_name("smallbn_shapes_pretrain")),
                   help="the pretraining scenes' folder (default $D2_SMALLBN_DATASETS/smallbn_shapes_pretrain)")
    p.add_argument("--data-seed", type=int, default=1, help="the pretraining scenes' seed (default 1; not the "
                   f"detection set's {DETECTION_SEED})")
    p.add_argument("--train-images", type=int, default=2000, help="generated training scenes (default 2000)")
    p.add_argument("--val-images", type=int, default=400, help="generated held-out scenes (default 400)")
    p.add_argument("--out", default="output/pretrain", help="output folder (default output/pretrain)")
    p.add_argument("--checkpoint-period", type=int, default=200, help="iterations between saved states (default 200)")
    p.add_argument("--log-period", type=int, default=50, help="iterations between log lines (default 50)")
    p.add_argument("--stop-after-iters", type=int, default=None,
                   help="train at most this many iterations of each variant now, save, and exit with 3 "
                        "(rerun to continue)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every available core)")
    args = p.parse_args(argv)
    problem = argument_problem(args)
    if problem:
        p.error(problem)
    return args


def argument_problem(args):
    """None, or what is wrong with the arguments."""
    if args.batch_size < MIN_BATCH:
        return (f"--batch-size {args.batch_size}: pretraining needs at least {MIN_BATCH} images per iteration "
                "(its BN must learn from a large batch's statistics, as an ImageNet backbone's did)")
    if args.crop_size < MIN_CROP:
        return f"--crop-size {args.crop_size}: at least {MIN_CROP} (the last stage has stride 32)"
    for flag in ("iters", "checkpoint_period", "log_period", "train_images", "val_images", "groups"):
        if getattr(args, flag) < 1:
            return f"--{flag.replace('_', '-')} must be at least 1"
    if args.warmup_iters < 0 or (args.stop_after_iters is not None and args.stop_after_iters < 0):
        return "--warmup-iters and --stop-after-iters must be >= 0"
    if 64 % args.groups:
        return f"--groups {args.groups} must divide 64 (the stem's channels)"
    return check_data_arguments(args)


def print_summary(reports):
    """One line per variant (accuracy or how far it got), and its conversion commands."""
    for r in reports:
        if r["status"] == "done":
            print(f"{r['variant']:12s} done: held-out crop accuracy {100 * r['accuracy']['top1']:.1f}% "
                  f"(majority class {100 * r['accuracy']['chance_majority_class']:.1f}%), {r['checkpoint']}")
            for c in r["convert"]:
                print(f"{'':12s}   {c['command']}    # {c['for']}")
        else:
            print(f"{r['variant']:12s} INCOMPLETE: iteration {r['iteration']} of {r['iters']}; {r['resume']}")


def main(argv=None):
    """Pretrains every requested variant (continuing saved states); returns the exit code."""
    args = parse_args(argv)
    args.command = command_line() if argv is None else f"{MODULE_COMMAND} {shlex.join(argv)}"
    set_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.torch_device = torch.device("cuda" if use_cuda else "cpu")
    data = load_data(args)
    reports = []
    for variant in args.variants:
        try:
            reports.append(pretrain_variant(variant, args, data))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
    write_json(Path(args.out) / "summary.json", {
        "command": args.command, "variants": {r["variant"]: {k: r.get(k) for k in (
            "status", "iteration", "iters", "accuracy", "checkpoint", "convert")} for r in reports}})
    print_summary(reports)
    return EXIT_DONE if all(r["status"] == "done" for r in reports) else EXIT_INCOMPLETE


if __name__ == "__main__":
    sys.exit(main())
