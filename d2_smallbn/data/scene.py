"""Render one synthetic scene: textured shapes with occlusion on a cluttered background.

``render_scene(rng)`` returns an RGB ``uint8`` image and its instances, each with a COCO
segmentation describing exactly the visible pixels of the shape:

- an unoccluded shape that lies inside the image keeps its polygon: the painted pixels are
  pycocotools' own rasterization of that polygon, so ``annToMask`` reproduces them exactly;
- an occluded or border-clipped shape, and every ring (it has a hole), gets a compressed RLE of
  its visible pixels.

Only numpy, OpenCV and pycocotools are needed. Each category has a hue (spaced evenly on the colour
circle); a shape's main colour takes a hue within ``hue_spread`` degrees around it, and its
texture, the texture's second colour, saturation and brightness are random. The outline is the
only exact cue; with ``hue_spread=360`` it is the only cue at all.
"""
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = ("ellipse", "rectangle", "triangle", "star", "ring")
SMALL_MAX_AREA = 32 ** 2   # COCO's small/medium/large boundaries (pixel area)
LARGE_MIN_AREA = 96 ** 2

SIZE_CLASS_WEIGHTS = (0.22, 0.40, 0.38)          # small, medium, large (before occlusion)
SMALL_AREA_RANGE = (200.0, 900.0)
MEDIUM_AREA_RANGE = (1300.0, 8000.0)
LARGE_AREA_RANGE = (12000.0, 30000.0)
MAX_LARGE_IMAGE_FRACTION = 0.35   # a large shape covers at most this fraction of the image
MIN_VISIBLE_FRACTION = 0.5       # placements hiding more of an earlier shape are rejected
DROP_VISIBLE_FRACTION = 0.25     # less visible shapes are not annotated (a safeguard: placement
                                 # and MIN_INSIDE_FRACTION already keep >= 0.4 visible)
MIN_INSIDE_FRACTION = 0.8        # at least this much of a shape's area lies inside the image
BORDER_OVERHANG = 0.15           # at most this much of a shape's width/height leaves the image
MIN_VISIBLE_PIXELS = 40
PLACEMENT_TRIES = 12
TEXTURES = ("solid", "stripes", "checker", "gradient", "noise")


@dataclass(frozen=True)
class SceneOptions:
    """Image size range (pixels, each side), number of shapes placed per image, and the width in
    degrees of the hue range of a shape's main colour around its category's hue."""

    min_side: int = 160
    max_side: int = 320
    min_objects: int = 3
    max_objects: int = 8
    hue_spread: int = 60


@dataclass(frozen=True)
class Shape:
    """A posed shape: flat outlines (rounded to 0.01 px) and its rasterized in-image mask."""

    category_id: int         # 1-based index into CATEGORIES
    outline: list            # [x0, y0, x1, y1, ...]
    hole: list               # outline of the hole (rings), else None
    mask: np.ndarray         # bool HxW: pycocotools' rasterization, clipped to the image
    polygon_area: float      # analytic area, including any part outside the image


def render_scene(rng, options=SceneOptions()):
    """Return ``(image, instances)``: an HxWx3 uint8 RGB image and a list of dicts with
    category_id, segmentation (polygon list or RLE dict), area and bbox [x, y, w, h]."""
    height, width = (int(v) for v in rng.integers(options.min_side, options.max_side + 1, size=2))
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int16)   # index of the topmost shape at each pixel
    shapes = []
    for candidate in _candidates(rng, height * width, options):
        shape = _place(rng, candidate, shapes, owner)
        if shape is not None:
            _paint(rng, image, shape.mask, _class_colour(rng, shape.category_id, options.hue_spread))
            owner[shape.mask] = len(shapes)
            shapes.append(shape)
    image += rng.uniform(2.0, 6.0) * rng.standard_normal(image.shape, dtype=np.float32)
    instances = [_instance(shape, owner == i) for i, shape in enumerate(shapes)]
    return np.clip(image, 0, 255).astype(np.uint8), [inst for inst in instances if inst]


# ------------------------------------------------------------------ layout

def _candidates(rng, image_area, options):
    """Yield (category_id, unit outline, unit hole, target area), roughly largest first, so that
    most occluders are smaller than what they cover."""
    count = int(rng.integers(options.min_objects, options.max_objects + 1))
    areas = [_target_area(rng, image_area) for _ in range(count)]
    order = np.argsort([-math.log(a) + rng.normal(0.0, 0.8) for a in areas], kind="stable")
    for index in order:
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))
        outline, hole = _unit_outline(rng, CATEGORIES[category_id - 1])
        yield category_id, outline, hole, areas[index]


