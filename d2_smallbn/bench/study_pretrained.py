"""The pretrained regime at 4 processes x 1 image (docs/study.md section "pretrained"): the papers'
main COCO setting at CPU scale. A backbone pretrained at a large batch by ``d2_smallbn.bench.pretrain``
enters through ``d2-smallbn-convert-weights``, exactly as a user's ImageNet checkpoint would, and the
quickstart's Mask R-CNN R18-FPN is fine-tuned on the built-in dataset with G processes x n images
(detectron2's ``launch``, gloo on CPU), each process normalizing with its own images' statistics.

Tables (``--tables``), one per paper table, each row a ``configs/pretrained`` config with the norms
(and, for the ablations, the CBN keys) set on the command line:

    cbn_4a     CBN Table 4 (a): FrozenBN backbone, the norm in FPN and heads: none, bn, syncbn, gn,
               cbn; CBN's ablations: the window k (cbn_k1 .. cbn_k8; cbn is k 16), the naive window
               (RHO 0), and the burn-in (25% of the schedule, and ending at the LR drop)
    bcn_9      BCN Tables 9-10: gn, gn_ws, bcn_ws, each from its own pretrained backbone
    mabn_6     MABN Table 6, weight-centralized backbone: syncbn, mabn
    cbn_4b     CBN Table 4 (b), FREEZE_AT 2 and the norm everywhere else: bn, syncbn, gn, cbn

The schedule is the from-scratch study's (``study_accuracy.per_gpu_schedule``: the quickstart's
learning rate scaled with the total batch, LR step at 80%, each method's own counts scaled by the
one rule of ``d2_smallbn.norms.scale_phases``), so that the two regimes differ only in the start.
Every run records each norm's statistics error against the whole batch's.

Runs are executed, reused and reported by the machinery of ``study_accuracy`` (one subprocess per
run, a finished run with the same command and config is reused). The pretrained weights must be
done (``pretrain.json`` status "done"); each is converted once into ``<pretrain>/<variant>/R18-<target>.pkl``
(the configs' default MODEL.WEIGHTS paths) and reused while it is newer than its source.

Usage:
    python -m d2_smallbn.bench.study_pretrained [--tables cbn_4a,...] [--settings none,bn,...]
        [--seeds 0,1] [--iters 400] [--gpus 4] [--pretrain-dir output/pretrain] [--out DIR]
        [--report-only] [KEY VALUE ...]

Writes DIR/<table>/study_accuracy.{json,md,png} (DIR: output/study_pretrained_GxN).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, NamedTuple, Tuple

from .common import command_line, device_info, int_list, write_json
from .study_accuracy import (PER_GPU_ITERS, QUICKSTART, collect, execute, finished, per_gpu_schedule, plot,
                             table)
from ..paper_results import paper_result
from ..paths import OutputPathError, check_output_paths


class Weights(NamedTuple):
    variant: str  # d2_smallbn.bench.pretrain's
    target: str  # d2-smallbn-convert-weights --target-norm
    conv: str  # d2-smallbn-convert-weights --conv


class Row(NamedTuple):
    config: str  # under configs/pretrained/
    overrides: Tuple[Tuple[str, object], ...]
    weights: Weights
    paper: str  # the config under configs/ whose reported row this one stands for ("": none)


class Table(NamedTuple):
    title: str
    rows: Dict[str, Row]


def heads(norm):
    return (("MODEL.FPN.NORM", norm), ("MODEL.ROI_BOX_HEAD.NORM", norm), ("MODEL.ROI_MASK_HEAD.NORM", norm))


def everywhere(norm):
    return (("MODEL.RESNETS.NORM", norm),) + heads(norm)


def cbn_table_4a(iters):
    config, weights = "mask_rcnn_R18_FPN_frozenbn_cbn.yaml", Weights("bn", "frozenbn", "plain")
    paper = "cbn/faster_rcnn_R50_FPN_frozenbn_{}_1x.yaml"
    rows = {name: Row(config, heads(norm), weights, paper.format(name))
            for name, norm in (("none", ""), ("bn", "BN"), ("syncbn", "naiveSyncBN"), ("gn", "GN"))}
    rows["cbn"] = Row(config, (), weights, paper.format("cbn"))
    for k in (1, 2, 4, 8):  # k = 1: per-process BN through CBN's own layer
        rows[f"cbn_k{k}"] = Row(config, (("MODEL.SMALLBN.CBN.WINDOW_SIZE", k),), weights, "")
    rows["cbn_naive"] = Row(config, (("MODEL.SMALLBN.CBN.RHO", 0.0),), weights, "")
    step = round(0.8 * iters)  # per_gpu_schedule's LR step
    rows["cbn_burnin_25"] = Row(config, (("MODEL.SMALLBN.CBN.BURNIN_ITERS", round(0.25 * iters)),), weights, "")
    rows["cbn_burnin_lr_drop"] = Row(config, (("MODEL.SMALLBN.CBN.BURNIN_ITERS", step),), weights, "")
    return Table("CBN Table 4 (a): FrozenBN backbone (BN-pretrained), the norm in the FPN and both heads", rows)


def bcn_table_9(iters):
    paper = "bcn/mask_rcnn_R50_FPN_{}_2x.yaml"
    gn = "Base-Pretrained.yaml"  # the norms are set here
    return Table("BCN Tables 9-10: the norm in backbone (past res2), FPN and both heads, each from its own backbone", {
        "gn": Row(gn, everywhere("GN") + (("MODEL.SMALLBN.CONV", "plain"),), Weights("gn", "gn", "plain"),
                  paper.format("gn_gn")),
        "gn_ws": Row(gn, everywhere("GN") + (("MODEL.SMALLBN.CONV", "ws"),), Weights("gnws", "gn", "ws"),
                     paper.format("gnws_gnws")),
        "bcn_ws": Row("mask_rcnn_R18_FPN_bcnws_bcnws.yaml", (), Weights("bcnws", "bcn", "ws"),
                      paper.format("bcnws_bcnws")),
    })


def mabn_table_6(iters):
    paper = "mabn/mask_rcnn_R50_FPN_{}_finetune_2x.yaml"
    config = "mask_rcnn_R18_FPN_mabn_mabn.yaml"
    return Table("MABN Table 6: the norm in backbone (past res2), FPN and both heads, weight-centralized backbone", {
        "syncbn": Row(config, everywhere("naiveSyncBN") + (("MODEL.SMALLBN.CONV", "centered"),),
                      Weights("centered_bn", "syncbn", "centered"), paper.format("syncbn_syncbn")),
        "mabn": Row(config, (), Weights("centered_bn", "mabn", "centered"), paper.format("mabn_mabn")),
    })


def cbn_table_4b(iters):
    config, paper = "mask_rcnn_R18_FPN_cbn_cbn.yaml", "cbn/faster_rcnn_R50_FPN_{}_1x.yaml"
    return Table("CBN Table 4 (b): FREEZE_AT 2, the norm in the rest of the backbone, the FPN and both heads", {
        "bn": Row(config, everywhere("BN"), Weights("bn", "bn", "plain"), paper.format("bn_bn")),
        "syncbn": Row(config, everywhere("naiveSyncBN"), Weights("bn", "syncbn", "plain"), paper.format("syncbn_syncbn")),
        "gn": Row(config, everywhere("GN"), Weights("gn", "gn", "plain"), paper.format("gn_gn")),
        "cbn": Row(config, (), Weights("bn", "cbn", "plain"), paper.format("cbn_cbn")),
    })


TABLES = {"cbn_4a": cbn_table_4a, "bcn_9": bcn_table_9, "mabn_6": mabn_table_6, "cbn_4b": cbn_table_4b}
DEFAULT_SETTINGS = {"cbn_4a": ("none", "bn", "syncbn", "gn", "cbn")}  # the ablations are asked for by name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", default="cbn_4a", help=f"comma-separated, from {','.join(TABLES)} (default cbn_4a)")
    p.add_argument("--settings", default=None,
                   help="rows of the tables to run (default: each table's main rows; cbn_4a's ablations by name)")
    p.add_argument("--seeds", type=int_list("--seeds", 0, "0,1"), default=[0, 1], help="SEED of each run (default 0,1)")
    p.add_argument("--iters", type=int, default=PER_GPU_ITERS, help=f"training iterations (default {PER_GPU_ITERS})")
    p.add_argument("--gpus", type=int, default=4, help="processes (default 4)")
    p.add_argument("--images-per-gpu", type=int, default=1, help="images per process (default 1)")
    p.add_argument("--pretrain-dir", type=Path, default=Path("output/pretrain"),
                   help="d2_smallbn.bench.pretrain's --out (default output/pretrain)")
    p.add_argument("--out", type=Path, default=None, help="default: output/study_pretrained_<gpus>x<images-per-gpu>")
    p.add_argument("--data-root", default=None, help="detection dataset folder (default: see d2_smallbn.data)")
    p.add_argument("--num-train", type=int, default=None, help="generated training images (default: dataset default)")
    p.add_argument("--num-val", type=int, default=None, help="generated validation images")
    p.add_argument("--report-only", action="store_true", help="report the finished runs, run nothing")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for every run, KEY VALUE pairs")
    args = p.parse_args(argv)
    names = [t.strip() for t in args.tables.split(",") if t.strip()]
    if not names or set(names) - set(TABLES):
        p.error(f"unknown --tables {sorted(set(names) - set(TABLES)) or names}; choose from {','.join(TABLES)}")
    if args.gpus < 2 or args.images_per_gpu < 1 or args.iters < 1:
        p.error("--gpus must be >= 2 (the regime is per process), --images-per-gpu and --iters >= 1")
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs, got {args.opts}")
    args.tables = {name: TABLES[name](args.iters) for name in names}
    every = {row for t in args.tables.values() for row in t.rows}
    wanted = [s.strip() for s in args.settings.split(",") if s.strip()] if args.settings else None
    if wanted is not None and (not wanted or set(wanted) - every):
        p.error(f"unknown --settings {sorted(set(wanted) - every) or wanted}; the tables have {','.join(sorted(every))}")
    rows = {name: [r for r in t.rows if (r in wanted if wanted else r in DEFAULT_SETTINGS.get(name, t.rows))]
            for name, t in args.tables.items()}
    args.rows = {name: names for name, names in rows.items() if names}  # a table none of --settings is in: not run
    args.tables = {name: args.tables[name] for name in args.rows}
    args.out = args.out or Path(f"output/study_pretrained_{args.gpus}x{args.images_per_gpu}")
    try:
        check_output_paths([("--out", str(args.out))], [("--pretrain-dir", str(args.pretrain_dir)),
                                                         ("--data-root", args.data_root)])
    except OutputPathError as e:
        p.error(str(e))
    return args


def pretrained(pretrain_dir, variant):
    """The variant's final torchvision checkpoint; SystemExit naming the command if it is not done."""
    report = pretrain_dir / variant / "pretrain.json"
    try:
        done = json.loads(report.read_text()).get("status") == "done"
    except (OSError, ValueError):
        done = False
    if not done:
        raise SystemExit(f"the {variant!r} backbone is not pretrained ({report} does not say done): run "
                         f"python -m d2_smallbn.bench.pretrain --variants {variant} --out {pretrain_dir}")
    return pretrain_dir / variant / "model_final_torchvision.pth"


