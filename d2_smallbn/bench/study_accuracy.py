"""Accuracy at micro-batch on the built-in dataset: the quickstart Mask R-CNN (R18-FPN, 4conv1fc
head, from scratch, the norm in backbone, FPN and both heads), box and mask AP on smallbn_shapes_val
(COCO evaluation) and the training curves, per norm and seed. Two regimes:

- ``--gpus 1`` (default): one process at 2 images per iteration with BN, GN, CBN, MABN and BCN+WS,
  and BN at 16 images per iteration (the large-batch reference), for the same iterations, learning
  rate and seeds.
- ``--gpus G`` (G > 1), the papers' regime: G processes (detectron2's ``launch``; gloo on CPU)
  with ``--images-per-gpu n`` images each, total batch G*n. Each process computes its norms'
  statistics on its own n images, exactly as one of G GPUs would, and DDP averages the gradients.
  Settings: BN (per process), syncbn (detectron2's naiveSyncBN: statistics over all G*n images,
  the reference), GN, CBN, MABN, BCN+WS and BRN. The schedule follows ``per_gpu_schedule``: the
  quickstart's learning rate scaled linearly with the total batch, its LR warmup kept in images,
  and each method's own iteration counts taken from its paper's rules, scaled to the schedule by
  the one rule of ``d2_smallbn.norms.scale_phases`` (never below what its running estimates need).
  Each run records each norm's statistics error against the whole batch's
  (``d2_smallbn.engine.statistics_error``).

Each run is ``d2-smallbn-quickstart`` (``python -m d2_smallbn.quickstart``) in a subprocess (its
own output folder under DIR/runs, with its log), ``--jobs`` at a time with ``--threads`` torch
threads per process. A run whose folder already holds the results of the same command, with the
same resolved config (hyper-parameters of norms the run does not use aside), is reused, so an
interrupted or extended study redoes only what changed; an interrupted run is rerun, never reported.

Usage:
    python -m d2_smallbn.bench.study_accuracy [--settings bn,gn,cbn,mabn,bcn_ws,bn_16] [--seeds 0,1]
        [--reference-seeds 0] [--iters N] [--jobs J] [--threads T] [--out DIR] [--report-only]
        [KEY VALUE ...]
    python -m d2_smallbn.bench.study_accuracy --gpus 4 --images-per-gpu 1 --iters 500 --seeds 0,1
        [--settings bn,syncbn,gn,cbn,mabn,bcn_ws,brn] ...

Trailing KEY VALUE pairs are config overrides passed to every run. Writes DIR/study_accuracy.json,
DIR/study_accuracy.md (printed too) and DIR/study_accuracy.png (DIR: output/study_accuracy, or
output/study_per_gpu_GxN in the per-GPU regime).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .cli import add_norm_modules, import_requested_norms
from .common import available_cores, command_line, device_info, int_list, pyplot, write_json
from ..quickstart import training_entries

# setting -> (quickstart norm, images per iteration, extra config overrides)
SETTINGS = {
    "bn": ("bn", 2, ()),
    "gn": ("gn", 2, ()),
    "cbn": ("cbn", 2, ()),
    "mabn": ("mabn", 2, ()),
    "bcn_ws": ("bcn_ws", 2, ()),
    "bn_16": ("bn", 16, ("SOLVER.IMS_PER_BATCH", "16", "MODEL.SMALLBN.PAPER_IMS_PER_GPU", "16")),
}
REFERENCE = "bn_16"
# the per-GPU regime: setting -> quickstart norm (syncbn: detectron2's naiveSyncBN)
PER_GPU_SETTINGS = {name: name for name in ("bn", "syncbn", "gn", "cbn", "mabn", "bcn_ws", "brn")}
# Default schedule: the longest whose 14 runs (7 settings x 2 seeds at 4 x 1 images) fit about 2.5 hours
# on 2 cores: a measured BCN+WS run took 1.30 s per iteration plus 27 s (start, evaluation).
PER_GPU_ITERS = 400
PROCESSES_PER_CORE = 2  # the most study processes per core (one torch thread each)
STATS_ERROR = "stats_error/"  # metrics.json keys of StatisticsErrorHook
METRICS = (("bbox", "AP"), ("bbox", "AP50"), ("segm", "AP"), ("segm", "AP50"))
QUICKSTART = ["-m", "d2_smallbn.quickstart"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=None,
                   help=f"comma-separated subset of {','.join(SETTINGS)} (--gpus 1) or of "
                        f"{','.join(PER_GPU_SETTINGS)} (--gpus > 1), default: all; besides, any norm of the table "
                        "by its name (lower case; e.g. one registered by a --norm-module): the quickstart model with "
                        "it in backbone, FPN and both heads")
    p.add_argument("--gpus", type=int, default=1,
                   help="processes per run, each a GPU of the papers' setting (default 1: the 2-image regime)")
    p.add_argument("--images-per-gpu", type=int, default=1, help="images per process with --gpus > 1 (default 1)")
    p.add_argument("--seeds", type=int_list("--seeds", 0, "0,1"), default=[0, 1], help="SEED of each run (default 0,1)")
    p.add_argument("--reference-seeds", type=int_list("--reference-seeds", 0, "0"), default=None,
                   help=f"seeds of {REFERENCE}, 8x the compute of the others per run (default: --seeds)")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the quickstart config's)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: cores // jobs)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: output/study_accuracy, or output/study_per_gpu_GxN with --gpus G > 1")
    p.add_argument("--data-root", default=None, help="dataset folder (default: see d2_smallbn.data)")
    p.add_argument("--num-train", type=int, default=None, help="generated training images (default: dataset default)")
    p.add_argument("--num-val", type=int, default=None, help="generated validation images")
    p.add_argument("--hue-spread", type=int, default=None, help="generated dataset's hue spread (default: dataset default)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the requested runs that have finished, list the others")
    add_norm_modules(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run, KEY VALUE pairs")
    args = p.parse_args(argv)
    import_requested_norms(p, args)  # and the quickstart runs it starts (D2_SMALLBN_NORM_MODULES)
    if args.gpus < 1 or args.images_per_gpu < 1:
        p.error(f"--gpus and --images-per-gpu must be >= 1, got {args.gpus} and {args.images_per_gpu}")
    valid = PER_GPU_SETTINGS if args.gpus > 1 else SETTINGS
    args.settings = [s.strip() for s in (args.settings or ",".join(valid)).split(",") if s.strip()]
    unknown = sorted(set(args.settings) - set(valid) - set(table_settings()))
    if unknown or not args.settings:
        p.error(f"unknown --settings {unknown or args.settings} for --gpus {args.gpus}; choose from {','.join(valid)} "
                f"or a norm of the table ({','.join(table_settings())}; your own: --norm-module MODULE)")
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        p.error("--jobs and --threads must be >= 1")
    limit = PROCESSES_PER_CORE * available_cores()
    if args.gpus * args.jobs > limit:
        choices = [g for g in range(1, limit + 1) if g * args.jobs <= limit]
        p.error(f"--gpus {args.gpus} x --jobs {args.jobs} = {args.gpus * args.jobs} processes, but this machine runs "
                f"at most {limit} ({PROCESSES_PER_CORE} per core, {available_cores()} cores): with --jobs {args.jobs} "
                f"choose --gpus from {choices[0]}-{choices[-1]}" if choices else
                f"--jobs {args.jobs} alone exceeds the {limit} processes this machine runs")
    if args.out is None:
        args.out = Path("output/study_accuracy" if args.gpus == 1 else
                        f"output/study_per_gpu_{args.gpus}x{args.images_per_gpu}")
    if args.iters is not None and args.iters < 1:
        p.error(f"--iters must be >= 1, got {args.iters}")
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    args.threads = args.threads or max(1, available_cores() // (args.jobs * args.gpus))
    return args


def table_settings():
    """Every norm of the table as a setting: its name in lower case, trained by the quickstart's ``--norm``."""
    from ..norms import NORMS

    return [name.lower() for name in NORMS]


