"""detectron2's PointRend mask head in the comparison (PartialPointRendMaskHead).

PointRend (Kirillov, Wu, He, Girshick, "PointRend: Image Segmentation as Rendering", CVPR 2020)
predicts a coarse mask per box and re-predicts the points where that mask is least certain, with
a small point head on fine-grained features, at ever higher resolution. detectron2 ships it as
``detectron2.projects.point_rend`` (``projects/PointRend`` in its repository; detectron2
installed from the repository, editable or not, includes it). It is used here as shipped: its
coarse head (``ConvFCHead``), point head (``StandardPointHead``), training-point sampling, losses
(``loss_mask`` on the coarse mask, ``loss_mask_point`` on the sampled points), subdivision
inference, config keys (its ``add_pointrend_config``, which ``add_masklab_config`` calls) and
parameter names (its checkpoints load). Per box, with the shapes sizing
(``configs/shapes/point_rend_R_18_FPN.yaml``)::

    p2 [N, C, H/4, W/4] --point_sample at the box's 14 x 14 bin centres--> [R, C, 14, 14]
    -> coarse head: 2x2 stride-2 conv, 2 FCs -> [R, K, 7, 7] coarse logits
    inference: the point head on a 14 x 14 grid, then twice: x2 upsampling and the N = 196 most
    uncertain points re-predicted from p2 and the coarse logits -> [R, K, 56, 56] logits

What the comparison's protocol needs around it is all this module adds:

* **Mask classes from the project's keys.** detectron2's coarse head predicts one mask per class
  (``ROI_HEADS.NUM_CLASSES``) whatever ``CLS_AGNOSTIC_MASK`` says, and its point head asserts
  that ``POINT_HEAD.NUM_CLASSES`` is that number. The head is built with K mask classes for both:
  K = 1 with ``ROI_MASK_HEAD.CLS_AGNOSTIC_MASK`` (the partially supervised configs), so classes
  without masks get a trained mask, else ``ROI_HEADS.NUM_CLASSES``. ``POINT_HEAD.NUM_CLASSES`` is
  thereby derived; its value in a config is not read.
* **Training batches without a masked instance.** Under partial supervision a batch may have no
  instance with a mask, on which point_rend's ``sample_point_labels`` fails (``torch.cat`` of an
  empty list). Such a batch gives zero losses that keep every parameter in the graph (DDP needs
  them), as the other heads' do.
* **Clear errors** for what PointRend cannot read: a mask pooler (it samples its own crops),
  point-head maps the mask branch does not get.

Partial supervision and ground-truth crops reach it through
:class:`~masklab_d2.modeling.PartialROIHeads`, as for every head: the head sees only instances
that have a mask, and with ``MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES`` their ``proposal_boxes`` are
the ground-truth boxes, which PointRend crops for its coarse mask and its mask targets and
samples its point labels in. Head-only training (``MODEL.FREEZE_DETECTOR``) trains
``roi_heads.mask_head``, all of PointRend; it has no BatchNorm, so PreciseBN leaves it alone.
"""

import contextlib
from collections import abc
from typing import Any, Dict, Iterator, Mapping

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY
from torch import nn

from masklab_d2.utils.detectron2 import point_rend_available, require_point_rend

from .contract import MaskHeadContract

__all__ = [
    "PartialPointRendMaskHead",
    "PointRendMaskHead",
    "point_rend_head_config",
]

if point_rend_available():
    from detectron2.projects.point_rend import PointRendMaskHead
else:  # every other head works without it; the PointRend head says how to install it
    PointRendMaskHead = None


def point_rend_head_config(cfg: CfgNode, input_shape: Mapping[str, ShapeSpec]) -> CfgNode:
    """The config detectron2's PointRendMaskHead is built with: ``cfg`` with K mask classes.

    Args:
        cfg: the model's config, with PointRend's keys.
        input_shape: the maps the mask branch gets from
            :class:`~masklab_d2.modeling.PartialROIHeads` (those of
            ``MODEL.ROI_MASK_HEAD.IN_FEATURES``), name -> ShapeSpec(channels, stride).

    Returns:
        A frozen copy of ``cfg`` whose ``MODEL.ROI_HEADS.NUM_CLASSES`` and
        ``MODEL.POINT_HEAD.NUM_CLASSES`` are K: 1 with ``MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK``,
        else ``MODEL.ROI_HEADS.NUM_CLASSES``.

    Raises:
        ValueError: with a mask pooler, no ``MODEL.ROI_MASK_HEAD.IN_FEATURES``, or point-head maps
            that the mask branch does not get.
    """
    mask_cfg = cfg.MODEL.ROI_MASK_HEAD
    if mask_cfg.POOLER_TYPE or not isinstance(input_shape, abc.Mapping):
        raise ValueError(
            "PointRend samples its own crops from MODEL.ROI_MASK_HEAD.IN_FEATURES: set "
            f'MODEL.ROI_MASK_HEAD.POOLER_TYPE to "" (got {mask_cfg.POOLER_TYPE!r})'
        )
    coarse = list(mask_cfg.IN_FEATURES)
    if not coarse:
        # masklab_d2's empty default means "the box branch's maps" to PartialROIHeads, but
        # PointRend's coarse head concatenates the crops of every map it names.
        raise ValueError(
            "PointRend's coarse head crops MODEL.ROI_MASK_HEAD.IN_FEATURES, which is empty: set "
            'it (detectron2\'s PointRend configs: ["p2"])'
        )
    points = list(cfg.MODEL.POINT_HEAD.IN_FEATURES) if mask_cfg.POINT_HEAD_ON else []
    missing = [f for f in dict.fromkeys(coarse + points) if f not in input_shape]
    if missing:
        raise ValueError(
            f"PointRend reads {missing} (MODEL.ROI_MASK_HEAD.IN_FEATURES, "
            f"MODEL.POINT_HEAD.IN_FEATURES) but the mask branch gets {sorted(input_shape)}, the "
            "maps of MODEL.ROI_MASK_HEAD.IN_FEATURES: the point head's maps must be among them"
        )
    num_mask_classes = 1 if mask_cfg.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES
    head_cfg = cfg.clone()
    head_cfg.defrost()
    head_cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_mask_classes
    head_cfg.MODEL.POINT_HEAD.NUM_CLASSES = num_mask_classes
    head_cfg.freeze()
    return head_cfg


