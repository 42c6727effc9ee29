"""MaskLab's deformable crop-and-resize (Chen et al., CVPR 2018, Sec. 3 and Fig. 5).

MaskLab crops a box, splits the crop into G x G sub-boxes, predicts an offset per sub-box and crops
again at the shifted sub-boxes. Here a sub-box is the group of (S/G) x (S/G) samples of the plain
S x S crop lattice that it covers, and its shift is ``gamma * offset * (box_w, box_h)`` (Dai et
al.'s normalisation, gamma = 0.1). With zero offsets the result is therefore *exactly* the plain
:func:`~masklab_d2.layers.crop_and_resize`, which lets an offset network start from plain pooling.
"""

from typing import Tuple, Union

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .crop_and_resize import (
    BoxesLike,
    bilinear_sample_reference,
    boxes_to_rois,
    sample_positions_reference,
)


def deformable_crop_and_resize(
    features: torch.Tensor,
    boxes: BoxesLike,
    offsets: torch.Tensor,
    spatial_scale: float,
    output_size: Union[int, Tuple[int, int]],
    gamma: float = 0.1,
    aligned: bool = False,
) -> torch.Tensor:
    """Crop-and-resize with per-sub-box offsets (compiled op).

    Args:
        features: [N, C, H, W], any float dtype, any memory format; channels-last is the CPU
            fast path (as for :func:`~masklab_d2.layers.crop_and_resize`).
        boxes: [K, 5] (batch_index, x1, y1, x2, y2) in input pixels, or a list of [K_i, 4].
        offsets: [K, 2, G, G] sub-box offsets in units of the box size (channel 0: x, 1: y).
            G must divide both output sides.
        spatial_scale: feature-map size / input size.
        output_size: S or (S_h, S_w).
        gamma: offset scale (0.1 in Deformable ConvNets and here).
        aligned: half-pixel coordinate convention with RoIAlign's border rule (a sample within
            one pixel outside the map reads the border value), else TensorFlow's (0 outside the
            map); see :mod:`masklab_d2.layers.crop_and_resize`.

    Returns:
        Tensor[K, C, S_h, S_w]. Differentiable w.r.t. ``features``, ``boxes`` and ``offsets``.
    """
    from ._ops import ops

    out_h, out_w = _pair(output_size)
    return ops.deformable_crop_and_resize(
        features,
        boxes_to_rois(boxes),
        offsets,
        float(spatial_scale),
        out_h,
        out_w,
        float(gamma),
        aligned,
    )


class DeformableCropAndResize(nn.Module):
    """Module form of :func:`deformable_crop_and_resize`; offsets are a forward argument.

    Args:
        output_size: S or (S_h, S_w).
        spatial_scale: feature-map size / input size.
        grid: G, the number of sub-boxes per side.
        gamma: offset scale.
        aligned: half-pixel coordinate convention.
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        spatial_scale: float,
        grid: int,
        gamma: float = 0.1,
        aligned: bool = False,
    ):
        super().__init__()
        self.output_size = _pair(output_size)
        if self.output_size[0] % grid or self.output_size[1] % grid:
            raise ValueError(f"output_size {self.output_size} must be divisible by grid={grid}")
        self.spatial_scale = float(spatial_scale)
        self.grid = grid
        self.gamma = gamma
        self.aligned = aligned

    def forward(
        self, features: torch.Tensor, boxes: BoxesLike, offsets: torch.Tensor
    ) -> torch.Tensor:
        """[N, C, H, W], [K, 5], [K, 2, G, G] -> [K, C, S_h, S_w]."""
        if offsets.dim() != 4 or offsets.shape[2:] != (self.grid, self.grid):
            raise ValueError(
                f"offsets must be [K, 2, {self.grid}, {self.grid}], got {tuple(offsets.shape)}"
            )
        return deformable_crop_and_resize(
            features, boxes, offsets, self.spatial_scale, self.output_size, self.gamma, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"grid={self.grid}, gamma={self.gamma}, aligned={self.aligned}"
        )


def deformable_crop_and_resize_reference(
    features: torch.Tensor,
    boxes: BoxesLike,
    offsets: torch.Tensor,
    spatial_scale: float,
    output_size: Union[int, Tuple[int, int]],
    gamma: float = 0.1,
    aligned: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch :func:`deformable_crop_and_resize` (F.grid_sample based)."""
    rois = boxes_to_rois(boxes)
    y, x = sample_positions_reference(
        rois, spatial_scale, _pair(output_size), aligned, offsets=offsets, gamma=gamma
    )
    return bilinear_sample_reference(features, rois[:, 0].long(), y, x, clamp_border=aligned)


__all__ = [
    "deformable_crop_and_resize",
    "DeformableCropAndResize",
    "deformable_crop_and_resize_reference",
]
