"""The GPU check's refusals (each before any install), its stage runner and its budget, and the stack
switch. The whole flow is rehearsed on CPU by `make test` (GPU_CHECK_DEVICE=cpu bash tools/gpu_check.sh)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from d2_smallbn import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def gpu_check_sh(tmp_path, **env):
    full_env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_WORK": str(tmp_path / "work"),
                "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], env=full_env, capture_output=True,
                          text=True, timeout=120)


def test_unknown_device_names_the_valid_ones(tmp_path):
    result = gpu_check_sh(tmp_path, GPU_CHECK_DEVICE="tpu")
    assert result.returncode == 2
    assert "GPU_CHECK_DEVICE='tpu'" in result.stderr and "cuda" in result.stderr and "cpu" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_without_cuda_it_stops_at_once_and_names_the_rehearsal(tmp_path):
    result = gpu_check_sh(tmp_path, GPU_CHECK_BUNDLE=str(tmp_path / "no_bundle"))
    assert result.returncode == 2
    assert "sees no CUDA device" in result.stderr and "GPU_CHECK_DEVICE=cpu" in result.stderr
    assert not (tmp_path / "work").exists()  # nothing installed


def fake_bundle(folder, drop=None, unlisted=None):
    """A bundle of empty files named like the real one's wheels, one of them dropped or unlisted."""
    folder.mkdir()
    names = ["sal_detectron2-0.7.2-py3-none-any.whl", "pip-24.0-py3-none-any.whl"]
    for line in (ROOT / "requirements" / "current.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            names.append(f"{name.replace('-', '_')}-{version}-py3-none-any.whl")
    listed = [n for n in names if n != unlisted]
    (folder / "BUNDLE").write_text("key test\n" + "\n".join(listed) + "\n")
    for name in names:
        if name != drop and name != unlisted:
            (folder / name).write_bytes(b"")
    return names


@pytest.mark.parametrize("case", ["no_bundle", "listed_wheel_missing", "requirement_without_wheel"])
def test_a_missing_or_incomplete_bundle_names_the_package_and_the_rebuild(tmp_path, case):
    bundle = tmp_path / "bundle"
    if case == "listed_wheel_missing":
        fake_bundle(bundle, drop="yacs-0.1.8-py3-none-any.whl")
        expected = "lacks yacs-0.1.8-py3-none-any.whl"
    elif case == "requirement_without_wheel":
        fake_bundle(bundle, unlisted="omegaconf-2.3.1-py3-none-any.whl")
        expected = "no wheel for omegaconf==2.3.1"
    else:
        expected = "BUNDLE is missing"
    result = gpu_check_sh(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_BUNDLE=str(bundle))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr and "make gpu-bundle" in result.stderr
    assert not (tmp_path / "work").exists()


def test_stage_runner_records_failures_and_kills_at_its_limit(tmp_path):
    ok = gpu_check.run_stage("ok", 30, [[sys.executable, "-c", "print('hi')"]], False, tmp_path, log=lambda m: None)
    assert ok["status"] == "ok" and ok["returncodes"] == [0]
    assert (tmp_path / "ok_0.log").read_text() == "hi\n"
    failed = gpu_check.run_stage("bad", 30, [[sys.executable, "-c", "raise SystemExit(3)"]] * 2, True, tmp_path,
                                 log=lambda m: None)
    assert failed["status"] == "failed" and failed["returncodes"] == [3, 3]
    slow = [sys.executable, "-c", "import time; time.sleep(30)"]
    timed_out = gpu_check.run_stage("slow", 1, [slow, slow], False, tmp_path, log=lambda m: None)
    assert timed_out["status"] == "timeout" and timed_out["seconds"] < 10
    assert len(timed_out["returncodes"]) == 1  # the second command never started


def test_stages_that_do_not_fit_the_budget_are_skipped_and_reported(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
                         "--budget", "30"])
    assert rc == 1  # nothing ran, so the check did not pass
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["stages"]) == ["tests", "layers", "model_b2", "train", "model_b4"]
    assert {s["status"] for s in report["stages"].values()} == {"skipped (budget)"}
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| tests | skipped (budget) |" in md and "# GPU check (cpu)" in md


def test_unknown_stack_lists_the_valid_ones():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup_env.sh"), "newest"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown stack 'newest'" in result.stderr and "pinned current gpu-standin" in result.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_with_an_unknown_stack_fails_with_the_list():
    result = subprocess.run(["make", "-s", "env", "STACK=newest"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "valid stacks: pinned current gpu-standin" in result.stderr
