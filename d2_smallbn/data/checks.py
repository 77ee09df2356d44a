"""Validate a COCO instances file and its images before registration or training.

``check_coco_dataset`` turns the usual failure modes (missing or truncated files, missing keys,
dangling ids, missing images, images that do not decode) into a ``DatasetError`` naming the file,
the problem and the fix, instead of a traceback from deep inside a data loader, possibly hours into
training. Every image is decoded once: a file whose size and modification time are unchanged since
it last decoded is not decoded again (``damaged_images``; the record is a small JSON file per image
folder under ``cache_dir()``). Needs only the standard library and PIL.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError

REQUIRED_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox", "area"),
    "categories": ("id", "name"),
}
MAX_EXAMPLES = 3


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file, problem and fix."""


def check_coco_dataset(json_path, image_root, require_segmentation=True, check_image_sizes=True, fix_hint=None):
    """Check ``json_path`` (COCO instances) and the images it lists under ``image_root``.

    Raises ``DatasetError`` on the first kind of problem found. ``fix_hint``, if given, replaces
    the generic fix in messages about the files themselves (e.g. "regenerate with ..."). Returns
    ``{"images": n, "annotations": m, "categories": [names]}``.
    """
    json_path = Path(json_path)
    coco = _read_json(json_path, fix_hint)
    required = dict(REQUIRED_KEYS)
    if require_segmentation:
        required["annotations"] += ("segmentation",)
    for section, keys in required.items():
        _check_entries(json_path, coco, section, keys, fix_hint)
    image_ids = _unique_ids(json_path, coco["images"], "images", fix_hint)
    category_ids = _unique_ids(json_path, coco["categories"], "categories", fix_hint)
    _unique_ids(json_path, coco["annotations"], "annotations", fix_hint)
    _check_references(json_path, coco["annotations"], "image_id", image_ids, "images", fix_hint)
    _check_references(json_path, coco["annotations"], "category_id", category_ids, "categories", fix_hint)
    _check_boxes(json_path, coco["annotations"], fix_hint)
    _check_images(json_path, Path(image_root), coco["images"], check_image_sizes, fix_hint)
    return {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
            "categories": [c["name"] for c in coco["categories"]]}


def _fail(path, problem, fix, fix_hint=None):
    raise DatasetError(f"{path}: {problem}. Fix: {fix_hint or fix}")


def _read_json(path, fix_hint):
    if not path.is_file():
        _fail(path, "annotation file does not exist", "check the path, or create the dataset first", fix_hint)
    try:
        with open(path, encoding="utf-8") as handle:
            coco = json.load(handle)
    except json.JSONDecodeError as err:
        _fail(path, f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}; truncated or "
                    "corrupted?)", "rewrite or re-download the file", fix_hint)
    except (UnicodeDecodeError, OSError) as err:
        _fail(path, f"cannot be read as UTF-8 JSON ({err})", "rewrite or re-download the file", fix_hint)
    if not isinstance(coco, dict):
        _fail(path, f"top level is a {type(coco).__name__}, not an object with 'images', 'annotations' and "
                    "'categories'", "write a COCO instances file", fix_hint)
    missing = [key for key in REQUIRED_KEYS if not isinstance(coco.get(key), list)]
    if missing:
        _fail(path, f"lacks the list(s) {missing} at the top level", "write a COCO instances file with "
              "'images', 'annotations' and 'categories' lists", fix_hint)
    return coco


def _check_entries(path, coco, section, keys, fix_hint):
    bad = [i for i, entry in enumerate(coco[section]) if not isinstance(entry, dict) or not set(keys) <= entry.keys()]
    if bad:
        first = coco[section][bad[0]]
        lacking = sorted(set(keys) - first.keys()) if isinstance(first, dict) else "everything (not an object)"
        _fail(path, f"{len(bad)} of {len(coco[section])} entries in '{section}' lack required keys; "
                    f"{section}[{bad[0]}] lacks {lacking}", f"give every entry in '{section}' the keys {list(keys)}",
              fix_hint)


def _unique_ids(path, entries, section, fix_hint):
    ids = [entry["id"] for entry in entries]
    if len(set(ids)) != len(ids):
        seen, duplicates = set(), []
        for value in ids:
            if value in seen:
                duplicates.append(value)
            seen.add(value)
        _fail(path, f"ids in '{section}' are not unique (e.g. {duplicates[:MAX_EXAMPLES]})",
              f"give every entry in '{section}' its own id", fix_hint)
    return set(ids)


