"""Config keys added by masklab_d2 (call `add_masklab_config(cfg)` before `merge_from_file`).

Every key is listed, with its default and the comment above it here, in docs/config_keys.md,
which ``python3 -m masklab_d2.utils.config_reference --write`` generates from this file.

A key that sets a constructor argument takes its default from that constructor
(:func:`default_of`), so a default is written once, where the module is; the LazyConfig helpers
leave such arguments to the constructors too.
"""

import inspect
import logging
import os
import re
from typing import Any, Callable, Optional, Sequence

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from masklab_d2.layers.masklab import DirectionBinning
from masklab_d2.modeling.blendmask_head import BlendMaskHead
from masklab_d2.modeling.box_heads import Res5BoxHead
from masklab_d2.modeling.deep_marc_head import DeepMaskHead
from masklab_d2.modeling.masklab_head import MaskLabHead
from masklab_d2.modeling.poolers import DeformableCropAndResizePooler
from masklab_d2.modeling.roi_heads import PartialROIHeads
from masklab_d2.utils.detectron2 import POINT_REND_HINT, point_rend_available

# MASKLAB_ALLOW_CPU=1 lets a CUDA config run on the CPU where no GPU is visible.
ALLOW_CPU_ENV = "MASKLAB_ALLOW_CPU"


def cpu_fallback_allowed() -> bool:
    """Whether a CUDA config may run on the CPU here: MASKLAB_ALLOW_CPU=1, or a PyTorch built
    without CUDA (where no config could ever get a GPU)."""
    return os.environ.get(ALLOW_CPU_ENV, "") in ("1", "true", "yes") or torch.version.cuda is None


def resolve_device(
    device: str, key: str, cpu_hint: str, allow_cpu_fallback: Optional[bool] = None
) -> str:
    """The device a config's ``device`` means here; the one device policy of both config systems.

    "auto" is "cuda" when a GPU is visible, else "cpu". A CUDA device where no GPU is visible
    becomes "cpu" only when the fallback is allowed, with a warning; otherwise it is an error,
    since a job meant for a GPU would train ~100x slower on the CPU unnoticed (a cluster node
    with a broken driver, a Slurm job without a GPU).

    Args:
        device: the configured device ("auto", "cpu", "cuda", "cuda:1", ...).
        key: the key that set it, for messages ("MODEL.DEVICE", "train.device").
        cpu_hint: how to ask for the CPU with that key, for the error.
        allow_cpu_fallback: True: fall back (interactive tools); False: never; None: as
            :func:`cpu_fallback_allowed` says (training, where a cluster job must not).

    Returns:
        The device to use.
    """
    has_gpu = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if has_gpu else "cpu"
        logging.getLogger(__name__).info(f"{key} auto: {device}")
        return device
    if not device.startswith("cuda") or has_gpu:
        return device
    if allow_cpu_fallback is None:
        allow_cpu_fallback = cpu_fallback_allowed()
    if not allow_cpu_fallback:
        raise RuntimeError(
            f"{key} is {device!r} but no GPU is visible (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}). To run on the CPU on purpose, "
            f"{cpu_hint}, or set {ALLOW_CPU_ENV}=1."
        )
    logging.getLogger(__name__).warning(
        f"NO GPU VISIBLE: {key} {device!r} -> 'cpu'; this runs on the CPU, far slower"
    )
    return "cpu"


def load_config(
    config_file: str, opts: Sequence[str] = (), allow_cpu_fallback: Optional[bool] = True
) -> CN:
    """detectron2's defaults + masklab_d2's keys + a YAML file + ``KEY VALUE`` options, with
    MODEL.DEVICE resolved by :func:`resolve_device`.

    Args:
        config_file: the YAML file.
        opts: ``KEY VALUE`` overrides, applied last.
        allow_cpu_fallback: True: fall back (interactive tools); False: never; None: as
            :func:`cpu_fallback_allowed` says (train_net.py, where a cluster job must not).

    Returns:
        The config, unfrozen.
    """
    cfg = get_cfg()
    add_masklab_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as error:  # yacs' two "Non-existent key" errors
        _explain_missing_point_rend(error, config_file)
        raise
    cfg.MODEL.DEVICE = resolve_device(
        cfg.MODEL.DEVICE, "MODEL.DEVICE", "pass MODEL.DEVICE cpu (or auto)", allow_cpu_fallback
    )
    return cfg


# The keys detectron2's add_pointrend_config adds: a config that sets one of them is a PointRend
# config, which cannot load where detectron2.projects.point_rend is missing.
POINT_REND_KEYS = (
    "MODEL.POINT_HEAD",
    "MODEL.IMPLICIT_POINTREND",
    "MODEL.ROI_MASK_HEAD.FC_DIM",
    "MODEL.ROI_MASK_HEAD.NUM_FC",
    "MODEL.ROI_MASK_HEAD.OUTPUT_SIDE_RESOLUTION",
    "MODEL.ROI_MASK_HEAD.POINT_HEAD_ON",
    "INPUT.COLOR_AUG_SSD",
    "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA",
)


