"""Lazy model pieces: every mask head, and what it needs, on detectron2's LazyConfig models.

detectron2's LazyConfig models (``configs/common/models/mask_rcnn_fpn.py``, ViTDet's
``mask_rcnn_vitdet.py``, the LSJ baselines built on them) are trees of ``LazyCall`` nodes. The
functions here edit such a tree in place and return it, as detectron2's own configs edit theirs
(``model.backbone.bottom_up.freeze_at = 0``), so that a config with another head is a few lines::

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    use_masklab_head(model)              # + PartialROIHeads, hypercolumn FPN, ground-truth boxes

Each ``use_*_head`` function swaps ``model.roi_heads.mask_head`` and sets what that head needs
around it: :class:`~masklab_d2.modeling.PartialROIHeads` (partial supervision, ground-truth-box
training), the mask pooler (or none, for heads that crop for themselves), the maps the head
reads and, for MaskLab, the bottom-up features passed through the FPN.

The shapes (channels, stride) of the maps a head reads are taken from the backbone itself when
the function runs: it is built on the meta device (no memory, no weights, the random state
untouched; nothing global is patched). Change the backbone before calling a head function; like detectron2's own configs,
whose heads spell out their ``input_shape``, a head keeps the shapes it was given.
"""

from collections import abc
from typing import Dict, Mapping, Optional, Sequence

import torch
from detectron2.config import LazyCall as L
from detectron2.config import get_cfg, instantiate
from detectron2.layers import ShapeSpec
from detectron2.modeling import ResNet
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead
from detectron2.utils.registry import locate
from torch import nn

from masklab_d2.config import add_masklab_config
from masklab_d2.layers.masklab import DirectionBinning
from masklab_d2.modeling import PartialROIHeads
from masklab_d2.modeling.backbone import HypercolumnFPN, HypercolumnResNet, hypercolumn_resnet
from masklab_d2.modeling.blendmask_head import BlendMaskHead
from masklab_d2.modeling.deep_marc_head import HourglassMaskHead, ResNetMaskHead
from masklab_d2.modeling.masklab_head import MaskLabHead
from masklab_d2.modeling.point_rend_head import PartialPointRendMaskHead
from masklab_d2.modeling.poolers import CropAndResizePooler, DeformableCropAndResizePooler
from masklab_d2.utils.detectron2 import require_point_rend

__all__ = [
    "crop_and_resize_poolers",
    "deformable_box_pooler",
    "feature_shapes",
    "hypercolumn_fpn",
    "hypercolumn_resnet",
    "partial_roi_heads",
    "point_rend_mask_head",
    "use_blendmask_head",
    "use_deep_marc_head",
    "use_mask_rcnn_head",
    "use_masklab_head",
    "use_point_rend_head",
]


def _target(node):
    """The callable a LazyCall node names (detectron2 stores it as the object or its path)."""
    target = node["_target_"]
    return locate(target) if isinstance(target, str) else target


def _built_backbone(node):
    """The backbone a LazyConfig node describes, built only to read its output shapes.

    It is built on the meta device (``torch.device("meta")`` as a context: parameters without
    memory or initialisation; nothing global is patched). A constructor that computes with
    tensor values at build time (ViT's drop-path rates call ``.item()``) cannot run there; such a
    backbone is built on the CPU instead. Either way under ``fork_rng``: the seeded
    initialisation of the real model does not depend on this call.
    """
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return instantiate(node)
        except (NotImplementedError, RuntimeError):  # a value read from a meta tensor
            return instantiate(node)


def feature_shapes(model, names: Optional[Sequence[str]] = None) -> Dict[str, ShapeSpec]:
    """Shapes of the backbone's outputs, from the backbone that ``model.backbone`` builds.

    Args:
        model: a LazyConfig GeneralizedRCNN node.
        names: the outputs wanted, in this order (default: all).

    Returns:
        name -> ShapeSpec(channels, stride).

    Raises:
        ValueError: when the backbone has no output of one of ``names``.
    """
    shapes = _built_backbone(model.backbone).output_shape()
    names = list(shapes) if names is None else list(names)
    missing = [f for f in names if f not in shapes]
    if missing:
        raise ValueError(f"the backbone has no outputs {missing} (it has {sorted(shapes)})")
    return {f: ShapeSpec(channels=shapes[f].channels, stride=shapes[f].stride) for f in names}


