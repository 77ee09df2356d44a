"""Generate ``smallbn_shapes``, the built-in COCO-format instance-segmentation dataset.

Textured ellipses, rectangles, triangles, stars and rings (5 categories, ids 1-5; each shape's main
colour near its category's hue, within ``hue_spread`` degrees, see ``scene.py``) on cluttered
backgrounds (shading, translucent blobs, random lines), with occlusion, in images of 160-320 px
per side. Annotations describe the visible pixels only; see ``scene.py`` for how masks, areas and
boxes are made exactly consistent with pycocotools. Unoccluded shapes are polygons, the others
(occluded, border-clipped, rings) RLE: train Mask R-CNN with ``INPUT.MASK_FORMAT: "bitmask"``.

Layout under ``root``::

    train/000000.jpg ...   val/000000.jpg ...          (file_name is relative to the split folder)
    annotations/instances_train.json   annotations/instances_val.json
    manifest.json          generation parameters and per-split statistics; written last

Defaults: seed 0, 400 train / 100 val images, 3-8 shapes tried per image (about 5 instances per
image kept). The output is byte-identical for equal parameters; train and val use different
random streams, and image i depends only on (seed, split, i).

``root`` defaults to ``$D2_SMALLBN_DATASETS/smallbn_shapes``, where ``D2_SMALLBN_DATASETS``
defaults to ``./datasets`` (relative to the current working directory), like detectron2's
``DETECTRON2_DATASETS``.

Writing is atomic: a run generates into a temporary sibling directory and renames it into place,
holding a lock file (``.<name>.lock`` next to ``root``). A complete dataset with the same
parameters is reused untouched once every file checks out (annotation files parse, every image
decodes: each image is decoded once, then known by size and mtime); a damaged image is named in
``GeneratedDataset.repaired`` and written again in place (byte-identical), a damaged annotation file
makes it regenerate everything. Otherwise (other parameters, ``force=True``, or an interrupted
run) it is regenerated, and leftovers of interrupted runs are removed. The generator deletes only
what it wrote: a folder is replaced only when every file in it, at any depth, is one its
``manifest.json`` names (the manifest, the annotation files, the numbered images its parameters
give); any other file, a symbolic link, or a folder without the generator's manifest that holds
files makes it refuse, naming the folder and a file found.

Only numpy, PIL, OpenCV and pycocotools are needed here (no detectron2).
"""
import contextlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .checks import DatasetError, damaged_images
from .scene import CATEGORIES, LARGE_MIN_AREA, SMALL_MAX_AREA, SceneOptions, render_scene

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock
    fcntl = None

GENERATOR = "d2_smallbn.data.shapes"
GENERATOR_VERSION = 2     # bump whenever the rendering changes, so old datasets are regenerated
SPLITS = ("train", "val")
SPLIT_STREAMS = {"train": 0, "val": 1}
JPEG_QUALITY = 90
MANIFEST = "manifest.json"
_REPAIR_LEFTOVER = re.compile(r"(train|val)/\.\d{6}\.jpg\.tmp-\d+")


@dataclass(frozen=True)
class GeneratedDataset:
    """Where a generated dataset lives, whether it was reused, and per-split statistics."""

    root: Path
    reused: bool
    statistics: dict     # split -> {"images", "instances", "small", "medium", "large", ...}
    repaired: tuple = ()  # ((path, problem), ...): damaged files of an existing dataset, regenerated

    def annotation_file(self, split):
        return annotation_file(self.root, split)

    def image_dir(self, split):
        return image_dir(self.root, split)


def default_root():
    """``$D2_SMALLBN_DATASETS/smallbn_shapes`` (default ``./datasets/smallbn_shapes``), absolute."""
    return (Path(os.environ.get("D2_SMALLBN_DATASETS", "datasets")).expanduser() / "smallbn_shapes").absolute()


def annotation_file(root, split):
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_dir(root, split):
    return Path(root) / split


def generate_dataset(root=None, seed=0, num_train=400, num_val=100, min_side=160, max_side=320,
                     min_objects=3, max_objects=8, hue_spread=SceneOptions.hue_spread, force=False):
    """Write the dataset under ``root`` (see the module docstring), or reuse a complete one
    generated with the same parameters unless ``force``. Returns a ``GeneratedDataset``."""
    root = Path(root).expanduser().absolute() if root is not None else default_root()
    params = _parameters(seed, num_train, num_val, min_side, max_side, min_objects, max_objects, hue_spread)
    root.parent.mkdir(parents=True, exist_ok=True)
    repaired = ()
    with _exclusive_lock(root):
        manifest = None if force else _complete_manifest(root, params)
        if manifest is not None:
            damaged = _damaged_files(root, params)
            if not damaged:
                return GeneratedDataset(root, True, manifest["statistics"])
            repaired = tuple(damaged)
            if _rerender_images(root, params, [path for path, _ in damaged]):
                return GeneratedDataset(root, False, manifest["statistics"], repaired)
        _check_replaceable(root)
        _remove_leftovers(root)
        temporary = root.parent / f".{root.name}.tmp-{os.getpid()}"
        try:
            statistics = _write_dataset(temporary, params)
            _move_into_place(temporary, root)
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    return GeneratedDataset(root, False, statistics, repaired)