def setting_norm(setting, gpus):
    """(quickstart ``--norm``, images per iteration, extra overrides) of a setting; a norm of the table
    named by itself trains at the regime's batch with no overrides."""
    if gpus > 1:
        return PER_GPU_SETTINGS.get(setting, setting), None, ()
    return SETTINGS.get(setting, (setting, 2, ()))


def per_gpu_schedule(gpus, images_per_gpu, iters):
    """The per-GPU regime's config overrides, and how each was chosen (printed into the report).

    From the quickstart (2 images per iteration, lr 0.01, LR warmup 100 iterations = 200 images,
    lr /10 at 80% of the schedule): the learning rate scales linearly with the total batch
    (Goyal et al.), the LR warmup stays at 200 images, the step at 80%. CBN's window follows its
    paper's k x images per GPU = 16. Each method's own iteration counts are its paper's, scaled to
    ``iters`` by ``d2_smallbn.norms.scale_phases``, which raises any count below what the method's
    running estimates need (3 time constants of an EMA, the buffer of a moving average). The paper's
    counts are each norm's ``NormSpec.paper_phases``: CBN's burn-in of 3 in 12 epochs; MABN's 100
    iterations of batch statistics (backbone, FPN), the heads' 10,000 and 1,000 without clipping, of
    180,000; BRN's ramp in Ioffe's step counts (5,000 / 25,000 / 40,000) taken as fractions of the
    MABN paper's 180,000. The momentum (of the quickstart configs, the defaults) is kept."""
    from ..norms import NORMS, resolve, scale_phases

    total = gpus * images_per_gpu
    defaults = resolve(None)
    rules = {
        "SOLVER.IMS_PER_BATCH": (total, f"{gpus} processes x {images_per_gpu} images"),
        "MODEL.SMALLBN.PAPER_IMS_PER_GPU": (images_per_gpu, "the per-process batch this study reproduces"),
        "SOLVER.MAX_ITER": (iters, "the schedule"),
        "SOLVER.BASE_LR": (0.01 * total / 2, "quickstart's 0.01 at 2 images, scaled linearly with the total batch"),
        "SOLVER.WARMUP_ITERS": (min(round(200 / total), iters - 1), "the quickstart's LR warmup of 200 images"),
        "SOLVER.STEPS": (tuple(s for s in (round(0.8 * iters),) if 0 < s < iters), "lr /10 at 80%, as the quickstart"),
        "MODEL.SMALLBN.CBN.WINDOW_SIZE": (max(1, round(16 / images_per_gpu)), "k x images per GPU = 16 (CBN paper)"),
    }
    for name, paper in ((name, spec.paper_phases) for name, spec in NORMS.items() if spec.paper_phases):
        for key, (value, how) in scale_phases(name, defaults[name], paper.counts, iters / paper.length).items():
            rules[f"MODEL.SMALLBN.{name}.{key}"] = (value, f"{paper.source}: {how}")
    opts = [str(x) for key, (value, _) in rules.items() for x in (key, value)]
    return opts, {key: {"value": value, "rule": why} for key, (value, why) in rules.items()}


