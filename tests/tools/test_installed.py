"""What a pip user gets: ``pip install .`` (not editable) into a fresh venv, then, from a folder
outside the checkout, every console script's ``--help`` (each script a process of its own; their
``python -m`` twins run in one process, as ``-m`` runs them: ``runpy`` with ``__main__``) and the main
job ``d2-smallbn-quickstart`` end to end (2 iterations on a 4 + 2 image dataset in the default dataset
folder: the same path as a longer run). The venv sees the test interpreter's dependencies (torch,
detectron2, ...) through a .pth file, but not the checkout."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a venv, and processes of their own (make test-fast leaves it out)
REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"d2-smallbn-train", "d2-smallbn-eval", "d2-smallbn-convert-weights", "d2-smallbn-convert",
            "d2-smallbn-dataset", "d2-smallbn-quickstart", "d2-smallbn-demo"}
SCRIPTS = ("import d2_smallbn\nfrom importlib.metadata import distribution\nprint(d2_smallbn.__file__)\n"
           "print('\\n'.join(e.name for e in distribution('d2_smallbn').entry_points if e.group == 'console_scripts'))")
# ``python -m MODULE --help`` for each module, in one process: runpy runs a module as ``-m`` does
AS_MAIN = """import contextlib, io, json, runpy, sys
results = {}
for module in sys.argv[1:]:
    out, code = io.StringIO(), None
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    results[module] = [code or 0, out.getvalue()]
print(json.dumps(results))
"""


def dependency_sites():
    """The site folders the test interpreter imports its dependencies from, its own one excluded
    (that one holds the checkout's editable install)."""
    own = os.path.realpath(sysconfig.get_paths()["purelib"])
    return [p for p in sys.path if p.endswith("site-packages") and os.path.realpath(p) != own and os.path.isdir(p)]


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"  # a copy, so that building leaves nothing in the checkout
    shutil.copy(REPO_ROOT / "setup.py", source.mkdir() or source / "setup.py")
    shutil.copytree(REPO_ROOT / "d2_smallbn", source / "d2_smallbn", ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = root / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "test_dependencies.pth").write_text("\n".join(dependency_sites()) + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              "--no-build-isolation", str(source)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    work = root / "elsewhere"
    work.mkdir()
    return env_dir, work, Path(site)


def run(command, cwd, timeout=300, **env):
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env, "PYTHONPATH": ""})


def test_the_package_is_installed_as_a_copy_with_every_command(venv):
    env_dir, work, site = venv
    listed = run([str(env_dir / "bin" / "python"), "-c", SCRIPTS], work)
    where, *scripts = listed.stdout.split()
    assert listed.returncode == 0 and where.startswith(str(site)), listed.stdout + listed.stderr
    scripts = set(scripts)
    assert REQUIRED <= scripts, listed.stdout + listed.stderr
    modules = {"d2-smallbn-eval": "d2_smallbn.evaluation", "d2-smallbn-convert-weights": "d2_smallbn.weights",
               "d2-smallbn-convert": "d2_smallbn.convert",
               "d2-smallbn-quickstart": "d2_smallbn.quickstart", "d2-smallbn-demo": "d2_smallbn.demo",
               "d2-smallbn-train": "d2_smallbn.train_net", "d2-smallbn-dataset": "d2_smallbn.data"}
    as_main = run([str(env_dir / "bin" / "python"), "-c", AS_MAIN, *modules.values()], work)
    assert as_main.returncode == 0, as_main.stderr[-3000:]
    as_main = json.loads(as_main.stdout.splitlines()[-1])
    for name in sorted(scripts):
        proc = run([str(env_dir / "bin" / name), "--help"], work)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: "), (name, proc.stdout[-2000:],
                                                                            proc.stderr[-2000:])
        module = modules.get(name)
        if module:  # the same command as python -m
            code, same = as_main[module]
            options = [help_text.split("\n\n", 1)[1] for help_text in (same, proc.stdout)]
            assert code == 0 and options[0] == options[1], name


def test_quickstart_runs_end_to_end_from_another_folder(venv):
    env_dir, work, _ = venv
    # score threshold 0: a briefly trained model may score no detection above the default 0.05 (measured at 20
    # iterations on the current stack with one thread), and COCO then has no AP to give; with every detection
    # kept it has one
    proc = run([str(env_dir / "bin" / "d2-smallbn-quickstart"), "--iters", "2", "--num-train", "4", "--num-val", "2",
                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"], work, timeout=600,
               D2_SMALLBN_DATASETS=str(work / "datasets"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = work / "output" / "quickstart_cbn"
    results = json.loads((out / "results.json").read_text())
    assert results["iterations"] == 2 and set(results["results"]) == {"trained", "untrained"}
    for run_name in ("trained", "untrained"):
        for task in ("bbox", "segm"):
            ap = results["results"][run_name][task]["AP"]
            assert 0.0 <= ap <= 100.0, (run_name, task, ap)
    for name in ("predictions.png", "curves.png", "metrics.json", "model_final.pth", "log.txt"):
        assert (out / name).is_file(), name
    assert (work / "datasets" / "smallbn_shapes" / "annotations" / "instances_val.json").is_file()
