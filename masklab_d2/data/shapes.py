"""Synthetic "shapes" instance-segmentation dataset: deterministic, seeded, COCO format.

One file of about 700 lines on purpose: it runs alone (``python masklab_d2/data/shapes.py``, no
torch, no detectron2, no package import), so its shapes, scenes, splits and cache cannot be split
into modules of the package.

This is the built-in default dataset of masklab_d2. Mask heads (Mask R-CNN, MaskLab, BlendMask,
Deep-MARC) are trained and compared on it on CPU, including in the partially supervised protocol
(masks for one group of classes, boxes for all, mask AP reported separately per group).

Classes:
    16 classes with stable ids 1..16, in two groups of 8 that play the roles of the VOC and
    non-VOC groups of COCO (the group is each category's "supercategory"):

    * ``voc``: circle, triangle, square, star, ring, cross, heart, arrow.
    * ``nonvoc``: pentagon, hexagon, semicircle, frame, crescent, l_shape, t_shape, chevron.

What makes it a real test of mask heads:
    * Scale: object sizes are log-uniform from 8 px to 3/4 of the image, so a box head alone
      cannot give good masks at every scale and small objects are plentiful.
    * Topology and thin parts: ring and frame have holes, crescent is a disc minus an offset disc,
      cross, arrow, l_shape, t_shape and chevron have thin arms that a coarse mask smears out.
    * Occlusion: objects are drawn in z-order and each annotation is the visible mask (its full
      mask minus everything drawn later), which may be split into pieces.
    * Crowding: same-class neighbours are spawned on purpose, touching or overlapping, with
      similar colours, so instances of one class must be told apart at a shared boundary.
    * Appearance: rotation, moderate aspect changes, solid / gradient / striped / noisy fills,
      textured and cluttered backgrounds (gradients, smoothed noise, stripes, checkers, plus
      un-annotated lines, curves and blobs), contrast with the background that is sometimes low,
      uneven illumination, blur, sensor noise and JPEG compression.

Each image depends only on (split seed, image index), so the data do not depend on the number of
worker processes or their order. Data live in ``<root>/<GENERATOR_VERSION>/<split>/`` as
``images/*.jpg`` and ``annotations.json`` (segmentations as COCO RLE); `ensure_split` generates a
split on first use, safely when several processes ask for it at once.

Example:
    Generate the val split in the default root (if needed) and write side-by-side PNGs
    (image | annotations) of its first 8 images::

        python -m masklab_d2.data.shapes --split val --vis 8 --out /tmp/shapes_vis
"""

import argparse
import colorsys
import fcntl
import functools
import glob
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import cv2
import numpy as np
from pycocotools import mask as mask_util

__all__ = [
    "GENERATOR_VERSION",
    "SHAPES_CATEGORIES",
    "SHAPES_CLASS_GROUPS",
    "SPLITS",
    "default_root",
    "ensure_split",
    "generate_split",
    "render_annotations",
]

# Explicit name: under `python -m` this module's __name__ is "__main__".
logger = logging.getLogger("masklab_d2.data.shapes")

# Bump whenever the generated data change: it is part of the cache path, so stale caches are
# never mixed with new ones.
GENERATOR_VERSION = "v1"

# split name -> (num_images, seed). "test" is generated as "val" is, with its own seed: choices
# (sizings, schedules) are made on val and final numbers reported on test, never used to choose.
SPLITS = {
    "train": (2000, 1),
    "val": (500, 2),
    "tiny_train": (64, 3),
    "tiny_val": (32, 4),
    "test": (500, 5),
}

_GROUPS = (
    ("voc", ("circle", "triangle", "square", "star", "ring", "cross", "heart", "arrow")),
    (
        "nonvoc",
        ("pentagon", "hexagon", "semicircle", "frame", "crescent", "l_shape", "t_shape", "chevron"),
    ),
)
SHAPES_CLASS_GROUPS = {group: list(names) for group, names in _GROUPS}
SHAPES_CATEGORIES = [
    {"id": category_id, "name": name, "supercategory": group}
    for category_id, (group, name) in enumerate(
        ((group, name) for group, names in _GROUPS for name in names), start=1
    )
]