def _check_references(path, annotations, key, known_ids, section, fix_hint):
    dangling = [a for a in annotations if a[key] not in known_ids]
    if dangling:
        examples = ", ".join(f"annotation {a['id']} -> {key} {a[key]!r}" for a in dangling[:MAX_EXAMPLES])
        _fail(path, f"{len(dangling)} annotations point at {key}s absent from '{section}' ({examples})",
              f"add the missing entries to '{section}' or remove those annotations", fix_hint)


def _check_boxes(path, annotations, fix_hint):
    def valid(box):
        return (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
                and box[2] >= 0 and box[3] >= 0)
    bad = [a for a in annotations if not valid(a["bbox"])]
    if bad:
        _fail(path, f"{len(bad)} annotations have a bbox that is not [x, y, width >= 0, height >= 0] "
                    f"(e.g. annotation {bad[0]['id']}: {bad[0]['bbox']!r})", "write boxes as [x, y, w, h]", fix_hint)


def _check_images(path, image_root, images, check_sizes, fix_hint):
    if not image_root.is_dir():
        _fail(image_root, f"image folder of {path} does not exist", "pass the folder that file_name is relative to",
              fix_hint)
    missing = [os.fspath(image_root / image["file_name"]) for image in images
               if not (image_root / image["file_name"]).is_file()]
    if missing:
        _fail(missing[0], f"image listed in {path} does not exist ({len(missing)} of {len(images)} missing: "
                          f"{', '.join(missing[:MAX_EXAMPLES])})",
              "restore the images or remove them from the annotation file", fix_hint)
    if check_sizes:
        damaged = damaged_images(image_root, images)
        if damaged:
            file, problem, fix = damaged[0]
            others = f" ({len(damaged)} of {len(images)} images damaged)" if len(damaged) > 1 else ""
            _fail(file, f"image listed in {path} {problem}{others}", fix, fix_hint)


# ------------------------------------------------------------------ decoding every image once

CACHE_ENV = "D2_SMALLBN_CACHE"
_CACHE_VERSION = 1


def cache_dir():
    """``$D2_SMALLBN_CACHE``, by default ``$XDG_CACHE_HOME/d2_smallbn`` (``~/.cache/d2_smallbn``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "d2_smallbn"


def _record_path(image_root):
    digest = hashlib.sha1(os.fsencode(os.path.abspath(image_root))).hexdigest()[:20]
    return cache_dir() / "decoded_images" / f"{digest}.json"


def damaged_images(image_root, images):
    """``[(path, problem, fix)]`` for the entries of ``images`` (COCO ``images``, relative
    ``file_name``) whose file under ``image_root`` cannot be decoded or whose decoded size differs
    from the entry's width and height. Missing files are the caller's to report.

    Each file is fully decoded (a JPEG cut after its header still opens and reports its size; only
    decoding finds the damage) unless it decoded before with the same byte size and modification
    time. The record of decoded files is best effort: without a writable cache folder every check
    decodes again."""
    image_root = Path(image_root)
    record_file = _record_path(image_root)
    try:
        record = json.loads(record_file.read_text())
        known = record["files"] if record.get("version") == _CACHE_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        known = {}
    seen, damaged = {}, []
    for image in images:
        file = image_root / image["file_name"]
        try:
            stat = file.stat()
        except OSError:
            continue  # missing: reported by the caller
        key = os.fspath(image["file_name"])
        entry = known.get(key)
        if isinstance(entry, list) and len(entry) == 4 and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            width, height = entry[2:]
        else:
            try:
                with Image.open(file) as handle:
                    handle.load()
                    width, height = handle.size
            except (UnidentifiedImageError, OSError, ValueError) as err:
                damaged.append((os.fspath(file), f"cannot be decoded ({err}; a truncated or corrupted file?)",
                                "restore the image file, or remove it from the annotation file"))
                continue
        seen[key] = [stat.st_size, stat.st_mtime_ns, width, height]
        if (width, height) != (image["width"], image["height"]):
            damaged.append((os.fspath(file), f"is {width}x{height} but the annotation file says "
                                             f"{image['width']}x{image['height']} (image id {image['id']})",
                            "fix the width/height in the annotation file"))
    if seen != {k: known.get(k) for k in seen}:
        _write_record(record_file, {"version": _CACHE_VERSION, "image_root": os.path.abspath(image_root),
                                    "files": {**known, **seen}})
    return damaged


def _write_record(path, record):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump(record, handle)
        os.replace(handle.name, path)
    except OSError:
        pass  # no cache: the next check decodes again