def partial_roi_heads(
    model,
    *,
    train_mask_on_gt_boxes: Optional[bool] = None,
    max_mask_rois_per_image: Optional[int] = None,
):
    """Makes ``model.roi_heads`` a :class:`PartialROIHeads`, keeping every other argument.

    Args:
        model: a LazyConfig GeneralizedRCNN node whose ROI heads are StandardROIHeads' kind.
        train_mask_on_gt_boxes: train the mask branch on the ground-truth boxes (None: keep;
            False on conversion).
        max_mask_rois_per_image: cap on the foreground proposals per image that train the mask
            branch, 0 for none (None: keep; 0 on conversion).

    Returns:
        ``model``.
    """
    roi_heads = model.roi_heads
    if _target(roi_heads) is not PartialROIHeads:
        roi_heads._target_ = PartialROIHeads
        roi_heads.train_mask_on_gt_boxes = False
        roi_heads.max_mask_rois_per_image = 0
    if train_mask_on_gt_boxes is not None:
        roi_heads.train_mask_on_gt_boxes = train_mask_on_gt_boxes
    if max_mask_rois_per_image is not None:
        roi_heads.max_mask_rois_per_image = max_mask_rois_per_image
    return model


def crop_and_resize_poolers(model):
    """Replaces the box and mask ROIPoolers (those the model has) by crop-and-resize poolers.

    TensorFlow-style crop_and_resize, half-pixel aligned as ROIAlignV2, one sample per output
    pixel; masklab_d2's op is several times faster than torchvision's RoIAlign on the CPU.

    Returns:
        ``model``.
    """
    for name in ("box_pooler", "mask_pooler"):
        pooler = model.roi_heads.get(name)
        if pooler is not None:
            model.roi_heads[name] = L(CropAndResizePooler)(
                output_size=pooler.output_size, scales=pooler.scales
            )
    return model


def deformable_box_pooler(model, **kwargs):
    """Replaces the box pooler by MaskLab's deformable crop-and-resize pooler.

    Args:
        model: a LazyConfig GeneralizedRCNN node.
        kwargs: :class:`~masklab_d2.modeling.poolers.DeformableCropAndResizePooler`'s ``grid``,
            ``gamma``, ``hidden_dim``, ``max_offset``, ``lr_factor`` (its defaults otherwise,
            which are the MODEL.ROI_BOX_HEAD.DEFORMABLE_* keys'). ``lr_factor`` scales the offset
            network's learning rate when masklab_d2's lazy trainer builds the optimizer.

    Returns:
        ``model``.
    """
    roi_heads = model.roi_heads
    channels = {s.channels for s in feature_shapes(model, roi_heads.box_in_features).values()}
    if len(channels) != 1:
        raise ValueError(f"pooled features must share a channel count, got {channels}")
    roi_heads.box_pooler = L(DeformableCropAndResizePooler)(
        output_size=roi_heads.box_pooler.output_size,
        scales=roi_heads.box_pooler.scales,
        in_channels=channels.pop(),
        **kwargs,
    )
    return model


def hypercolumn_fpn(model, features: Sequence[str] = ("conv1", "res2")):
    """Makes the FPN also return bottom-up features (e.g. "conv1", "res2") unchanged.

    ``model.backbone`` must be an FPN over a ResNet (detectron2's, whose weights and parameter
    names are kept, or :func:`hypercolumn_resnet`).

    Returns:
        ``model``.
    """
    backbone = model.backbone
    bottom_up = backbone.bottom_up
    if _target(bottom_up) is ResNet:
        bottom_up._target_ = HypercolumnResNet  # same stages and names, plus "conv1"
    elif _target(bottom_up) not in (HypercolumnResNet, hypercolumn_resnet):
        raise ValueError(
            f"hypercolumn features need a ResNet bottom-up network, got {_target(bottom_up)}"
        )
    # The FPN's own inputs stay the pyramid's; detectron2's configs tie them to the bottom-up
    # outputs by interpolation, which would now include the extra features.
    in_features = list(backbone.in_features)
    backbone._target_ = HypercolumnFPN
    backbone.in_features = in_features
    backbone.hypercolumn_features = list(features)
    bottom_up.out_features = in_features + [f for f in features if f not in in_features]
    return model