# ------------------------------------------------------------------ parameters and manifest

def _parameters(seed, num_train, num_val, min_side, max_side, min_objects, max_objects, hue_spread):
    params = {"seed": seed, "num_train": num_train, "num_val": num_val, "min_side": min_side,
              "max_side": max_side, "min_objects": min_objects, "max_objects": max_objects,
              "hue_spread": hue_spread}
    for key, value in params.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"generate_dataset: {key} must be a non-negative integer, got {value!r}")
    params = {key: int(value) for key, value in params.items()}
    if params["num_train"] < 1 or params["num_val"] < 1:
        raise ValueError("generate_dataset: num_train and num_val must be at least 1")
    if not 64 <= min_side <= max_side:
        raise ValueError(f"generate_dataset: need 64 <= min_side <= max_side, got {min_side}, {max_side}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"generate_dataset: need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0 <= hue_spread <= 360:
        raise ValueError(f"generate_dataset: hue_spread is in degrees, 0-360 (360: colour independent of the "
                         f"class), got {hue_spread}")
    return params


def _manifest(params, statistics):
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "parameters": params,
            "statistics": statistics}


def _complete_manifest(root, params):
    """The manifest of a complete dataset at ``root`` generated with ``params``, else None."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        expected = {"generator": GENERATOR, "version": GENERATOR_VERSION, "parameters": params}
        if any(manifest.get(key) != value for key, value in expected.items()):
            return None
        if all(_split_complete(root, split, manifest["statistics"][split]["images"]) for split in SPLITS):
            return manifest
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        pass   # unreadable or foreign manifest: regenerate
    return None


def _split_complete(root, split, num_images):
    images = image_dir(root, split)
    return (annotation_file(root, split).is_file() and images.is_dir()
            and len(list(images.glob("*.jpg"))) == num_images)


def _damaged_files(root, params):
    """``[(path, problem)]`` for the files of a complete-looking dataset that cannot be used: an
    annotation file that does not parse or lists other images, images that do not decode or have
    another size (each image is decoded once, see ``checks.damaged_images``)."""
    damaged = []
    for split in SPLITS:
        path = annotation_file(root, split)
        try:
            images = json.loads(path.read_text())["images"]
            expected = [f"{i:06d}.jpg" for i in range(params[f"num_{split}"])]
            if [image["file_name"] for image in images] != expected:
                raise ValueError("lists other images than were generated")
        except (OSError, ValueError, KeyError, TypeError) as err:
            damaged.append((path, f"cannot be used ({err})"))
            continue
        damaged += [(Path(file), problem) for file, problem, _ in damaged_images(image_dir(root, split), images)]
    return damaged


def _rerender_images(root, params, paths):
    """Writes the images at ``paths`` again (image i of a split depends only on the seed, the split
    and i, so they come out byte-identical to the originals). False, changing nothing, when a path
    is not one of the dataset's images."""
    targets = []
    for path in paths:
        split = path.parent.name
        if path.parent != image_dir(root, split) or split not in SPLITS or path.suffix != ".jpg" \
                or not path.stem.isdigit() or int(path.stem) >= params[f"num_{split}"]:
            return False
        targets.append((path, split, int(path.stem)))
    options = _scene_options(params)
    for path, split, index in targets:
        pixels, _ = _render(params["seed"], split, index, options)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        _save_jpeg(pixels, temporary)
        os.replace(temporary, path)
    return True


# ------------------------------------------------------------------ writing

def _scene_options(params):
    return SceneOptions(params["min_side"], params["max_side"], params["min_objects"], params["max_objects"],
                        params["hue_spread"])


def _render(seed, split, index, options):
    return render_scene(np.random.default_rng([seed, SPLIT_STREAMS[split], index]), options)


def _save_jpeg(pixels, path):
    Image.fromarray(pixels).save(path, format="JPEG", quality=JPEG_QUALITY, subsampling=0)


def _write_dataset(directory, params):
    options = _scene_options(params)
    (directory / "annotations").mkdir(parents=True)
    counts = {"train": params["num_train"], "val": params["num_val"]}
    statistics = {split: _write_split(directory, split, params["seed"], counts[split], options)
                  for split in SPLITS}
    _write_json(directory / MANIFEST, _manifest(params, statistics))   # last: marks completion
    return statistics


