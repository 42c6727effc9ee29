"""BlendMaskHead: BlendMask's blender as a two-stage (ROI) mask head for detectron2.

Per image, the bottom module turns FPN levels (MODEL.BLENDMASK.BOTTOM_IN_FEATURES, p3-p5) into K
bases at stride 4. Per ROI, an ROIPooler (ROIAlignV2, FPN level assignment over the head's
MODEL.ROI_MASK_HEAD.IN_FEATURES, p2-p5) pools M x M box features, and the attention network turns
them into K x M x M attentions; the bases are RoIAligned at R x R with the same boxes, and the
blender gives class-agnostic R x R mask logits. Boxes: ``proposal_boxes`` in training (ground-truth
boxes with MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES), ``pred_boxes`` at test time.

Training losses: ``loss_mask``, detectron2's ``mask_rcnn_loss`` (per-pixel sigmoid BCE against
``gt_masks.crop_and_resize(proposal_boxes, R)``, averaged over ROIs and pixels), and, with
MODEL.BLENDMASK.SEMANTIC_LOSS_WEIGHT > 0, ``loss_basis_sem``: AdelaiDet's auxiliary per-pixel
cross entropy of a small segmentation head on the first bottom level against a thing-only
semantic map built from the image's ground truth, in which the boxes of instances without masks
are ignored (partial supervision: their pixels are never called background). The segmentation
head reads the FPN level itself, as AdelaiDet's, so the loss shapes the shared features; under
MODEL.FREEZE_DETECTOR those are frozen and the loss could not reach the masks, so it is switched
off (no segmentation head is built).

Training boxes: BlendMask trains the blender on ground-truth boxes ("During training, ground truth
boxes are used as the proposals"), and so do the BlendMask configs
(MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES: True); training on foreground proposals is the
``configs/shapes-partial/blendmask_R_18_FPN.yaml`` variant.

The bases are RoIAligned with ROIAlignV2, sampling_ratio 1, as AdelaiDet's blender: detectron2
crops the targets with ROIAlignV2 too (``BitMasks.crop_and_resize``), so every blended pixel sits
exactly on its target pixel's centre. masklab_d2's crop_and_resize places its samples on the box
edges instead (half a bin off the targets), and its box-coordinate gradient is of no use here.

NOTE: the head is built with POOLER_TYPE "" (it pools for itself), see configs/*/blendmask_*.yaml.
"""

import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detectron2.structures import BitMasks, Instances, PolygonMasks
from torch import nn

from masklab_d2.layers.blender import (
    SEMANTIC_IGNORE_INDEX,
    AttentionNet,
    BasisSemanticHead,
    BottomModule,
    blend,
    thing_semantic_target,
)

from .contract import MaskHeadContract
from .roi_heads import instances_with_masks

__all__ = ["BlendMaskHead", "semantic_targets"]


def _bit_masks(gt_masks, keep: torch.Tensor, image_size) -> torch.Tensor:
    """bool [P, H, W] image-resolution masks of the instances selected by ``keep``."""
    if isinstance(gt_masks, BitMasks):
        return gt_masks.tensor[keep].bool()
    if isinstance(gt_masks, PolygonMasks):
        height, width = image_size
        return BitMasks.from_polygon_masks(gt_masks[keep], height, width).tensor.bool()
    raise TypeError(f"gt_masks must be BitMasks or PolygonMasks, got {type(gt_masks).__name__}")


def semantic_targets(gt_instances: List[Instances], size, stride: int) -> torch.Tensor:
    """Thing-only semantic targets of a batch (see :func:`thing_semantic_target`).

    Args:
        gt_instances: per image, all ground-truth instances (``gt_boxes``, ``gt_classes`` and,
            where any instance has a mask, ``gt_masks`` with ``gt_has_mask``).
        size: (h, w) of the (padded) feature map the targets are for.
        stride: its stride.

    Returns:
        Tensor[B, h, w] int64: 0 background, class + 1 on masks, SEMANTIC_IGNORE_INDEX in the
        boxes of instances without a mask.
    """
    targets = []
    for instances in gt_instances:
        has_mask = instances_with_masks(instances)
        if has_mask.any():
            masks = _bit_masks(instances.gt_masks, has_mask, instances.image_size)
        else:
            masks = torch.zeros((0, 1, 1), dtype=torch.bool, device=has_mask.device)
        targets.append(
            thing_semantic_target(
                masks,
                instances.gt_classes[has_mask],
                instances.gt_boxes.tensor[~has_mask],
                size,
                stride,
            )
        )
    return torch.stack(targets)


logger = logging.getLogger(__name__)