def run_commands(args):
    """{(setting, seed): (run folder, command)} in the order they should start: longest first."""
    common = ["--no-untrained", "--num-vis", "3"]
    for flag, value in (("--data-root", args.data_root), ("--num-train", args.num_train), ("--num-val", args.num_val),
                        ("--hue-spread", args.hue_spread)):
        if value is not None:
            common += [flag, str(value)]
    runs = {}
    if args.gpus > 1:  # the schedule is given as config keys (quickstart's --iters would rescale them)
        schedule, _ = per_gpu_schedule(args.gpus, args.images_per_gpu, args.iters or PER_GPU_ITERS)
        common += ["--num-gpus", str(args.gpus)]
        for seed in args.seeds:  # every setting's first seed first: a partial study covers every setting
            for setting in args.settings:
                folder = (args.out / "runs" / f"{setting}_seed{seed}").absolute()
                runs[(setting, seed)] = (folder, [sys.executable, *QUICKSTART, "--norm", setting_norm(setting, args.gpus)[0],
                                                  "--output-dir", str(folder), *common, *schedule, *args.opts,
                                                  "SEED", str(seed)])
        return runs
    if args.iters is not None:
        common += ["--iters", str(args.iters)]
    for setting in sorted(args.settings, key=lambda s: -setting_norm(s, 1)[1]):
        norm, _, overrides = setting_norm(setting, 1)
        seeds = args.reference_seeds if setting == REFERENCE and args.reference_seeds else args.seeds
        for seed in seeds:
            folder = (args.out / "runs" / f"{setting}_seed{seed}").absolute()
            cmd = [sys.executable, *QUICKSTART, "--norm", norm, "--output-dir", str(folder), *common,
                   *args.opts, *overrides, "SEED", str(seed)]
            runs[(setting, seed)] = (folder, cmd)
    return runs