def _explain_missing_point_rend(error: Exception, config_file: str) -> None:
    """Raises ImportError (how to install PointRend) when ``error``, yacs' "Non-existent key"
    error, names a PointRend key and PointRend is not importable; returns otherwise."""
    match = re.search(r"Non-existent (?:config )?key: ([\w.]+)", str(error))
    if not match or not match.group(1).startswith(POINT_REND_KEYS) or point_rend_available():
        return
    raise ImportError(
        f"the config ({config_file} and its options) sets {match.group(1)}, a key of detectron2's "
        f"PointRend project. "
        f"{POINT_REND_HINT}"
    ) from error


def add_point_rend_config(cfg: CN) -> None:
    """detectron2's PointRend keys (its add_pointrend_config, documented in
    projects/PointRend/point_rend/config.py), where detectron2.projects.point_rend imports;
    nothing otherwise, so that every other config loads without it."""
    if not point_rend_available():
        return
    from detectron2.projects.point_rend import add_pointrend_config

    add_pointrend_config(cfg)


def default_of(constructor: Callable, argument: str) -> Any:
    """The default of ``constructor``'s ``argument``, as a YAML value (a tuple as a list).

    Raises:
        TypeError: when the argument has no default (a key must not invent one).
    """
    default = inspect.signature(constructor).parameters[argument].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{constructor.__qualname__}'s {argument} has no default")
    return list(default) if isinstance(default, tuple) else default


