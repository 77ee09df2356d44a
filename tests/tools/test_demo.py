"""d2-smallbn-demo: predictions on a user's images equal the loaded model's own, are drawn at the
input's size, and bad inputs stop with a message naming the problem (an unreadable image: named,
skipped, exit code 1)."""
import json
import logging
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from commands import installed
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from generated_images import make_images
from PIL import Image

from d2_smallbn import demo
from d2_smallbn.data import CATEGORIES
from d2_smallbn.engine.defaults import build_config
from d2_smallbn.engine.lazy import build_model as build_lazy_model
from d2_smallbn.engine.lazy import load_config

CONFIG = "quickstart/mask_rcnn_R18_FPN_gn.yaml"
TINY = ["INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128"]


def reference_predictions(model, path, min_size, max_size, threshold):
    """The model's predictions on one image, computed here: BGR, test-time resize, at least ``threshold``."""
    bgr = np.asarray(Image.open(path).convert("RGB"))[:, :, ::-1]
    resized = T.ResizeShortestEdge([min_size, min_size], max_size).get_transform(bgr).apply_image(bgr)
    with torch.no_grad():
        out = model([{"image": torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)),
                      "height": bgr.shape[0], "width": bgr.shape[1]}])[0]["instances"]
    keep = out.scores >= threshold
    return out.pred_boxes.tensor[keep], out.scores[keep], out.pred_classes[keep]


@pytest.fixture(autouse=True)
def _fresh_loggers():
    """main() sets up detectron2's loggers on the stdout of the moment (capsys' stream, closed after
    each test); start every test without those handlers."""
    yield
    for name in ("d2_smallbn", "detectron2"):
        logging.getLogger(name).handlers.clear()
    setup_logger.cache_clear()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint of a (random-init) quickstart model, the model itself in eval mode, and images."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(1)
    cfg = build_config(CONFIG, TINY)
    model = build_model(cfg).eval()
    DetectionCheckpointer(model, save_dir=str(root)).save("model")
    (root / "photos").mkdir()
    (root / "more").mkdir()
    images = [r["file_name"] for r in make_images(str(root / "photos"), count=2, size=(90, 120))]
    images += [r["file_name"] for r in make_images(str(root / "more"), count=1, size=(100, 80), seed=1)]
    return root, model, images


def test_demo_predicts_what_the_loaded_model_predicts_and_draws_each_image(trained, tmp_path, capsys):
    root, model, images = trained
    shutil.copy(images[0], tmp_path / "broken.png")
    (tmp_path / "broken.png").write_bytes((tmp_path / "broken.png").read_bytes()[:40])  # header only
    out = tmp_path / "out"
    torch.manual_seed(7)  # the demo's own model starts from other random weights: only loading makes them equal
    code = demo.main(["--config-file", CONFIG, "--weights", str(root / "model.pth"), "--output", str(out),
                      "--input", str(root / "photos"), images[2], str(tmp_path / "broken.png"),
                      "--confidence-threshold", "0.05", "--opts", *TINY])
    assert code == 1  # one image could not be read
    printed = capsys.readouterr()
    assert f"cannot read image {tmp_path / 'broken.png'}" in printed.out + printed.err

    listed = json.loads((out / "predictions.json").read_text())
    assert sorted(listed["images"]) == sorted(images)
    assert listed["unreadable"] and str(tmp_path / "broken.png") in listed["unreadable"][0]
    # images[0] of photos/ and images[2] of more/ are both "0.png": two distinct outputs
    assert sorted(os.listdir(out)) == ["0.png", "0_1.png", "1.png", "predictions.json"]
    total = 0
    for path in images:
        entry = listed["images"][path]
        boxes, scores, classes = reference_predictions(model, path, 96, 128, 0.05)
        got = entry["instances"]
        assert len(got) == len(scores) <= 100
        total += len(got)
        np.testing.assert_allclose([p["box_xyxy"] for p in got], boxes.reshape(-1, 4).numpy(), atol=0.01)
        np.testing.assert_allclose([p["score"] for p in got], scores.numpy(), atol=1e-4)
        assert [p["class"] for p in got] == classes.tolist()
        assert all(p["class_name"] == CATEGORIES[p["class"]] for p in got)  # the config's test dataset's names
        with Image.open(entry["output"]) as drawn, Image.open(path) as original:
            assert drawn.size == original.size
            difference = np.abs(np.asarray(drawn.convert("RGB"), float) - np.asarray(original.convert("RGB"), float))
            assert difference.mean() > 1.0 if got else difference.max() == 0  # predictions are drawn, nothing else
    assert total > 0  # a random-init model above a 0.05 threshold still predicts: the check is not vacuous


