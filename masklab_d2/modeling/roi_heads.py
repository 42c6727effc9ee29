"""PartialROIHeads: detectron2's StandardROIHeads for partially supervised mask-head research.

One ROI-heads class serves every mask head; what it adds, and nothing head-specific:

* the mask branch trains only on instances that have a mask (``gt_has_mask`` from
  :class:`~masklab_d2.data.PartialMaskDatasetMapper`); the RPN and box branch train on all;
* ``MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES``: train the mask branch on the ground-truth boxes,
  each instance with a mask exactly once (Deep-MARC's crop-to-ground-truth), instead of on the
  foreground proposals; inference always uses the predicted boxes;
* ``MODEL.ROI_MASK_HEAD.IN_FEATURES``: the maps the mask branch reads, when they differ from the
  box branch's (e.g. MaskLab's dense branch and hypercolumn);
* ``MODEL.ROI_MASK_HEAD.MAX_TRAIN_ROIS_PER_IMAGE``: at most this many (randomly chosen) foreground
  proposals per image train the mask branch, bounding its cost (0: all);
* poolers by name, including "CropAndResize" and "DeformableCropAndResize" (box branch);
* mask heads that use image targets (:func:`~masklab_d2.modeling.contract.uses_image_targets`)
  also receive the image's ground truth (all instances, ``gt_has_mask`` included) in training,
  for dense auxiliary losses.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads import build_box_head, build_mask_head
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.roi_heads import select_foreground_proposals
from detectron2.structures import Instances

from .contract import uses_image_targets
from .poolers import build_roi_pooler


def instances_with_masks(instances: Instances) -> torch.Tensor:
    """Bool [N]: which (ground-truth or matched proposal) instances carry a real mask."""
    if instances.has("gt_has_mask"):
        return instances.gt_has_mask
    return torch.full(
        (len(instances),),
        instances.has("gt_masks"),
        dtype=torch.bool,
        device=instances.gt_classes.device,
    )


def random_subset(instances: Instances, limit: int) -> Instances:
    """At most ``limit`` of ``instances``, chosen at random (all of them when ``limit`` <= 0)."""
    if limit <= 0 or len(instances) <= limit:
        return instances
    return instances[torch.randperm(len(instances), device=instances.gt_classes.device)[:limit]]


@ROI_HEADS_REGISTRY.register()
class PartialROIHeads(StandardROIHeads):
    """StandardROIHeads with partial mask supervision and crop-to-ground-truth (module docstring)."""

    @configurable
    def __init__(
        self, *, train_mask_on_gt_boxes: bool = False, max_mask_rois_per_image: int = 0, **kwargs
    ):
        """
        Args:
            train_mask_on_gt_boxes: train the mask branch on ground-truth boxes.
            max_mask_rois_per_image: cap on the foreground proposals per image that train the
                mask branch (0: no cap).
            kwargs: see :class:`StandardROIHeads`.
        """
        super().__init__(**kwargs)
        if train_mask_on_gt_boxes and self.train_on_pred_boxes:
            raise ValueError(
                "train_mask_on_gt_boxes (MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES) and "
                "train_on_pred_boxes (MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES) both choose the "
                "boxes the mask branch trains on; set only one"
            )
        self.train_mask_on_gt_boxes = train_mask_on_gt_boxes
        self.max_mask_rois_per_image = max_mask_rois_per_image

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["train_mask_on_gt_boxes"] = cfg.MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES
        ret["max_mask_rois_per_image"] = cfg.MODEL.ROI_MASK_HEAD.MAX_TRAIN_ROIS_PER_IMAGE
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        in_features = list(cfg.MODEL.ROI_HEADS.IN_FEATURES)
        box_pooler, pooled_shape = build_roi_pooler(
            cfg.MODEL.ROI_BOX_HEAD, input_shape, in_features
        )
        box_head = build_box_head(cfg, pooled_shape)
        return {
            "box_in_features": in_features,
            "box_pooler": box_pooler,
            "box_head": box_head,
            "box_predictor": FastRCNNOutputLayers(cfg, box_head.output_shape),
        }

    @classmethod
    def _init_mask_head(cls, cfg, input_shape):
        if not cfg.MODEL.MASK_ON:
            return {}
        in_features = list(cfg.MODEL.ROI_MASK_HEAD.IN_FEATURES or cfg.MODEL.ROI_HEADS.IN_FEATURES)
        missing = [f for f in in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"mask head features {missing} are not produced by the backbone "
                f"(it has {sorted(input_shape)})"
            )
        if cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE:
            mask_pooler, head_input = build_roi_pooler(
                cfg.MODEL.ROI_MASK_HEAD, input_shape, in_features
            )
        else:
            mask_pooler, head_input = None, {f: input_shape[f] for f in in_features}
        return {
            "mask_in_features": in_features,
            "mask_pooler": mask_pooler,
            "mask_head": build_mask_head(cfg, head_input),
        }

    def forward(self, images, features, proposals, targets=None):
        """Same contract as :meth:`StandardROIHeads.forward`."""
        del images
        if not self.training:
            pred_instances = self._forward_box(features, proposals)
            return self.forward_with_given_boxes(features, pred_instances), {}
        if not targets:
            raise ValueError("PartialROIHeads needs 'targets' in training")
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals)
        losses.update(self._forward_mask(features, proposals, targets))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _mask_training_instances(
        self, proposals: List[Instances], targets: List[Instances]
    ) -> List[Instances]:
        """The instances the mask branch trains on; all carry a mask, and proposal_boxes."""
        if self.train_mask_on_gt_boxes:
            selected = []
            for targets_per_image in targets:
                instances = targets_per_image[instances_with_masks(targets_per_image)]
                instances.proposal_boxes = instances.gt_boxes
                selected.append(instances)
            return selected
        foreground, _ = select_foreground_proposals(proposals, self.num_classes)
        return [
            random_subset(x[instances_with_masks(x)], self.max_mask_rois_per_image)
            for x in foreground
        ]

    def _forward_mask(
        self,
        features: Dict[str, torch.Tensor],
        instances: List[Instances],
        targets: Optional[List[Instances]] = None,
    ):
        if not self.mask_on:
            return {} if self.training else instances
        extra = {}
        if self.training:
            instances = self._mask_training_instances(instances, targets)
            if uses_image_targets(self.mask_head):
                extra["gt_instances"] = targets
        if self.mask_pooler is not None:
            boxes = [x.proposal_boxes if self.training else x.pred_boxes for x in instances]
            head_input = self.mask_pooler([features[f] for f in self.mask_in_features], boxes)
        else:
            head_input = {f: features[f] for f in self.mask_in_features}
        return self.mask_head(head_input, instances, **extra)