def effective_config(cfg):
    """``cfg`` as plain data without the OUTPUT_DIR and the MODEL.SMALLBN sections of norms it does
    not use: what a finished run's config.yaml must equal for the run to be reused."""
    import yaml

    from ..config import norm_names
    from ..norms import NORMS

    cfg = cfg.clone()
    cfg.defrost()
    used = norm_names(cfg)
    for norm in NORMS:
        if norm not in used:
            cfg.MODEL.SMALLBN.pop(norm)
    cfg.OUTPUT_DIR = ""
    return yaml.safe_load(cfg.dump())  # resolves the YAML anchors that dump() may write


def finished(folder, cmd):
    """Whether ``folder`` holds the results of ``cmd`` run with the current config files."""
    from detectron2.config import CfgNode

    from ..quickstart import build_cfg, parse_args

    try:
        done = json.loads((folder / "study_run.json").read_text())
        if done["command"][1:] != cmd[1:] or not (folder / "results.json").is_file():
            return False
        saved = CfgNode.load_yaml_with_base(str(folder / "config.yaml"))
    except (OSError, ValueError, KeyError):
        return False
    args = parse_args(cmd[1 + len(QUICKSTART):])
    return effective_config(CfgNode(saved)) == effective_config(build_cfg(args, args.data_root))