def converted(pretrain_dir, weights):
    """``weights`` as a .pkl made by d2-smallbn-convert-weights (as a user would), converted once per checkpoint."""
    source = pretrained(pretrain_dir, weights.variant)
    target = source.parent / f"R18-{weights.target}.pkl"
    if target.is_file() and target.stat().st_mtime >= source.stat().st_mtime:
        return target.absolute()
    if target.exists():  # never removed: it is the user's, and finished runs were trained from it
        raise SystemExit(f"{target} is older than the checkpoint it converts, {source} (the backbone was pretrained "
                         "again after it was converted), so runs from it would not be runs from this backbone. Fix: "
                         f"move {target} away (and the study's finished runs that used it), or pass another --pretrain-dir")
    cmd = [sys.executable, "-m", "d2_smallbn.weights", str(source), str(target), "--target-norm", weights.target,
           "--conv", weights.conv, "--strict"]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return target.absolute()


def run_commands(args, name):
    """{(row, seed): (run folder, command)} of one table, every row's first seed first."""
    schedule, _ = per_gpu_schedule(args.gpus, args.images_per_gpu, args.iters)
    table_ = args.tables[name]
    common = ["--no-untrained", "--num-vis", "3", "--num-gpus", str(args.gpus)]
    for flag, value in (("--data-root", args.data_root), ("--num-train", args.num_train), ("--num-val", args.num_val)):
        if value is not None:
            common += [flag, str(value)]
    runs = {}
    for seed in args.seeds:
        for row_name in args.rows[name]:
            row = table_.rows[row_name]
            weights = [] if args.report_only else ["MODEL.WEIGHTS", str(converted(args.pretrain_dir, row.weights))]
            folder = (args.out / name / "runs" / f"{row_name}_seed{seed}").absolute()
            overrides = [str(x) for pair in row.overrides for x in pair]
            runs[(row_name, seed)] = (folder, [sys.executable, *QUICKSTART, "--config-file", f"pretrained/{row.config}",
                                               "--output-dir", str(folder), *common, *schedule, *overrides,
                                               *args.opts, *weights, "SEED", str(seed)])
    return runs


