"""A DatasetMapper for partial mask supervision: every box is kept, masks only where allowed.

detectron2's `annotations_to_instances` looks only at the first annotation to decide whether an
image has masks (later annotations without one raise KeyError; a first one without drops every
mask), and `filter_empty_instances` removes instances whose mask is empty, box included. Here each
instance carries ``gt_has_mask``; instances without a mask get a placeholder that no loss reads
(the ROI heads drop them before the mask branch) and keep training the RPN and box head.
"""

import copy
import logging
from typing import Iterable, List, Optional

import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks, polygons_to_bitmask
from PIL import UnidentifiedImageError

from .supervision import mask_class_ids

logger = logging.getLogger(__name__)


def mask_train_class_ids(cfg, dataset_names: Optional[Iterable[str]] = None) -> Optional[List[int]]:
    """:func:`~masklab_d2.data.supervision.mask_class_ids` of DATASETS.MASK_TRAIN_CLASSES on
    ``dataset_names`` (default: DATASETS.TRAIN); None for "all"."""
    return mask_class_ids(
        cfg.DATASETS.MASK_TRAIN_CLASSES, list(dataset_names or cfg.DATASETS.TRAIN)
    )


def _has_segmentation(annotation: dict) -> bool:
    segmentation = annotation.get("segmentation")
    if segmentation is None:
        return False
    if isinstance(segmentation, list):
        return any(len(polygon) >= 6 for polygon in segmentation)
    return True  # RLE dict or a bitmask array


def _box_polygon(box) -> List[np.ndarray]:
    x0, y0, x1, y1 = box
    return [np.array([x0, y0, x1, y0, x1, y1, x0, y1], dtype=np.float64)]


def annotations_to_partial_instances(annotations: List[dict], image_size, mask_format="polygon"):
    """Like detectron2's `annotations_to_instances`, with per-instance ``gt_has_mask``.

    Args:
        annotations: transformed annotations, each with "bbox", "category_id", "has_mask" and,
            when "has_mask" is true, "segmentation" (polygons or a bitmask array).
        image_size: (height, width).
        mask_format: "polygon" or "bitmask"; None creates no mask fields.

    Returns:
        Instances with gt_boxes, gt_classes and, with a mask format, gt_masks and gt_has_mask
        (placeholder masks where gt_has_mask is False: the box polygon, or an empty bitmask).
    """
    target = utils.annotations_to_instances(
        [{k: v for k, v in a.items() if k != "segmentation"} for a in annotations], image_size
    )
    if mask_format is None:
        return target
    has_mask = [bool(a["has_mask"]) for a in annotations]
    target.gt_has_mask = torch.tensor(has_mask, dtype=torch.bool)
    height, width = image_size
    if mask_format == "polygon":
        polygons = []
        for annotation, box in zip(annotations, target.gt_boxes.tensor.tolist()):
            if not annotation["has_mask"]:
                polygons.append(_box_polygon(box))
            elif isinstance(annotation["segmentation"], list):
                polygons.append(
                    [
                        np.asarray(p, dtype=np.float64)
                        for p in annotation["segmentation"]
                        if len(p) >= 6
                    ]
                )
            else:
                raise ValueError(
                    "An annotation has an RLE/bitmask segmentation but INPUT.MASK_FORMAT is "
                    "'polygon'; set INPUT.MASK_FORMAT 'bitmask'"
                )
        target.gt_masks = PolygonMasks(polygons)
    elif mask_format == "bitmask":
        masks = []
        for annotation in annotations:
            if not annotation["has_mask"]:
                masks.append(np.zeros((height, width), dtype=bool))
                continue
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, list):
                masks.append(polygons_to_bitmask(segmentation, height, width))
            elif isinstance(segmentation, dict):
                masks.append(mask_util.decode(segmentation).astype(bool))
            else:
                masks.append(np.asarray(segmentation).astype(bool))
        target.gt_masks = BitMasks(
            torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros((0, height, width), dtype=torch.bool)
        )
    else:
        raise ValueError(f"Unknown mask format {mask_format!r}: use 'polygon' or 'bitmask'")
    return target


def filter_empty_partial_instances(instances: Instances, box_threshold: float = 1e-5) -> Instances:
    """Drops instances with an empty box, and mask-carrying instances whose mask became empty."""
    keep = instances.gt_boxes.nonempty(threshold=box_threshold)
    if instances.has("gt_masks"):
        keep &= ~instances.gt_has_mask | instances.gt_masks.nonempty()
    return instances[keep]


class PartialMaskDatasetMapper(DatasetMapper):
    """DatasetMapper that keeps all boxes and only the masks of DATASETS.MASK_TRAIN_CLASSES.

    Instances get ``gt_has_mask``; an image whose instances all lack masks is a normal training
    image. An image that cannot be decoded is skipped with a warning naming it in training
    (detectron2's loader then draws another) and is an error in evaluation.
    """

    @configurable
    def __init__(
        self, is_train: bool = True, *, mask_class_ids: Optional[Iterable[int]] = None, **kwargs
    ):
        super().__init__(is_train, **kwargs)
        self.mask_class_ids = None if mask_class_ids is None else frozenset(mask_class_ids)

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["mask_class_ids"] = (
            mask_train_class_ids(cfg) if (cfg.MODEL.MASK_ON and is_train) else None
        )
        return ret

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            message = f"cannot read image {dataset_dict.get('file_name')!r}: {error}"
            if self.is_train:
                logger.warning(f"Skipping a training image: {message}")
                return None
            raise RuntimeError(message) from error

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        annotations = []
        for obj in dataset_dict.pop("annotations"):
            if obj.get("iscrowd", 0) != 0:
                continue
            obj = copy.copy(obj)
            if not self.use_keypoint:
                obj.pop("keypoints", None)
            has_mask = (
                self.use_instance_mask
                and _has_segmentation(obj)
                and (self.mask_class_ids is None or obj["category_id"] in self.mask_class_ids)
            )
            if not has_mask:
                obj.pop("segmentation", None)
            obj = utils.transform_instance_annotations(
                obj, transforms, image_shape, keypoint_hflip_indices=self.keypoint_hflip_indices
            )
            obj["has_mask"] = has_mask
            annotations.append(obj)
        instances = annotations_to_partial_instances(
            annotations,
            image_shape,
            mask_format=self.instance_mask_format if self.use_instance_mask else None,
        )
        if self.recompute_boxes and instances.has("gt_masks") and len(instances):
            # Boxes re-derived from cropped masks, where there is a mask to derive them from.
            boxes = instances.gt_boxes.tensor.clone()
            has_mask = instances.gt_has_mask
            boxes[has_mask] = instances.gt_masks[has_mask].get_bounding_boxes().tensor
            instances.gt_boxes = Boxes(boxes)
        dataset_dict["instances"] = filter_empty_partial_instances(instances)