_MIN_VISIBLE_PIXELS = 20
_MIN_VISIBLE_FRACTION = 0.10
_MIN_OBJECT_SIZE = 8.0
_MAX_OBJECT_FRACTION = 0.75
_JPEG_QUALITY = 92
_SUBPIXEL_BITS = 4
_MAX_WORKERS = 4
# Below this a pool costs more to start than it saves.
_MIN_IMAGES_FOR_POOL = 48
_FILL_KINDS = ("solid", "gradient", "stripes", "texture")
_FILL_PROBABILITIES = (0.35, 0.25, 0.15, 0.25)


# ----------------------------------------------------------------------------- shape geometry
# Every builder returns [(polygon, value), ...] in unit coordinates (extent about [-1, 1]);
# value 1 fills, value 0 cuts a hole, applied in order.


def _normalized(points):
    """Centres a polygon's bounding box on the origin and scales its longer side to 2."""
    points = np.asarray(points, dtype=np.float64)
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - (low + high) / 2) / ((high - low).max() / 2)


def _regular_polygon(num_vertices, radius=1.0, start_angle=-math.pi / 2):
    angles = start_angle + np.arange(num_vertices) * (2 * math.pi / num_vertices)
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


_UNIT_SQUARE = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)


def _star(rng):
    radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
    angles = -math.pi / 2 + np.arange(10) * (math.pi / 5)
    return [(_normalized(radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)), 1)]


def _ring(rng):
    return [(_regular_polygon(64), 1), (_regular_polygon(48, rng.uniform(0.45, 0.7)), 0)]


def _cross(rng):
    arm = rng.uniform(0.18, 0.3)  # half thickness of each arm
    corners = [(arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm), (arm, 1)]
    right_half = np.array(corners, dtype=np.float64)
    return [(np.concatenate([right_half, right_half * [-1, -1]]), 1)]


def _heart(rng):
    angles = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x_coords = 16 * np.sin(angles) ** 3
    y_coords = -(
        13 * np.cos(angles) - 5 * np.cos(2 * angles) - 2 * np.cos(3 * angles) - np.cos(4 * angles)
    )
    return [(_normalized(np.stack([x_coords, y_coords], 1)), 1)]


def _arrow(rng):
    shaft, head, neck = rng.uniform(0.1, 0.2), rng.uniform(0.45, 0.65), rng.uniform(0.0, 0.35)
    points = [(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0), (neck, head), (neck, shaft)]
    return [(_normalized(points + [(-1, shaft)]), 1)]


def _frame(rng):
    return [(_UNIT_SQUARE, 1), (_UNIT_SQUARE * rng.uniform(0.5, 0.72), 0)]


def _crescent(rng):
    hole_radius, offset = rng.uniform(0.72, 0.92), rng.uniform(0.35, 0.6)
    # x where the two circles cross: the horns' tips. Shift so the visible part is centred.
    tip_x = min(1.0, (1 - hole_radius**2 + offset**2) / (2 * offset))
    shift = np.array([-(tip_x - 1) / 2, 0.0])
    hole = _regular_polygon(64, hole_radius) + [offset, 0.0]
    return [(_regular_polygon(64) + shift, 1), (hole + shift, 0)]


def _l_shape(rng):
    width = rng.uniform(0.45, 0.75)
    points = [(-1, -1), (-1 + width, -1), (-1 + width, 1 - width), (1, 1 - width), (1, 1), (-1, 1)]
    return [(np.array(points, dtype=np.float64), 1)]


def _t_shape(rng):
    width = rng.uniform(0.45, 0.75)
    half, bar = width / 2, -1 + width
    points = [(-1, -1), (1, -1), (1, bar), (half, bar), (half, 1), (-half, 1), (-half, bar)]
    return [(np.array(points + [(-1, bar)], dtype=np.float64), 1)]


def _chevron(rng):
    width = rng.uniform(0.55, 0.9)
    points = [(-1, -1), (-1 + width, -1), (1, 0), (-1 + width, 1), (-1, 1), (1 - width, 0)]
    return [(np.array(points, dtype=np.float64), 1)]


