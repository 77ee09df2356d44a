"""The data loaders ``SmallBNTrainer`` builds: detectron2's, with errors that name the file or the
dataset and say how to fix it.

- ``FileNamingMapper`` wraps a dataset mapper: an image that cannot be read (missing, truncated,
  not an image) raises a ``DatasetError`` naming the file, instead of PIL's ``OSError: image file is
  truncated`` from somewhere in the middle of training;
- ``build_train_loader`` explains detectron2's "No valid data found" (nothing left after images
  without annotations are dropped): per dataset, how many images and annotations it has, and why.
"""
from detectron2.data import (DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader,
                             build_detection_train_loader)

from .checks import DatasetError

UNREADABLE_FIX = ("restore the file (a truncated copy or download?) or remove it from the dataset's annotation file; "
                  "`d2-smallbn-dataset` regenerates damaged files of the built-in smallbn_shapes, and "
                  "d2_smallbn.data.check_coco_dataset(json_file, image_root) finds every damaged image of a COCO "
                  "dataset before training")


class FileNamingMapper:
    """Calls ``mapper``; an ``OSError`` while reading a record's image becomes a ``DatasetError``
    naming the file (the original error is chained)."""

    def __init__(self, mapper):
        self.mapper = mapper

    def __call__(self, dataset_dict):
        try:
            return self.mapper(dataset_dict)
        except OSError as err:
            name = dataset_dict.get("file_name", "<record without file_name>")
            raise DatasetError(f"{name}: image cannot be read ({type(err).__name__}: {err}). "
                               f"Fix: {UNREADABLE_FIX}") from err


def build_train_loader(cfg):
    """detectron2's train loader with ``FileNamingMapper(DatasetMapper(cfg, True))``."""
    try:
        return build_detection_train_loader(cfg, mapper=FileNamingMapper(DatasetMapper(cfg, True)))
    except AssertionError as err:
        if "No valid data found" not in str(err) and "is empty" not in str(err):
            raise
        raise DatasetError(explain_no_training_data(cfg)) from err


def build_test_loader(cfg, dataset_name):
    return build_detection_test_loader(cfg, dataset_name, mapper=FileNamingMapper(DatasetMapper(cfg, False)))


def explain_no_training_data(cfg):
    """Why DATASETS.TRAIN left no training image: images and (non-crowd) annotations per dataset."""
    parts = []
    for name in cfg.DATASETS.TRAIN:
        records = DatasetCatalog.get(name)
        annotations = sum(len(r.get("annotations", ())) for r in records)
        usable = sum(any(a.get("iscrowd", 0) == 0 for a in r.get("annotations", ())) for r in records)
        source = MetadataCatalog.get(name).get("json_file")
        parts.append(f"'{name}'" + (f" ({source})" if source else "") + f": {len(records)} images, {annotations} "
                     f"annotations, {usable} images with a non-crowd annotation")
    filtering = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
    return ("no training data in DATASETS.TRAIN: " + "; ".join(parts) + ". "
            + ("DATALOADER.FILTER_EMPTY_ANNOTATIONS drops images without non-crowd annotations, so none was left. "
               if filtering else "")
            + "Fix: train on a dataset with annotations (check that the annotation file lists them and that their "
              "image_id values match the images' ids); a dataset meant only for evaluation belongs in DATASETS.TEST")
