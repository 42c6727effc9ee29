"""MaskLabHead: MaskLab's semantic + direction mask head as a detectron2 ROI mask head.

The head sees whole feature maps (ROI_MASK_HEAD.POOLER_TYPE ""), computes the dense semantic
and direction logits once per image, and for each box crops, assembles, fuses and refines them
(the building blocks and the choices the paper leaves open are in masklab_d2/layers/masklab.py).
MaskLab trains the mask path on ground-truth boxes only (MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES,
set in its configs); at test time it uses the predicted boxes and classes.

Semantic input (MODEL.MASKLAB.SEMANTIC_INPUT): "class" crops the semantic channel of the box's
class (the paper); "agnostic" predicts one foreground channel (plus background) that every mask
trains and crops it for every box. Under partial supervision the per-class channel of a class
without masks never receives a gradient, so "class" would feed the fusion an untrained random
projection for exactly the unseen classes; "agnostic" has no such channel.

Losses: sigmoid BCE of the refined (``loss_mask``) and coarse (``loss_mask_coarse``) masks
against the ground-truth mask on the same S x S lattice, via detectron2's ``mask_rcnn_loss``
(its accuracy / false-positive / false-negative metrics are the refined mask's; the coarse
mask's go under ``coarse/``); optionally per-pixel semantic (``loss_semantic``) and direction
(``loss_direction``) losses on the dense logits, where instances without a mask (partial
supervision) are ignored, and classes without masks are left out of the semantic softmax.
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat, get_norm
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_inference, mask_rcnn_loss
from detectron2.structures import BitMasks, Instances, PolygonMasks
from detectron2.utils.events import get_event_storage
from torch import nn

from masklab_d2.layers.crop_and_resize import crop_and_resize, lattice_rois
from masklab_d2.layers.masklab import (
    CoarseMaskFusion,
    DirectionBinning,
    HypercolumnRefinement,
    SemanticDirectionBranch,
    crop_semantic_channels,
    dense_targets,
    direction_pool,
    hypercolumn_crops,
    select_semantic_classes,
)

from .contract import MaskHeadContract

IGNORE = -1
SEMANTIC_INPUTS = ("class", "agnostic")


@ROI_MASK_HEAD_REGISTRY.register()
class MaskLabHead(MaskHeadContract, nn.Module):
    """MaskLab's mask head (see the module docstring).

    Records (:meth:`recording`): "semantic_logits" [N, K+1, h, w], "direction_logits"
    [N, D*B, h, w] and, per box, "semantic_crop", "pooled_direction", "coarse", "refined"
    [R, 1, S, S] (those the configuration computes).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        dense_in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        common_stride: int = 4,
        dense_conv_dim: int = 128,
        dense_norm: str = "GN",
        binning: Optional[DirectionBinning] = None,
        use_semantic: bool = True,
        use_direction: bool = True,
        semantic_input: str = "class",
        mask_class_ids: Optional[List[int]] = None,
        crop_size: int = 41,
        hypercolumn_features: Sequence[str] = ("conv1", "res2"),
        refine_num_convs: int = 3,
        refine_conv_dim: int = 64,
        refine_kernel_size: int = 5,
        coarse_loss_weight: float = 1.0,
        semantic_loss_weight: float = 0.0,
        direction_loss_weight: float = 0.0,
        direction_center: str = "box",
    ):
        """
        The defaults are the paper's model (and the YAML defaults, MODEL.MASKLAB.*, taken from
        here): FPN levels p2-p5 merged at stride 4, 8 directions x 4 distance bins, 41 x 41
        crops, a refinement of three 5x5 convs of 64 on conv1 and res2.

        Args:
            input_shape: shapes of the feature maps the ROI heads pass in.
            num_classes: K.
            dense_in_features: maps of the semantic / direction branch.
            common_stride: stride of the dense logits.
            dense_conv_dim: merge-conv width (0: read the single map directly, the C4 variant).
            dense_norm: norm of the merge convs.
            binning: the direction / distance binning (None: DirectionBinning's defaults).
            use_semantic, use_direction: which crops feed the coarse mask.
            semantic_input: "class" (crop the channel of the box's class) or "agnostic" (one
                foreground channel for every box).
            mask_class_ids: the classes whose masks train the model (None: all); the others
                are left out of the dense semantic loss's softmax.
            crop_size: S.
            hypercolumn_features: maps cropped for the refinement; empty disables it.
            refine_num_convs, refine_conv_dim, refine_kernel_size: the refinement ConvNet.
            coarse_loss_weight: weight of the coarse mask loss.
            semantic_loss_weight, direction_loss_weight: dense auxiliary losses (0 = off).
            direction_center: "box" or "mask", the centre of the dense direction targets.
        """
        super().__init__()
        if semantic_input not in SEMANTIC_INPUTS:
            raise ValueError(
                f"semantic_input (MODEL.MASKLAB.SEMANTIC_INPUT) must be one of {SEMANTIC_INPUTS}, "
                f"got {semantic_input!r}"
            )
        missing = [
            f for f in list(dense_in_features) + list(hypercolumn_features) if f not in input_shape
        ]
        if missing:
            raise ValueError(
                f"MaskLabHead reads features {missing} (dense_in_features, hypercolumn_features: "
                "MODEL.MASKLAB.DENSE_IN_FEATURES, HYPERCOLUMN_FEATURES) but input_shape has "
                f"{sorted(input_shape)}: add them to the maps the ROI heads pass it "
                "(MODEL.ROI_MASK_HEAD.IN_FEATURES; lazy: roi_heads.mask_in_features) and, for an "
                "FPN backbone, bottom-up ones to MODEL.FPN.HYPERCOLUMN_FEATURES"
            )
        self.num_classes = num_classes
        self.semantic_input = semantic_input
        self.mask_class_ids = None if mask_class_ids is None else sorted(mask_class_ids)
        self.dense_in_features = list(dense_in_features)
        self.common_stride = common_stride
        binning = DirectionBinning() if binning is None else binning
        self.binning = binning
        self.crop_size = crop_size
        self.hypercolumn_features = list(hypercolumn_features)
        self.hypercolumn_strides = [input_shape[f].stride for f in self.hypercolumn_features]
        self.coarse_loss_weight = coarse_loss_weight
        self.semantic_loss_weight = semantic_loss_weight
        self.direction_loss_weight = direction_loss_weight
        self.direction_center = direction_center
        # PartialROIHeads passes the image's ground truth only to heads that ask for it.
        self.uses_image_targets = semantic_loss_weight > 0 or direction_loss_weight > 0

        self.dense_branch = SemanticDirectionBranch(
            in_channels=[input_shape[f].channels for f in self.dense_in_features],
            in_strides=[input_shape[f].stride for f in self.dense_in_features],
            common_stride=common_stride,
            conv_dim=dense_conv_dim,
            # Agnostic: one foreground channel and background, as if there were one class.
            num_semantic_channels=(
                (num_classes + 1 if semantic_input == "class" else 2)
                if use_semantic or semantic_loss_weight > 0
                else 0
            ),
            num_direction_channels=(
                binning.num_channels if use_direction or direction_loss_weight > 0 else 0
            ),
            norm=(lambda channels: get_norm(dense_norm, channels)) if dense_norm else None,
        )
        self.fusion = CoarseMaskFusion(use_semantic, use_direction)
        self.refinement = (
            HypercolumnRefinement(
                sum(input_shape[f].channels for f in self.hypercolumn_features),
                num_convs=refine_num_convs,
                conv_dim=refine_conv_dim,
                kernel_size=refine_kernel_size,
            )
            if self.hypercolumn_features
            else None
        )
        self.register_buffer(
            "direction_template", binning.crop_template(crop_size), persistent=False
        )

    @property
    def class_agnostic(self) -> bool:
        """One semantic channel for every box: the mask does not depend on the box's class."""
        return self.semantic_input == "agnostic"

    @classmethod
    def from_config(cls, cfg, input_shape):
        masklab = cfg.MODEL.MASKLAB
        mask_class_ids = None
        if masklab.SEMANTIC_LOSS_WEIGHT > 0 and masklab.SEMANTIC_INPUT == "class":
            # Imported here: only the class-restricted dense loss needs the datasets' classes.
            from masklab_d2.data import mask_train_class_ids

            mask_class_ids = mask_train_class_ids(cfg)
        return {
            "input_shape": input_shape,
            "num_classes": cfg.MODEL.ROI_HEADS.NUM_CLASSES,
            "dense_in_features": masklab.DENSE_IN_FEATURES,
            "common_stride": masklab.COMMON_STRIDE,
            "dense_conv_dim": masklab.DENSE_CONV_DIM,
            "dense_norm": masklab.DENSE_NORM,
            "binning": DirectionBinning(
                masklab.NUM_DIRECTIONS, masklab.NUM_DISTANCE_BINS, masklab.DISTANCE_METRIC
            ),
            "use_semantic": masklab.USE_SEMANTIC,
            "use_direction": masklab.USE_DIRECTION,
            "semantic_input": masklab.SEMANTIC_INPUT,
            "mask_class_ids": mask_class_ids,
            "crop_size": masklab.CROP_SIZE,
            "hypercolumn_features": masklab.HYPERCOLUMN_FEATURES,
            "refine_num_convs": masklab.REFINE_NUM_CONVS,
            "refine_conv_dim": masklab.REFINE_CONV_DIM,
            "refine_kernel_size": masklab.REFINE_KERNEL_SIZE,
            "coarse_loss_weight": masklab.COARSE_LOSS_WEIGHT,
            "semantic_loss_weight": masklab.SEMANTIC_LOSS_WEIGHT,
            "direction_loss_weight": masklab.DIRECTION_LOSS_WEIGHT,
            "direction_center": masklab.DIRECTION_CENTER,
        }

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        instances: List[Instances],
        gt_instances: Optional[List[Instances]] = None,
    ):
        """
        Args:
            features: feature maps by name (ROI_MASK_HEAD.IN_FEATURES).
            instances: per image; training: ``proposal_boxes`` (ground-truth boxes in MaskLab's
                configs), ``gt_classes``, ``gt_masks``; inference: ``pred_boxes``,
                ``pred_classes``.
            gt_instances: all ground truth per image, for the dense auxiliary losses.

        Returns:
            Training: a dict of losses. Inference: ``instances`` with ``pred_masks``
            [R_i, 1, S, S] probabilities.
        """
        semantic_logits, direction_logits = self.dense_branch(
            [features[f] for f in self.dense_in_features]
        )
        boxes = [(x.proposal_boxes if self.training else x.pred_boxes).tensor for x in instances]
        classes = cat([x.gt_classes if self.training else x.pred_classes for x in instances])
        batch_index = cat(
            [torch.full((len(b),), i, device=classes.device) for i, b in enumerate(boxes)]
        )
        rois = lattice_rois(cat(boxes), batch_index, self.crop_size)
        scale = 1.0 / self.common_stride

        semantic_crop = pooled_direction = None
        if self.fusion.use_semantic:
            channels = classes if self.semantic_input == "class" else torch.zeros_like(classes)
            semantic_crop = crop_semantic_channels(
                semantic_logits, rois, channels, scale, self.crop_size
            )
        if self.fusion.use_direction:
            direction_crops = crop_and_resize(
                direction_logits, rois, scale, self.crop_size, aligned=True
            )
            pooled_direction = direction_pool(direction_crops, self.direction_template)
        coarse = self.fusion(semantic_crop, pooled_direction)
        refined = None
        if self.refinement is not None:
            hypercolumn = hypercolumn_crops(
                [features[f] for f in self.hypercolumn_features],
                self.hypercolumn_strides,
                rois,
                self.crop_size,
            )
            refined = self.refinement(coarse, hypercolumn)
        masks = refined if refined is not None else coarse
        self.remember(
            semantic_logits=semantic_logits,
            direction_logits=direction_logits,
            semantic_crop=semantic_crop,
            pooled_direction=pooled_direction,
            coarse=coarse,
            refined=refined,
        )
        if not self.training:
            mask_rcnn_inference(masks, instances)
            return instances
        losses = {"loss_mask": mask_rcnn_loss(masks, instances)}
        if refined is not None and self.coarse_loss_weight > 0:
            # mask_rcnn_loss logs its accuracy metrics under fixed names: scope the coarse call
            # so it does not overwrite the refined mask's.
            with get_event_storage().name_scope("coarse"):
                coarse_loss = mask_rcnn_loss(coarse, instances)
            losses["loss_mask_coarse"] = coarse_loss * self.coarse_loss_weight
        if self.uses_image_targets:
            losses.update(self._dense_losses(semantic_logits, direction_logits, gt_instances))
        return losses

    def _dense_losses(
        self, semantic_logits, direction_logits, gt_instances
    ) -> Dict[str, torch.Tensor]:
        """Per-pixel cross entropies; instances without masks are ignored, not background."""
        dense_size = (semantic_logits if semantic_logits is not None else direction_logits).shape[
            -2:
        ]
        semantic_targets, direction_targets = [], []
        for targets in gt_instances:
            masks = targets.gt_masks
            height, width = targets.image_size
            if isinstance(masks, PolygonMasks):
                masks = BitMasks.from_polygon_masks(masks, height, width)
            has_mask = (
                targets.gt_has_mask
                if targets.has("gt_has_mask")
                else torch.ones(len(targets), dtype=torch.bool)
            )
            device = targets.gt_boxes.device
            agnostic = self.semantic_input == "agnostic"
            semantic, direction = dense_targets(
                masks.tensor.to(device),
                targets.gt_boxes.tensor,
                torch.zeros_like(targets.gt_classes) if agnostic else targets.gt_classes,
                has_mask.to(device),
                self.binning,
                self.common_stride,
                tuple(dense_size),
                1 if agnostic else self.num_classes,
                center=self.direction_center,
                ignore_value=IGNORE,
            )
            semantic_targets.append(semantic)
            direction_targets.append(direction)
        losses = {}
        if self.semantic_loss_weight > 0:
            semantic_targets = torch.stack(semantic_targets)
            if self.mask_class_ids is not None:
                semantic_logits, semantic_targets = select_semantic_classes(
                    semantic_logits, semantic_targets, self.mask_class_ids, IGNORE
                )
            losses["loss_semantic"] = self.semantic_loss_weight * _cross_entropy(
                semantic_logits, semantic_targets
            )
        if self.direction_loss_weight > 0:
            losses["loss_direction"] = self.direction_loss_weight * _cross_entropy(
                direction_logits, torch.stack(direction_targets)
            )
        return losses


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over labelled pixels; 0 (keeping the graph) when there are none."""
    if not (targets != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, targets, ignore_index=IGNORE)