def test_demo_lazy_config_loads_the_weights_it_is_given(tmp_path, capsys):
    opts = ["train.device=cpu", "dataloader.test.mapper.augmentations=[]"]
    torch.manual_seed(2)
    cfg = load_config("lazy/mask_rcnn_R50_FPN_cbn.py", opts)
    cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0  # what the demo's threshold 0 sets
    model = build_lazy_model(cfg).eval()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("lazy")
    image = make_images(str(tmp_path), count=1, size=(64, 96))[0]["file_name"]
    torch.manual_seed(3)
    code = demo.main(["--config-file", "lazy/mask_rcnn_R50_FPN_cbn.py", "--weights", str(tmp_path / "lazy.pth"),
                      "--input", image, "--output", str(tmp_path / "out"), "--confidence-threshold", "0.0",
                      "--opts", *opts])
    assert code == 0, capsys.readouterr().err
    got = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"][image]["instances"]
    bgr = np.asarray(Image.open(image).convert("RGB"))[:, :, ::-1]
    with torch.no_grad():  # no augmentations: the image goes in as it is
        ref = model([{"image": torch.as_tensor(bgr.astype("float32").transpose(2, 0, 1))}])[0]["instances"]
    assert len(got) == len(ref) > 0
    np.testing.assert_allclose([p["score"] for p in got], ref.scores.numpy(), atol=1e-4)


@pytest.mark.parametrize("case, message", [
    ("no weights", "no weights: neither --weights nor the config's MODEL.WEIGHTS names a checkpoint"),
    ("missing weights", "do not exist: pass --weights with an existing checkpoint"),
    ("missing input", "is neither an image file nor a folder"),
    ("empty folder", "has no image files"),
    ("threshold", "--confidence-threshold must be in [0, 1], got 1.5"),
])
def test_demo_bad_input_names_the_problem(trained, tmp_path, capsys, case, message):
    root, _, images = trained
    (tmp_path / "empty").mkdir()
    args = {"no weights": [], "missing weights": ["--weights", str(tmp_path / "nope.pth")]}.get(
        case, ["--weights", str(root / "model.pth")])
    inputs = {"missing input": [str(tmp_path / "nope.jpg")], "empty folder": [str(tmp_path / "empty")]}.get(
        case, [images[0]])
    threshold = ["--confidence-threshold", "1.5"] if case == "threshold" else []
    code = demo.main(["--config-file", CONFIG, *args, "--input", *inputs, "--output", str(tmp_path / "out"),
                      *threshold, "--opts", *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.slow
def test_demo_command_is_installed(trained, tmp_path):
    root, _, images = trained
    proc = subprocess.run([*installed("d2-smallbn-demo"), "--config-file", CONFIG, "--weights",
                           str(root / "model.pth"), "--input", images[2], "--output", str(tmp_path / "out"),
                           "--opts", *TINY], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "0.png").is_file() and "1 images drawn into" in proc.stdout


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, relation", [
    ("output is the input folder", "is the --input folder"),
    ("input image inside the output", "is a folder holding the --input image"),
    ("output inside the input folder", "lies inside the --input folder"),
])
def test_demo_refuses_an_output_that_could_overwrite_the_input_images(trained, tmp_path, capsys, case, relation):
    """`d2-smallbn-demo --input DIR --output DIR` used to replace the user's PNGs by the drawings."""
    root, _, images = trained
    photos = tmp_path / "photos"
    shutil.copytree(root / "photos", photos)
    inputs, output = {
        "output is the input folder": ([photos], photos),
        "input image inside the output": ([photos / "0.png"], photos),
        "output inside the input folder": ([photos], photos / "drawn"),
    }[case]
    before = _tree(tmp_path)
    code = demo.main(["--config-file", CONFIG, "--weights", str(root / "model.pth"), "--input", *map(str, inputs),
                      "--output", str(output), "--opts", *TINY])
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {output}: the --output ") and ". Fix: " in lines[0], lines
    assert relation in lines[0], lines[0]
    assert _tree(tmp_path) == before and not (photos / "drawn").exists()
