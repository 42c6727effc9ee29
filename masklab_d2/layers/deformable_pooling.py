"""Deformable crop-and-resize pooling with a learned offset network (MaskLab, Sec. 3, Fig. 5).

A plain crop of the box feeds a small network that predicts one (x, y) offset per sub-box; the
crop is then taken again at the shifted sub-boxes with
:func:`~masklab_d2.layers.deformable_crop_and_resize`. The last layer of the offset network is
zero-initialised, so training starts from plain crop-and-resize (as Deformable ConvNets do).

The paper does not give the offset network; like Deformable ConvNets' RoI pooling (and mmcv's
DeformRoIPoolPack) it is an MLP on the flattened plain crop: C*R*R -> hidden -> ReLU -> 2*G*G.
Two safeguards keep it from running away, which it does with adaptive optimisers on unnormalised
features (offsets of ~1000 box units after a few hundred AdamW steps were seen here):

* offsets are bounded smoothly, ``max_offset * tanh(raw / max_offset)``;
* the network carries ``lr_factor`` (Deformable ConvNets train offset layers at 0.01x the base
  learning rate), which masklab_d2's optimiser builder applies to its parameters.
"""

from typing import Optional

import torch
from torch import nn

from .crop_and_resize import crop_and_resize
from .deformable_crop_and_resize import deformable_crop_and_resize


class SubBoxOffsetNet(nn.Module):
    """[K, C, R, R] plain crops -> [K, 2, G, G] sub-box offsets (box units, x then y).

    Args:
        in_channels: C.
        resolution: R.
        grid: G.
        hidden_dim: width of the hidden layer.
        max_offset: bound on each offset (box units before the deformable op's gamma).
        lr_factor: learning-rate multiplier for these parameters (see the module docstring).
    """

    def __init__(
        self,
        in_channels: int,
        resolution: int,
        grid: int,
        hidden_dim: int = 256,
        max_offset: float = 5.0,
        lr_factor: float = 1.0,
    ):
        super().__init__()
        if max_offset <= 0:
            raise ValueError(f"max_offset must be positive, got {max_offset}")
        self.grid = grid
        self.max_offset = max_offset
        self.lr_factor = lr_factor
        self.hidden = nn.Linear(in_channels * resolution * resolution, hidden_dim)
        self.offsets = nn.Linear(hidden_dim, 2 * grid * grid)
        nn.init.kaiming_uniform_(self.hidden.weight, a=1)
        nn.init.zeros_(self.hidden.bias)
        # Zero offsets: the deformable crop starts as the plain crop.
        nn.init.zeros_(self.offsets.weight)
        nn.init.zeros_(self.offsets.bias)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.hidden(crops.flatten(1)))
        raw = self.offsets(hidden).view(-1, 2, self.grid, self.grid)
        return self.max_offset * torch.tanh(raw / self.max_offset)

    def extra_repr(self) -> str:
        return f"grid={self.grid}, max_offset={self.max_offset}, lr_factor={self.lr_factor}"


class DeformableCropAndResizePool(nn.Module):
    """Plain crop -> offsets -> deformable crop, for one feature map.

    Call signature ``(features [N, C, H, W], rois [K, 5]) -> [K, C, R, R]``, the same as a
    detectron2 ROIPooler level pooler, so it can stand in for one.

    Args:
        output_size: R (divisible by ``grid``).
        spatial_scale: feature-map size / input size.
        offset_net: a :class:`SubBoxOffsetNet` (may be shared between feature levels).
        gamma: offset scale of the deformable op.
        aligned: half-pixel coordinate convention.

    Attributes:
        last_rois, last_offsets: the rois [K, 5] and offsets [K, 2, G, G] of the latest call
            (detached), for visualising the learned sub-boxes.
    """

    def __init__(
        self,
        output_size: int,
        spatial_scale: float,
        offset_net: SubBoxOffsetNet,
        gamma: float = 0.1,
        aligned: bool = True,
    ):
        super().__init__()
        if output_size % offset_net.grid:
            raise ValueError(
                f"output size {output_size} is not divisible by grid {offset_net.grid}"
            )
        self.output_size = output_size
        self.spatial_scale = float(spatial_scale)
        self.offset_net = offset_net
        self.gamma = gamma
        self.aligned = aligned
        self.last_rois: Optional[torch.Tensor] = None
        self.last_offsets: Optional[torch.Tensor] = None

    def forward(self, features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        plain = crop_and_resize(features, rois, self.spatial_scale, self.output_size, self.aligned)
        offsets = self.offset_net(plain)
        self.last_rois, self.last_offsets = rois.detach(), offsets.detach()
        return deformable_crop_and_resize(
            features, rois, offsets, self.spatial_scale, self.output_size, self.gamma, self.aligned
        )

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"grid={self.offset_net.grid}, gamma={self.gamma}, aligned={self.aligned}"
        )
