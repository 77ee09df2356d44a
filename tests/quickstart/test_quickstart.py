"""The quickstart configs train, and the main command's code path produces every promised file."""
import json
import subprocess

import numpy as np
import pytest
from commands import installed
from PIL import Image

import d2_smallbn  # noqa: F401
from d2_smallbn.data import generate_dataset, register_shapes
from d2_smallbn.engine import SmallBNTrainer
from d2_smallbn.engine.defaults import build_config
from d2_smallbn.model_zoo import list_configs

TINY = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "128"]


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_dataset(root, num_train=4, num_val=2)
    register_shapes(root)
    return root


@pytest.mark.parametrize("name", [n for n in list_configs() if n.startswith("quickstart/")])
def test_each_quickstart_config_trains_two_iterations(name, tiny_shapes, tmp_path):
    cfg = build_config(name, TINY + ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
                                     "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)])
    trainer = SmallBNTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert trainer.iter == 2
    losses = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(losses) == 2 and all(0 < v < 100 for v in losses)


@pytest.mark.slow
def test_main_command_writes_every_promised_file(tmp_path):
    out = tmp_path / "out"
    cmd = [*installed("d2-smallbn-quickstart"), "--norm", "cbn", "--iters", "2",
           "--num-train", "4", "--num-val", "2", "--num-vis", "2", "--data-root", str(tmp_path / "data"),
           "--output-dir", str(out)] + TINY
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("results.json", "predictions.png", "curves.png", "metrics.json", "model_final.pth", "config.yaml",
                 "log.txt"):
        path = out / name
        assert path.is_file() and str(path) in proc.stdout, name  # the end prints where every file is
    log = (out / "log.txt").read_text()  # detectron2's lines and ours, as on stdout
    assert "d2_smallbn.quickstart INFO: Training quickstart/mask_rcnn_R18_FPN_cbn.yaml" in log
    assert "d2.engine.train_loop INFO: Starting training from iteration 0" in log
    for name, min_size in (("predictions.png", (150, 90)), ("curves.png", (600, 300))):
        with Image.open(out / name) as img:
            assert img.size[0] >= min_size[0] and img.size[1] >= min_size[1], (name, img.size)
            assert len(np.unique(np.asarray(img.convert("L")))) > 10, f"{name} looks blank"
    results = json.loads((out / "results.json").read_text())
    rows = results["results"]
    assert set(rows) == {"trained", "untrained"} and results["norm"] == "cbn" and results["iterations"] == 2
    for ap in rows.values():
        assert set(ap) == {"bbox", "segm"} and 0 <= ap["bbox"]["AP"] <= 100
    assert "COCO evaluation" in proc.stdout and "box AP" in proc.stdout


@pytest.mark.parametrize("iters, steps, burnin", [(None, (400,), 200), (1000, (800,), 400), (2, (1,), 1)])
def test_iters_flag_scales_the_schedule_and_cbn_burnin(iters, steps, burnin, tmp_path):
    from d2_smallbn.quickstart import build_cfg, parse_args

    argv = ["--norm", "cbn", "--output-dir", str(tmp_path)] + (["--iters", str(iters)] if iters else [])
    cfg = build_cfg(parse_args(argv), tmp_path)
    assert cfg.SOLVER.MAX_ITER == (iters or 500) and tuple(cfg.SOLVER.STEPS) == steps
    assert cfg.MODEL.SMALLBN.CBN.BURNIN_ITERS == burnin and cfg.MODEL.SMALLBN.CBN.WINDOW_SIZE == 4


def test_training_entries_keep_the_latest_run_of_an_appended_metrics_file(tmp_path):
    """detectron2 appends to metrics.json: a folder trained twice holds two runs, and the curves
    and the accuracy study must read only the latest one (not a line back to iteration 19); a
    resumed run keeps the entries from before its checkpoint."""
    from d2_smallbn.quickstart import training_entries

    def run(losses):
        return [{"iteration": 19 + 20 * i, "total_loss": v, "lr": 0.01} for i, v in enumerate(losses)]

    first, second = run([3.0, 2.0, 1.0]), run([4.0, 3.5])
    evaluation = {"iteration": 59, "bbox/AP": 1.0}  # no losses: not a training entry
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(e) for e in first + [evaluation] + second) + "\n")
    assert training_entries(path) == second
    path.write_text("\n".join(json.dumps(e) for e in first + [evaluation]) + "\n")
    assert training_entries(path) == first
    resumed = [{"iteration": 39, "total_loss": 1.5, "lr": 0.01}, {"iteration": 59, "total_loss": 0.5, "lr": 0.01}]
    path.write_text("\n".join(json.dumps(e) for e in first + resumed) + "\n")  # resumed after iteration 19
    assert training_entries(path) == first[:1] + resumed
    path.write_text(json.dumps(evaluation) + "\n")
    with pytest.raises(ValueError, match="no training entries"):
        training_entries(path)