_HALF_CIRCLE_ANGLES = np.linspace(0, math.pi, 33)
# Shapes with no random parameters: one polygon each.
_FIXED_SHAPES = {
    "circle": _regular_polygon(64),
    "triangle": _normalized(_regular_polygon(3)),
    "square": _UNIT_SQUARE,
    "pentagon": _normalized(_regular_polygon(5)),
    "hexagon": _regular_polygon(6),
    "semicircle": _normalized(
        np.stack([np.cos(_HALF_CIRCLE_ANGLES), np.sin(_HALF_CIRCLE_ANGLES)], 1)
    ),
}
_SHAPE_BUILDERS = {
    **{
        name: (lambda rng, polygon=polygon: [(polygon, 1)])
        for name, polygon in _FIXED_SHAPES.items()
    },
    "star": _star,
    "ring": _ring,
    "cross": _cross,
    "heart": _heart,
    "arrow": _arrow,
    "frame": _frame,
    "crescent": _crescent,
    "l_shape": _l_shape,
    "t_shape": _t_shape,
    "chevron": _chevron,
}
_BUILDER_BY_ID = [None] + [_SHAPE_BUILDERS[category["name"]] for category in SHAPES_CATEGORIES]


def _rasterize(parts, obj, image_size):
    """Fills the shape's polygons, placed and posed as `obj` says, into a full-image bool mask."""
    stretch = math.sqrt(obj["aspect"])
    scale = np.array([stretch, 1 / stretch]) * obj["size"] / 2
    cos, sin = math.cos(obj["angle"]), math.sin(obj["angle"])
    rotation = np.array([[cos, -sin], [sin, cos]])
    mask = np.zeros((image_size, image_size), np.uint8)
    for polygon, value in parts:
        points = (polygon * scale) @ rotation.T + obj["center"]
        # Sub-pixel vertices, so small shapes keep their outline instead of snapping to a grid.
        fixed_point = np.round(points * (1 << _SUBPIXEL_BITS)).astype(np.int32)
        cv2.fillPoly(mask, [fixed_point], value, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return mask.astype(bool)


# ----------------------------------------------------------------------------- colours, textures


@functools.lru_cache(maxsize=4)
def _pixel_grid(image_size):
    ys, xs = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


def _random_colour(rng):
    hue, saturation, value = rng.random(), rng.random() ** 0.8, rng.uniform(0.1, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value), dtype=np.float32) * 255


def _shifted_colour(rng, colour, distance):
    direction = rng.standard_normal(3)
    shifted = colour + direction / (np.linalg.norm(direction) + 1e-6) * distance
    return np.clip(shifted, 0, 255).astype(np.float32)


def _smooth_noise(rng, height, width, cells, channels=1):
    """Cubic upsampling of coarse uniform noise: blotchy texture at a chosen scale, in ~[0, 1]."""
    coarse = rng.random((cells, cells, channels), dtype=np.float32)
    noise = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return noise.reshape(height, width, channels)


