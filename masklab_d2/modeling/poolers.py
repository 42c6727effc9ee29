"""ROI poolers by name: detectron2's types plus "CropAndResize" and "DeformableCropAndResize".

Both new types reuse detectron2's `ROIPooler` (its FPN level assignment and batching) with the
per-level poolers swapped for masklab_d2's crop ops, so they plug into any head that takes pooled
features. "DeformableCropAndResize" learns sub-box offsets (MaskLab's deformable crop and resize);
one offset network is shared by all feature levels, as the box head is.

The cropping convention: "CropAndResize" samples each box's S x S bin centres, half-pixel
aligned, with RoIAlign's border rule -- exactly detectron2's ROIAlignV2 with sampling_ratio 1,
computed by the faster crop op -- which is also how MaskLab's crops and BlendMask's base crops
sample. Every head of a comparison config then reads its box and mask inputs the same way.
"DeformableCropAndResize" keeps TensorFlow's lattice on the box edges (MaskLab's paper op, whose
sub-box structure is defined on it).
"""

from typing import Dict, Sequence

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from torch import nn

from masklab_d2.layers.crop_and_resize import crop_and_resize, lattice_rois
from masklab_d2.layers.deformable_pooling import DeformableCropAndResizePool, SubBoxOffsetNet

CROP_POOLER_TYPES = ("CropAndResize", "DeformableCropAndResize")


class BinCentreCropAndResize(nn.Module):
    """crop_and_resize at a box's S x S bin centres: RoIAlign(aligned=True, sampling_ratio=1).

    Args:
        output_size: S.
        spatial_scale: feature-map size / input size.
    """

    def __init__(self, output_size: int, spatial_scale: float):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = float(spatial_scale)

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W], [K, 5] (batch index, x1, y1, x2, y2) -> [K, C, S, S]."""
        lattice = lattice_rois(rois[:, 1:], rois[:, 0], self.output_size)
        return crop_and_resize(
            features, lattice, self.spatial_scale, self.output_size, aligned=True
        )

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class CropAndResizePooler(ROIPooler):
    """ROIPooler with ROIAlignV2's result at sampling_ratio 1, computed by crop_and_resize.

    One sample per output pixel at the bin centre (:class:`BinCentreCropAndResize`), half-pixel
    aligned, RoIAlign's border rule; ``sampling_ratio`` does not apply.
    """

    def __init__(self, output_size: int, scales: Sequence[float], **kwargs):
        super().__init__(output_size, scales, sampling_ratio=0, pooler_type="ROIAlignV2", **kwargs)
        self.level_poolers = nn.ModuleList(
            BinCentreCropAndResize(output_size, scale) for scale in scales
        )


class DeformableCropAndResizePooler(ROIPooler):
    """ROIPooler whose level poolers are :class:`DeformableCropAndResizePool` with a shared
    offset network.

    Attributes:
        offset_net: the shared :class:`SubBoxOffsetNet`.
    """

    def __init__(
        self,
        output_size: int,
        scales: Sequence[float],
        in_channels: int,
        grid: int = 7,
        gamma: float = 0.1,
        hidden_dim: int = 256,
        max_offset: float = 5.0,
        lr_factor: float = 0.01,
        **kwargs,
    ):
        """
        Args:
            output_size: R, the crops' size (a multiple of ``grid``).
            scales: 1 / stride of each pyramid level.
            in_channels: C of the pooled maps.
            grid: G, sub-boxes per side (MODEL.ROI_BOX_HEAD.DEFORMABLE_GRID).
            gamma: offset scale (DEFORMABLE_GAMMA).
            hidden_dim: width of the offset MLP (DEFORMABLE_HIDDEN_DIM).
            max_offset: smooth bound on each offset, box units before gamma
                (DEFORMABLE_MAX_OFFSET).
            lr_factor: learning-rate multiplier of the offset network (DEFORMABLE_LR_FACTOR;
                Deformable ConvNets' 0.01).
            kwargs: see detectron2's ROIPooler.
        """
        super().__init__(output_size, scales, sampling_ratio=0, pooler_type="ROIAlignV2", **kwargs)
        self.offset_net = SubBoxOffsetNet(
            in_channels, output_size, grid, hidden_dim, max_offset, lr_factor
        )
        self.level_poolers = nn.ModuleList(
            DeformableCropAndResizePool(output_size, scale, self.offset_net, gamma=gamma)
            for scale in scales
        )


def build_roi_pooler(head_cfg, input_shape: Dict[str, ShapeSpec], in_features: Sequence[str]):
    """The pooler named by ``head_cfg.POOLER_TYPE`` over ``in_features``.

    Args:
        head_cfg: cfg.MODEL.ROI_BOX_HEAD or cfg.MODEL.ROI_MASK_HEAD.
        input_shape: backbone output shapes.
        in_features: the feature maps to pool from.

    Returns:
        (pooler, ShapeSpec of the pooled features).
    """
    resolution = head_cfg.POOLER_RESOLUTION
    scales = tuple(1.0 / input_shape[f].stride for f in in_features)
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(
            f"pooled features {list(in_features)} must share a channel count, got {channels}"
        )
    in_channels = channels.pop()
    pooler_type = head_cfg.POOLER_TYPE
    if pooler_type == "CropAndResize":
        pooler = CropAndResizePooler(resolution, scales)
    elif pooler_type == "DeformableCropAndResize":
        if "DEFORMABLE_GRID" not in head_cfg:
            raise ValueError(
                "POOLER_TYPE 'DeformableCropAndResize' is available for the box head only"
            )
        pooler = DeformableCropAndResizePooler(
            resolution,
            scales,
            in_channels=in_channels,
            grid=head_cfg.DEFORMABLE_GRID,
            gamma=head_cfg.DEFORMABLE_GAMMA,
            hidden_dim=head_cfg.DEFORMABLE_HIDDEN_DIM,
            max_offset=head_cfg.DEFORMABLE_MAX_OFFSET,
            lr_factor=head_cfg.DEFORMABLE_LR_FACTOR,
        )
    else:  # detectron2's own types; ROIPooler raises on unknown names
        pooler = ROIPooler(
            output_size=resolution,
            scales=scales,
            sampling_ratio=head_cfg.POOLER_SAMPLING_RATIO,
            pooler_type=pooler_type,
        )
    return pooler, ShapeSpec(channels=in_channels, height=resolution, width=resolution)
