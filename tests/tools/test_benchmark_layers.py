"""Smoke test of the layer benchmark (d2_smallbn.bench.layers) at a tiny size: it runs, checks folding, and writes
well-formed results. Timings themselves are never asserted."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "d2_smallbn.bench.layers"]

TRAIN_SETTINGS = ("bn", "frozen_bn", "gn", "gn_ws", "bn_wgrad", "cbn", "mabn", "bcn_ws")
EVAL_SETTINGS = ("frozen_bn", "gn", "gn_ws", "cbn", "mabn", "bcn_ws", "cbn_folded", "mabn_folded", "bcn_ws_folded")


def _positive_finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_benchmark_layers_tiny(tmp_path):
    out = tmp_path / "bench"
    cmd = [*COMMAND, "--channels", "32", "--shapes", "8x8", "--batch", "2",
           "--iters", "2", "--warmup", "1", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    json_path, md_path = out / "benchmark_layers.json", out / "benchmark_layers.md"
    assert json_path.is_file() and md_path.is_file()
    report = json.loads(json_path.read_text())
    assert report["device"]["type"] == "cpu"
    assert report["torch_version"]
    assert report["config"]["shapes"] == [[8, 8]]
    assert set(report["fold_check"]) == {"cbn", "mabn", "bcn_ws"}

    res = report["results"]["8x8"]
    assert set(res["train"]) == set(TRAIN_SETTINGS)
    assert set(res["eval"]) == set(EVAL_SETTINGS)
    for phase in ("train", "eval"):
        for key, entry in res[phase].items():
            assert _positive_finite(entry["median_s"]), (phase, key, entry["median_s"])
            assert len(entry["times_s"]) == 2
            assert all(_positive_finite(t) for t in entry["times_s"]), (phase, key)
    for key in TRAIN_SETTINGS:
        assert _positive_finite(res["memory"][key]["metric_bytes"]), key
        assert _positive_finite(res["train"][key]["ratio_vs_bn"]["median"]), key
    assert _positive_finite(res["train"]["bcn_ws"]["ratio_vs_gn_ws"]["median"])

    assert res["train"]["bn"]["ratio_vs_bn"]["median"] == 1.0
    assert res["memory"]["bn"]["ratio_vs_bn"] == 1.0
    assert res["eval"]["frozen_bn"]["ratio_vs_frozen_bn"]["median"] == 1.0
    assert {t["setting"] for t in res["targets"]} == {"cbn", "mabn", "bcn_ws", "cbn_folded", "mabn_folded"}

    md = md_path.read_text()
    assert "| setting | train step ratio vs BN | peak mem ratio vs BN | eval ratio vs FrozenBN | target | met? |" in md
    assert "| setting |" in proc.stdout  # the table is printed too