def _background_pattern(rng, ys, xs):
    image_size = xs.shape[0]
    colour_a = _random_colour(rng)
    colour_b = _shifted_colour(rng, colour_a, rng.uniform(20, 140))
    angle = rng.uniform(0, math.pi)
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    kind = rng.integers(4)
    if kind == 0:  # linear gradient
        weight = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    elif kind == 1:  # smoothed noise, tinted per channel so it is not just two colours
        cells = int(rng.integers(2, 14))
        weight = _smooth_noise(rng, image_size, image_size, cells)[..., 0]
        tint = (_smooth_noise(rng, image_size, image_size, cells, 3) - 0.5) * rng.uniform(0, 80)
        return colour_a + (colour_b - colour_a) * weight[..., None] + tint
    elif kind == 2:  # stripes, soft or hard
        period = rng.uniform(5, 48)
        weight = 0.5 + 0.5 * np.sin(ramp * (2 * math.pi / period) + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.5:
            weight = (weight > 0.5).astype(np.float32)
    else:  # rotated checkerboard
        period = rng.uniform(8, 48)
        across = -xs * math.sin(angle) + ys * math.cos(angle)
        weight = (np.floor(ramp / period) + np.floor(across / period)) % 2
    return colour_a + (colour_b - colour_a) * weight[..., None]


def _draw_clutter(rng, canvas):
    """Un-annotated lines, curves and blobs: edges and colour changes that are not objects."""
    image_size = canvas.shape[0]
    busyness = rng.random()

    def count(maximum):
        return int(rng.integers(0, 1 + round(maximum * busyness)))

    def colour():
        return tuple(int(channel) for channel in _random_colour(rng))

    for _ in range(count(10)):
        ends = np.round(rng.uniform(-0.1, 1.1, (2, 2)) * image_size).astype(int)
        start, end = (tuple(int(value) for value in point) for point in ends)
        thickness = int(rng.integers(1, 4))
        cv2.line(canvas, start, end, colour(), thickness, cv2.LINE_AA)
    steps = np.linspace(0, 1, 32)[:, None]
    for _ in range(count(5)):
        start, bend, end = rng.uniform(-0.1, 1.1, (3, 2)) * image_size
        curve = (1 - steps) ** 2 * start + 2 * (1 - steps) * steps * bend + steps**2 * end
        thickness = int(rng.integers(1, 4))
        cv2.polylines(canvas, [curve.astype(np.int32)], False, colour(), thickness, cv2.LINE_AA)
    for _ in range(count(12)):
        # Irregular star-convex blobs: radii vary enough that they match no shape class.
        num_vertices = int(rng.integers(6, 12))
        angles = np.sort(rng.uniform(0, 2 * math.pi, num_vertices))
        radii = rng.uniform(0.3, 1.0, num_vertices) * rng.uniform(2, 10)
        offsets = np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
        blob = (rng.uniform(0, image_size, 2) + offsets).astype(np.int32)
        cv2.fillPoly(canvas, [blob], colour(), cv2.LINE_AA)


def _background(rng, ys, xs):
    pattern = _background_pattern(rng, ys, xs)
    if rng.random() < 0.5:
        blend = rng.uniform(0.25, 0.6)
        pattern = pattern * (1 - blend) + _background_pattern(rng, ys, xs) * blend
    canvas = np.clip(pattern, 0, 255).astype(np.uint8)
    _draw_clutter(rng, canvas)
    return canvas.astype(np.float32)


def _pick_style(rng, local_mean, family_style):
    """Fill kind and colours with some contrast to the background under the object.

    The required contrast is itself random, so some objects stand out and some barely do.
    A same-class neighbour starts from its family's colour, so that neighbours look alike and
    their shared boundary is subtle but present.
    """
    min_contrast = rng.uniform(25, 80)
    if family_style is not None and rng.random() < 0.75:
        kind = family_style[0]
    else:
        kind = _FILL_KINDS[rng.choice(len(_FILL_KINDS), p=_FILL_PROBABILITIES)]
    for _ in range(8):
        if family_style is not None:
            primary = _shifted_colour(rng, family_style[1], rng.uniform(25, 60))
        else:
            primary = _random_colour(rng)
        if rng.random() < 0.7:
            secondary = _shifted_colour(rng, primary, rng.uniform(30, 110))
        else:
            secondary = _random_colour(rng)
        fill_mean = primary if kind == "solid" else (primary + secondary) / 2
        if np.linalg.norm(fill_mean - local_mean) >= min_contrast:
            break
    return kind, primary, secondary


def _fill_texture(rng, style, obj, ys, xs):
    """The object's colours over a crop whose pixel coordinates are `ys`, `xs`."""
    kind, primary, secondary = style
    height, width = xs.shape
    if kind == "solid":
        return np.broadcast_to(primary, (height, width, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xs - obj["center"][0]) * math.cos(angle) + (ys - obj["center"][1]) * math.sin(angle)
    size = obj["size"]
    if kind == "gradient":
        weight = np.clip(ramp / size + 0.5, 0, 1)
    elif kind == "stripes":
        period = rng.uniform(max(3.0, size / 10), max(4.0, size / 3))
        phase = rng.uniform(0, 2 * math.pi)
        weight = (np.sin(ramp * (2 * math.pi / period) + phase) > 0).astype(np.float32)
    else:
        weight = _smooth_noise(rng, height, width, int(rng.integers(2, 7)))[..., 0]
        weight = weight + rng.standard_normal((height, width), dtype=np.float32) * 0.1
    return primary + (secondary - primary) * weight[..., None]


# ----------------------------------------------------------------------------- composition


def _log_uniform(rng, low, high):
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _sample_objects(rng, image_size):
    """Classes and poses of the objects in one image, in drawing (back to front) order."""
    roll = rng.random()
    count = 0 if roll < 0.03 else 1 if roll < 0.08 else int(rng.integers(2, 10))
    max_size = _MAX_OBJECT_FRACTION * image_size

    def pose(size, center):
        return {
            "size": size,
            "center": center,
            "angle": rng.uniform(0, 2 * math.pi),
            "aspect": _log_uniform(rng, 0.7, 1.4),
        }

    objects = []
    for _ in range(count):
        size = _log_uniform(rng, _MIN_OBJECT_SIZE, max_size)
        center = rng.uniform(0.05, 0.95, 2) * image_size
        objects.append(
            {
                "category_id": int(rng.integers(1, len(SHAPES_CATEGORIES) + 1)),
                "family": None,
                **pose(size, center),
            }
        )
    if objects and rng.random() < 0.45:
        # Same-class neighbours that touch or overlap: instance separation within one class.
        parent = objects[int(rng.integers(len(objects)))]
        parent["family"] = 0
        for _ in range(int(rng.integers(1, 3))):
            size = float(
                np.clip(parent["size"] * rng.uniform(0.7, 1.3), _MIN_OBJECT_SIZE, max_size)
            )
            direction = rng.uniform(0, 2 * math.pi)
            distance = (parent["size"] + size) / 2 * rng.uniform(0.45, 0.95)
            offset = distance * np.array([math.cos(direction), math.sin(direction)])
            center = np.clip(parent["center"] + offset, 0, image_size - 1)
            objects.append(
                {"category_id": parent["category_id"], "family": 0, **pose(size, center)}
            )
    # Larger objects tend to be further back, as in photographs, so small ones are not all
    # buried; the noise still lets small objects be occluded.
    depth = [-math.log(obj["size"]) + rng.normal(0, 0.6) for obj in objects]
    return [objects[position] for position in np.argsort(depth, kind="stable")]


def _finish(rng, canvas, ys, xs):
    """Uneven illumination, camera blur and sensor noise over the whole composed image."""
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / xs.shape[0]
        canvas *= (1 + rng.uniform(0.1, 0.4) * (ramp - ramp.mean()))[..., None]
    if rng.random() < 0.4:
        canvas = cv2.GaussianBlur(canvas, (0, 0), rng.uniform(0.5, 1.0))
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(1, 7)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def _visible_annotations(full_masks, category_ids):
    """COCO annotations (without ids) of the visible part of each object, back to front."""
    covered = np.zeros_like(full_masks[0]) if full_masks else None
    annotations = []
    for full_mask, category_id in zip(reversed(full_masks), reversed(category_ids)):
        visible = full_mask & ~covered
        covered |= full_mask
        area = int(visible.sum())
        # A remnant this small is still in the image (re-rendering without it would change the
        # scene); only its annotation is dropped, like an unlabelled sliver in real data.
        if area < _MIN_VISIBLE_PIXELS or area < _MIN_VISIBLE_FRACTION * full_mask.sum():
            continue
        rle = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
        annotation = {
            "category_id": category_id,
            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            "area": area,
            "bbox": [float(value) for value in mask_util.toBbox(rle)],
            "iscrowd": 0,
        }
        annotations.append(annotation)
    return annotations[::-1]


def _render_image(seed, index, image_size):
    """Renders one image; returns (RGB uint8 image, annotations without ids)."""
    rng = np.random.default_rng([seed, index])
    ys, xs = _pixel_grid(image_size)
    canvas = _background(rng, ys, xs)
    full_masks, category_ids, family_style = [], [], None
    for obj in _sample_objects(rng, image_size):
        full_mask = _rasterize(_BUILDER_BY_ID[obj["category_id"]](rng), obj, image_size)
        rows, cols = np.flatnonzero(full_mask.any(axis=1)), np.flatnonzero(full_mask.any(axis=0))
        if rows.size == 0:
            continue
        window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        mask_crop, canvas_crop = full_mask[window], canvas[window]
        # Background mean includes objects drawn before: contrast is with what is really behind.
        style = _pick_style(
            rng,
            canvas_crop[mask_crop].mean(axis=0),
            family_style if obj["family"] is not None else None,
        )
        if obj["family"] is not None:
            family_style = style
        canvas_crop[mask_crop] = _fill_texture(rng, style, obj, ys[window], xs[window])[mask_crop]
        full_masks.append(full_mask)
        category_ids.append(obj["category_id"])
    return _finish(rng, canvas, ys, xs), _visible_annotations(full_masks, category_ids)


# ----------------------------------------------------------------------------- dataset I/O


def _render_and_save(task):
    images_dir, seed, index, image_size = task
    image, annotations = _render_image(seed, index, image_size)
    file_name = f"{index:06d}.jpg"
    image_path = os.path.join(images_dir, file_name)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(image_path, bgr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY]):
        raise OSError(f"could not write {image_path}")
    return file_name, annotations


def _default_num_workers():
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(available or 1, _MAX_WORKERS))


