"""Model-level speed and memory of d2_smallbn's norms in Mask R-CNN R50-FPN (4conv1fc box head),
against the matching BatchNorm model measured in the same run.

Settings (backbone stem and res2 frozen in all of them, FREEZE_AT 2, for comparability; the CBN
paper's setting (b) and the paper configs use the same):

    frozen_none   FrozenBN backbone, no norm in FPN and heads (detectron2's default model)
    frozen_bn     FrozenBN backbone, BN in FPN, box head convs and mask head convs
    frozen_gn     FrozenBN backbone, GN in FPN and heads
    frozen_cbn    FrozenBN backbone, CBN in FPN and heads (the CBN paper's default setting)
    bn, gn        that norm in backbone, FPN and heads
    gn_ws         GN with weight-standardized convs (MODEL.SMALLBN.CONV "ws") everywhere
    cbn, mabn     CBN / MABN everywhere
    bcn_ws        BCN + WS everywhere

Models: random init (MODEL.WEIGHTS ""), except that every setting loads the same "pseudo-pretrained"
ResNet: random conv weights with BN statistics measured on the benchmark images, standing in for the
papers' ImageNet BN checkpoint (mapped into each norm as a BN checkpoint is: FrozenBN, BN, CBN and BCN
take the statistics, MABN running_sqmean = var + mean^2, GN only the affine). Without it a random
FrozenBN backbone (identity statistics) explodes through 50 layers and training diverges in a few steps.

What is measured, for each setting, on the same synthetic batch (``--batch``, default 2 images; random pixels with a
few random boxes and elliptic masks, detectron2 Instances, created once):

- training step: forward (losses) + backward + SGD step of ``d2_smallbn.engine.build_optimizer``,
  with the same fixed proposals in every setting (``fixed_proposals``: the RPN runs and computes its
  losses as usual, but the ROI heads get the same RoIs in every model; a random-init model's own
  proposals would make the heads' work, mostly the mask head's, differ by model),
  timed from the forward to the end of the step (device synchronized). Before every step each
  CBN / MABN layer gets ``set_iteration(i)`` and each BCN layer the current learning rate, as
  ``SmallBNHook`` does. Every norm's own iteration counts (``NormSpec.phases``: CBN's burn-in, the
  MABN warmups) are 0, and each model is first primed on small images for the steps its norm layers
  ask for (``priming_steps()``: until CBN's window is full and MABN uses its moving averages with
  clipping), so every timed step is in the steady state (``steady()``). Before each step the RNG is
  seeded with the round number, so every setting draws the same random numbers (RoI sampling);
- peak memory of a training step (separate untimed steps): on CUDA, torch.cuda.max_memory_allocated
  during the step minus the memory allocated before it, plus the model's own state (parameters,
  buffers, optimizer state), i.e. the peak if this model were alone on the device; on CPU, the
  bytes of the unique storages autograd saves for backward (saved_tensors_hooks; parameters and
  buffers excluded) plus parameters, their gradients, buffers and optimizer state. The CPU-style
  number is in the JSON on both devices;
- inference: ``model.inference(inputs, do_postprocess=False)`` in eval mode under no_grad (the
  network, NMS and the mask head; resizing boxes and pasting masks into the image is norm-independent
  and left out), with ROI_HEADS.SCORE_THRESH_TEST 0, so every image yields TEST.DETECTIONS_PER_IMAGE
  detections and the mask head always runs on them; unfolded and folded with
  ``d2_smallbn.modeling.fold_model``. Before timing, each folded model is checked against its
  unfolded model on the benchmark inputs: FPN features, box-head outputs on the same proposals
  and mask-head outputs on the same boxes must agree to a relative 1e-3 (TF32 off for the check),
  and at least 90% of the end-to-end detections must match (ties among random-init scores may be
  broken differently).

Settings are interleaved round-robin (rotated order each round), so machine noise hits all of
them alike; every figure is the median over rounds of the per-round ratio to the matching BN
setting of the same round: frozen_* to frozen_bn, the everywhere settings to bn, bcn_ws also to
gn_ws; folded inference also to frozen_none folded (the same plain-conv architecture) and
unfolded (the stock FrozenBN deployment). Absolute times appear only next to the device name.

Usage:
    d2-smallbn-benchmark [--size HxW] [--depth 50] [--batch 2] [--iters N] [--warmup N] [--device cpu|cuda]
        [--out DIR] [--settings frozen_cbn,mabn,...] [--tiny] [--lr LR] [--cbn-window K] [--seed S]
        [--memory-rounds N] [--threads N] [--profile mabn,bn,...] [--norm-module MODULE] [--verbose]

A setting is a key of ``SETTINGS`` (``d2_smallbn.bench.model_settings``) or the name of any norm of the
table of norms, e.g. one of yours registered with ``d2_smallbn.register_norm`` in a module that
``--norm-module`` (or D2_SMALLBN_NORM_MODULES) names: that norm everywhere, compared with BN everywhere.

Targets (``TARGETS["model"]`` in ``d2_smallbn.bench.targets``) are judged by device type: the GPU
targets on CUDA, the CPU study's on CPU.
Defaults: 800x1216 on CUDA; 320x480 on CPU (full-size R50 steps take tens of seconds there);
10 timed rounds after 2 warmup rounds on CUDA, 5 after 1 on CPU. ``--tiny`` is a smoke-test model
(R18 unless --depth is given, 32-channel FPN and heads, few RoIs; default size 64x96).
Writes DIR/benchmark.json, DIR/benchmark.md (printed too) and DIR/benchmark.png.
"""
import argparse
import sys
import time

from .cli import (add_norm_modules, add_run_arguments, begin, check_device, comma_list, height_width,
                  import_requested_norms, print_written, report_head)
