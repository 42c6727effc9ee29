"""A control for MaskLab's refinement: Mask R-CNN's 4-conv head with MaskLab's hypercolumn input.

MaskLab alone of the compared heads reads the early backbone maps (conv1, res2, ...): it refines
its coarse mask with crops of them (:class:`~masklab_d2.layers.masklab.HypercolumnRefinement`),
its largest single gain on shapes. Whether that gain belongs to MaskLab's semantic and direction
features or to the extra input needs a head that has the input and not the features. This one
is Mask R-CNN's head, unchanged, followed by MaskLab's refinement, with the same maps, crop lattice
and merge (the ``MODEL.MASKLAB`` keys of the refinement are read here too). Per box::

    MODEL.HYPERCOLUMN_MASK_HEAD.IN_FEATURES (p2-p5) --its pooler--> [R, C, P, P]
    -> detectron2's MaskRCNNConvUpsampleHead (ROI_MASK_HEAD.NUM_CONV convs, deconv, predictor)
    -> [R, K, 2P, 2P] coarse logits; the box's class channel, resized to S x S -> [R, 1, S, S]
    -> [coarse, crops of MODEL.MASKLAB.HYPERCOLUMN_FEATURES at the box's S x S bin centres]
    -> HypercolumnRefinement -> [R, 1, S, S] refined logits (S = MODEL.MASKLAB.CROP_SIZE)

The losses are MaskLab's: sigmoid BCE of the refined mask, plus ``COARSE_LOSS_WEIGHT`` times that
of the coarse mask. Both the 2P x 2P coarse grid and the S x S crops are the box's bin centres
(:func:`~masklab_d2.layers.crop_and_resize.lattice_rois`), so a bilinear resize with
``align_corners=False`` maps one onto the other.
"""

from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
    mask_rcnn_inference,
    mask_rcnn_loss,
)
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from torch import nn

from masklab_d2.layers.crop_and_resize import lattice_rois
from masklab_d2.layers.masklab import HypercolumnRefinement, hypercolumn_crops

from .contract import MaskHeadContract
from .poolers import build_roi_pooler

__all__ = ["HypercolumnMaskRCNNHead", "resize_to_bin_centres"]


def resize_to_bin_centres(logits: torch.Tensor, size: int) -> torch.Tensor:
    """[R, C, M, M] values at a box's M x M bin centres -> [R, C, S, S] at its S x S bin centres.

    Bilinear with ``align_corners=False`` maps bin centres onto bin centres (a function linear in
    the image's coordinates is reproduced exactly when S <= M), the lattice of the hypercolumn
    crops (:func:`~masklab_d2.layers.crop_and_resize.lattice_rois`).
    """
    return F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)