@pytest.mark.parametrize("entries", [1, 3])
def test_curves_draw_every_entry_even_a_single_one(tmp_path, entries):
    """A 1-iteration run writes one metrics entry: a line through one point is invisible, so the
    panels came out blank."""
    from d2_smallbn.quickstart import draw_curves

    path = tmp_path / "metrics.json"
    rows = [{"iteration": 19 + 20 * i, "total_loss": 2.0 - 0.3 * i, "loss_cls": 0.7, "lr": 0.01 + 0.001 * i}
            for i in range(entries)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    png = draw_curves(path, tmp_path / "curves.png")
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 80  # axes, ticks and text are grey; data is coloured
    half = rgb.shape[1] // 2
    assert coloured[:, half:].sum() > 20, "the learning-rate panel (no legend) shows no data"
    # the loss panel has a legend with coloured samples whether or not the data shows, so its data
    # is compared with the same figure drawn without losses (legend and all, data removed)
    empty = tmp_path / "empty.json"
    empty.write_text("\n".join(json.dumps({**r, "total_loss": float("nan"), "loss_cls": float("nan")})
                               for r in rows) + "\n")
    baseline = np.asarray(Image.open(draw_curves(empty, tmp_path / "baseline.png")).convert("RGB")).astype(int)
    baseline_coloured = (baseline.max(axis=2) - baseline.min(axis=2)) > 80
    assert coloured[:, :half].sum() > baseline_coloured[:, :half].sum() + 20, "the loss panel shows no data"


@pytest.mark.parametrize("inside", [True, False])
def test_output_dir_and_data_root_must_stay_apart(inside, tmp_path):
    """An output folder inside the dataset (or holding it) is refused before anything is generated."""
    from d2_smallbn.quickstart import main

    data, out = (tmp_path / "data", tmp_path / "data" / "out") if inside else (tmp_path / "out" / "data", tmp_path / "out")
    with pytest.raises(SystemExit, match="--output-dir .*--data-root") as error:
        main(["--data-root", str(data), "--output-dir", str(out)])
    assert "Fix: pass another --output-dir" in str(error.value)
    assert not data.exists()


def test_config_file_replaces_the_norms_config_and_names_the_run(tmp_path):
    from d2_smallbn.quickstart import build_cfg, parse_args, run_name

    args = parse_args(["--config-file", "pretrained/mask_rcnn_R18_FPN_mabn_mabn.yaml", "--iters", "400"])
    cfg = build_cfg(args, tmp_path)
    assert cfg.MODEL.RESNETS.NORM == "MABN" and cfg.MODEL.WEIGHTS == "output/pretrain/centered_bn/R18-mabn.pkl"
    assert cfg.OUTPUT_DIR.endswith("quickstart_mask_rcnn_R18_FPN_mabn_mabn") and run_name(args) in cfg.OUTPUT_DIR
    assert cfg.MODEL.SMALLBN.MABN.CLIP_WARMUP_ITERS >= 150  # --iters scales its phases as for --norm


def test_a_config_file_that_is_not_there_is_refused_before_anything_starts(tmp_path):
    from d2_smallbn.quickstart import main

    with pytest.raises(SystemExit, match="--config-file 'nope.yaml' is neither a file nor a d2_smallbn config"):
        main(["--config-file", "nope.yaml", "--data-root", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o")])
    assert not (tmp_path / "data").exists()