def _write_split(directory, split, seed, count, options):
    image_dir(directory, split).mkdir()
    images, annotations = [], []
    for index in range(count):
        pixels, instances = _render(seed, split, index, options)
        file_name = f"{index:06d}.jpg"
        _save_jpeg(pixels, image_dir(directory, split) / file_name)
        height, width = pixels.shape[:2]
        images.append({"id": index + 1, "file_name": file_name, "height": height, "width": width})
        for instance in instances:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "iscrowd": 0, **instance})
    _write_json(annotation_file(directory, split), _coco_document(split, images, annotations))
    return _split_statistics(images, annotations)


def _coco_document(split, images, annotations):
    return {
        "info": {"description": f"smallbn_shapes {split}: synthetic shapes for d2_smallbn",
                 "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CATEGORIES)],
    }


def _split_statistics(images, annotations):
    areas = np.array([a["area"] for a in annotations])
    return {
        "images": len(images),
        "instances": len(annotations),
        "small": int(np.sum(areas < SMALL_MAX_AREA)),
        "medium": int(np.sum((areas >= SMALL_MAX_AREA) & (areas < LARGE_MIN_AREA))),
        "large": int(np.sum(areas >= LARGE_MIN_AREA)),
        "rle_masks": sum(isinstance(a["segmentation"], dict) for a in annotations),
        "per_category": {name: sum(a["category_id"] == i + 1 for a in annotations)
                         for i, name in enumerate(CATEGORIES)},
    }


def _write_json(path, document):
    Path(path).write_text(json.dumps(document, sort_keys=True, separators=(",", ":")) + "\n")


# ------------------------------------------------------------------ atomic replacement

@contextlib.contextmanager
def _exclusive_lock(root):
    """Serialize generators of the same ``root`` across processes (POSIX only)."""
    if fcntl is None:
        yield
        return
    with open(root.parent / f".{root.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_replaceable(root):
    """Raises DatasetError, naming the folder and a file, unless every file under ``root`` is one its
    manifest names (``_own_entries``): the generator deletes only what it wrote."""
    if not root.exists():
        return
    if not root.is_dir() or root.is_symlink():
        raise DatasetError(f"{root}: exists and is not a directory. Fix: pass another --root or remove it.")
    foreign = _foreign_entries(root)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise DatasetError(
            f"{root}: holds {foreign[0]}{more}, which the shapes generator did not write (its manifest does not "
            "list it); refusing to replace the folder. Fix: pass another --root, or move those files out.")


def _own_entries(root):
    """The files (relative paths, '/'-separated) of the dataset that the manifest at ``root``
    describes: the manifest, the annotation files and the numbered images of each split. Empty
    without a manifest of this generator."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest["generator"] != GENERATOR:
            return set()
        counts = {split: int(manifest["parameters"][f"num_{split}"]) for split in SPLITS}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    own = {MANIFEST}
    for split in SPLITS:
        own.add(annotation_file(Path(), split).as_posix())
        own.update(f"{split}/{index:06d}.jpg" for index in range(counts[split]))
    return own


def _foreign_entries(root):
    """The files and symbolic links under ``root`` that its manifest does not name, and folders that
    cannot be read, sorted (folders themselves are not counted: replacing one loses only what it
    holds). A repair's temporary image (``train/.000012.jpg.tmp-PID``, left by an interrupted run)
    is the generator's own."""
    own = _own_entries(root)
    foreign = []

    def unreadable(error):
        foreign.append(Path(error.filename).relative_to(root).as_posix())

    for folder, dirs, files in os.walk(root, onerror=unreadable):
        for name in files + [name for name in dirs if os.path.islink(os.path.join(folder, name))]:
            relative = Path(folder, name).relative_to(root).as_posix()
            generated = relative in own or _REPAIR_LEFTOVER.fullmatch(relative)
            if os.path.islink(os.path.join(folder, name)) or not generated:
                foreign.append(relative)
    return sorted(foreign)


def _remove_leftovers(root):
    """Remove temporary directories of interrupted runs (safe: we hold the lock): the siblings
    ``.<name>.tmp-PID`` and ``.<name>.old-PID`` this generator names, and no other."""
    for kind in ("tmp", "old"):
        for leftover in root.parent.glob(f".{root.name}.{kind}-*"):
            if leftover.name.rpartition("-")[2].isdigit() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)


def _move_into_place(temporary, root):
    if not root.exists():
        os.rename(temporary, root)
        return
    old = root.parent / f".{root.name}.old-{os.getpid()}"
    os.rename(root, old)
    os.rename(temporary, root)
    shutil.rmtree(old, ignore_errors=True)