@ROI_MASK_HEAD_REGISTRY.register()
class HypercolumnMaskRCNNHead(MaskHeadContract, nn.Module):
    """Mask R-CNN's 4-conv head refined with MaskLab's hypercolumn crops (module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        pooled_features: Sequence[str],
        pooler: nn.Module,
        conv_head: MaskRCNNConvUpsampleHead,
        hypercolumn_features: Sequence[str],
        hypercolumn_strides: Sequence[int],
        refinement: HypercolumnRefinement,
        crop_size: int,
        coarse_loss_weight: float = 1.0,
    ):
        """
        Args:
            pooled_features: the maps the 4-conv head pools.
            pooler: their ROI pooler, [R, C, P, P] crops.
            conv_head: Mask R-CNN's head on those crops; its ``layers`` give the coarse logits.
            hypercolumn_features, hypercolumn_strides: the maps cropped for the refinement.
            refinement: MaskLab's refinement ConvNet.
            crop_size: S, the side of the hypercolumn crops and of the refined mask.
            coarse_loss_weight: weight of the coarse mask's loss (the refined mask's is 1).
        """
        super().__init__()
        if not hypercolumn_features:
            raise ValueError(
                "HypercolumnMaskRCNNHead needs hypercolumn features "
                "(MODEL.MASKLAB.HYPERCOLUMN_FEATURES is empty: use MaskRCNNConvUpsampleHead)"
            )
        self.pooled_features = list(pooled_features)
        self.pooler = pooler
        self.conv_head = conv_head
        self.hypercolumn_features = list(hypercolumn_features)
        self.hypercolumn_strides = list(hypercolumn_strides)
        self.refinement = refinement
        self.crop_size = crop_size
        self.coarse_loss_weight = coarse_loss_weight

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        pooled_features = list(cfg.MODEL.HYPERCOLUMN_MASK_HEAD.IN_FEATURES)
        hypercolumn_features = list(cfg.MODEL.MASKLAB.HYPERCOLUMN_FEATURES)
        missing = [f for f in pooled_features + hypercolumn_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"HypercolumnMaskRCNNHead reads features {missing} that the mask branch does not "
                f"get (it gets {sorted(input_shape)}: MODEL.ROI_MASK_HEAD.IN_FEATURES, with "
                "POOLER_TYPE '' so that the head crops for itself, and MODEL.FPN.HYPERCOLUMN_"
                "FEATURES)"
            )
        pooler_cfg = cfg.MODEL.ROI_MASK_HEAD.clone()
        pooler_cfg.defrost()
        pooler_cfg.POOLER_TYPE = cfg.MODEL.HYPERCOLUMN_MASK_HEAD.POOLER_TYPE
        pooler, pooled_shape = build_roi_pooler(pooler_cfg, input_shape, pooled_features)
        masklab = cfg.MODEL.MASKLAB
        return {
            "pooled_features": pooled_features,
            "pooler": pooler,
            "conv_head": MaskRCNNConvUpsampleHead(cfg, pooled_shape),
            "hypercolumn_features": hypercolumn_features,
            "hypercolumn_strides": [input_shape[f].stride for f in hypercolumn_features],
            "refinement": HypercolumnRefinement(
                sum(input_shape[f].channels for f in hypercolumn_features),
                num_convs=masklab.REFINE_NUM_CONVS,
                conv_dim=masklab.REFINE_CONV_DIM,
                kernel_size=masklab.REFINE_KERNEL_SIZE,
            ),
            "crop_size": masklab.CROP_SIZE,
            "coarse_loss_weight": masklab.COARSE_LOSS_WEIGHT,
        }

    @property
    def class_agnostic(self) -> bool:
        """One coarse mask for every class (``ROI_MASK_HEAD.CLS_AGNOSTIC_MASK``)."""
        return self.conv_head.predictor.out_channels == 1

    def forward(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        """
        Args:
            features: the maps by name, [N, C_f, H_f, W_f] each.
            instances: per image; training: ``proposal_boxes``, ``gt_classes``, ``gt_masks``;
                inference: ``pred_boxes``, ``pred_classes``.

        Returns:
            Training: {"loss_mask", "loss_mask_coarse"}. Inference: ``instances`` with
            ``pred_masks`` [R_i, 1, S, S] probabilities.
        """
        boxes = [(x.proposal_boxes if self.training else x.pred_boxes) for x in instances]
        crops = self.pooler([features[f] for f in self.pooled_features], boxes)
        coarse = self.conv_head.layers(crops)  # [R, K, 2P, 2P]
        classes = cat([x.gt_classes if self.training else x.pred_classes for x in instances])
        channel = torch.zeros_like(classes) if self.class_agnostic else classes
        coarse_of_class = coarse[torch.arange(len(coarse), device=coarse.device), channel]
        resized = resize_to_bin_centres(coarse_of_class[:, None], self.crop_size)
        box_tensors = [b.tensor for b in boxes]
        batch_index = cat(
            [torch.full((len(b),), i, device=coarse.device) for i, b in enumerate(box_tensors)]
        )
        rois = lattice_rois(cat(box_tensors), batch_index, self.crop_size)
        hypercolumn = hypercolumn_crops(
            [features[f] for f in self.hypercolumn_features],
            self.hypercolumn_strides,
            rois,
            self.crop_size,
        )
        refined = self.refinement(resized, hypercolumn)
        self.remember(coarse=resized, refined=refined)
        if not self.training:
            mask_rcnn_inference(refined, instances)
            return instances
        losses = {"loss_mask": mask_rcnn_loss(refined, instances)}
        # mask_rcnn_loss logs accuracy metrics under fixed names: scope the coarse call.
        with get_event_storage().name_scope("coarse"):
            losses["loss_mask_coarse"] = mask_rcnn_loss(coarse, instances) * self.coarse_loss_weight
        return losses