def generate_split(out_dir, num_images, seed, image_size=256, num_workers=None):
    """Generates a split: `out_dir/images/*.jpg` and `out_dir/annotations.json`.

    Args:
        out_dir: Folder to write into (created if missing).
        num_images: Number of images.
        seed: Split seed; image k is a function of (seed, k) only.
        image_size: Side of the square images in pixels.
        num_workers: Processes to render with; None for min(available cores, 4). Small splits
            and calls from daemonic processes (which may not have children) render serially.

    Returns:
        Path of the COCO json file.
    """
    images_dir = os.path.join(out_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    tasks = [(images_dir, seed, index, image_size) for index in range(num_images)]
    num_workers = _default_num_workers() if num_workers is None else num_workers
    if (
        num_workers <= 1
        or num_images < _MIN_IMAGES_FOR_POOL
        or multiprocessing.current_process().daemon
    ):
        results = [_render_and_save(task) for task in tasks]
    else:
        chunk_size = max(1, num_images // (num_workers * 8))
        # fork on every Python version: workers inherit this module instead of re-importing it by
        # name (the masklab_d2.data package needs detectron2; tests load this file on its own).
        # Workers must not call cv2.setNumThreads: in a forked child of a process whose OpenCV
        # thread pool is running, it waits forever for the parent's threads.
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            results = pool.map(_render_and_save, tasks, chunksize=chunk_size)

    images, annotations = [], []
    for image_id, (file_name, image_annotations) in enumerate(results, start=1):
        images.append(
            {"id": image_id, "file_name": file_name, "height": image_size, "width": image_size}
        )
        for annotation in image_annotations:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    dataset = {
        "info": {
            "description": "masklab_d2 synthetic shapes",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "num_images": num_images,
            "image_size": image_size,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": SHAPES_CATEGORIES,
    }
    # The json is written last and renamed into place, so its presence means the split is whole.
    json_path = os.path.join(out_dir, "annotations.json")
    with open(json_path + ".tmp", "w") as json_file:
        json.dump(dataset, json_file)
    os.replace(json_path + ".tmp", json_path)
    return json_path


def default_root():
    """Cache root: $MASKLAB_SHAPES_DIR if set, else ~/.cache/masklab_d2/shapes."""
    return os.path.expanduser(os.environ.get("MASKLAB_SHAPES_DIR") or "~/.cache/masklab_d2/shapes")


def ensure_split(split, root=None):
    """Returns (json_path, image_root) of a split, generating it on first use.

    Safe when several processes (e.g. a sweep's parallel training runs) call it at once: the
    first takes an exclusive lock, generates into a temporary sibling folder and renames it into
    place, so nobody ever sees a half-written split; the others wait and then reuse it.

    Args:
        split: A key of `SPLITS`.
        root: Cache root; None for `default_root()`. Data go to <root>/<GENERATOR_VERSION>/<split>.
    """
    if split not in SPLITS:
        raise KeyError(f"unknown shapes split {split!r}; known: {sorted(SPLITS)}")
    version_dir = os.path.join(root or default_root(), GENERATOR_VERSION)
    split_dir = os.path.join(version_dir, split)
    json_path = os.path.join(split_dir, "annotations.json")
    image_root = os.path.join(split_dir, "images")
    if os.path.exists(json_path):
        return json_path, image_root
    os.makedirs(version_dir, exist_ok=True)
    with open(os.path.join(version_dir, f".{split}.lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if os.path.exists(json_path):  # generated by another process while we waited
                return json_path, image_root
            num_images, seed = SPLITS[split]
            logger.info(
                "Generating shapes split %r (%d images) in %s", split, num_images, split_dir
            )
            start = time.perf_counter()
            # Holding the lock, any temporary sibling is a leftover of a killed generator.
            for leftover in glob.glob(os.path.join(version_dir, f".{split}.tmp-*")):
                shutil.rmtree(leftover, ignore_errors=True)
            temporary_dir = tempfile.mkdtemp(prefix=f".{split}.tmp-", dir=version_dir)
            try:
                generate_split(temporary_dir, num_images, seed)
                if os.path.isdir(split_dir):  # a leftover without its json: not a whole split
                    shutil.rmtree(split_dir)
                os.rename(temporary_dir, split_dir)
            except BaseException:
                shutil.rmtree(temporary_dir, ignore_errors=True)
                raise
            logger.info("Generated shapes split %r in %.1f s", split, time.perf_counter() - start)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return json_path, image_root


# ----------------------------------------------------------------------------- visualisation


def _instance_colour(position):
    hue = (position * 0.618034) % 1.0  # golden-ratio steps keep consecutive instances apart
    return tuple(int(channel * 255) for channel in colorsys.hsv_to_rgb(hue, 0.85, 1.0))


def render_annotations(image_rgb, annotations, categories):
    """Draws annotations over an image: translucent masks, outlines, boxes and class names.

    Args:
        image_rgb: HxWx3 uint8 RGB image.
        annotations: COCO annotations of the image, segmentations as RLE.
        categories: COCO categories, for the names.

    Returns:
        A new HxWx3 uint8 RGB image.
    """
    names = {category["id"]: category["name"] for category in categories}
    height, width = image_rgb.shape[:2]
    masks = []
    for annotation in annotations:
        rle = annotation["segmentation"]
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = mask_util.frPyObjects(rle, height, width)
        masks.append(mask_util.decode(rle).astype(bool))
    blended = image_rgb.astype(np.float32)
    for position, mask in enumerate(masks):
        blended[mask] = blended[mask] * 0.5 + np.array(_instance_colour(position)) * 0.5
    canvas = np.ascontiguousarray(blended.astype(np.uint8))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for position, (annotation, mask) in enumerate(zip(annotations, masks)):
        colour = _instance_colour(position)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, colour, 1)
        x, y, box_width, box_height = (int(round(value)) for value in annotation["bbox"])
        cv2.rectangle(canvas, (x, y), (x + box_width - 1, y + box_height - 1), colour, 1)
        label = names.get(annotation["category_id"], str(annotation["category_id"]))
        (text_width, text_height), baseline = cv2.getTextSize(label, font, 0.3, 1)
        text_x = min(max(x, 0), max(width - text_width, 0))
        text_y = min(max(y, text_height + baseline), height - 1)
        label_top_left = (text_x, text_y - text_height - baseline)
        cv2.rectangle(canvas, label_top_left, (text_x + text_width, text_y), colour, cv2.FILLED)
        cv2.putText(
            canvas, label, (text_x, text_y - baseline), font, 0.3, (0, 0, 0), 1, cv2.LINE_AA
        )
    return canvas


def main(argv=None):
    """CLI: ensure a split exists, and optionally write visualisations of its first images."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="val", choices=sorted(SPLITS))
    parser.add_argument("--root", default=None, help="cache root (default: default_root())")
    parser.add_argument(
        "--vis", type=int, default=0, help="write [image | annotations] PNGs of the first N images"
    )
    parser.add_argument("--out", default=None, help="folder for the visualisations")
    parser.add_argument("--generate-only", action="store_true", help="only generate the split")
    args = parser.parse_args(argv)
    if args.vis and not args.generate_only and not args.out:
        parser.error("--vis needs --out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    json_path, image_root = ensure_split(args.split, root=args.root)
    print(f"{args.split}: {json_path} (images in {image_root})")
    if args.generate_only or not args.vis:
        return 0
    with open(json_path) as json_file:
        dataset = json.load(json_file)
    by_image = {}
    for annotation in dataset["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    os.makedirs(args.out, exist_ok=True)
    for position, image in enumerate(dataset["images"][: args.vis]):
        bgr = cv2.imread(os.path.join(image_root, image["file_name"]), cv2.IMREAD_COLOR)
        image_rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        overlay = render_annotations(
            image_rgb, by_image.get(image["id"], []), dataset["categories"]
        )
        # Side by side, so masks can be checked against the pixels they cover.
        panel = np.concatenate([image_rgb, overlay], axis=1)
        out_path = os.path.join(args.out, f"shapes_{args.split}_{position}.png")
        cv2.imwrite(out_path, cv2.cvtColor(panel, cv2.COLOR_RGB2BGR))
        print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
