"""Generated detection images for tests (tests/ is on sys.path through tests/conftest.py, and spawned
DDP workers inherit it)."""
import os

import numpy as np
from PIL import Image


def make_images(folder, count=4, size=(96, 128), seed=0):
    """Images with a few filled rectangles (boxes and polygon masks), as detectron2 dataset dicts."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        h, w = size
        img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
        annos = []
        for _ in range(2):
            bw, bh = rng.integers(20, 50), rng.integers(20, 40)
            x0, y0 = rng.integers(0, w - bw), rng.integers(0, h - bh)
            cls = int(rng.integers(0, 2))
            img[y0:y0 + bh, x0:x0 + bw] = (200, 60, 60) if cls == 0 else (60, 200, 60)
            poly = [x0, y0, x0 + bw, y0, x0 + bw, y0 + bh, x0, y0 + bh]
            annos.append({"bbox": [float(x0), float(y0), float(bw), float(bh)], "bbox_mode": 1,
                          "category_id": cls, "segmentation": [[float(v) for v in poly]], "iscrowd": 0})
        path = os.path.join(folder, f"{i}.png")
        Image.fromarray(img).save(path)
        records.append({"file_name": path, "image_id": i, "height": h, "width": w, "annotations": annos})
    return records


def register_generated(name, folder, size=(64, 96)):
    """Registers ``name`` in detectron2's catalogs (replacing an earlier one) as images made by
    ``make_images`` in ``folder``, with their two classes; returns ``name``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    records = make_images(str(folder), size=size)
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(thing_classes=["red", "green"])
    return name