def _target_area(rng, image_area):
    """A log-uniform area within a random COCO size class (large only if the image allows it)."""
    size_class = int(rng.choice(3, p=SIZE_CLASS_WEIGHTS))
    large_max = min(LARGE_AREA_RANGE[1], MAX_LARGE_IMAGE_FRACTION * image_area)
    if size_class == 2 and large_max <= LARGE_AREA_RANGE[0]:
        size_class = 1   # the image is too small for a large shape
    low, high = (SMALL_AREA_RANGE, MEDIUM_AREA_RANGE, (LARGE_AREA_RANGE[0], large_max))[size_class]
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _place(rng, candidate, shapes, owner):
    """Return the candidate posed at a random position that keeps it mostly inside the image and
    leaves every earlier shape at least MIN_VISIBLE_FRACTION visible; None if no try succeeds."""
    category_id, outline, hole, target_area = candidate
    scale = math.sqrt(target_area / (_polygon_area(outline) - _polygon_area(hole)))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    rotation = scale * np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    outline, hole = outline @ rotation, (None if hole is None else hole @ rotation)
    low, high = _centre_range(outline, owner.shape)
    visible = np.bincount(owner[owner >= 0], minlength=len(shapes))
    required = np.array([MIN_VISIBLE_FRACTION * s.mask.sum() for s in shapes])
    for _ in range(PLACEMENT_TRIES):
        shape = _shape_at(category_id, outline, hole, rng.uniform(low, high), owner.shape)
        if shape.mask.sum() < max(MIN_VISIBLE_PIXELS, MIN_INSIDE_FRACTION * shape.polygon_area):
            continue
        lost = np.bincount(owner[shape.mask & (owner >= 0)], minlength=len(shapes))
        if np.all(visible - lost >= required):
            return shape
    return None


def _centre_range(outline, image_size):
    """Centres for which at most BORDER_OVERHANG of the shape's extent leaves the image per side."""
    height, width = image_size
    lowest, highest = outline.min(axis=0), outline.max(axis=0)
    margin = BORDER_OVERHANG * (highest - lowest)
    low, high = -lowest - margin, np.array([width, height]) - highest + margin
    return np.minimum(low, high), np.maximum(low, high)


def _instance(shape, visible):
    """COCO fields for the visible part of ``shape``; None if it is nearly invisible."""
    height, width = visible.shape
    visible_pixels = int(visible.sum())
    if visible_pixels < max(MIN_VISIBLE_PIXELS, DROP_VISIBLE_FRACTION * shape.polygon_area):
        return None
    whole = visible_pixels == int(shape.mask.sum())
    if shape.hole is None and whole and _inside(shape.outline, height, width):
        segmentation = [shape.outline]
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        rle = mask_utils.encode(np.asfortranarray(visible, dtype=np.uint8))
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return {
        "category_id": shape.category_id,
        "segmentation": segmentation,
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    }


def _inside(flat, height, width):
    """Whether a flat polygon lies within the image."""
    xs, ys = flat[0::2], flat[1::2]
    return min(xs) >= 0 and min(ys) >= 0 and max(xs) <= width and max(ys) <= height


# ------------------------------------------------------------------ geometry

def _unit_outline(rng, name):
    """(outline, hole) as Nx2 arrays of about unit size centred at 0; hole is None but for rings."""
    if name == "ellipse":
        return _ellipse(rng.uniform(1.0, 1.8), 1.0), None
    if name == "rectangle":
        half = rng.uniform(1.0, 2.5) / 2.0
        return np.array([(-half, -0.5), (half, -0.5), (half, 0.5), (-half, 0.5)]), None
    if name == "triangle":
        # arcs between the vertices on a circle; each >= 60 deg keeps every angle >= 30 deg
        arcs = math.pi / 3.0 + math.pi * rng.dirichlet((2.0, 2.0, 2.0))
        angles = np.cumsum(arcs)
        return np.stack([np.cos(angles), np.sin(angles)], axis=1), None
    if name == "star":
        points = int(rng.integers(5, 7))
        radii = np.tile([1.0, rng.uniform(0.4, 0.55)], points)
        angles = np.arange(2 * points) * math.pi / points
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1), None
    if name == "ring":
        aspect, inner = rng.uniform(1.0, 1.25), rng.uniform(0.45, 0.65)
        return _ellipse(aspect, 1.0), _ellipse(aspect * inner, inner)
    raise ValueError(f"unknown shape {name!r}")


def _ellipse(radius_x, radius_y, vertices=48):
    """An axis-aligned ellipse as an Nx2 polygon."""
    angles = np.arange(vertices) * (2.0 * math.pi / vertices)
    return np.stack([radius_x * np.cos(angles), radius_y * np.sin(angles)], axis=1)


def _polygon_area(points):
    """Shoelace area of an Nx2 polygon (0 for None)."""
    if points is None:
        return 0.0
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _shape_at(category_id, outline, hole, centre, image_size):
    """The Shape of ``outline`` (and ``hole``) moved to ``centre``, rounded to 0.01 px."""
    flat_outline = [float(v) for v in np.round(outline + centre, 2).ravel()]
    flat_hole = None if hole is None else [float(v) for v in np.round(hole + centre, 2).ravel()]
    mask = _rasterize(flat_outline, image_size)
    area = _polygon_area(np.reshape(flat_outline, (-1, 2)))
    if flat_hole is not None:
        mask &= ~_rasterize(flat_hole, image_size)
        area -= _polygon_area(np.reshape(flat_hole, (-1, 2)))
    return Shape(category_id, flat_outline, flat_hole, mask, area)


