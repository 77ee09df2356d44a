"""The GPU check's stages and report; ``tools/gpu_check.sh`` installs the environment and runs this.

    python -m d2_smallbn.gpu_check --device cuda|cpu --out DIR --work DIR [--budget 480]

Stages, in order of priority, each a subprocess with its own time limit, all within ``--budget``
seconds counted from ``--started`` (a stage that no longer fits is reported as skipped):

    tests         the layer property tests and the trainer resume test on the device (AMP on CUDA)
    layers        tools/benchmark_layers.py on the device (CUDA: the papers' stride-4..16 FPN maps)
    model_b2      tools/benchmark.py, Mask R-CNN R50-FPN at 800x1216, 2 images per step, every setting
    train         each quickstart norm trains for 200 iterations with AMP (in parallel: accuracy, not speed)
    model_b4      tools/benchmark.py at 4 images per step, BN / GN / CBN everywhere (CBN paper, Table 6)

On CPU the same stages run at tiny sizes (the rehearsal), torch on one thread per process (OMP_NUM_THREADS=1
unless set; the model benchmark with --threads 1), the quickstart trainings in parallel as on CUDA. Writes
DIR/gpu_check.json, DIR/gpu_check.md and DIR/gpu_check_logs.tar.gz (every stage's log and outputs, no
checkpoints).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

QUICKSTART_NORMS = ("cbn", "mabn", "bcn_ws", "gn", "bn")  # the quickstart configs the train stage trains
REPORT_RESERVE_S = 15  # kept back from the budget for writing the report


def stages(device, work):
    """{name: (time limit in seconds, [commands], parallel)} for the device, in order of priority."""
    py = sys.executable
    cuda = device == "cuda"
    if cuda:
        tests = [[py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={work}/tests_{i}.xml",
                  path, "-k", "cuda"] for i, path in enumerate(("tests/layers", "tests/modeling/test_train.py"))]
        layers = ["--shapes", "200x304,100x152,50x76", "--channels", "256", "--iters", "30", "--warmup", "5"]
        model_b2 = ["--iters", "6", "--warmup", "1"]
        model_b4 = ["--batch", "4", "--settings", "bn,gn,cbn", "--iters", "5", "--warmup", "1"]
        train = ["--iters", "200", "MODEL.DEVICE", "cuda", "SOLVER.AMP.ENABLED", "True"]
    else:
        tests = [[py, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={work}/tests_{i}.xml",
                  path, "-k", select] for i, (path, select) in
                 enumerate((("tests/layers/test_amp.py", "cpu"), ("tests/modeling/test_train.py", "cpu and MABN")))]
        layers = ["--shapes", "24x36", "--channels", "32", "--groups", "8", "--iters", "2", "--warmup", "1"]
        model_b2 = ["--tiny", "--settings", "frozen_cbn,mabn,bcn_ws", "--iters", "1", "--warmup", "0", "--threads", "1"]
        model_b4 = ["--tiny", "--batch", "4", "--settings", "cbn", "--iters", "1", "--warmup", "0", "--threads", "1"]
        train = ["--iters", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST",
                 "96", "INPUT.MAX_SIZE_TEST", "128"]
    bench = [py, "tools/benchmark.py", "--device", device]
    data = f"{work}/data"
    data_size = [] if cuda else ["--num-train", "4", "--num-val", "2"]
    return {
        "tests": (150 if cuda else 300, tests, False),
        "layers": (90 if cuda else 120, [[py, "tools/benchmark_layers.py", "--device", device, "--batch", "2",
                                          "--out", f"{work}/layers"] + layers], False),
        "model_b2": (180 if cuda else 300, [bench + ["--out", f"{work}/model_b2"] + model_b2], False),
        "train": (150 if cuda else 600,
                  [[py, "tools/make_dataset.py", "--root", data] + data_size] +
                  [[py, "tools/quickstart.py", "--norm", norm, "--output-dir", f"{work}/train_{norm}", "--data-root",
                    data, "--no-untrained", "--num-vis", "2"] + data_size + train for norm in QUICKSTART_NORMS], True),
        "model_b4": (120 if cuda else 300, [bench + ["--out", f"{work}/model_b4"] + model_b4], False),
    }


def run_stage(name, limit, commands, parallel, work, log=print, env=None):
    """Runs the commands (all but the first at once with ``parallel``; in ``env``, default this process's
    environment); returns the stage's record."""
    start = time.time()
    record = {"limit_s": round(limit), "commands": [" ".join(c) for c in commands], "returncodes": []}
    logs = [open(Path(work) / f"{name}_{i}.log", "w") for i in range(len(commands))]
    try:
        groups = [commands[:1], commands[1:]] if parallel else [[c] for c in commands]
        offset = 0
        for group in groups:
            procs = [subprocess.Popen(c, stdout=logs[offset + i], stderr=subprocess.STDOUT, env=env)
                     for i, c in enumerate(group)]
            for proc in procs:
                try:
                    proc.wait(timeout=max(1.0, limit - (time.time() - start)))
                except subprocess.TimeoutExpired:
                    for p in procs:
                        p.kill()
                    record["status"] = "timeout"
                record["returncodes"].append(proc.wait())
            offset += len(group)
            if record.get("status") == "timeout":
                break
    finally:
        for f in logs:
            f.close()
    record.setdefault("status", "ok" if all(rc == 0 for rc in record["returncodes"]) else "failed")
    record["seconds"] = round(time.time() - start, 1)
    log(f"gpu_check: {name}: {record['status']} in {record['seconds']} s")
    return record