def report_only_runs(runs):
    """The finished runs of a report-only call: their saved commands (which hold the weights' paths)."""
    done, missing = {}, []
    for key, (folder, _) in runs.items():
        try:
            cmd = json.loads((folder / "study_run.json").read_text())["command"]
        except (OSError, ValueError, KeyError):
            cmd = None
        if cmd and finished(folder, cmd):
            done[key] = (folder, cmd)
        else:
            missing.append(key)
    return done, missing


def paper_rows(table_):
    lines = ["| row | paper row | paper box AP | paper mask AP |", "|---|---|---|---|"]
    for name, row in table_.rows.items():
        reported = paper_result(row.paper) if row.paper else None
        if reported:
            segm = reported.get("segm", {}).get("AP")
            lines.append(f"| {name} | {reported['paper']} Table {reported['table']}: {reported['row']} | "
                         f"{reported['bbox'].get('AP', '-')} | {segm if segm is not None else '-'} |")
    return "\n".join(lines)


def run_table(args, name):
    import torch

    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    runs = run_commands(args, name)
    started, missing = time.time(), []
    if args.report_only:
        runs, missing = report_only_runs(runs)
        if not runs:
            print(f"{name}: no finished runs to report", file=sys.stderr)
            return 1
    else:
        errors = execute(runs, 1, 1)
        failed = {k: e for k, e in errors.items() if e}
        for (row, seed), error in failed.items():
            print(f"FAILED {name} {row} seed {seed}: {error}", file=sys.stderr)
        if failed:
            return 1
    report = collect(runs)
    markdown = f"{args.tables[name].title}\n\n{table(report)}\n\nThe papers' rows (theirs):\n\n{paper_rows(args.tables[name])}"
    if missing:
        markdown += "\n\nNot finished (not in the table): " + ", ".join(f"{k[0]} seed {k[1]}" for k in missing)
    write_json(out / "study_accuracy.json", {
        "command": command_line(), "table": name, "title": args.tables[name].title, "report_only": args.report_only,
        "device": device_info(torch.device("cpu")), "wall_seconds": round(time.time() - started, 1),
        "config_overrides": args.opts, "settings": report, "not_finished": [list(k) for k in missing],
        "rows": {r: {"config": f"pretrained/{row.config}", "overrides": dict(row.overrides),
                     "weights": row.weights._asdict(), "paper": paper_result(row.paper) if row.paper else None}
                 for r, row in args.tables[name].rows.items()},
        "regime": {"processes": args.gpus, "images_per_process": args.images_per_gpu,
                   "schedule": per_gpu_schedule(args.gpus, args.images_per_gpu, args.iters)[1]}})
    (out / "study_accuracy.md").write_text(markdown + "\n")
    plot(report, out / "study_accuracy.png")
    print(markdown)
    print(f"\nWrote {out / 'study_accuracy.json'}, {out / 'study_accuracy.md'}, {out / 'study_accuracy.png'}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    status = 0
    for name in args.tables:
        status = run_table(args, name) or status
    return status


if __name__ == "__main__":
    sys.exit(main())
