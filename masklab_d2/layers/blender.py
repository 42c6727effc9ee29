"""BlendMask's bottom module, a two-stage top (attention) network and the blender, in plain PyTorch.

BlendMask (Chen et al., "BlendMask: Top-Down Meets Bottom-Up for Instance Segmentation", CVPR
2020) replaces Mask R-CNN's per-ROI 4-conv mask head by a *blend*: a bottom module predicts K
image-wide score maps ("bases") once per image; each instance predicts K low-resolution attention
maps (K x M x M); the mask is the per-pixel softmax-over-K weighted sum of the instance's RoIAligned
base crops (R x R) with its attentions upsampled from M to R. Only the blend runs at R x R per
instance, so R can grow at a small cost.

Reference: AdelaiDet (``adet/modeling/blendmask/{basis_module,blender}.py``), summarised in the
project's ``reference/blendmask.md``. What is kept and what is new here:

* :class:`BottomModule` is AdelaiDet's ``ProtoNet``: per-level "refine" 3x3 conv -> norm -> ReLU,
  the other levels bilinearly resized to the first one's size and summed, a tower of
  ``num_convs`` x (3x3 conv, norm, ReLU), a bilinear x2 upsample, one more conv block and a 1x1
  conv to K bases (no activation); kaiming_uniform(a=1) convs without bias when normalised.
  On p3-p5 its output has stride 4.
* :class:`BasisSemanticHead` is AdelaiDet's auxiliary ``seg_head`` (training only).
* :class:`AttentionNet` is new. AdelaiDet is one-stage: a single 3x3 conv on FCOS's box tower
  predicts all K*M*M attentions of a location as one vector. In a two-stage detector each ROI has
  RoIAligned box features instead, so the attentions are predicted *spatially*: the M x M box
  features go through ``num_convs`` x (3x3 conv, ReLU) and a 1x1 conv to K channels, which are the
  K x M x M attentions (position i, j of the attention reads the features at the same place of
  the box). The last layer is initialised as AdelaiDet's top layer (normal std 0.01, bias 0), so
  attentions start near uniform and every base contributes equally.
* :func:`blend` is AdelaiDet's ``Blender.merge_bases`` after the RoIAlign.

Conventions: tensors are NCHW; ``N`` is the number of ROIs (it may be 0), ``K`` the number of
bases, ``M`` the attention size and ``R`` the blender's output resolution.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NORMS",
    "SEMANTIC_IGNORE_INDEX",
    "get_norm",
    "conv_norm_relu",
    "BottomModule",
    "BasisSemanticHead",
    "AttentionNet",
    "blend",
    "thing_semantic_target",
]

NORMS = ("BN", "SyncBN", "GN", "")
# Label of the pixels the auxiliary semantic loss ignores (F.cross_entropy's ignore_index). Not
# 255, detectron2's semantic-segmentation convention, so that any number of classes fits.
SEMANTIC_IGNORE_INDEX = -1
_GN_GROUPS = 32


def get_norm(norm: Optional[str], channels: int) -> Optional[nn.Module]:
    """The normalisation layer for ``channels`` feature maps.

    Args:
        norm: "BN" (nn.BatchNorm2d), "SyncBN" (nn.SyncBatchNorm; it behaves as BN on one process
            and on the CPU), "GN" (GroupNorm with 32 groups) or "" / None (no normalisation).
        channels: number of channels C of the [B, C, H, W] input.

    Returns:
        nn.Module mapping [B, C, H, W] -> [B, C, H, W], or None for no normalisation.

    Raises:
        ValueError: for an unknown name, or "GN" with C not divisible by 32.
    """
    if not norm:
        return None
    if norm == "BN":
        return nn.BatchNorm2d(channels)
    if norm == "SyncBN":
        return nn.SyncBatchNorm(channels)
    if norm == "GN":
        if channels % _GN_GROUPS:
            raise ValueError(
                f"GN uses {_GN_GROUPS} groups: {channels} channels are not divisible by it"
            )
        return nn.GroupNorm(_GN_GROUPS, channels)
    raise ValueError(f"Unknown norm {norm!r}: use one of {NORMS} ('' for none)")


def conv_norm_relu(
    in_channels: int, out_channels: int, kernel_size: int, norm: Optional[str]
) -> nn.Sequential:
    """AdelaiDet's ``conv_with_kaiming_uniform(norm, activation=True)`` block.

    A ``kernel_size`` conv ("same" padding, stride 1; bias only without a norm, kaiming_uniform
    with a=1, bias 0), then the norm, then ReLU: [B, C_in, H, W] -> [B, C_out, H, W].
    """
    norm_layer = get_norm(norm, out_channels)
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=norm_layer is None
    )
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    layers = [conv] + ([norm_layer] if norm_layer is not None else []) + [nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class BottomModule(nn.Module):
    """Predicts K bases per image from several feature levels (AdelaiDet's ``ProtoNet``).

    [B, C_l, H_l, W_l] for each level l (finest first) -> [B, K, 2 H_0, 2 W_0]: twice the first
    level's resolution, i.e. stride 4 when the first level is p3.

    Args:
        in_channels: channels of each input level, finest first.
        num_bases: K.
        conv_dim: channels of every conv but the last.
        num_convs: 3x3 conv blocks before the x2 upsampling.
        norm: see :func:`get_norm`.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_bases: int = 4,
        conv_dim: int = 128,
        num_convs: int = 3,
        norm: Optional[str] = "BN",
    ):
        super().__init__()
        if not in_channels:
            raise ValueError("BottomModule needs at least one input level")
        if num_bases < 1:
            raise ValueError(f"num_bases must be >= 1, got {num_bases}")
        self.refine = nn.ModuleList(conv_norm_relu(c, conv_dim, 3, norm) for c in in_channels)
        tower = [conv_norm_relu(conv_dim, conv_dim, 3, norm) for _ in range(num_convs)]
        tower.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        tower.append(conv_norm_relu(conv_dim, conv_dim, 3, norm))
        tower.append(nn.Conv2d(conv_dim, num_bases, 1))
        self.tower = nn.Sequential(*tower)
        self.num_bases = num_bases

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features: one [B, C_l, H_l, W_l] map per level, in the order of ``in_channels``.

        Returns:
            Tensor[B, K, 2 H_0, 2 W_0]: the bases (unbounded scores, no activation).
        """
        if len(features) != len(self.refine):
            raise ValueError(f"expected {len(self.refine)} feature levels, got {len(features)}")
        x = self.refine[0](features[0])
        for refine, feature in zip(self.refine[1:], features[1:]):
            y = refine(feature)
            x = x + F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.tower(x)


class BasisSemanticHead(nn.Module):
    """AdelaiDet's auxiliary ``seg_head``: per-pixel class scores on the first bottom level.

    [B, C, H, W] -> two (3x3 conv, norm, ReLU) blocks -> 1x1 conv -> [B, num_classes + 1, H, W]
    (channel 0 is background). It only serves the training loss.

    Args:
        in_channels: C.
        num_classes: foreground classes.
        conv_dim: channels of the two 3x3 convs.
        norm: see :func:`get_norm`.
    """

    def __init__(
        self, in_channels: int, num_classes: int, conv_dim: int = 128, norm: Optional[str] = "BN"
    ):
        super().__init__()
        self.layers = nn.Sequential(
            conv_norm_relu(in_channels, conv_dim, 3, norm),
            conv_norm_relu(conv_dim, conv_dim, 3, norm),
            nn.Conv2d(conv_dim, num_classes + 1, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> logits [B, num_classes + 1, H, W]."""
        return self.layers(x)


