"""The built-in shapes dataset: determinism, COCO validity and mask consistency, coverage,
detectron2 registration, clear errors for broken data, atomic reuse/regeneration, and the CLI."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from commands import installed
from pycocotools.coco import COCO

from d2_smallbn.data import (
    CATEGORIES, DatasetError, check_coco_dataset, default_root, generate_dataset, register_shapes,
)
from d2_smallbn.data import cli
from d2_smallbn.data.registration import SHAPES_DATASETS
from d2_smallbn.data.scene import decode_rle

SMALL = dict(num_train=6, num_val=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small dataset shared by the read-only tests."""
    return generate_dataset(tmp_path_factory.mktemp("shapes") / "smallbn_shapes", seed=0, **SMALL)


@pytest.fixture
def copied(dataset, tmp_path):
    """A private copy of the shared dataset, for tests that damage it."""
    root = tmp_path / "copy"
    shutil.copytree(dataset.root, root)
    return root


@pytest.fixture
def catalogs():
    """Restore detectron2's catalogs for our dataset names after the test."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    saved = {name: (DatasetCatalog[name], MetadataCatalog.get(name).as_dict())
             for name in SHAPES_DATASETS if name in DatasetCatalog}
    yield DatasetCatalog, MetadataCatalog
    for name in SHAPES_DATASETS:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        if name in saved:
            loader, metadata = saved[name]
            DatasetCatalog.register(name, loader)
            metadata.pop("name", None)
            MetadataCatalog.get(name).set(**metadata)


def file_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def file_stats(root):
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def load_json(path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------ determinism

def test_same_seed_gives_identical_bytes_and_other_seed_differs(dataset, tmp_path):
    again = generate_dataset(tmp_path / "again", seed=0, **SMALL)
    other_seed = generate_dataset(tmp_path / "other", seed=1, **SMALL)
    fewer = generate_dataset(tmp_path / "fewer", seed=0, num_train=4, num_val=3)
    reference = file_hashes(dataset.root)
    assert len(reference) == 6 + 3 + 2 + 1
    assert file_hashes(again.root) == reference
    different = file_hashes(other_seed.root)
    assert different.keys() == reference.keys()
    assert all(different[name] != reference[name] for name in reference)
    # image i depends only on (seed, split, i); train and val are different streams
    fewer_hashes = file_hashes(fewer.root)
    assert all(fewer_hashes[f"train/{i:06d}.jpg"] == reference[f"train/{i:06d}.jpg"] for i in range(4))
    assert reference["train/000000.jpg"] != reference["val/000000.jpg"]


def test_json_has_sorted_keys_and_no_timestamps(dataset):
    text = dataset.annotation_file("train").read_text()
    document = json.loads(text)
    assert text == json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n"
    assert "date" not in json.dumps(document["info"]).lower()


# ------------------------------------------------------------------ COCO validity and consistency

@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_masks_areas_and_boxes_are_consistent(dataset, split):
    coco = COCO(str(dataset.annotation_file(split)))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CATEGORIES)
    assert len(coco.getImgIds()) == SMALL[f"num_{split}"]
    for image in coco.loadImgs(coco.getImgIds()):
        with Image.open(dataset.image_dir(split) / image["file_name"]) as handle:
            assert handle.format == "JPEG" and handle.size == (image["width"], image["height"])
        assert 160 <= image["width"] <= 320 and 160 <= image["height"] <= 320
        covered = np.zeros((image["height"], image["width"]), np.int32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image["id"])):
            mask = decode_rle(coco.annToRLE(ann))
            assert ann["iscrowd"] == 0 and ann["area"] == int(mask.sum()) > 0
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.allclose(ann["bbox"], tight, atol=1.0)
            if isinstance(ann["segmentation"], list):
                assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
            covered += mask
        assert covered.max() <= 1   # visible parts never overlap


def test_objects_per_image_and_sizes(dataset):
    stats = dataset.statistics["train"]
    annotations = load_json(dataset.annotation_file("train"))["annotations"]
    per_image = np.bincount([a["image_id"] for a in annotations], minlength=7)[1:]
    assert per_image.min() >= 2 and per_image.max() <= 8
    assert stats["instances"] == len(annotations) == stats["small"] + stats["medium"] + stats["large"]


def test_covers_small_medium_large_and_occlusion(dataset):
    annotations = [a for split in ("train", "val") for a in load_json(dataset.annotation_file(split))["annotations"]]
    areas = np.array([a["area"] for a in annotations])
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any() and (areas >= 96 ** 2).any()
    ring_id = CATEGORIES.index("ring") + 1
    assert any(isinstance(a["segmentation"], dict) and a["category_id"] != ring_id for a in annotations)
    assert any(isinstance(a["segmentation"], list) for a in annotations)
    assert _some_boxes_overlap(annotations)


def _some_boxes_overlap(annotations):
    for image_id in {a["image_id"] for a in annotations}:
        boxes = [a["bbox"] for a in annotations if a["image_id"] == image_id]
        for i, (x, y, w, h) in enumerate(boxes):
            for (u, v, s, t) in boxes[i + 1:]:
                if x < u + s and u < x + w and y < v + t and v < y + h:
                    return True
    return False


@pytest.mark.parametrize("spread", [0, 60, 360])
def test_main_colour_hue_lies_within_the_spread_around_the_category_hue(spread):
    import cv2

    from d2_smallbn.data.scene import _class_colour

    rng = np.random.default_rng(0)
    for category_id in range(1, len(CATEGORIES) + 1):
        colours = np.stack([_class_colour(rng, category_id, spread) for _ in range(400)])[None]
        hue = cv2.cvtColor(colours.astype(np.float32) / 255.0, cv2.COLOR_RGB2HSV)[0, :, 0]  # degrees (uint8 HSV: 2-degree steps)
        centre = 360.0 * (category_id - 1) / len(CATEGORIES)
        offset = (hue - centre + 180.0) % 360.0 - 180.0
        assert np.abs(offset).max() <= spread / 2 + 3.0, (category_id, np.abs(offset).max())
        if spread == 360:   # independent of the category: the whole colour circle
            assert np.histogram(hue, bins=6, range=(0, 360))[0].min() > 30


def test_check_coco_dataset_accepts_the_generated_files(dataset):
    summary = check_coco_dataset(dataset.annotation_file("val"), dataset.image_dir("val"))
    assert summary["images"] == 3 and summary["categories"] == list(CATEGORIES)


# ------------------------------------------------------------------ detectron2 registration

def test_registration_is_idempotent_and_loads_with_detectron2(dataset, catalogs, tmp_path):
    DatasetCatalog, MetadataCatalog = catalogs
    assert register_shapes(dataset.root) == ("smallbn_shapes_train", "smallbn_shapes_val")
    register_shapes(dataset.root)   # again: no error
    dicts = DatasetCatalog.get("smallbn_shapes_train")
    assert len(dicts) == 6 and all(d["annotations"] for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(len(CATEGORIES)))
    for name in SHAPES_DATASETS:
        metadata = MetadataCatalog.get(name)
        assert metadata.thing_classes == list(CATEGORIES) and metadata.evaluator_type == "coco"
    assert len(DatasetCatalog.get("smallbn_shapes_val")) == 3

    register_shapes(tmp_path / "elsewhere")   # another root replaces the registration
    assert MetadataCatalog.get("smallbn_shapes_train").json_file.startswith(str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetError, match=r"smallbn_shapes_train.*does not exist.*d2-smallbn-dataset"):
        DatasetCatalog.get("smallbn_shapes_train")


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")
def test_registered_dicts_go_through_the_bitmask_mapper(dataset, catalogs):
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper

    DatasetCatalog, _ = catalogs
    register_shapes(dataset.root)
    cfg = get_cfg()
    cfg.MODEL.MASK_ON, cfg.INPUT.MASK_FORMAT = True, "bitmask"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN = (192,), 320
    mapper = DatasetMapper(cfg, is_train=True)
    for record in DatasetCatalog.get("smallbn_shapes_train")[:3]:
        instances = mapper(record)["instances"]
        assert len(instances) == len(record["annotations"])
        assert instances.gt_masks.tensor.shape[1:] == instances.image_size


def test_register_does_not_generate(tmp_path, catalogs, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("D2_SMALLBN_DATASETS", raising=False)
    register_shapes()
    assert catalogs[1].get("smallbn_shapes_val").image_root == str(Path.cwd() / "datasets" / "smallbn_shapes" / "val")
    assert not (tmp_path / "datasets").exists()


def test_default_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("D2_SMALLBN_DATASETS", raising=False)
    assert default_root() == Path.cwd() / "datasets" / "smallbn_shapes"
    monkeypatch.setenv("D2_SMALLBN_DATASETS", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere" / "smallbn_shapes"


# ------------------------------------------------------------------ clear errors

def test_missing_image_is_named(copied):
    missing = copied / "train" / "000002.jpg"
    missing.unlink()
    with pytest.raises(DatasetError, match="does not exist") as info:
        check_coco_dataset(copied / "annotations" / "instances_train.json", copied / "train")
    assert str(missing) in str(info.value) and "Fix:" in str(info.value)


def test_truncated_json_is_named(copied):
    path = copied / "annotations" / "instances_val.json"
    path.write_text(path.read_text()[: len(path.read_text()) // 2])
    with pytest.raises(DatasetError, match="not valid JSON") as info:
        check_coco_dataset(path, copied / "val")
    assert str(path) in str(info.value)


def test_dangling_image_and_category_ids_are_named(copied):
    path = copied / "annotations" / "instances_train.json"
    document = load_json(path)
    document["annotations"][0]["image_id"] = 9999
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=r"image_ids absent from 'images'.*9999") as info:
        check_coco_dataset(path, copied / "train")
    assert str(path) in str(info.value)

    document["annotations"][0]["image_id"] = 1
    document["annotations"][1]["category_id"] = 42
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=r"category_ids absent from 'categories'.*42"):
        check_coco_dataset(path, copied / "train")


def test_missing_keys_are_named(copied):
    path = copied / "annotations" / "instances_train.json"
    document = load_json(path)
    del document["annotations"][3]["bbox"]
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match=r"annotations\[3\] lacks \['bbox'\]"):
        check_coco_dataset(path, copied / "train")
    del document["categories"]
    path.write_text(json.dumps(document))
    with pytest.raises(DatasetError, match="categories"):
        check_coco_dataset(path, copied / "train")


def test_registered_loader_reports_broken_data_with_the_fix(copied, catalogs):
    (copied / "val" / "000001.jpg").unlink()
    register_shapes(copied)
    with pytest.raises(DatasetError) as info:
        catalogs[0].get("smallbn_shapes_val")
    message = str(info.value)
    assert "smallbn_shapes_val" in message and "000001.jpg" in message and "d2-smallbn-dataset" in message


# ------------------------------------------------------------------ reuse and atomic regeneration

def test_second_call_reuses_files_and_force_or_new_parameters_regenerate(tmp_path):
    root = tmp_path / "shapes"
    first = generate_dataset(root, seed=0, **SMALL)
    before = file_stats(root)
    second = generate_dataset(root, seed=0, **SMALL)
    assert not first.reused and second.reused and second.statistics == first.statistics
    assert file_stats(root) == before

    forced = generate_dataset(root, seed=0, force=True, **SMALL)
    assert not forced.reused
    assert (root / "manifest.json").stat().st_ino != before["manifest.json"][0]

    recoloured = generate_dataset(root, seed=0, hue_spread=360, **SMALL)
    assert not recoloured.reused and load_json(root / "manifest.json")["parameters"]["hue_spread"] == 360

    changed = generate_dataset(root, seed=0, num_train=6, num_val=2)
    assert not changed.reused and changed.statistics["val"]["images"] == 2
    assert sorted(p.name for p in (root / "val").iterdir()) == ["000000.jpg", "000001.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shapes.lock", "shapes"]


def test_interrupted_runs_are_cleaned_up_and_regenerated(tmp_path, dataset):
    root = tmp_path / "shapes"
    leftover = tmp_path / ".shapes.tmp-99999"    # a run stopped while writing (the root is renamed in whole)
    (leftover / "train").mkdir(parents=True)
    (leftover / "train" / "000000.jpg").write_bytes(b"half-written")
    users = tmp_path / ".shapes.tmp-mine"    # a name the generator never gives: a user's
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    result = generate_dataset(root, seed=0, **SMALL)
    assert not result.reused and not leftover.exists() and (users / "notes.txt").read_text() == "mine"
    assert file_hashes(root) == file_hashes(dataset.root)

    (root / "val" / "000002.jpg").unlink()    # manifest present but files missing
    assert not generate_dataset(root, seed=0, **SMALL).reused
    assert file_hashes(root) == file_hashes(dataset.root)


def test_foreign_directory_is_never_replaced(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="thesis.tex"):
        generate_dataset(root, seed=0, **SMALL)
    assert (root / "thesis.tex").read_text() == "precious"


def _user_files(root):
    """A folder laid out like the dataset (train/, val/, annotations/) holding a user's own files."""
    files = {"train/cat.jpg": b"my photo", "val/dog.jpg": b"another photo",
             "annotations/instances_train.json": b'{"images": []}', "annotations/notes.txt": b"my notes"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("force", [False, True])
def test_a_users_files_below_the_dataset_folders_are_never_deleted(tmp_path, capsys, force):
    """A folder with train/, val/ and annotations/ passed the old check, which looked at top-level names only:
    the generator replaced it, deleting the user's files."""
    root = tmp_path / "mine"
    files = _user_files(root)
    code = cli.main(["--root", str(root), "--num-train", "2", "--num-val", "1"] + (["--force"] if force else []))
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {root}: ") and ". Fix: " in lines[0], lines
    assert "annotations/instances_train.json" in lines[0] or "train/cat.jpg" in lines[0], lines[0]
    assert file_hashes(root) == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def test_a_file_added_to_a_generated_dataset_stops_its_regeneration(tmp_path):
    root = tmp_path / "shapes"
    generate_dataset(root, seed=0, **SMALL)
    (root / "train" / "labels.txt").write_text("my labels")
    assert generate_dataset(root, seed=0, **SMALL).reused    # reusing deletes nothing: allowed
    before = file_hashes(root)
    for changed in (dict(force=True, **SMALL), dict(num_train=6, num_val=2)):
        with pytest.raises(DatasetError, match=f"{root}: .*train/labels.txt"):
            generate_dataset(root, seed=0, **changed)
        assert file_hashes(root) == before


def test_a_folder_without_this_generators_manifest_is_never_replaced(tmp_path):
    root = tmp_path / "shapes"
    (root / "train").mkdir(parents=True)
    (root / "train" / "000000.jpg").write_bytes(b"a user's image with the generator's name")
    with pytest.raises(DatasetError, match="train/000000.jpg"):
        generate_dataset(root, seed=0, **SMALL)
    assert (root / "train" / "000000.jpg").read_bytes() == b"a user's image with the generator's name"


def test_invalid_parameters_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_dataset(tmp_path / "x", num_train=0)
    with pytest.raises(ValueError, match="seed"):
        generate_dataset(tmp_path / "x", seed=-1)
    with pytest.raises(ValueError, match="hue_spread is in degrees, 0-360"):
        generate_dataset(tmp_path / "x", hue_spread=400)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------ command line

@pytest.mark.slow
def test_cli_generates_in_a_subprocess_and_prints_locations(tmp_path):
    env = {**os.environ, "D2_SMALLBN_DATASETS": str(tmp_path / "env")}
    command = [*installed("d2-smallbn-dataset"), "--seed", "3", "--num-train", "4", "--num-val", "2"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    root = tmp_path / "env" / "smallbn_shapes"
    assert str(root / "annotations" / "instances_train.json") in result.stdout
    assert str(root / "val") in result.stdout and "generated" in result.stdout
    assert "train: 4 images" in result.stdout and "small" in result.stdout and "large" in result.stdout
    check_coco_dataset(root / "annotations" / "instances_val.json", root / "val")


def test_cli_reuses_and_reports_bad_arguments_without_traceback(tmp_path, capsys):
    arguments = ["--root", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1"]
    assert cli.main(arguments) == 0 and "generated" in capsys.readouterr().out
    assert cli.main(arguments) == 0 and "reused" in capsys.readouterr().out
    assert cli.main(arguments + ["--force"]) == 0 and "generated" in capsys.readouterr().out
    assert cli.main(arguments + ["--num-val", "0"]) == 2
    assert "num_val" in capsys.readouterr().err


# ------------------------------------------------------------------ damaged images (decoded once, cached)

def truncate_after_header(path):
    """Keeps the JPEG header (size readable) and drops most of the compressed data."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 3])
    with Image.open(path) as img:  # the header still parses: only decoding finds the damage
        assert img.size[0] > 0


@pytest.fixture
def decode_counter(monkeypatch, tmp_path):
    """Counts full image decodes; the check's cache lives in a private folder."""
    monkeypatch.setenv("D2_SMALLBN_CACHE", str(tmp_path / "cache"))
    calls = []
    original = Image.Image.load

    def load(self):
        calls.append(getattr(self, "filename", None))
        return original(self)

    monkeypatch.setattr(Image.Image, "load", load)
    return calls


def test_truncated_image_is_found_by_decoding_and_named(copied, decode_counter):
    damaged = copied / "train" / "000003.jpg"
    truncate_after_header(damaged)
    with pytest.raises(DatasetError, match="cannot be decoded") as info:
        check_coco_dataset(copied / "annotations" / "instances_train.json", copied / "train")
    assert str(damaged) in str(info.value) and "Fix:" in str(info.value)


def test_images_are_decoded_once_and_rechecked_when_they_change(copied, decode_counter):
    json_path, images = copied / "annotations" / "instances_train.json", copied / "train"
    check_coco_dataset(json_path, images)
    assert len(set(decode_counter)) == SMALL["num_train"]  # every image decoded (PIL's load may recurse)
    decode_counter.clear()
    check_coco_dataset(json_path, images)
    assert decode_counter == []  # the second check reads sizes and times only
    touched = images / "000001.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10 ** 9))
    check_coco_dataset(json_path, images)
    assert set(decode_counter) == {str(touched)}  # a file with a new mtime is decoded again
    truncate_after_header(images / "000002.jpg")  # new size: found although it decoded before
    with pytest.raises(DatasetError, match="000002.jpg"):
        check_coco_dataset(json_path, images)


def test_make_dataset_names_and_regenerates_a_damaged_image(tmp_path, decode_counter):
    root = tmp_path / "shapes"
    generate_dataset(root, seed=0, **SMALL)
    original = file_hashes(root)
    damaged = root / "val" / "000001.jpg"
    truncate_after_header(damaged)
    repaired = generate_dataset(root, seed=0, **SMALL)
    assert not repaired.reused and [str(p) for p, _ in repaired.repaired] == [str(damaged)]
    assert file_hashes(root) == original  # the same bytes as first generated
    again = generate_dataset(root, seed=0, **SMALL)
    assert again.reused and again.repaired == ()
    annotations = root / "annotations" / "instances_train.json"
    annotations.write_text(annotations.read_text()[:1000])  # truncated: everything is regenerated
    rebuilt = generate_dataset(root, seed=0, **SMALL)
    assert not rebuilt.reused and [str(p) for p, _ in rebuilt.repaired] == [str(annotations)]
    assert file_hashes(root) == original


def test_make_dataset_cli_reports_the_repair(tmp_path, capsys, decode_counter):
    arguments = ["--root", str(tmp_path / "cli"), "--num-train", "2", "--num-val", "1"]
    assert cli.main(arguments) == 0
    capsys.readouterr()
    truncate_after_header(tmp_path / "cli" / "train" / "000000.jpg")
    assert cli.main(arguments) == 0
    out = capsys.readouterr().out
    assert "reused" not in out and "regenerated 1 damaged file" in out
    assert str(tmp_path / "cli" / "train" / "000000.jpg") in out and "truncated" in out
    check_coco_dataset(tmp_path / "cli" / "annotations" / "instances_train.json", tmp_path / "cli" / "train")


@pytest.mark.slow
def test_import_registers_the_names_touching_no_file_and_loading_says_how_to_generate(tmp_path):
    code = ("import d2_smallbn\n"
            "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
            "from d2_smallbn.data import DatasetError\n"
            "assert {'smallbn_shapes_train', 'smallbn_shapes_val'} <= set(DatasetCatalog.list())\n"
            "print(MetadataCatalog.get('smallbn_shapes_val').json_file)\n"
            "try:\n"
            "    DatasetCatalog.get('smallbn_shapes_train')\n"
            "except DatasetError as err:\n"
            "    print(err)\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "D2_SMALLBN_DATASETS": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    json_file, message = proc.stdout.strip().split("\n", 1)
    root = tmp_path / "data" / "smallbn_shapes"
    assert json_file == str(root / "annotations" / "instances_val.json")
    assert message.startswith("dataset 'smallbn_shapes_train' is not generated yet")
    assert f"d2-smallbn-dataset --root {root}" in message and "generate_dataset(" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and not any(work.iterdir())  # no file touched