def execute(runs, jobs, threads):
    """Runs every command not already finished, ``jobs`` at a time; returns {key: error or None}."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending = [k for k, (folder, cmd) in runs.items() if not finished(folder, cmd)]
    for key in runs:
        if key not in pending:
            print(f"reusing {runs[key][0]}", flush=True)
    active, errors = {}, {}
    while pending or active:
        while pending and len(active) < jobs:
            key = pending.pop(0)
            folder, cmd = runs[key]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "study_run.json").unlink(missing_ok=True)
            log = open(folder / "log.txt", "w")
            print(f"start {key[0]} seed {key[1]} -> {folder}/log.txt", flush=True)
            active[key] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd()),
                           log, time.time())
        time.sleep(1)
        for key, (proc, log, started) in list(active.items()):
            if proc.poll() is None:
                continue
            log.close()
            del active[key]
            folder, cmd = runs[key]
            if proc.returncode == 0:
                write_json(folder / "study_run.json", {"command": cmd, "seconds": round(time.time() - started, 1),
                                                       "threads": threads, "jobs": jobs})
                errors[key] = None
            else:
                errors[key] = f"exit code {proc.returncode}; see {folder / 'log.txt'}"
            print(f"done {key[0]} seed {key[1]}: {errors[key] or 'ok'} ({time.time() - started:.0f} s)", flush=True)
    return errors


def collect(runs):
    """Per setting: per-seed APs, their mean and range, seconds per iteration, and the loss curves."""
    report = {}
    for (setting, seed), (folder, _) in runs.items():
        results = json.loads((folder / "results.json").read_text())
        done = json.loads((folder / "study_run.json").read_text())
        entries = training_entries(folder / "metrics.json")
        times = [e["time"] for e in entries if "time" in e]
        entry = report.setdefault(setting, {"images_per_iteration": results["images_per_iteration"],
                                            "processes": results.get("processes", 1),
                                            "iterations": results["iterations"], "seeds": {}})
        entry["seeds"][seed] = {"ap": results["results"]["trained"], "curve": {"iteration": [e["iteration"] for e in entries],
                                          "total_loss": [e["total_loss"] for e in entries]},
                                "seconds_per_iteration": statistics.median(times) if times else None,
                                # how the run was executed: its torch threads, and how many runs shared the machine
                                "threads": done.get("threads"), "jobs": done.get("jobs"),
                                "statistics_error": statistics_error(folder / "metrics.json")}
    for entry in report.values():
        for task, key in METRICS:
            values = [s["ap"][task][key] for s in entry["seeds"].values()]  # None: the run predicted nothing
            known = [v for v in values if v is not None]
            entry[f"{task}_{key}"] = {"mean": statistics.fmean(known) if known else None,
                                      "min": min(known, default=None), "max": max(known, default=None),
                                      "values": values}
    return report


def statistics_error(metrics_json):
    """The run's statistics error (``StatisticsErrorHook``): per key of metrics.json (overall and per
    layer, mean and variance) its mean over the run's records, and the number of records; None
    where nothing was recorded (one process, or no batch-statistics norm)."""
    try:
        entries = training_entries(metrics_json, key=STATS_ERROR + "mean")
    except ValueError:
        return None
    keys = sorted({k for e in entries for k in e if k.startswith(STATS_ERROR)})
    return {"records": len(entries), **{k[len(STATS_ERROR):]: statistics.fmean(e[k] for e in entries if k in e)
                                        for k in keys},
            "curve": {"iteration": [e["iteration"] for e in entries],
                      **{key: [e.get(STATS_ERROR + key) for e in entries] for key in ("mean", "var", "sqmean")}}}


def spread(m):
    if m["mean"] is None:
        return "-"
    text = f"{m['mean']:.1f}" if len(m["values"]) == 1 else f"{m['mean']:.1f} ({m['min']:.1f}-{m['max']:.1f})"
    return text + "*" * (None in m["values"])  # *: a seed predicted nothing (not in the mean)


def table(report):
    per_gpu = any(e["processes"] > 1 for e in report.values())
    lines = ["| setting | images / iter | seeds | box AP | box AP50 | mask AP | mask AP50 | s / iter |"
             + (" processes | statistics error: mean | var | second moment |" if per_gpu else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if per_gpu else "")]
    for setting, e in report.items():
        times = [s["seconds_per_iteration"] for s in e["seeds"].values() if s["seconds_per_iteration"]]
        cells = " | ".join(spread(e[f"{task}_{key}"]) for task, key in METRICS)
        speed = f"{statistics.median(times):.2f}" if times else "-"
        line = f"| {setting} | {e['images_per_iteration']} | {len(e['seeds'])} | {cells} | {speed} |"
        if per_gpu:
            errors = [s["statistics_error"] for s in e["seeds"].values() if s["statistics_error"]]
            cells = [f"{statistics.fmean(r[key] for r in errors if key in r):.3f}"
                     if any(key in r for r in errors) else "-" for key in ("mean", "var", "sqmean")]
            line += f" {e['processes']} | " + " | ".join(cells) + " |"
        lines.append(line)
    return "\n".join(lines)


def smooth(values, width=3):
    out, acc = [], []
    for v in values:
        acc = (acc + [v])[-width:]
        out.append(statistics.fmean(acc))
    return out


def plot(report, path):
    plt = pyplot()
    measured = [n for n in report if any((s.get("statistics_error") or {}).get("curve") for s in report[n]["seeds"].values())]
    fig, axes = plt.subplots(1, 3 if measured else 2, figsize=(19.5 if measured else 13, 4.5))
    ax_ap, ax_loss = axes[:2]
    names = list(report)
    for i, name in enumerate(names):
        for j, (task, colour) in enumerate((("bbox", "tab:blue"), ("segm", "tab:orange"))):
            m = report[name][f"{task}_AP"]
            x = i + (j - 0.5) * 0.35
            known = [v for v in m["values"] if v is not None]
            ax_ap.bar(x, m["mean"] or 0.0, width=0.35, color=colour, alpha=0.6,
                      label=("box AP" if task == "bbox" else "mask AP") if i == 0 else None)
            ax_ap.scatter([x] * len(known), known, color="k", s=10, zorder=3)
    ax_ap.set_xticks(range(len(names)), [f"{n}\n({report[n]['images_per_iteration']} img/it)" for n in names])
    ax_ap.set(ylabel="AP on smallbn_shapes_val", title="COCO AP (bars: mean over seeds; dots: seeds)")
    ax_ap.legend()
    for i, name in enumerate(names):
        for k, s in enumerate(report[name]["seeds"].values()):
            ax_loss.plot(s["curve"]["iteration"], smooth(s["curve"]["total_loss"]), lw=1,
                         label=name if k == 0 else None, color=f"C{i % 10}")
    ax_loss.set(xlabel="iteration", ylabel="total loss (running mean of 3 logged values)", yscale="log", title="training loss")
    ax_loss.legend(fontsize=8)
    if measured:
        ax_err = axes[2]
        for name in measured:
            seed, run = next((k, s) for k, s in report[name]["seeds"].items() if (s.get("statistics_error") or {}).get("curve"))
            curve = run["statistics_error"]["curve"]
            colour = f"C{names.index(name) % 10}"  # as in the loss panel
            ax_err.plot(curve["iteration"], curve["var"], lw=1.2, color=colour, label=f"{name} (seed {seed})")
            ax_err.plot(curve["iteration"], curve["mean"], lw=1, ls="--", color=colour)
        ax_err.set(xlabel="iteration", ylabel="relative error vs the whole batch (mean over layers)", yscale="log",
                   title="statistics error (solid: variance, dashed: mean)")
        ax_err.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    import torch

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = run_commands(args)
    print(f"{len(runs)} runs, {args.jobs} at a time with {args.threads} threads each", flush=True)
    started = time.time()
    missing = []
    if args.report_only:
        missing = [key for key, (folder, cmd) in runs.items() if not finished(folder, cmd)]
        runs = {key: run for key, run in runs.items() if key not in missing}
        if not runs:
            print("no finished runs to report", file=sys.stderr)
            return 1
    else:
        errors = execute(runs, args.jobs, args.threads)
        failed = {k: e for k, e in errors.items() if e}
        if failed:
            for (setting, seed), error in failed.items():
                print(f"FAILED {setting} seed {seed}: {error}", file=sys.stderr)
            return 1
    report = collect(runs)
    markdown = table(report)
    if missing:
        markdown += "\n\nNot finished (not in the table): " + ", ".join(f"{k[0]} seed {k[1]}" for k in missing)
    write_json(args.out / "study_accuracy.json", {
        "command": command_line(), "report_only": args.report_only,
        # this invocation's; each run's own are in its seed entry
        "jobs": None if args.report_only else args.jobs,
        "threads_per_job": None if args.report_only else args.threads,
        "device": device_info(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "wall_seconds": round(time.time() - started, 1),
        "config_overrides": args.opts, "settings": report, "not_finished": [list(k) for k in missing],
        "regime": {"processes": args.gpus, "images_per_process": args.images_per_gpu if args.gpus > 1 else None,
                   "schedule": per_gpu_schedule(args.gpus, args.images_per_gpu, args.iters or PER_GPU_ITERS)[1]
                   if args.gpus > 1 else None}})
    (args.out / "study_accuracy.md").write_text(markdown + "\n")
    plot(report, args.out / "study_accuracy.png")
    print(markdown)
    print(f"\nWrote {args.out / 'study_accuracy.json'}, {args.out / 'study_accuracy.md'}, {args.out / 'study_accuracy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
