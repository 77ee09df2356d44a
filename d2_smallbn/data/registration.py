"""Register ``smallbn_shapes_train`` and ``smallbn_shapes_val`` in detectron2's catalogs.

``register_shapes(root=None)`` uses detectron2's own ``register_coco_instances`` (the files are
plain COCO), then wraps the loader so that loading first runs ``check_coco_dataset``: a missing or
broken dataset raises a ``DatasetError`` saying how to (re)generate it. Registration reads and
writes no files; generating is explicit (``d2-smallbn-dataset`` or ``generate_dataset``).
``import d2_smallbn`` calls ``register_shapes()`` with the default root.
"""
import functools
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .checks import DatasetError, check_coco_dataset
from .scene import CATEGORIES
from .shapes import annotation_file, default_root, image_dir

SHAPES_DATASETS = {"smallbn_shapes_train": "train", "smallbn_shapes_val": "val"}


def register_shapes(root=None):
    """Register both splits of the shapes dataset under ``root`` (default: ``default_root()``).

    Idempotent; registering again with another root replaces the earlier registration.
    Returns the dataset names.
    """
    root = Path(root).expanduser().absolute() if root is not None else default_root()
    for name, split in SHAPES_DATASETS.items():
        json_file, image_root = str(annotation_file(root, split)), str(image_dir(root, split))
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        metadata = {"thing_classes": list(CATEGORIES),
                    "thing_dataset_id_to_contiguous_id": {i + 1: i for i in range(len(CATEGORIES))}}
        register_coco_instances(name, metadata, json_file, image_root)
        DatasetCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(_load_checked, name, root, json_file, image_root))
    return tuple(SHAPES_DATASETS)


def generate_commands(root):
    """How to generate the dataset at ``root``: the installed command, and the same from Python."""
    return (f"`d2-smallbn-dataset --root {root}`, or "
            f"`python -c \"from d2_smallbn.data import generate_dataset; generate_dataset('{root}')\"`")


def _load_checked(name, root, json_file, image_root):
    """detectron2's COCO loader, after checking the files."""
    if not Path(json_file).exists() and not Path(image_root).exists():
        raise DatasetError(f"dataset '{name}' is not generated yet: {json_file} does not exist, nor does {image_root}. "
                           f"Fix: generate it with {generate_commands(root)} (about 15 s), or register another "
                           "root with d2_smallbn.data.register_shapes(root) / the D2_SMALLBN_DATASETS variable")
    hint = (f"regenerate the damaged files with {generate_commands(root)}: a damaged image is rewritten, a damaged "
            "annotation file rebuilds the dataset (add --force / force=True to rebuild it anyway)")
    try:
        check_coco_dataset(json_file, image_root, fix_hint=hint)
    except DatasetError as err:
        raise DatasetError(f"dataset '{name}': {err}") from None
    return load_coco_json(json_file, image_root, name)
