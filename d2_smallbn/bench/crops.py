"""Object crops of a generated ``smallbn_shapes``-style set: the pretraining stage's classification
data (``d2_smallbn.bench.pretrain``).

Every annotated instance of a split becomes one RGB crop labelled with its category (the 5 shapes
of ``d2_smallbn.data.CATEGORIES``): the square around its box, widened by ``CONTEXT`` of the box's
longer side on each side (parts outside the image are black), resized to ``stored_side(side)``
pixels. Training takes a random ``side`` x ``side`` window of it and flips it half of the time;
evaluation takes the centre window. Occluded instances keep their occluders, as in detection.

Only numpy, PIL and torch are needed (no detectron2).
"""
import json
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from ..data import annotation_file, image_dir

CONTEXT = 0.15  # context around the box, as a fraction of its longer side, on each side
MARGIN = 1.25   # stored side / training side: room for the random window


def stored_side(side):
    """The side a crop is stored at, for training windows of ``side`` pixels."""
    return int(round(side * MARGIN))


def square_around(bbox, context=CONTEXT):
    """(left, top, right, bottom) of the square around a COCO box [x, y, w, h], widened by ``context``."""
    x, y, w, h = bbox
    half = max(w, h) * (0.5 + context)
    cx, cy = x + w / 2, y + h / 2
    return tuple(int(round(v)) for v in (cx - half, cy - half, cx + half, cy + half))


def object_crops(root, split, side):
    """(images: uint8 (N, 3, S, S) with S = stored_side(side), labels: int64 (N,) in 0..4) of every
    instance of ``split`` of the generated dataset at ``root``, in annotation order."""
    coco = json.loads(annotation_file(root, split).read_text())
    instances = defaultdict(list)
    for annotation in coco["annotations"]:
        instances[annotation["image_id"]].append(annotation)
    size = stored_side(side)
    crops, labels = [], []
    for image in coco["images"]:
        with Image.open(image_dir(root, split) / image["file_name"]) as picture:
            picture = picture.convert("RGB")
            for annotation in instances[image["id"]]:
                crop = picture.crop(square_around(annotation["bbox"])).resize((size, size), Image.BILINEAR)
                crops.append(np.asarray(crop))
                labels.append(annotation["category_id"] - 1)
    if not crops:
        raise ValueError(f"{annotation_file(root, split)}: no instances to crop")
    images = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()
    return images, torch.tensor(labels, dtype=torch.int64)


def training_windows(images, indices, side, generator):
    """A random ``side`` window of each crop ``images[indices]``, flipped left-right with probability
    1/2 (all draws from ``generator``): uint8 (len(indices), 3, side, side)."""
    room = images.shape[-1] - side
    offsets = torch.randint(0, room + 1, (len(indices), 2), generator=generator)
    flips = torch.rand(len(indices), generator=generator) < 0.5
    out = []
    for index, (dy, dx), flip in zip(indices.tolist(), offsets.tolist(), flips.tolist()):
        window = images[index, :, dy:dy + side, dx:dx + side]
        out.append(window.flip(-1) if flip else window)
    return torch.stack(out)


def centre_windows(images, side):
    """The centre ``side`` window of every crop: uint8 (N, 3, side, side)."""
    start = (images.shape[-1] - side) // 2
    return images[:, :, start:start + side, start:start + side]