if PointRendMaskHead is not None:

    @ROI_MASK_HEAD_REGISTRY.register()
    class PartialPointRendMaskHead(MaskHeadContract, PointRendMaskHead):
        """detectron2's PointRendMaskHead with K mask classes from the project's keys and zero
        losses for a training batch without instances (module docstring). Layers, parameter
        names, losses, point sampling and inference are PointRendMaskHead's, unchanged.

        Attributes (PointRendMaskHead's, among others):
            coarse_head (ConvFCHead): [R, C, P, P] crops -> [R, K, S, S] coarse logits (P:
                ``ROI_MASK_HEAD.POOLER_RESOLUTION``, S: ``OUTPUT_SIDE_RESOLUTION``).
            point_head (StandardPointHead): [R, C', n] point features and [R, K, n] coarse
                logits at the points -> [R, K, n] point logits.
            num_mask_classes (int): K.

        Records (:meth:`recording`, at inference): "coarse" [R, K, S, S] logits and "steps", a
        list of ([R, n, 2] points (box-normalised x, y), [R, K, n] point logits): the regular
        grid of the first subdivision step, then the most uncertain points of each later one.
        """

        def __init__(self, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]):
            """
            Args:
                cfg: the model's config (PointRend's keys: its add_pointrend_config).
                input_shape: the maps the head reads, name -> ShapeSpec(channels, stride).

            Raises:
                ValueError: see :func:`point_rend_head_config`.
            """
            head_cfg = point_rend_head_config(cfg, input_shape)
            super().__init__(head_cfg, input_shape)
            self.num_mask_classes = head_cfg.MODEL.ROI_HEADS.NUM_CLASSES

        def forward(self, features: Dict[str, torch.Tensor], instances: list):
            """PointRendMaskHead's forward; a training batch without instances gives zero losses.

            Args:
                features: name -> [N, C, H, W] maps (those of ``input_shape``).
                instances: per image, in training the instances to learn from (each with a
                    mask: ``proposal_boxes``, ``gt_classes``, ``gt_masks`` as BitMasks), in
                    inference the detections (``pred_boxes``, ``pred_classes``).

            Returns:
                Training: {"loss_mask": BCE of the coarse [R, K, S, S] logits, and with the point
                head "loss_mask_point": BCE at the sampled points}. Inference: ``instances``
                with ``pred_masks`` [R, 1, M, M] probabilities (M: the last subdivision's size).
            """
            if self.training and not any(len(x) for x in instances):
                zero = sum(p.sum() for p in self.parameters()) * 0.0
                losses = {"loss_mask": zero}
                if self.mask_point_on:
                    losses["loss_mask_point"] = zero
                return losses
            return super().forward(features, instances)

        @property
        def class_agnostic(self) -> bool:
            return self.num_mask_classes == 1

        @contextlib.contextmanager
        def recording(self) -> Iterator[Dict[str, Any]]:
            """MaskHeadContract.recording: every call of PointRendMaskHead's point-logit step
            is recorded (class docstring) by wrapping the bound method on this instance only,
            restored on leaving; layers and outputs are unchanged."""
            point_logits = self._get_point_logits
            steps = []

            def recorded(fine_grained_features, point_coords, coarse_logits):
                logits = point_logits(fine_grained_features, point_coords, coarse_logits)
                steps.append((point_coords.detach().float().cpu(), logits.detach().float().cpu()))
                self.remember(coarse=coarse_logits.float().cpu(), steps=steps)
                return logits

            with super().recording() as record:
                self._get_point_logits = recorded
                try:
                    yield record
                finally:
                    del self._get_point_logits  # the class's method again

        def extra_repr(self) -> str:
            size = self.coarse_head.output_shape[-1]
            text = (
                f"mask_classes={self.num_mask_classes}, coarse={size}x{size} from "
                f"{','.join(self.roi_pooler_in_features)}"
            )
            if self.mask_point_on:
                init = self.mask_point_subdivision_init_resolution
                final = init * 2**self.mask_point_subdivision_steps
                text += (
                    f", points from {','.join(self.mask_point_in_features)}: "
                    f"{self.mask_point_train_num_points} in training, {init}->{final} in "
                    f"inference ({self.mask_point_subdivision_num_points} per step)"
                )
            return text

else:

    @ROI_MASK_HEAD_REGISTRY.register()
    class PartialPointRendMaskHead(nn.Module):
        """Stands in for the PointRend head where detectron2.projects.point_rend is missing:
        building it raises an ImportError that says how to install it."""

        def __init__(self, *args, **kwargs):
            super().__init__()
            require_point_rend("MODEL.ROI_MASK_HEAD.NAME 'PartialPointRendMaskHead'")