def junit_summary(work):
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for path in sorted(Path(work).glob("tests_*.xml")):
        root = ET.parse(path).getroot()
        for suite in root.iter("testsuite"):
            for key in totals:
                totals[key] += int(suite.get(key, 0))
        for case in root.iter("testcase"):
            problem = case.find("failure")
            if problem is None:
                problem = case.find("error")
            if problem is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}: {(problem.get('message') or '')[:300]}")
    totals["passed"] = totals["tests"] - totals["failures"] - totals["errors"] - totals["skipped"]
    return {**totals, "failed": failed}


def load_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def training_summary(work):
    rows = {}
    for norm in QUICKSTART_NORMS:
        folder = Path(work) / f"train_{norm}"
        result = load_json(folder / "results.json")
        entries = []
        if (folder / "metrics.json").exists():
            for line in (folder / "metrics.json").read_text().splitlines():
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    pass
        losses = [e for e in entries if "total_loss" in e]
        times = sorted(e["time"] for e in losses if "time" in e)
        rows[norm] = {
            "finished": result is not None,
            "iterations": losses[-1]["iteration"] + 1 if losses else 0,
            "first_total_loss": losses[0]["total_loss"] if losses else None,
            "last_total_loss": losses[-1]["total_loss"] if losses else None,
            "median_iteration_s": times[len(times) // 2] if times else None,
            "ap": result["results"]["trained"] if result else None,
        }
    return rows


def installation(device, install_seconds):
    """What the check runs on: the versions of Python, torch (and its CUDA build), numpy and detectron2 (where,
    and whether its ``_C`` is there), the device (its name as the benchmarks report it) and the install's time."""
    import numpy
    import torch

    from .bench.common import device_info

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_build": torch.version.cuda,
            "numpy": numpy.__version__, "install_seconds": install_seconds, "device": device}
    try:
        import detectron2
        info["detectron2"] = f"{detectron2.__version__} at {os.path.dirname(detectron2.__file__)}"
        info["detectron2_C"] = any(Path(detectron2.__file__).parent.glob("_C*"))
    except ImportError as e:
        info["detectron2"] = f"not importable: {e}"
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=device_info(torch.device("cuda", 0))["name"],
                    gpu_memory_gib=round(props.total_memory / 2 ** 30, 1), cudnn=torch.backends.cudnn.version(),
                    gpu_count=torch.cuda.device_count())
    else:
        info["cpu"] = device_info(torch.device("cpu"))["name"]
    return info


