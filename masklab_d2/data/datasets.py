"""Dataset registration: the built-in shapes data, and COCO-format datasets with checked loading.

Importing `masklab_d2.data` registers ``shapes_train``, ``shapes_val``, ``shapes_test``,
``shapes_tiny_train`` and ``shapes_tiny_val`` (generated on first use, see
:mod:`masklab_d2.data.shapes`) and gives
detectron2's built-in COCO datasets their VOC / non-VOC class groups.
"""

import json
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from . import shapes

logger = logging.getLogger(__name__)


class DatasetFormatError(ValueError):
    """A COCO-format annotation file that cannot be loaded as it is."""


def check_coco_json(json_file: str, max_examples: int = 5) -> dict:
    """Checks a COCO instance json before detectron2 loads it.

    Errors (raised, naming the file and the offending ids): missing top-level lists, duplicate
    image or annotation ids, annotations that reference a missing image or category, malformed
    boxes. Warnings (logged with examples): boxes that extend outside their image (they are
    clipped when loaded) and boxes wholly outside it (dropped).

    Returns:
        The parsed json.
    """
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{json_file} is not valid json: {error}") from error
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetFormatError(f"{json_file}: missing or non-list '{key}'")
    images = {}
    for image in data["images"]:
        if image["id"] in images:
            raise DatasetFormatError(f"{json_file}: duplicate image id {image['id']}")
        images[image["id"]] = image
    category_ids = {category["id"] for category in data["categories"]}
    duplicate_annotations = [
        k for k, n in Counter(a.get("id") for a in data["annotations"]).items() if n > 1
    ]
    if duplicate_annotations:
        raise DatasetFormatError(
            f"{json_file}: duplicate annotation ids {duplicate_annotations[:max_examples]}"
        )
    outside, partly_outside = [], []
    for annotation in data["annotations"]:
        where = f"{json_file}: annotation id {annotation.get('id')}"
        if annotation.get("image_id") not in images:
            raise DatasetFormatError(
                f"{where} references image_id {annotation.get('image_id')}, which is not in "
                f"'images'"
            )
        if annotation.get("category_id") not in category_ids:
            raise DatasetFormatError(
                f"{where} references category_id {annotation.get('category_id')}, which is not "
                f"in 'categories' (ids {sorted(category_ids)})"
            )
        bbox = annotation.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)
        ):
            raise DatasetFormatError(
                f"{where} has a malformed bbox {bbox!r}: expected [x, y, w, h]"
            )
        if bbox[2] < 0 or bbox[3] < 0:
            raise DatasetFormatError(f"{where} has a negative box size {bbox}")
        image = images[annotation["image_id"]]
        width, height = image.get("width"), image.get("height")
        if width is None or height is None:
            continue
        x, y, w, h = bbox
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            outside.append((annotation.get("id"), image.get("file_name"), bbox))
        elif x < 0 or y < 0 or x + w > width + 0.5 or y + h > height + 0.5:
            partly_outside.append((annotation.get("id"), image.get("file_name"), bbox))
    for found, what in (
        (partly_outside, "extend outside their image and are clipped"),
        (outside, "lie wholly outside their image and are dropped"),
    ):
        if found:
            examples = ", ".join(
                f"annotation {a} in {f} bbox {b}" for a, f, b in found[:max_examples]
            )
            logger.warning(f"{json_file}: {len(found)} boxes {what}, e.g. {examples}")
    return data


def load_coco_json_checked(
    json_file: str, image_root: str, dataset_name: Optional[str] = None
) -> List[dict]:
    """detectron2's `load_coco_json` after :func:`check_coco_json`."""
    check_coco_json(json_file)
    return load_coco_json(json_file, image_root, dataset_name)


def register_coco_partial(
    name: str,
    json_file: str,
    image_root: str,
    class_groups: Optional[Dict[str, Sequence[str]]] = None,
    **metadata,
) -> None:
    """Registers a COCO-format instance dataset with checked loading and optional class groups.

    Like detectron2's `register_coco_instances`; datasets with COCO's 80 categories get the
    VOC / non-VOC groups without passing ``class_groups``.
    """
    DatasetCatalog.register(name, lambda: load_coco_json_checked(json_file, image_root, name))
    extra = {"class_groups": {k: list(v) for k, v in class_groups.items()}} if class_groups else {}
    MetadataCatalog.get(name).set(
        json_file=json_file, image_root=image_root, evaluator_type="coco", **extra, **metadata
    )


def register_coco_datasets(specs: Sequence[str]) -> List[str]:
    """Registers datasets given as "NAME=JSON:IMAGE_ROOT" strings (command-line options).

    Names already registered are left as they are. Returns the names.
    """
    names = []
    for spec in specs or []:
        name, _, paths = spec.partition("=")
        json_file, _, image_root = paths.partition(":")
        if not (name and json_file and image_root):
            raise ValueError(f"expected NAME=JSON:IMAGE_ROOT, got {spec!r}")
        if name not in DatasetCatalog.list():
            register_coco_partial(name, json_file, image_root)
        names.append(name)
    return names


def _load_shapes(split: str, dataset_name: str, root: Optional[str]) -> List[dict]:
    json_file, image_root = shapes.ensure_split(split, root=root)
    return load_coco_json_checked(json_file, image_root, dataset_name)


def register_shapes_datasets(root: Optional[str] = None) -> List[str]:
    """Registers every shapes split as ``shapes_<split>``; data is generated on first use.

    Args:
        root: cache folder; default :func:`masklab_d2.data.shapes.default_root` (the
            MASKLAB_SHAPES_DIR environment variable, else ~/.cache/masklab_d2/shapes).

    Returns:
        The registered dataset names.
    """
    categories = sorted(shapes.SHAPES_CATEGORIES, key=lambda c: c["id"])
    names = []
    for split in shapes.SPLITS:
        name = f"shapes_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(
            name, lambda split=split, name=name: _load_shapes(split, name, root)
        )
        split_dir = os.path.join(root or shapes.default_root(), shapes.GENERATOR_VERSION, split)
        MetadataCatalog.get(name).set(
            thing_classes=[c["name"] for c in categories],
            thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
            class_groups={
                group: list(members) for group, members in shapes.SHAPES_CLASS_GROUPS.items()
            },
            json_file=os.path.join(split_dir, "annotations.json"),
            image_root=os.path.join(split_dir, "images"),
            evaluator_type="coco",
        )
        names.append(name)
    return names


def ensure_materialized(dataset_name: str):
    """Loads a dataset once if its metadata is not complete yet, and returns the metadata.

    A lazily generated dataset has no json on disk before its first load, and a COCO-format
    dataset registered with `register_coco_instances` gets ``thing_classes`` only when loaded;
    evaluators and the mapper need both before anything else loads the data.
    """
    metadata = MetadataCatalog.get(dataset_name)
    json_file = metadata.get("json_file")
    if (json_file is not None and not os.path.exists(json_file)) or not metadata.get(
        "thing_classes"
    ):
        DatasetCatalog.get(dataset_name)
    return metadata