@ROI_MASK_HEAD_REGISTRY.register()
class BlendMaskHead(MaskHeadContract, nn.Module):
    """BlendMask's bottom module, attention network and blender as an ROI mask head.

    Called by :class:`~masklab_d2.modeling.PartialROIHeads` as ``head(features, instances)``
    (plus ``gt_instances`` in training, for the semantic loss). Masks are class-agnostic.

    Records (:meth:`recording`): "bases" [B, K, H/4, W/4] and the ROIs' "attentions" logits
    [N, K, M, M].
    """

    uses_image_targets = True  # set False on instances without the semantic loss
    class_agnostic = True

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        bottom_in_features: Sequence[str] = ("p3", "p4", "p5"),
        num_bases: int = 4,
        attn_size: int = 14,
        bottom_resolution: int = 56,
        top_interp: str = "bilinear",
        bottom_conv_dim: int = 128,
        bottom_num_convs: int = 3,
        norm: str = "BN",
        attn_num_convs: int = 2,
        attn_conv_dim: int = 128,
        attn_sampling_ratio: int = 1,
        semantic_loss_weight: float = 0.3,
        num_classes: int = 80,
        loss_weight: float = 1.0,
        vis_period: int = 0,
    ):
        """
        Args:
            input_shape: the feature maps the head receives, finest first; the attention pooler
                assigns boxes to their levels (they must form a stride pyramid, e.g. p2-p5).
            bottom_in_features: the maps the bottom module fuses (finest first), a subset of
                ``input_shape``; the bases come out at half the first one's stride.
            num_bases: K.
            attn_size: M, the size of the pooled box features and of the attentions.
            bottom_resolution: R, the size of the base crops and of the predicted masks.
            top_interp: F.interpolate mode that resizes the attentions from M to R.
            bottom_conv_dim, bottom_num_convs, norm: the bottom module (see
                :class:`~masklab_d2.layers.blender.BottomModule`); ``norm`` also in the seg head.
            attn_num_convs, attn_conv_dim: the attention network's 3x3 convs and their width.
            attn_sampling_ratio: sampling ratio of the attention pooler (0: adaptive); 1, one
                sample per bin, is the cropping convention every head's crops share.
            semantic_loss_weight: weight of ``loss_basis_sem``; 0 builds no segmentation head.
            num_classes: foreground classes (the semantic head predicts num_classes + 1).
            loss_weight: weight of ``loss_mask``.
            vis_period: detectron2's mask visualisation period (0: never).
        """
        super().__init__()
        attn_in_features = list(input_shape)
        missing = [f for f in bottom_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"bottom_in_features (MODEL.BLENDMASK.BOTTOM_IN_FEATURES) {missing} are not among "
                f"input_shape's features {attn_in_features} (MODEL.ROI_MASK_HEAD.IN_FEATURES; "
                "lazy: roi_heads.mask_in_features)"
            )
        if not bottom_in_features:
            raise ValueError("bottom_in_features (MODEL.BLENDMASK.BOTTOM_IN_FEATURES) is empty")
        first_stride = input_shape[bottom_in_features[0]].stride
        if first_stride % 2:
            raise ValueError(
                f"the first of bottom_in_features (MODEL.BLENDMASK.BOTTOM_IN_FEATURES) must have an "
                f"even stride, got {first_stride}"
            )
        channels = {input_shape[f].channels for f in attn_in_features}
        if len(channels) != 1:
            raise ValueError(f"the mask head's features must share a channel count, got {channels}")

        self.bottom_in_features = list(bottom_in_features)
        self.attn_in_features = attn_in_features
        self.bases_stride = first_stride // 2
        self.semantic_stride = first_stride
        self.top_interp = top_interp
        self.loss_weight = loss_weight
        self.semantic_loss_weight = semantic_loss_weight
        self.vis_period = vis_period

        self.bottom = BottomModule(
            [input_shape[f].channels for f in bottom_in_features],
            num_bases=num_bases,
            conv_dim=bottom_conv_dim,
            num_convs=bottom_num_convs,
            norm=norm,
        )
        self.attn_pooler = ROIPooler(
            output_size=attn_size,
            scales=tuple(1.0 / input_shape[f].stride for f in attn_in_features),
            sampling_ratio=attn_sampling_ratio,
            pooler_type="ROIAlignV2",
        )
        self.attention = AttentionNet(channels.pop(), num_bases, attn_conv_dim, attn_num_convs)
        self.bases_pooler = ROIPooler(
            output_size=bottom_resolution,
            scales=(1.0 / self.bases_stride,),
            sampling_ratio=1,
            pooler_type="ROIAlignV2",
        )
        if semantic_loss_weight > 0:
            self.seg_head = BasisSemanticHead(
                input_shape[bottom_in_features[0]].channels, num_classes, bottom_conv_dim, norm
            )
        else:
            self.seg_head = None
            self.uses_image_targets = False

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        bm = cfg.MODEL.BLENDMASK
        semantic_loss_weight = bm.SEMANTIC_LOSS_WEIGHT
        if cfg.MODEL.FREEZE_DETECTOR and semantic_loss_weight > 0:
            # The segmentation head exists to shape the FPN features the bases are made from;
            # a frozen detector fixes them, so the loss would train a head nothing reads.
            logger.warning(
                "MODEL.FREEZE_DETECTOR: BlendMask's auxiliary semantic loss can only shape the "
                "frozen FPN features, so it is off (MODEL.BLENDMASK.SEMANTIC_LOSS_WEIGHT ignored)"
            )
            semantic_loss_weight = 0.0
        # fmt: off
        return {
            "input_shape":          input_shape,
            "bottom_in_features":   list(bm.BOTTOM_IN_FEATURES),
            "num_bases":            bm.NUM_BASES,
            "attn_size":            bm.ATTN_SIZE,
            "bottom_resolution":    bm.BOTTOM_RESOLUTION,
            "top_interp":           bm.TOP_INTERP,
            "bottom_conv_dim":      bm.BOTTOM_CONV_DIM,
            "bottom_num_convs":     bm.BOTTOM_NUM_CONVS,
            "norm":                 bm.NORM,
            "attn_num_convs":       bm.ATTN_NUM_CONVS,
            "attn_conv_dim":        bm.ATTN_CONV_DIM,
            "attn_sampling_ratio":  cfg.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO,
            "semantic_loss_weight": semantic_loss_weight,
            "num_classes":          cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "vis_period":           cfg.VIS_PERIOD,
        }
        # fmt: on

    def mask_logits(self, features: Dict[str, torch.Tensor], boxes) -> torch.Tensor:
        """Class-agnostic mask logits [N, 1, R, R] for a list of per-image Boxes (N in all)."""
        bases = self.bottom([features[f] for f in self.bottom_in_features])
        box_features = self.attn_pooler([features[f] for f in self.attn_in_features], boxes)
        attentions = self.attention(box_features)
        base_crops = self.bases_pooler([bases], boxes)
        self.remember(bases=bases, attentions=attentions)
        return blend(base_crops, attentions, self.top_interp)[:, None]

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        instances: List[Instances],
        gt_instances: Optional[List[Instances]] = None,
    ):
        """
        Args:
            features: the head's input maps by name ([B, C, H_l, W_l]).
            instances: per image; training: the ROIs to train on (``proposal_boxes``,
                ``gt_masks``); inference: the detections (``pred_boxes``, ``pred_classes``).
            gt_instances: training only, all ground-truth instances per image (for the semantic
                loss; ``gt_has_mask`` marks those with a mask).

        Returns:
            Training: {"loss_mask": Tensor, "loss_basis_sem": Tensor (with the semantic loss)}.
            Inference: ``instances`` with ``pred_masks`` [N_i, 1, R, R] probabilities.
        """
        if not self.training:
            logits = self.mask_logits(features, [x.pred_boxes for x in instances])
            mask_rcnn_inference(logits, instances)
            return instances
        logits = self.mask_logits(features, [x.proposal_boxes for x in instances])
        losses = {
            "loss_mask": mask_rcnn_loss(logits, instances, self.vis_period) * self.loss_weight
        }
        if self.seg_head is not None:
            if gt_instances is None:
                raise ValueError("BlendMaskHead's semantic loss needs gt_instances in training")
            losses["loss_basis_sem"] = self.semantic_loss(features, gt_instances)
        return losses

    def semantic_loss(
        self, features: Dict[str, torch.Tensor], gt_instances: List[Instances]
    ) -> torch.Tensor:
        """Weighted cross entropy of the seg head against :func:`semantic_targets`.

        Averaged over the pixels that are not ignored; 0 (still in the graph) when all are.
        """
        logits = self.seg_head(features[self.bottom_in_features[0]])
        targets = semantic_targets(gt_instances, logits.shape[-2:], self.semantic_stride)
        loss = F.cross_entropy(logits, targets, ignore_index=SEMANTIC_IGNORE_INDEX, reduction="sum")
        num_valid = (targets != SEMANTIC_IGNORE_INDEX).sum().clamp(min=1)
        return loss / num_valid * self.semantic_loss_weight
