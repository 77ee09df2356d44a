"""d2-smallbn-train (the installed command) end to end in subprocesses: train 2 iterations with COCO
evaluation, resume, and --eval-only, from another working directory, on the generated dataset. The
first run sets MABN's r = 1 phase shorter than its EMA needs: log.txt warns, naming the key, the
momentum and the minimum; the resumed run, on the repository's config, does not."""
import json
import os
import re
import subprocess

import pytest
from commands import installed

from d2_smallbn.data import generate_dataset

pytestmark = pytest.mark.slow  # processes of their own (make test-fast leaves it out)
TINY = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
        "INPUT.MAX_SIZE_TEST", "128", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]  # an untrained model still predicts something


def run(args, cwd, env, output_dir):
    proc = subprocess.run([*installed("d2-smallbn-train"), "--config-file", "quickstart/mask_rcnn_R18_FPN_mabn.yaml",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return (output_dir / "log.txt").read_text()  # detectron2's log of the run (appended on resume)


def test_train_evaluate_resume_and_eval_only(tmp_path):
    generate_dataset(tmp_path / "datasets" / "smallbn_shapes", num_train=4, num_val=2)
    env = dict(os.environ, D2_SMALLBN_DATASETS=str(tmp_path / "datasets"))
    out = tmp_path / "out"
    log = run(TINY + ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out), "MODEL.SMALLBN.MABN.CLIP_WARMUP_ITERS", "16"],
              tmp_path, env, out)
    assert "Starting training from iteration 0" in log
    short = re.findall(r"d2_smallbn\.engine\.hooks WARNING: !!! MODEL\.SMALLBN\.MABN\.CLIP_WARMUP_ITERS = 16 is too "
                       r"short: .*EMA of momentum 0\.98.* Fix: set it to at least 150", log)
    assert len(short) == 1, log[-3000:]
    assert (out / "model_final.pth").is_file() and (out / "metrics.json").is_file()
    assert (out / "inference" / "coco_instances_results.json").is_file()
    assert "Evaluation results for smallbn_shapes_val" in log  # COCO evaluation ran (box and mask)
    assert "copypaste: Task: bbox" in log and "copypaste: Task: segm" in log

    log = run(["--resume"] + TINY + ["SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)], tmp_path, env, out)
    assert "Starting training from iteration 2" in log
    assert len(re.findall("is too short", log)) == 1  # the repository's config: no warning
    entries = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    trained = [e["iteration"] for e in entries if "total_loss" in e]
    assert trained == [1, 2]  # the resumed run trained iteration 2 only

    log = run(["--eval-only"] + TINY + ["MODEL.WEIGHTS", str(out / "model_final.pth"),
                                        "OUTPUT_DIR", str(tmp_path / "eval")], tmp_path, env, tmp_path / "eval")
    assert "copypaste: Task: bbox" in log and "Starting training" not in log
