"""The built-in dataset ``smallbn_shapes`` and COCO dataset checks.

- ``generate_dataset(root=None, seed=0, num_train=400, num_val=100, ..., force=False)`` writes
  (or reuses) the dataset; the command is ``d2-smallbn-dataset``.
- ``register_shapes(root=None)`` registers ``smallbn_shapes_train`` / ``smallbn_shapes_val`` with
  detectron2 (needs detectron2; generates nothing).
- ``check_coco_dataset(json_path, image_root)`` raises ``DatasetError`` with the file, problem and fix;
  it decodes every image once (``damaged_images``; a record by size and mtime under ``cache_dir()``,
  ``$D2_SMALLBN_CACHE`` or ``~/.cache/d2_smallbn``).
- ``import d2_smallbn`` registers both splits at the default root (no file touched).

The default root is ``$D2_SMALLBN_DATASETS/smallbn_shapes``, with ``D2_SMALLBN_DATASETS``
defaulting to ``./datasets`` in the current working directory. Some masks are RLE: train with
``INPUT.MASK_FORMAT: "bitmask"``.
"""
from .checks import DatasetError, cache_dir, check_coco_dataset, damaged_images
from .scene import CATEGORIES
from .shapes import GeneratedDataset, annotation_file, default_root, generate_dataset, image_dir

__all__ = ["CATEGORIES", "DatasetError", "GeneratedDataset", "annotation_file", "cache_dir", "check_coco_dataset",
           "damaged_images", "default_root", "generate_dataset", "image_dir"]

try:
    import detectron2  # noqa: F401
except ImportError:  # generation and checks work without detectron2
    pass
else:
    from .registration import SHAPES_DATASETS, register_shapes

    __all__ += ["SHAPES_DATASETS", "register_shapes"]