def _pooled_features_setup(model, resolution: Optional[int]):
    """Mask branch reads the box branch's maps through a pooler (the existing one, resized, or
    ROIAlignV2 with one sample per bin); returns the pooled ShapeSpec."""
    roi_heads = model.roi_heads
    roi_heads.mask_in_features = list(roi_heads.box_in_features)
    shapes = feature_shapes(model, roi_heads.mask_in_features)
    if roi_heads.get("mask_pooler") is None:
        roi_heads.mask_pooler = L(ROIPooler)(
            output_size=resolution or 14,
            scales=tuple(1.0 / s.stride for s in shapes.values()),
            sampling_ratio=1,  # one sample per bin: the crops of the heads that crop themselves
            pooler_type="ROIAlignV2",
        )
    elif resolution is not None:
        roi_heads.mask_pooler.output_size = resolution
    size = roi_heads.mask_pooler.output_size
    channels = {s.channels for s in shapes.values()}
    if len(channels) != 1:
        raise ValueError(f"pooled features must share a channel count, got {channels}")
    return ShapeSpec(channels=channels.pop(), height=size, width=size)


def use_mask_rcnn_head(
    model,
    *,
    conv_dims: Sequence[int] = (256, 256, 256, 256, 256),
    conv_norm="",
    resolution: Optional[int] = None,
    cls_agnostic: bool = False,
    train_on_gt_boxes: Optional[bool] = None,
):
    """Mask R-CNN's 4-conv head (detectron2's MaskRCNNConvUpsampleHead) on pooled box features.

    Args:
        model: a LazyConfig GeneralizedRCNN node.
        conv_dims: the convs' widths, the last one the deconv's (detectron2's 4 x 256 + 256).
        conv_norm: their norm (a name or a callable, as detectron2's).
        resolution: pooler output size (None: keep the mask pooler's, or 14 when there is none).
        cls_agnostic: one mask for all classes.
        train_on_gt_boxes: train on ground-truth boxes (None: keep the ROI heads' setting).

    Returns:
        ``model``.
    """
    partial_roi_heads(model, train_mask_on_gt_boxes=train_on_gt_boxes)
    model.roi_heads.mask_head = L(MaskRCNNConvUpsampleHead)(
        input_shape=_pooled_features_setup(model, resolution),
        num_classes=1 if cls_agnostic else "${..num_classes}",
        conv_dims=list(conv_dims),
        conv_norm=conv_norm,
    )
    return model


def use_deep_marc_head(
    model,
    *,
    network: str = "hourglass52",
    resolution: int = 32,
    cls_agnostic: bool = True,
    train_on_gt_boxes: bool = True,
    **kwargs,
):
    """Deep-MARC's hourglass / ResNet mask head on pooled box features.

    Defaults are the paper's: Hourglass-52 at nc = 64 on 32 x 32 crops (-> 64 x 64 masks),
    class-agnostic, trained on ground-truth boxes.

    Args:
        model: a LazyConfig GeneralizedRCNN node.
        network: "hourglass10/20/32/52/100" (HourglassMaskHead) or "resnet4/8/12/16/20"
            (ResNetMaskHead).
        resolution: the pooler's output size.
        cls_agnostic: one mask for all classes.
        train_on_gt_boxes: train the mask branch on ground-truth boxes.
        kwargs: other :class:`~masklab_d2.modeling.deep_marc_head.DeepMaskHead` arguments
            (``num_filters``, ``norm``, ``bn_momentum``; its defaults otherwise).

    Returns:
        ``model``.
    """
    head = HourglassMaskHead if network in HourglassMaskHead.valid_networks else ResNetMaskHead
    head.check_network(network)  # fails here, naming the valid networks, not at build time
    partial_roi_heads(model, train_mask_on_gt_boxes=train_on_gt_boxes)
    model.roi_heads.mask_head = L(head)(
        input_shape=_pooled_features_setup(model, resolution),
        network=network,
        num_classes=1 if cls_agnostic else "${..num_classes}",
        **kwargs,
    )
    return model