def markdown(report, work):
    lines = [f"# GPU check ({report['environment']['device']})", "",
             f"Started {report['started']}, {report['total_seconds']:.0f} s in all (budget {report['budget_s']} s).", "",
             "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["environment"].items()]
    lines += ["", "| stage | status | seconds | limit |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['status']} | {r.get('seconds', '')} | {r.get('limit_s', '')} |"
              for name, r in report["stages"].items()]
    t = report.get("tests")
    if t:
        lines += ["", f"## Tests\n\n{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, "
                      f"{t['skipped']} skipped."]
        lines += [f"- FAILED {f}" for f in t["failed"]]
    for name, title in (("layers", "Layer benchmark"), ("model_b2", "Model benchmark, 2 images per step"),
                        ("model_b4", "Model benchmark, 4 images per step (CBN paper, Table 6)")):
        md = Path(work) / name / ("benchmark_layers.md" if name == "layers" else "benchmark.md")
        if md.exists():
            lines += ["", f"## {title}", "", md.read_text().strip()]
    rows = report.get("training")
    if rows:
        lines += ["", "## Quickstart training (AMP on CUDA; runs in parallel, so times are not a benchmark)", "",
                  "| norm | finished | iterations | first loss | last loss | s/iter | box AP | mask AP |",
                  "|---|---|---|---|---|---|---|---|"]
        for norm, r in rows.items():
            ap = r["ap"] or {}
            box, mask = ap.get("bbox", {}).get("AP"), ap.get("segm", {}).get("AP")
            lines.append(f"| {norm} | {r['finished']} | {r['iterations']} | {_num(r['first_total_loss'])} | "
                         f"{_num(r['last_total_loss'])} | {_num(r['median_iteration_s'])} | {_num(box)} | {_num(mask)} |")
    return "\n".join(lines) + "\n"


def _num(value):
    return "" if value is None else f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"


def pack_logs(work, path):
    with tarfile.open(path, "w:gz") as tar:
        for item in sorted(Path(work).rglob("*")):
            rel = item.relative_to(work)
            if item.is_file() and rel.parts[0] not in ("venv", "data") and item.suffix not in (".pth", ".pkl"):
                tar.add(item, arcname=str(rel))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for everything, from --started")
    p.add_argument("--started", type=float, default=None, help="start time (epoch seconds; default now)")
    p.add_argument("--install-seconds", type=float, default=None)
    args = p.parse_args(argv)
    started = args.started or time.time()
    deadline = started + args.budget - REPORT_RESERVE_S
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)), "budget_s": args.budget,
              "environment": installation(args.device, args.install_seconds), "stages": {}}
    # the rehearsal's processes share a few cores (and maybe a machine running other tests): one thread each
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if args.device == "cpu" else None
    for name, (limit, commands, parallel) in stages(args.device, str(args.work)).items():
        left = deadline - time.time()
        if left < 20:
            report["stages"][name] = {"status": "skipped (budget)", "limit_s": limit}
            continue
        report["stages"][name] = run_stage(name, min(limit, left), commands, parallel, args.work, env=env)
    report["tests"] = junit_summary(args.work)
    for name, file in (("layers", "benchmark_layers.json"), ("model_b2", "benchmark.json"),
                       ("model_b4", "benchmark.json")):
        data = load_json(args.work / name / file)
        if data:
            report[name] = {k: data[k] for k in ("device", "config", "targets", "results", "fold_check") if k in data}
    report["training"] = training_summary(args.work)
    report["total_seconds"] = round(time.time() - started, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (args.out / "gpu_check.md").write_text(markdown(report, args.work))
    pack_logs(args.work, args.out / "gpu_check_logs.tar.gz")
    print(f"gpu_check: report in {args.out} (gpu_check.md, gpu_check.json, gpu_check_logs.tar.gz)")
    failed = [n for n, r in report["stages"].items() if r["status"] != "ok"]
    if failed or report["tests"]["failures"] or report["tests"]["errors"]:
        print(f"gpu_check: not all stages passed: {', '.join(failed) or 'test failures'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
