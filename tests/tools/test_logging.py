"""Our log lines reach detectron2's log files.

A two-process CPU run of the installed ``d2-smallbn-train`` (detectron2's ``launch``, gloo), with the
CBN quickstart config at 1 image per process (the config reproduces a 2-images-per-GPU setting), a
burn-in given in epochs and an ImageNet-style BN checkpoint as MODEL.WEIGHTS. The paper-batch warning must be in ``log.txt`` and ``log.txt.rank1``
with detectron2's format; the burn-in conversion and the "loaded BatchNorm statistics" lines in
``log.txt``.
"""
import re
import subprocess

import pytest
import torch
import torch.distributed as dist
import torchvision

from commands import installed

from d2_smallbn.convert import convert_file
from d2_smallbn.data import generate_dataset
from processes import local_url

pytestmark = [pytest.mark.slow,  # processes of their own (make test-fast leaves it out)
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with the gloo backend is not available")]
TINY = ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.STEPS", "()",
        "SOLVER.WARMUP_ITERS", "0", "DATASETS.TEST", "()"]
LINE = r"\[\d\d/\d\d \d\d:\d\d:\d\d\] d2_smallbn\.[\w.]+ (INFO|WARNING): "  # detectron2's file format


def test_two_process_run_writes_our_lines_into_every_ranks_log_file(tmp_path, monkeypatch):
    generate_dataset(tmp_path / "datasets" / "smallbn_shapes", num_train=4, num_val=2)
    monkeypatch.setenv("D2_SMALLBN_DATASETS", str(tmp_path / "datasets"))  # the command inherits it
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    convert_file(str(tmp_path / "r18.pth"), str(tmp_path / "r18.pkl"), target_norm="cbn")
    out = tmp_path / "out"
    command = [*installed("d2-smallbn-train"), "--config-file", "quickstart/mask_rcnn_R18_FPN_cbn.yaml",
               "--num-gpus", "2", "--dist-url", local_url(), *TINY,
               "MODEL.WEIGHTS", str(tmp_path / "r18.pkl"), "MODEL.SMALLBN.CBN.BURNIN_EPOCHS", "1.0",
               "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out)]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    log, rank1 = (out / "log.txt").read_text(), (out / "log.txt.rank1").read_text()
    assert "Starting training from iteration 0" in log  # detectron2's own lines are there too
    warning = LINE + r"!!! Images per process = SOLVER.IMS_PER_BATCH / world size = 2 / 2 = 1, but this config " \
                     r"reproduces a paper setting with 2 images per GPU"
    assert re.search(warning, log), log[-3000:]
    assert re.search(warning, rank1), rank1[-3000:]
    assert re.search(LINE + r"CBN burn-in: 1 epochs x 4 images / 2 per iteration = 2 iterations", log)
    loaded = re.findall(LINE + r"(\S+): loaded BatchNorm statistics into CrossIterationBatchNorm2d", log)
    assert len(loaded) == 20, loaded  # stem + 16 block convs + 3 shortcuts of the R18