from .common import write_json
from .model_measure import run
from .model_report import analyse, markdown, plot
from .model_settings import SETTINGS, choices, norms_of, setting, setting_key, with_references


def parse_size(text):
    return height_width(text, "size", "800x1216", minimum=32)


def setting_keys(parser, flag, names):
    """The setting keys ``names`` (given to ``flag``) name; a usage error for a name that is none."""
    keys = [setting_key(name) for name in names]
    bad = [name for name, key in zip(names, keys) if key is None]
    if bad or not keys:
        parser.error(f"{flag}: unknown settings {bad}; choose from {choices()}")
    return list(dict.fromkeys(keys))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=None,
                   help="input HxW (default 800x1216 on CUDA, 320x480 on CPU, 64x96 with --tiny)")
    p.add_argument("--depth", type=int, choices=(18, 34, 50, 101), default=None,
                   help="ResNet depth (default 50; 18 with --tiny)")
    p.add_argument("--batch", type=int, default=2, help="images per training step (default 2; the CBN paper's "
                   "Table 6 uses 4)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 10 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2 on CUDA, 1 on CPU)")
    p.add_argument("--memory-rounds", type=int, default=1, help="untimed memory-measuring steps per setting")
    add_run_arguments(p, out="output/benchmark")
    p.add_argument("--settings", type=comma_list, default=list(SETTINGS),
                   help=f"comma-separated subset of {','.join(SETTINGS)}, or a norm's name (that norm "
                        "everywhere); references are added (default: all of the former)")
    p.add_argument("--tiny", action="store_true", help="smoke-test model: R18, 32-channel FPN/heads, few RoIs")
    p.add_argument("--lr", type=float, default=0.0025,
                   help="SGD learning rate (default 0.0025: the papers' 0.02 for 16 images, scaled to 2)")
    p.add_argument("--cbn-window", type=int, default=4,
                   help="CBN window k, MODEL.SMALLBN.CBN.WINDOW_SIZE (default 4, MODEL.SMALLBN's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=comma_list, default=[],
                   help="after the timing, one more training step of each of these settings under "
                        "torch.profiler; writes DIR/profile_<setting>.txt (ops by self time)")
    add_norm_modules(p)
    p.add_argument("--verbose", action="store_true", help="progress on stderr")
    args = p.parse_args(argv)
    import_requested_norms(p, args)
    args.settings = setting_keys(p, "--settings", args.settings)
    args.profile = setting_keys(p, "--profile", args.profile) if args.profile else []
    measured = with_references(args.settings)
    unmeasured = [k for k in args.profile if k not in measured]
    if unmeasured:
        p.error(f"--profile {','.join(unmeasured)}: not measured in this run; add them to --settings")
    check_device(p, args)
    cuda = args.device == "cuda"
    args.depth = args.depth or (18 if args.tiny else 50)
    args.size = args.size or ((64, 96) if args.tiny else (800, 1216) if cuda else (320, 480))
    args.iters = args.iters if args.iters is not None else (10 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    if min(args.iters, args.memory_rounds, args.cbn_window, args.batch) < 1 or args.warmup < 0 or args.lr < 0:
        p.error("--iters, --memory-rounds, --cbn-window and --batch must be >= 1, --warmup and --lr >= 0")
    return args


def settings_description(keys):
    described = {}
    for k in keys:
        s = setting(k)
        described[k] = {"backbone": s.backbone, "fpn_and_heads": s.fpn_and_heads or "none", "conv": s.conv,
                        "reference": s.reference, "label": s.label}
    return described


def main(argv=None):
    args = parse_args(argv)
    device, start = begin(args)
    keys = with_references(args.settings)
    added = [k for k in keys if k not in args.settings]

    raw = run(args, device, keys)
    results, targets, work = analyse(raw, keys, device.type)
    cfg0 = raw["settings"][keys[0]].cfg
    report = {
        **report_head(device),
        "config": {"size": list(args.size), "depth": args.depth, "batch": args.batch, "iters": args.iters,
                   "warmup": args.warmup, "memory_rounds": args.memory_rounds, "tiny": args.tiny, "lr": args.lr,
                   "seed": args.seed, "settings": keys, "requested_settings": list(args.settings),
                   "added_references": added, "freeze_at": 2, "cbn_window_size": args.cbn_window,
                   "norm_settings": {name: cfg0.MODEL.SMALLBN[name] for name in norms_of(keys)},
                   "detections_per_image": cfg0.TEST.DETECTIONS_PER_IMAGE,
                   "roi_batch_per_image": cfg0.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE,
                   "primed_steps": raw["primed"]},
        "settings_description": settings_description(keys),
        "memory_metric": ("cuda_step_peak_delta_bytes + state_bytes" if device.type == "cuda"
                          else "saved_bytes + state_bytes + grad_bytes (cpu_metric_bytes)"),
        "timing": ("train: forward+backward+SGD step; inference: model.inference(do_postprocess=False), no_grad; "
                   "per-round ratios, median [p25, p75]"),
        "fold_check": raw["fold"],
        "contention": raw["contention"],
        "work_fg_rois_per_image": work,
        "profiles": raw["profiles"],
        "results": results,
        "targets": targets,
    }
    report["runtime_s"] = time.perf_counter() - start
    json_path, md_path, png_path = args.out / "benchmark.json", args.out / "benchmark.md", args.out / "benchmark.png"
    md = markdown(report)
    write_json(json_path, report)
    md_path.write_text(md)
    plot(report, png_path)
    print(md)
    print_written(report["runtime_s"], (json_path, md_path, png_path))
    for path in report["profiles"].values():
        print(f"profile: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