class AttentionNet(nn.Module):
    """The top module of a two-stage BlendMask: K x M x M attentions from each ROI's box features.

    [N, C, M, M] RoIAligned features -> ``num_convs`` x (3x3 conv, ReLU) -> 1x1 conv ->
    [N, K, M, M] attention logits. Hidden convs use detectron2's c2_msra_fill init (kaiming normal,
    fan_out, ReLU; bias 0); the last layer AdelaiDet's top-layer init (normal std 0.01, bias 0).

    Args:
        in_channels: C.
        num_bases: K.
        conv_dim: channels of the hidden convs.
        num_convs: hidden 3x3 convs (0: a single 1x1 conv from C to K).
    """

    def __init__(
        self, in_channels: int, num_bases: int = 4, conv_dim: int = 128, num_convs: int = 2
    ):
        super().__init__()
        layers = []
        channels = in_channels
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, conv_dim, 3, padding=1)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = conv_dim
        self.predictor = nn.Conv2d(channels, num_bases, 1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, M, M] -> attention logits [N, K, M, M] (softmax over K happens in :func:`blend`)."""
        return self.predictor(self.layers(x))


def blend(
    base_crops: torch.Tensor, attentions: torch.Tensor, interp: str = "bilinear"
) -> torch.Tensor:
    """Blends each ROI's base crops with its attentions (AdelaiDet's ``merge_bases``).

    The attentions are resized from M x M to R x R with ``F.interpolate(mode=interp)``
    (align_corners False, AdelaiDet's default), normalised with a softmax over the K bases, and
    the mask logits are the attention-weighted sum of the K base crops at every pixel.

    Args:
        base_crops: [N, K, R, R] RoIAligned bases.
        attentions: [N, K, M, M] attention logits.
        interp: "bilinear", "nearest", "bicubic", "area" or any 2-D F.interpolate mode.

    Returns:
        Tensor[N, R, R]: mask logits.
    """
    if base_crops.dim() != 4 or attentions.dim() != 4:
        raise ValueError(
            f"blend takes [N, K, R, R] crops and [N, K, M, M] attentions, got "
            f"{tuple(base_crops.shape)} and {tuple(attentions.shape)}"
        )
    if base_crops.shape[:2] != attentions.shape[:2]:
        raise ValueError(
            f"crops {tuple(base_crops.shape)} and attentions {tuple(attentions.shape)} disagree on "
            "the number of ROIs or bases"
        )
    size = base_crops.shape[-2:]
    if attentions.shape[-2:] != size:
        align = False if interp in ("linear", "bilinear", "bicubic", "trilinear") else None
        attentions = F.interpolate(attentions, size=size, mode=interp, align_corners=align)
    return (base_crops * attentions.softmax(dim=1)).sum(dim=1)


def thing_semantic_target(
    masks: torch.Tensor,
    classes: torch.Tensor,
    ignore_boxes: torch.Tensor,
    size: Tuple[int, int],
    stride: int,
    ignore_index: int = SEMANTIC_IGNORE_INDEX,
) -> torch.Tensor:
    """One image's thing-only semantic target at a feature map's resolution.

    Cell (i, j) of the [h, w] output stands for the image point ((j + 0.5) s, (i + 0.5) s), the
    centre of its s x s patch (s = ``stride``); it takes the value of the image pixel there
    (nearest sampling, as AdelaiDet's downsampled targets):

    * background (0) by default, including the padding beyond the masks' size;
    * ``ignore_index`` where the point lies in a box of an instance *without* a mask: what is there
      is unknown (that instance, or background, or something behind it);
    * ``class + 1`` where it lies in the mask of an instance *with* a mask; labelled pixels win
      over mask-less boxes (they are known), and later masks over earlier ones.

    Args:
        masks: bool [P, H, W] masks at image resolution of the instances that have one.
        classes: [P] their contiguous class ids (0-based).
        ignore_boxes: [Q, 4] (x0, y0, x1, y1) image-pixel boxes of the instances without a mask.
        size: (h, w) of the output; h * s may exceed H (padding).
        stride: s, an integer >= 1.
        ignore_index: the label of ignored cells.

    Returns:
        Tensor[h, w] int64.
    """
    h, w = size
    device = classes.device
    target = torch.zeros((h, w), dtype=torch.int64, device=device)
    cy = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * stride
    cx = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * stride
    if len(ignore_boxes):
        b = ignore_boxes.to(device=device, dtype=torch.float32)
        in_y = (cy[None, :] >= b[:, 1:2]) & (cy[None, :] < b[:, 3:4])  # [Q, h]
        in_x = (cx[None, :] >= b[:, 0:1]) & (cx[None, :] < b[:, 2:3])  # [Q, w]
        target[(in_y[:, :, None] & in_x[:, None, :]).any(dim=0)] = ignore_index
    if len(masks):
        mask_h, mask_w = masks.shape[-2:]
        iy, ix = cy.floor().long(), cx.floor().long()
        valid_y, valid_x = iy < mask_h, ix < mask_w
        sampled = torch.zeros((len(masks), h, w), dtype=torch.bool, device=device)
        inside = masks.to(device)[:, iy[valid_y]][:, :, ix[valid_x]]
        sampled[:, : int(valid_y.sum()), : int(valid_x.sum())] = inside  # valid cells come first
        for mask, cls in zip(sampled, classes.tolist()):
            target[mask] = int(cls) + 1
    return target