def _rasterize(flat, image_size):
    """pycocotools' rasterization of a flat polygon, as a bool HxW mask."""
    height, width = image_size
    return decode_rle(mask_utils.frPyObjects([flat], height, width)[0]).astype(bool)


def decode_rle(rle):
    """``pycocotools.mask.decode`` of one RLE (HxW uint8), without its numpy-2 deprecation warning:
    pycocotools' mask array has an ``__array__`` without numpy 2's copy keyword, so numpy falls back
    to a plain conversion (the same array) and warns on every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
        return mask_utils.decode(rle)


# ------------------------------------------------------------------ appearance

def _background(rng, height, width):
    """Float32 HxWx3: a muted gradient, low-frequency shading, translucent blobs and random lines
    (clutter that is not an object)."""
    ramp = _ramp(rng, height, width)[..., None]
    image = _muted_colour(rng) * (1.0 - ramp) + _muted_colour(rng) * ramp
    image += np.float32(rng.uniform(8.0, 25.0)) * _smooth_noise(rng, height, width, rng.uniform(16.0, 48.0))[..., None]
    for _ in range(int(rng.integers(1, 4))):
        blob = _smooth_noise(rng, height, width, rng.uniform(10.0, 30.0)) > rng.uniform(1.0, 1.6)
        alpha = np.float32(rng.uniform(0.25, 0.55))
        image[blob] = (1.0 - alpha) * image[blob] + alpha * _any_colour(rng)
    canvas = np.ascontiguousarray(np.clip(image, 0, 255).astype(np.uint8))
    for _ in range(int(rng.integers(3, 13))):
        points = rng.uniform((0, 0), (width, height), size=(int(rng.integers(2, 5)), 2)).astype(np.int32)
        colour = tuple(float(c) for c in _any_colour(rng))
        cv2.polylines(canvas, [points], False, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return canvas.astype(np.float32)


def _paint(rng, image, mask, main_colour):
    """Fill ``mask`` with a random texture, computed over the mask's bounding box only."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    region = mask[y0:y1, x0:x1]
    image[y0:y1, x0:x1][region] = _texture(rng, y1 - y0, x1 - x0, main_colour)[region]


def _texture(rng, height, width, first):
    """An HxWx3 float32 patch: a random texture kind mixing ``first`` with a random vivid colour
    (``first`` alone when solid)."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    second = _vivid_colour(rng)
    if kind == "solid":
        weight = np.zeros((height, width), np.float32)
    elif kind == "stripes":
        weight = (_rotated_coordinate(rng, height, width) / rng.uniform(4.0, 12.0)) % 1.0 < 0.5
    elif kind == "checker":
        cell = rng.uniform(4.0, 10.0)
        angle = rng.uniform(0.0, math.pi / 2.0)
        u = _rotated_coordinate(rng, height, width, angle) // cell
        v = _rotated_coordinate(rng, height, width, angle + math.pi / 2.0) // cell
        weight = (u + v) % 2
    elif kind == "gradient":
        weight = _ramp(rng, height, width)
    else:
        weight = np.clip(0.5 + 0.35 * _smooth_noise(rng, height, width, rng.uniform(3.0, 8.0)), 0, 1)
    weight = np.asarray(weight, np.float32)[..., None]
    return first * (1.0 - weight) + second * weight


def _rotated_coordinate(rng, height, width, angle=None):
    """x * cos(angle) + y * sin(angle) at every pixel (angle random if None)."""
    angle = rng.uniform(0.0, math.pi) if angle is None else angle
    xs = np.arange(width, dtype=np.float32) * np.float32(math.cos(angle))
    ys = np.arange(height, dtype=np.float32) * np.float32(math.sin(angle))
    return ys[:, None] + xs[None, :]


def _ramp(rng, height, width):
    """A linear 0..1 ramp across the image in a random direction."""
    u = _rotated_coordinate(rng, height, width)
    return (u - u.min()) / np.float32(max(float(u.max() - u.min()), 1e-6))


def _smooth_noise(rng, height, width, cell):
    """Zero-mean, roughly unit-variance noise varying over about ``cell`` pixels."""
    grid = rng.standard_normal((int(height / cell) + 2, int(width / cell) + 2)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _hsv_colour(hue, saturation, value):
    """RGB float32 colour from HSV in [0, 1]."""
    hsv = np.array([[[hue * 180.0, saturation * 255.0, value * 255.0]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _vivid_colour(rng, hue=None):
    hue = rng.uniform(0, 1) if hue is None else hue
    return _hsv_colour(hue, rng.uniform(0.5, 1.0), rng.uniform(0.55, 1.0))


def _class_colour(rng, category_id, hue_spread):
    """A vivid colour whose hue lies within ``hue_spread`` degrees around the category's hue."""
    centre = (category_id - 1) / len(CATEGORIES)
    return _vivid_colour(rng, (centre + rng.uniform(-0.5, 0.5) * hue_spread / 360.0) % 1.0)


def _muted_colour(rng):
    return _hsv_colour(rng.uniform(0, 1), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.85))


def _any_colour(rng):
    return _hsv_colour(rng.uniform(0, 1), rng.uniform(0.0, 1.0), rng.uniform(0.15, 1.0))