def add_masklab_config(cfg: CN) -> None:
    """Adds every masklab_d2 key, each with its default, to a detectron2 config in place."""
    _C = cfg

    # ---- PointRend (PartialPointRendMaskHead) -------------------------------------------------
    # First: its ROI_MASK_HEAD.IN_FEATURES default ("p2",) would make every head read p2 alone;
    # masklab_d2's default below (the box branch's maps) replaces it. The PointRend configs set
    # ["p2"], as detectron2's.
    add_point_rend_config(_C)

    # ---- Partially supervised data -----------------------------------------------------------
    # Classes whose masks train the mask branch: "all", a class group (e.g. "voc") or "a,b,c".
    _C.DATASETS.MASK_TRAIN_CLASSES = "all"

    # ---- Solver -----------------------------------------------------------------------------
    # "SGD" (detectron2's, with SOLVER.MOMENTUM / NESTEROV) or "ADAMW" (with SOLVER.BETAS).
    _C.SOLVER.OPTIMIZER = "SGD"
    # AdamW's (beta1, beta2).
    _C.SOLVER.BETAS = (0.9, 0.999)

    # ---- Head-only training -----------------------------------------------------------------
    # Load MODEL.WEIGHTS but not its mask branch, freeze the detector, train the mask branch.
    _C.MODEL.FREEZE_DETECTOR = False

    # ---- ROI heads (PartialROIHeads, used by every head config) -----------------------------
    # Train the mask branch on the ground-truth boxes (each masked instance once), not proposals.
    _C.MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES = default_of(PartialROIHeads, "train_mask_on_gt_boxes")
    # Feature maps the mask branch reads; empty means MODEL.ROI_HEADS.IN_FEATURES.
    _C.MODEL.ROI_MASK_HEAD.IN_FEATURES = []
    # At most this many random foreground proposals per image train the mask branch (0 = all).
    _C.MODEL.ROI_MASK_HEAD.MAX_TRAIN_ROIS_PER_IMAGE = default_of(
        PartialROIHeads, "max_mask_rois_per_image"
    )

    # ---- Box branch: deformable crop-and-resize pooling and MaskLab's res5 box head ---------
    # POOLER_TYPE "DeformableCropAndResize": sub-boxes per side G (divides POOLER_RESOLUTION).
    _C.MODEL.ROI_BOX_HEAD.DEFORMABLE_GRID = default_of(DeformableCropAndResizePooler, "grid")
    # Offset scale gamma: a sub-box moves by gamma * offset * (box width, box height).
    _C.MODEL.ROI_BOX_HEAD.DEFORMABLE_GAMMA = default_of(DeformableCropAndResizePooler, "gamma")
    # Hidden width of the offset MLP (C*R*R -> hidden -> 2*G*G, last layer zero-initialised).
    _C.MODEL.ROI_BOX_HEAD.DEFORMABLE_HIDDEN_DIM = default_of(
        DeformableCropAndResizePooler, "hidden_dim"
    )
    # Offsets are bounded smoothly to +-this (box units before gamma: 5 -> half a box).
    _C.MODEL.ROI_BOX_HEAD.DEFORMABLE_MAX_OFFSET = default_of(
        DeformableCropAndResizePooler, "max_offset"
    )
    # Learning-rate multiplier of the offset network (Deformable ConvNets: 0.01).
    _C.MODEL.ROI_BOX_HEAD.DEFORMABLE_LR_FACTOR = default_of(
        DeformableCropAndResizePooler, "lr_factor"
    )
    # Res5BoxHead (a duplicated res5 as box classifier): atrous rate of each of its blocks.
    _C.MODEL.ROI_BOX_HEAD.RES5_RATES = [1, 2, 4]
    # Res5BoxHead: 2x2 max-pool the crops before res5 (14x14 -> 7x7, as TF's Faster R-CNN).
    _C.MODEL.ROI_BOX_HEAD.RES5_POOL_FIRST = default_of(Res5BoxHead, "pool_first")

    # ---- Backbones (build_masklab_resnet_backbone / build_masklab_resnet_fpn_backbone) ------
    # Dilation of res4 (1 or 2); 2 keeps res4 at stride 8 (MaskLab's output stride 8).
    _C.MODEL.RESNETS.RES4_DILATION = 1
    # Per-block multipliers of RES5_DILATION in res5 (multi-grid); empty means all 1.
    _C.MODEL.RESNETS.RES5_MULTI_GRID = []
    # Bottom-up features ("conv1", "res2", ...) the FPN backbone also returns unchanged.
    _C.MODEL.FPN.HYPERCOLUMN_FEATURES = []

    # ---- Deep-MARC heads (HourglassMaskHead, ResNetMaskHead) --------------------------------
    _C.MODEL.DEEP_MARC = CN()
    # Mask network: hourglass10/20/32/52/100 or (ResNetMaskHead) resnet4/8/12/16/20.
    _C.MODEL.DEEP_MARC.NETWORK = "hourglass52"
    # Base width nc (64 in the paper; stage widths are multiples of it).
    _C.MODEL.DEEP_MARC.NUM_FILTERS = default_of(DeepMaskHead, "num_filters")
    # Norm of the mask network and deconv: "BN", "SyncBN", "GN" or "" (none).
    _C.MODEL.DEEP_MARC.NORM = default_of(DeepMaskHead, "norm")
    # BN momentum (PyTorch convention) of the mask network; None: reference (HG 0.9, ResNet 0.01).
    _C.MODEL.DEEP_MARC.BN_MOMENTUM = default_of(DeepMaskHead, "bn_momentum")

    # ---- BlendMask head (BlendMaskHead) ------------------------------------------------------
    _C.MODEL.BLENDMASK = CN()
    # Number of bases K.
    _C.MODEL.BLENDMASK.NUM_BASES = default_of(BlendMaskHead, "num_bases")
    # Attention size M (each ROI predicts K x M x M attentions).
    _C.MODEL.BLENDMASK.ATTN_SIZE = default_of(BlendMaskHead, "attn_size")
    # Blender output resolution R (bases are RoIAligned at R x R; masks are R x R).
    _C.MODEL.BLENDMASK.BOTTOM_RESOLUTION = default_of(BlendMaskHead, "bottom_resolution")
    # Upsampling of attentions from M to R: "bilinear" or "nearest".
    _C.MODEL.BLENDMASK.TOP_INTERP = default_of(BlendMaskHead, "top_interp")
    # FPN levels fused by the bottom module (bases at half the first level's stride).
    _C.MODEL.BLENDMASK.BOTTOM_IN_FEATURES = default_of(BlendMaskHead, "bottom_in_features")
    # Channels of the bottom module's convs.
    _C.MODEL.BLENDMASK.BOTTOM_CONV_DIM = default_of(BlendMaskHead, "bottom_conv_dim")
    # 3x3 convs in the bottom module's tower (before its x2 upsampling).
    _C.MODEL.BLENDMASK.BOTTOM_NUM_CONVS = default_of(BlendMaskHead, "bottom_num_convs")
    # Norm of the bottom module and seg head: "BN", "SyncBN", "GN" or "" (none).
    _C.MODEL.BLENDMASK.NORM = default_of(BlendMaskHead, "norm")
    # 3x3 convs of the attention network on the RoIAligned box features.
    _C.MODEL.BLENDMASK.ATTN_NUM_CONVS = default_of(BlendMaskHead, "attn_num_convs")
    # Channels of the attention network's convs.
    _C.MODEL.BLENDMASK.ATTN_CONV_DIM = default_of(BlendMaskHead, "attn_conv_dim")
    # Weight of the auxiliary semantic loss (AdelaiDet: 0.3; mask-less boxes ignored; 0 = off).
    _C.MODEL.BLENDMASK.SEMANTIC_LOSS_WEIGHT = default_of(BlendMaskHead, "semantic_loss_weight")

    # ---- MaskLab head (MaskLabHead; open choices documented in layers/masklab.py) -----------
    _C.MODEL.MASKLAB = CN()
    # Maps the semantic / direction branch reads: FPN levels (merged) or ["res5"] (C4).
    _C.MODEL.MASKLAB.DENSE_IN_FEATURES = default_of(MaskLabHead, "dense_in_features")
    # Stride of the semantic and direction logits.
    _C.MODEL.MASKLAB.COMMON_STRIDE = default_of(MaskLabHead, "common_stride")
    # Width of the FPN merge convs; 0 = none, the 1x1 logit convs read the single input map.
    _C.MODEL.MASKLAB.DENSE_CONV_DIM = default_of(MaskLabHead, "dense_conv_dim")
    # Norm of the merge convs: "BN", "SyncBN", "GN", "" (none).
    _C.MODEL.MASKLAB.DENSE_NORM = default_of(MaskLabHead, "dense_norm")
    # Use the cropped semantic channel of the box's class.
    _C.MODEL.MASKLAB.USE_SEMANTIC = default_of(MaskLabHead, "use_semantic")
    # Use the assembled direction crop.
    _C.MODEL.MASKLAB.USE_DIRECTION = default_of(MaskLabHead, "use_direction")
    # Semantic crop: "class" (channel of the box's class, paper) or "agnostic" (one foreground).
    _C.MODEL.MASKLAB.SEMANTIC_INPUT = default_of(MaskLabHead, "semantic_input")
    # Directions D (360 degrees in D equal sectors, the first starting at 0 degrees).
    _C.MODEL.MASKLAB.NUM_DIRECTIONS = default_of(DirectionBinning, "num_directions")
    # Distance bins B per direction (direction logits have D * B channels).
    _C.MODEL.MASKLAB.NUM_DISTANCE_BINS = default_of(DirectionBinning, "num_distance_bins")
    # Normalised distance of the bins: "box" (max(|u|, |v|), box-shaped rings) or "ellipse".
    _C.MODEL.MASKLAB.DISTANCE_METRIC = default_of(DirectionBinning, "distance_metric")
    # Centre of the dense direction targets: "box" (as pooling uses) or "mask" (centroid).
    _C.MODEL.MASKLAB.DIRECTION_CENTER = default_of(MaskLabHead, "direction_center")
    # Crop size S of semantic, direction and hypercolumn crops (= mask resolution; paper: 41).
    _C.MODEL.MASKLAB.CROP_SIZE = default_of(MaskLabHead, "crop_size")
    # Features cropped for the refinement (paper: conv1 and res2); empty = no refinement.
    _C.MODEL.MASKLAB.HYPERCOLUMN_FEATURES = default_of(MaskLabHead, "hypercolumn_features")
    # Refinement convs (paper: three 5x5 convs with 64 filters).
    _C.MODEL.MASKLAB.REFINE_NUM_CONVS = default_of(MaskLabHead, "refine_num_convs")
    # Width of the refinement convs.
    _C.MODEL.MASKLAB.REFINE_CONV_DIM = default_of(MaskLabHead, "refine_conv_dim")
    # Kernel size of the refinement convs.
    _C.MODEL.MASKLAB.REFINE_KERNEL_SIZE = default_of(MaskLabHead, "refine_kernel_size")
    # Weight of the coarse mask's sigmoid BCE (the refined mask's is 1).
    _C.MODEL.MASKLAB.COARSE_LOSS_WEIGHT = default_of(MaskLabHead, "coarse_loss_weight")
    # Weight of the auxiliary per-pixel semantic loss on the dense logits (0 = off).
    _C.MODEL.MASKLAB.SEMANTIC_LOSS_WEIGHT = default_of(MaskLabHead, "semantic_loss_weight")
    # Weight of the auxiliary per-pixel direction loss on the dense logits (0 = off).
    _C.MODEL.MASKLAB.DIRECTION_LOSS_WEIGHT = default_of(MaskLabHead, "direction_loss_weight")

    # ---- HypercolumnMaskRCNNHead: the 4-conv head + MaskLab's refinement (MODEL.MASKLAB) ----
    _C.MODEL.HYPERCOLUMN_MASK_HEAD = CN()
    # Maps its 4-conv head pools (the mask branch gets all maps raw: ROI_MASK_HEAD.POOLER_TYPE "").
    _C.MODEL.HYPERCOLUMN_MASK_HEAD.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    # Pooler of those maps, at ROI_MASK_HEAD.POOLER_RESOLUTION.
    _C.MODEL.HYPERCOLUMN_MASK_HEAD.POOLER_TYPE = "CropAndResize"
