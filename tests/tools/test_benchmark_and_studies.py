"""Smoke tests of the model benchmark and the studies (d2_smallbn.bench; tools/ calls the same) at
tiny sizes: each runs as a script and writes every output it promises, with well-formed numbers.
Timings and study outcomes are never asserted (one thread each, so a busy machine cannot stall
their parallel regions)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULES = {"benchmark": "d2_smallbn.bench.model", "study_accuracy": "d2_smallbn.bench.study_accuracy",
           "study_cbn_fidelity": "d2_smallbn.bench.study_cbn_fidelity",
           "study_mabn_premise": "d2_smallbn.bench.study_mabn_premise"}


def command(tool):
    """The command line of a measurement tool (python -m, as an installed package runs it)."""
    return [sys.executable, "-m", MODULES[tool]]

ALL_SETTINGS = ("frozen_none", "frozen_bn", "frozen_gn", "frozen_cbn", "bn", "gn", "gn_ws", "cbn", "mabn", "bcn_ws")
TARGETS = {"cbn_fpn_heads_train", "mabn_train", "bcn_ws_train", "frozen_cbn_folded_infer", "cbn_folded_infer",
           "mabn_folded_infer", "cbn_fpn_heads_memory", "cbn_memory"}


def _run(tool, *args):
    cmd = [*command(tool), "--threads", "1", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def _positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _non_negative(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value >= 0


def _check_png(path, min_width=600, min_height=300):
    assert path.is_file() and path.stat().st_size > 10_000, path
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] >= min_width and img.size[1] >= min_height, img.size


def _benchmark_module(part):
    """A module of the model benchmark (its functions, without running it): ``settings`` or ``build``."""
    import importlib

    return importlib.import_module(f"d2_smallbn.bench.model_{part}")


def _check_summary(s):
    assert all(_positive(s[k]) for k in ("median", "p25", "p75", "min", "max")), s
    assert s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"]


@pytest.mark.slow
def test_benchmark_tiny(tmp_path):
    out = tmp_path / "bench"
    requested = ["frozen_cbn", "cbn", "mabn", "bcn_ws"]
    proc = _run("benchmark", "--tiny", "--settings", ",".join(requested), "--iters", "1", "--warmup", "0",
                "--device", "cpu", "--out", str(out), "--profile", "bn,mabn")
    report = json.loads((out / "benchmark.json").read_text())
    cfg = report["config"]
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["torch_version"] and report["detectron2_version"]
    assert cfg["size"] == [64, 96] and cfg["depth"] == 18 and cfg["batch"] == 2 and cfg["tiny"] is True
    # the references every requested setting is compared with were added, in canonical order
    expected = ("frozen_none", "frozen_bn", "frozen_cbn", "bn", "gn_ws", "cbn", "mabn", "bcn_ws")
    assert cfg["settings"] == list(expected)
    assert set(cfg["added_references"]) == {"frozen_none", "frozen_bn", "bn", "gn_ws"}
    assert cfg["primed_steps"]["mabn"] >= cfg["norm_settings"]["MABN"]["BUFFER_SIZE"]
    assert cfg["primed_steps"]["cbn"] >= 1
    assert cfg["norm_settings"]["MABN"]["WARMUP_ITERS"] == cfg["norm_settings"]["CBN"]["BURNIN_ITERS"] == 0

    res = report["results"]
    for section in ("train", "infer", "infer_folded"):
        assert set(res[section]) == set(expected)
        for key, entry in res[section].items():
            assert _positive(entry["median_s"]) and len(entry["times_s"]) == 1, (section, key)
            for name, value in entry.items():
                if name.startswith("ratio_vs_"):
                    _check_summary(value)
    for key in expected:
        ref = "frozen_bn" if key.startswith("frozen_") else "bn"
        for section in ("train", "infer"):
            assert f"ratio_vs_{ref}" in res[section][key]
        folded = res["infer_folded"][key]
        for name in ("ratio_vs_unfolded", f"ratio_vs_{ref}_folded", "ratio_vs_frozen_none_folded",
                     "ratio_vs_frozen_none_unfolded"):
            assert name in folded, (key, name)
        mem = res["memory"][key]
        for name in ("metric_bytes", "saved_bytes", "state_bytes", "grad_bytes", "cpu_metric_bytes",
                     f"ratio_vs_{ref}"):
            assert _positive(mem[name]), (key, name)
    assert res["train"]["bn"]["ratio_vs_bn"]["median"] == 1.0
    assert res["train"]["frozen_bn"]["ratio_vs_frozen_bn"]["median"] == 1.0
    assert res["memory"]["bn"]["ratio_vs_bn"] == 1.0
    assert res["infer_folded"]["frozen_none"]["ratio_vs_frozen_none_folded"]["median"] == 1.0
    _check_summary(res["train"]["bcn_ws"]["ratio_vs_gn_ws"])
    assert _positive(res["memory"]["bcn_ws"]["ratio_vs_gn_ws"])

    # every folded model was checked against its unfolded model
    assert set(report["fold_check"]) == set(expected)
    for key, check in report["fold_check"].items():
        assert check["detections_matched_fraction"] >= 0.9, key
        assert check["features.p2"]["max_abs_err"] <= 1e-3 * check["features.p2"]["max_abs_ref"] + 1e-6, key

    # the profiled training steps: ops by self time, the norm's own autograd function among them
    assert set(report["profiles"]) == {"bn", "mabn"}
    profiles = {k: Path(v).read_text() for k, v in report["profiles"].items()}
    assert "aten::native_batch_norm_backward" in profiles["bn"] and "Self CPU" in profiles["bn"]
    assert "_MABNFunctionBackward" in profiles["mabn"] and "Self CPU" in profiles["mabn"]

    # fixed training proposals: every setting's heads sampled the same foreground RoIs
    work = report["work_fg_rois_per_image"]
    assert set(work) == set(expected) and len({json.dumps(w, sort_keys=True) for w in work.values()}) == 1, work
    assert work["bn"]["median"] >= 4  # the ground-truth boxes at least

    targets = {t["name"]: t for t in report["targets"]}
    assert set(targets) == TARGETS
    for t in targets.values():
        assert _positive(t["measured"]) and _positive(t["bound"]) and isinstance(t["met"], bool), t

    md = (out / "benchmark.md").read_text()
    assert "| setting | reference | train step | peak memory | inference |" in md
    assert "| target | measured | met? |" in md
    assert report["device"]["name"] in md
    assert "| setting | reference |" in proc.stdout
    _check_png(out / "benchmark.png", min_width=1000)


def test_benchmark_adds_references_transitively():
    bench = _benchmark_module("settings")
    # bcn_ws is compared with bn, gn_ws and frozen_none; frozen_none in turn with frozen_bn
    assert bench.with_references(["bcn_ws"]) == ["frozen_none", "frozen_bn", "bn", "gn_ws", "bcn_ws"]
    assert bench.with_references(["frozen_bn"]) == ["frozen_none", "frozen_bn"]
    for key in ALL_SETTINGS:
        keys = bench.with_references([key])
        assert all(ref in keys for k in keys for ref in bench.references(k)), key
    # a norm of the table without a row of its own is that norm everywhere, compared with BN everywhere
    assert bench.with_references(["brn"]) == ["frozen_none", "frozen_bn", "bn", "brn"]
    assert bench.setting("brn").label == "BRN everywhere" and bench.setting("brn").conv == "auto"
    assert [bench.setting_key(t) for t in ("BRN", "bcn", "CBN", "frozen_cbn", "batchnorm")] == [
        "brn", "bcn_ws", "cbn", "frozen_cbn", None]
    assert bench.norms_of(["frozen_cbn", "bcn_ws", "gn"]) == ["CBN", "BCN"]


@pytest.mark.slow
def test_benchmark_rejects_profiling_an_unmeasured_setting(tmp_path):
    cmd = [*command("benchmark"), "--tiny", "--settings", "mabn", "--profile", "gn",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--profile gn: not measured in this run" in proc.stderr, proc.stderr
    assert not (tmp_path / "benchmark.json").exists()


def test_benchmarks_name_what_is_wrong_with_a_setting_or_a_norm_module(capsys):
    from d2_smallbn.bench import layers, model

    for parse, args, message in (
            (model.parse_args, ["--settings", "cbn,batchnorm"], "--settings: unknown settings ['batchnorm']; choose "
                                                                "from frozen_none"),
            (model.parse_args, ["--settings", "cbn", "--profile", "toybn"], "--profile: unknown settings ['toybn']"),
            (model.parse_args, ["--norm-module", "no_such_module"], "cannot import the norm module 'no_such_module'"),
            (layers.parse_args, ["--norms", "BRN,MYBN"], "--norms: no norm 'MYBN' in the table of norms"),
            (layers.parse_args, ["--shapes", "8x0"], "shape '8x0' is too small (at least 1x1)")):
        with pytest.raises(SystemExit) as exit_info:
            parse(args)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, (args, message)
    assert model.parse_args(["--settings", "BRN", "--device", "cpu"]).settings == ["brn"]
    assert layers.parse_args(["--norms", "brn,CBN", "--device", "cpu"]).norms == {
        "cbn": "CBN", "mabn": "MABN", "bcn_ws": "BCN", "brn": "BRN"}


@pytest.mark.slow
def test_study_cbn_fidelity_tiny(tmp_path):
    out = tmp_path / "cbn"
    proc = _run("study_cbn_fidelity", "--tiny", "--out", str(out))
    report = json.loads((out / "cbn_fidelity.json").read_text())
    ks = report["config"]["ks"]
    assert ks == [1, 2, 4, 8]
    assert set(report["results"]) == {"bn", "cbn"}
    for norm, res in report["results"].items():
        assert res["measured_steps"] >= 1
        assert 0 <= res["heldout_accuracy"] <= 1 and _positive(res["loss_first"]) and _positive(res["loss_last"])
        assert set(res["by_k"]) == {str(k) for k in ks}
        for k in ks:
            row = res["by_k"][str(k)]
            assert set(row) == {"compensated", "naive", "exact_window"}
            for est, errs in row.items():
                assert _positive(errs["mean_err"]) and _positive(errs["var_err"]), (norm, k, est)
            for est in ("compensated", "naive"):
                for name in ("mean_err_vs_window", "var_err_vs_window"):
                    assert _non_negative(row[est][name]), (norm, k, est, name)
                    if k > 1:
                        assert row[est][name] > 0, (norm, k, est, name)
        # k = 1 is the current batch alone: compensation has nothing to act on
        one = res["by_k"]["1"]
        assert one["compensated"] == one["naive"]
        series = res["series"]
        assert series["k"] == max(ks) and len(series["steps"]) == res["measured_steps"]
        for name in ("compensated_var_err", "naive_var_err", "bn_var_err"):
            assert len(series[name]) == len(series["steps"]) and all(_positive(v) for v in series[name])
    assert "| train norm | k |" in proc.stdout
    _check_png(out / "cbn_fidelity.png", min_width=1000)


@pytest.mark.slow
def test_study_mabn_premise_tiny(tmp_path):
    out = tmp_path / "mabn"
    proc = _run("study_mabn_premise", "--tiny", "--out", str(out))
    report = json.loads((out / "mabn_premise.json").read_text())
    assert report["config"]["ms"] == [2, 4] and report["config"]["large_batch"] == 32
    series_names = {"batch2", "sma2", "sma4", "batch32"}
    for stat in ("g", "psi", "mu", "var"):
        res = report["results"][stat]
        assert set(res) == series_names | {"mean_square_batch32"}
        for name in series_names:
            assert _positive(res[name]["variance"]) and _positive(res[name]["ratio_to_batch32"]), (stat, name)
            curve = report["curves"][stat][name]
            assert len(curve) == len(report["curves"]["window_end_steps"]) >= 1
            assert all(_positive(v) for v in curve)
        assert res["batch32"]["ratio_to_batch32"] == 1.0
        assert _positive(res["mean_square_batch32"])
    assert 0 <= report["heldout_accuracy"] <= 1
    assert "| statistic |" in proc.stdout
    _check_png(out / "mabn_premise.png", min_width=1000)


@pytest.mark.slow
def test_study_accuracy_tiny_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "acc"
    common = ["--iters", "2", "--num-train", "4", "--num-val", "2", "--data-root", str(tmp_path / "data"),
              "--out", str(out), "--jobs", "2"]
    overrides = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
                 "INPUT.MAX_SIZE_TEST", "96"]
    proc = _run("study_accuracy", *common, "--settings", "cbn,bn_16", "--seeds", "0", *overrides)
    assert "reusing" not in proc.stdout
    report = json.loads((out / "study_accuracy.json").read_text())
    settings = report["settings"]
    assert list(settings) == ["bn_16", "cbn"]  # the longest run starts first
    assert settings["bn_16"]["images_per_iteration"] == 16 and settings["cbn"]["images_per_iteration"] == 2
    for name, entry in settings.items():
        assert entry["iterations"] == 2 and list(entry["seeds"]) == ["0"]
        run = entry["seeds"]["0"]
        assert run["curve"]["iteration"][-1] == 1 and all(_positive(v) for v in run["curve"]["total_loss"])
        assert run["threads"] == 1 and run["jobs"] == 2  # how it was executed (--threads 1, --jobs 2)
        for metric in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"):
            m = entry[metric]
            assert 0 <= m["min"] <= m["mean"] <= m["max"] <= 100 and len(m["values"]) == 1, (name, metric)
        assert m["values"] == [run["ap"]["segm"]["AP50"]]
        assert json.loads((out / "runs" / f"{name}_seed0" / "results.json").read_text())["seed"] == 0
    md = (out / "study_accuracy.md").read_text()
    assert md.startswith("| setting | images / iter | seeds | box AP |") and "| bn_16 | 16 | 1 |" in md
    _check_png(out / "study_accuracy.png", min_width=1000)

    # a finished run is reused only while its resolved config is unchanged (unused norms aside)
    from d2_smallbn.bench import study_accuracy

    args = study_accuracy.parse_args([*common, "--settings", "cbn", "--seeds", "0", *overrides])
    (folder, cmd), = study_accuracy.run_commands(args).values()
    saved = (folder / "config.yaml").read_text()
    assert study_accuracy.finished(folder, cmd)
    (folder / "config.yaml").write_text(saved.replace("BUFFER_SIZE: 16", "BUFFER_SIZE: 7"))  # MABN's: unused
    assert study_accuracy.finished(folder, cmd)
    (folder / "config.yaml").write_text(saved.replace("WINDOW_SIZE: 4", "WINDOW_SIZE: 8"))
    assert not study_accuracy.finished(folder, cmd)
    (folder / "config.yaml").write_text(saved)

    # a second call reuses finished runs and only trains the new seed
    proc = _run("study_accuracy", *common, "--settings", "cbn", "--seeds", "0,1", *overrides)
    assert f"reusing {out / 'runs' / 'cbn_seed0'}" in proc.stdout and "start cbn seed 1" in proc.stdout
    assert "start cbn seed 0" not in proc.stdout
    entry = json.loads((out / "study_accuracy.json").read_text())["settings"]["cbn"]
    assert list(entry["seeds"]) == ["0", "1"] and len(entry["bbox_AP"]["values"]) == 2

    # --report-only trains nothing and names what has not finished
    proc = _run("study_accuracy", *common, "--settings", "cbn,gn", "--seeds", "0", "--report-only", *overrides)
    report = json.loads((out / "study_accuracy.json").read_text())
    assert list(report["settings"]) == ["cbn"] and report["not_finished"] == [["gn", 0]]
    assert report["report_only"] is True and report["jobs"] is None and report["threads_per_job"] is None
    assert report["settings"]["cbn"]["seeds"]["0"]["threads"] == 1  # the run's own, kept
    assert "start" not in proc.stdout and "Not finished (not in the table): gn seed 0" in proc.stdout
    assert not (out / "runs" / "gn_seed0").exists()


@pytest.mark.slow
def test_study_accuracy_rejects_bad_arguments(tmp_path, capsys):
    """The command refuses each with exit code 2 and the message: the first as a process of its own, the
    others through its argument parser in this process (argparse's exit is the process's exit code)."""
    from d2_smallbn.bench.study_accuracy import parse_args

    proc = subprocess.run([*command("study_accuracy"), "--out", str(tmp_path), "--settings", "cbn,batchnorm"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown --settings" in proc.stderr, proc.stderr
    for args, message in ((["--settings", "cbn,batchnorm"], "unknown --settings"),
                          (["--jobs", "0"], "--jobs and --threads must be >= 1"),
                          (["SOLVER.BASE_LR"], "KEY VALUE pairs"),
                          (["--gpus", "2", "--settings", "bn_16"],
                           "unknown --settings ['bn_16'] for --gpus 2; choose from bn,syncbn,gn,cbn,mabn,bcn_ws,brn"),
                          (["--gpus", "1000"], "processes, but this machine runs at most"),
                          (["--gpus", "0"], "--gpus and --images-per-gpu must be >= 1")):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--out", str(tmp_path), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, (args, message)


def test_fixed_proposals_cover_ground_truth_and_background():
    """The benchmark's shared training proposals: the requested count per image, inside the image,
    jittered copies overlapping their ground-truth box, and random boxes that are all background."""
    import torch
    from detectron2.structures import Boxes, pairwise_iou

    bench = _benchmark_module("build")
    inputs, _ = bench.make_inputs(64, 96, 5, torch.device("cpu"), seed=0)
    copies = 4
    proposals = bench.fixed_proposals(inputs, count=100, seed=0, copies_per_box=copies)
    assert len(proposals) == len(inputs)
    for item, props in zip(inputs, proposals):
        boxes = props.proposal_boxes.tensor
        gt = item["instances"].gt_boxes
        assert props.image_size == (64, 96) and len(props) == 100 and props.objectness_logits.shape == (100,)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 64).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()
        iou = pairwise_iou(Boxes(boxes), gt)
        near = len(gt) * copies
        own = iou[:near].view(copies, len(gt), len(gt)).diagonal(dim1=1, dim2=2)
        assert (own > 0.5).float().mean() >= 0.75  # up to 10% jitter keeps most copies foreground
        assert (iou[near:].amax(1) < 0.5).all()
    again = bench.fixed_proposals(inputs, count=100, seed=0, copies_per_box=copies)
    assert all(torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor) for a, b in zip(proposals, again))


def test_per_gpu_schedule_follows_the_stated_rules():
    from d2_smallbn.bench.study_accuracy import per_gpu_schedule

    opts, rules = per_gpu_schedule(4, 1, 500)
    value = {key: rule["value"] for key, rule in rules.items()}
    assert value["SOLVER.IMS_PER_BATCH"] == 4 and value["MODEL.SMALLBN.PAPER_IMS_PER_GPU"] == 1
    assert value["SOLVER.BASE_LR"] == pytest.approx(0.02)  # 0.01 at 2 images, linear in the batch
    assert value["SOLVER.WARMUP_ITERS"] == 50 and value["SOLVER.STEPS"] == (400,)  # 200 images; 80%
    assert value["MODEL.SMALLBN.CBN.WINDOW_SIZE"] == 16 and value["MODEL.SMALLBN.CBN.BURNIN_ITERS"] == 125
    # the paper's counts scaled, raised to the rule's minimum (tests/configs/test_phase_rule.py): the buffer
    # (16) for MABN's warmups, 3 / (1 - 0.98) = 150 for what renormalizes towards an EMA; ramps keep their lengths
    assert [value[f"MODEL.SMALLBN.MABN.{k}"] for k in ("WARMUP_ITERS", "FPN_WARMUP_ITERS", "HEADS_WARMUP_ITERS",
                                                       "CLIP_WARMUP_ITERS")] == [16, 16, 28, 150]
    assert [value[f"MODEL.SMALLBN.BRN.{k}"] for k in ("WARMUP_ITERS", "D_MAX_ITERS", "R_MAX_ITERS")] == [150, 206, 247]
    assert opts[:2] == ["SOLVER.IMS_PER_BATCH", "4"] and len(opts) == 2 * len(rules)
    assert per_gpu_schedule(4, 2, 500)[1]["MODEL.SMALLBN.CBN.WINDOW_SIZE"]["value"] == 8
    assert per_gpu_schedule(4, 1, 2)[1]["SOLVER.STEPS"]["value"] == ()  # no step at the last iteration


@pytest.mark.slow
def test_study_per_gpu_regime_runs_processes_records_the_statistics_error_and_reruns_an_interrupted_run(tmp_path):
    out = tmp_path / "per_gpu"
    common = ["--gpus", "2", "--iters", "2", "--num-train", "4", "--num-val", "2", "--data-root",
              str(tmp_path / "data"), "--out", str(out), "--seeds", "0"]
    overrides = ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
                 "INPUT.MAX_SIZE_TEST", "96", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
    proc = _run("study_accuracy", *common, "--settings", "bn,syncbn", *overrides)
    report = json.loads((out / "study_accuracy.json").read_text())
    assert report["regime"]["processes"] == 2 and report["regime"]["images_per_process"] == 1
    assert report["regime"]["schedule"]["SOLVER.IMS_PER_BATCH"]["value"] == 2
    for name in ("bn", "syncbn"):
        entry = report["settings"][name]
        assert entry["processes"] == 2 and entry["images_per_iteration"] == 2 and entry["iterations"] == 2
        run = entry["seeds"]["0"]
        error = run["statistics_error"]  # one record (iteration 0 of 2) of all four layers
        assert error["records"] == 1
        for layer in ("stem", "res3", "fpn", "box_head"):
            assert {f"{layer}/mean", f"{layer}/var", f"{layer}/sqmean"} <= set(error)
        if name == "bn":  # one image per process: each normalizes with its own image's statistics
            assert _positive(error["mean"]) and _positive(error["var"])
        else:  # naiveSyncBN normalizes with the whole batch's
            assert error["mean"] < 1e-4 and error["var"] < 1e-4 and error["sqmean"] < 1e-4, error
        results = json.loads((out / "runs" / f"{name}_seed0" / "results.json").read_text())
        assert results["processes"] == 2
        config = (out / "runs" / f"{name}_seed0" / "config.yaml").read_text()
        assert "IMS_PER_BATCH: 2" in config and ("naiveSyncBN" in config) == (name == "syncbn")
    assert "| processes | statistics error: mean | var | second moment |" in proc.stdout

    # a run without results (interrupted) is run again; the finished one is reused
    (out / "runs" / "syncbn_seed0" / "results.json").unlink()
    proc = _run("study_accuracy", *common, "--settings", "bn,syncbn", *overrides)
    assert f"reusing {out / 'runs' / 'bn_seed0'}" in proc.stdout and "start syncbn seed 0" in proc.stdout
    assert "start bn seed 0" not in proc.stdout