def use_blendmask_head(
    model,
    *,
    bottom_in_features: Sequence[str] = ("p3", "p4", "p5"),
    train_on_gt_boxes: bool = True,
    **kwargs,
):
    """BlendMask's blender as an ROI mask head, reading the box branch's pyramid levels.

    Masks are class-agnostic. The head crops for itself: the mask pooler is removed.

    Args:
        model: a LazyConfig GeneralizedRCNN node (FPN-like backbone).
        bottom_in_features: levels the bottom module fuses (bases at half the first's stride).
        train_on_gt_boxes: train the blender on ground-truth boxes (the paper, AdelaiDet);
            False: on foreground proposals.
        kwargs: other :class:`BlendMaskHead` arguments (``num_bases``, ``bottom_resolution``,
            ``norm``, ...); the rest keep the head's defaults, which are the YAML defaults.

    Returns:
        ``model``.
    """
    partial_roi_heads(model, train_mask_on_gt_boxes=train_on_gt_boxes)
    roi_heads = model.roi_heads
    roi_heads.mask_in_features = list(roi_heads.box_in_features)
    roi_heads.mask_pooler = None
    roi_heads.mask_head = L(BlendMaskHead)(
        input_shape=feature_shapes(model, roi_heads.mask_in_features),
        bottom_in_features=list(bottom_in_features),
        num_classes="${..num_classes}",
        **kwargs,
    )
    return model


def use_masklab_head(
    model,
    *,
    hypercolumn_features: Sequence[str] = ("conv1", "res2"),
    dense_in_features: Optional[Sequence[str]] = None,
    cls_agnostic: bool = False,
    binning: Optional[Dict[str, object]] = None,
    **kwargs,
):
    """MaskLab's head, trained on ground-truth boxes (as the paper), with what it reads.

    The dense semantic / direction branch reads the box branch's pyramid levels (or
    ``dense_in_features``); the refinement crops ``hypercolumn_features``. Bottom-up ResNet
    features among them ("conv1", "res2", ...) are passed through the FPN
    (:func:`hypercolumn_fpn`); a backbone without them (ViTDet's simple pyramid) can name its own
    levels instead, e.g. ``("p2",)``.

    Args:
        model: a LazyConfig GeneralizedRCNN node.
        hypercolumn_features: maps cropped for the refinement (the paper: conv1 and res2).
        dense_in_features: maps the dense branch merges (default: the box branch's).
        cls_agnostic: crop one foreground semantic channel for every box instead of the box
            class's (MODEL.MASKLAB.SEMANTIC_INPUT "agnostic"; for unseen classes).
        binning: :class:`~masklab_d2.layers.masklab.DirectionBinning` arguments
            (``num_directions``, ``num_distance_bins``, ``distance_metric``; its defaults
            otherwise).
        kwargs: other :class:`MaskLabHead` arguments (``crop_size``, ``dense_conv_dim``, ...);
            its defaults otherwise, which are the YAML defaults (MODEL.MASKLAB.*).

    Returns:
        ``model``.
    """
    roi_heads = model.roi_heads
    pyramid = list(dense_in_features or roi_heads.box_in_features)
    available = feature_shapes(model)
    bottom_up = [f for f in hypercolumn_features if f not in available]
    if bottom_up:
        hypercolumn_fpn(model, bottom_up)
    partial_roi_heads(model, train_mask_on_gt_boxes=True)
    roi_heads.mask_in_features = pyramid + [f for f in hypercolumn_features if f not in pyramid]
    roi_heads.mask_pooler = None
    roi_heads.mask_head = L(MaskLabHead)(
        input_shape=feature_shapes(model, roi_heads.mask_in_features),
        num_classes="${..num_classes}",
        dense_in_features=pyramid,
        binning=L(DirectionBinning)(**(binning or {})),
        semantic_input="agnostic" if cls_agnostic else "class",
        hypercolumn_features=list(hypercolumn_features),
        **kwargs,
    )
    return model


def _yacs_value(value):
    """A LazyConfig value (OmegaConf lists and tuples included) as yacs merges it: lists."""
    if isinstance(value, abc.Sequence) and not isinstance(value, str):
        return [_yacs_value(v) for v in value]
    return value


def point_rend_mask_head(
    input_shape: Dict[str, ShapeSpec],
    *,
    num_classes: int,
    cls_agnostic: bool = False,
    roi_mask_head: Optional[Mapping[str, object]] = None,
    point_head: Optional[Mapping[str, object]] = None,
) -> nn.Module:
    """The PointRend head of the YAML keys of the same names, for LazyCall.

    It merges the arguments into the YAML defaults (detectron2's, PointRend's, masklab_d2's) and
    builds :class:`PartialPointRendMaskHead` from them, so both config systems make the same head
    the same way.

    Args:
        input_shape: the maps the head reads, name -> ShapeSpec(channels, stride).
        num_classes: ``MODEL.ROI_HEADS.NUM_CLASSES``.
        cls_agnostic: ``MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK``.
        roi_mask_head: ``MODEL.ROI_MASK_HEAD`` keys by lower-case name, e.g. ``in_features``,
            ``conv_dim``, ``fc_dim``, ``num_fc``, ``output_side_resolution``,
            ``pooler_resolution``, ``point_head_on``.
        point_head: ``MODEL.POINT_HEAD`` keys by lower-case name, e.g. ``in_features``,
            ``fc_dim``, ``num_fc``, ``train_num_points``, ``subdivision_steps``,
            ``subdivision_num_points``.

    Returns:
        The head.
    """
    require_point_rend("masklab_d2's PointRend head")
    cfg = get_cfg()
    add_masklab_config(cfg)
    options = [
        "MODEL.ROI_HEADS.NUM_CLASSES",
        num_classes,
        "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK",
        cls_agnostic,
        "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
        "",
    ]
    for prefix, keys in (("MODEL.ROI_MASK_HEAD", roi_mask_head), ("MODEL.POINT_HEAD", point_head)):
        for name, value in (keys or {}).items():
            options += [f"{prefix}.{name.upper()}", _yacs_value(value)]
    cfg.merge_from_list(options)
    return PartialPointRendMaskHead(cfg, input_shape)


def use_point_rend_head(
    model,
    *,
    cls_agnostic: bool = False,
    train_on_gt_boxes: Optional[bool] = None,
    in_features: Sequence[str] = ("p2",),
    roi_mask_head: Optional[Dict[str, object]] = None,
    point_head: Optional[Dict[str, object]] = None,
):
    """detectron2's PointRend mask head (masklab_d2's PartialPointRendMaskHead), reading
    ``in_features`` for its coarse crops and its points.

    The head is built by :func:`~masklab_d2.modeling.point_rend_head.point_rend_mask_head` from
    the YAML keys, so the YAML and lazy paths make the same head. It crops for itself: the mask
    pooler is removed. Defaults are detectron2's PointRend (COCO) model: 14 x 14 crops of p2, 7 x 7
    coarse masks from a 2x2/2 conv of 256 and two FCs of 1024, a point head of 3 FCs of 256, 196
    training points per box, 5 subdivision steps of 784 points (-> 224 x 224).

    Args:
        model: a LazyConfig GeneralizedRCNN node (FPN-like backbone).
        cls_agnostic: one mask for every class, in the coarse and the point head.
        train_on_gt_boxes: train on ground-truth boxes (None: keep the ROI heads' setting).
        in_features: the maps the coarse head crops and the point head samples.
        roi_mask_head: other ``MODEL.ROI_MASK_HEAD`` keys by lower-case name (``conv_dim``,
            ``fc_dim``, ``num_fc``, ``output_side_resolution``, ``pooler_resolution``, ...).
        point_head: ``MODEL.POINT_HEAD`` keys by lower-case name (``fc_dim``, ``num_fc``,
            ``train_num_points``, ``subdivision_steps``, ``subdivision_num_points``, ...).

    Returns:
        ``model``.

    Raises:
        ImportError: where detectron2.projects.point_rend is missing (the message says how to
            install it).
    """
    require_point_rend("masklab_d2.lazy.use_point_rend_head")
    partial_roi_heads(model, train_mask_on_gt_boxes=train_on_gt_boxes)
    roi_heads = model.roi_heads
    roi_heads.mask_in_features = list(in_features)
    roi_heads.mask_pooler = None
    roi_heads.mask_head = L(point_rend_mask_head)(
        input_shape=feature_shapes(model, in_features),
        num_classes="${..num_classes}",
        cls_agnostic=cls_agnostic,
        roi_mask_head={
            "in_features": list(in_features),
            "point_head_on": True,
            **(roi_mask_head or {}),
        },
        point_head={"in_features": list(in_features), **(point_head or {})},
    )
    return model
