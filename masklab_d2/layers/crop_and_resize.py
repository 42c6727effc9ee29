"""TensorFlow-style crop-and-resize (``tf.image.crop_and_resize``) for PyTorch.

Unlike RoIAlign, which averages samples at bin centres, crop_and_resize places its ``S`` samples per
axis on the box itself: the first and last on the box edges, the rest evenly in between, and a
single sample (S = 1) at the box centre. The op is differentiable in the features *and* in the box
coordinates, which is what lets MaskLab learn deformable sub-box offsets.

Two conventions, chosen by ``aligned``:

* ``aligned=False``, TensorFlow's: a coordinate maps to the feature map as ``x * spatial_scale``
  (corner-aligned, pixel centres at integers), and a sample outside ``[0, H - 1] x [0, W - 1]``
  reads 0.
* ``aligned=True``, detectron2's ROIAlignV2 / torchvision's ``roi_align(aligned=True)``: the
  coordinate is ``x * spatial_scale - 0.5`` (pixel centres at half-integers, so that crops of maps
  at different strides line up), with RoIAlign's border rule: a sample within one pixel outside
  the map (``y`` in ``[-1, 0)`` or ``(H - 1, H]``, ``x`` likewise) reads the border value, and one
  farther out reads 0. A box whose edge lies on the image border (at feature coordinate -0.5)
  therefore keeps its outer row and column, as with roi_align; the feature gradient of such a
  sample goes to the border pixel, and its position gradient along the clamped axis is 0.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

BoxesLike = Union[torch.Tensor, Sequence[torch.Tensor]]


def boxes_to_rois(boxes: BoxesLike) -> torch.Tensor:
    """Accepts boxes as a [K, 5] tensor or as a list of per-image [K_i, 4] tensors.

    Returns:
        Tensor[K, 5]: (batch_index, x1, y1, x2, y2) rows.
    """
    if isinstance(boxes, torch.Tensor):
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(
            f"boxes must be a [K, 5] tensor or a list of [K_i, 4] tensors, got {type(boxes)}"
        )
    for i, b in enumerate(boxes):
        if not isinstance(b, torch.Tensor) or b.dim() != 2 or b.shape[1] != 4:
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b)
            raise ValueError(
                f"boxes[{i}] must be a [K_i, 4] tensor of (x1, y1, x2, y2), got {shape}"
            )
    if len(boxes) == 0:
        raise ValueError("boxes is an empty list: pass one [K_i, 4] tensor per image")
    batch_index = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([batch_index, torch.cat(list(boxes), dim=0)], dim=1)


def crop_and_resize(
    features: torch.Tensor,
    boxes: BoxesLike,
    spatial_scale: float,
    crop_size: Union[int, Tuple[int, int]],
    aligned: bool = False,
) -> torch.Tensor:
    """Crops boxes out of feature maps and resizes them bilinearly (compiled op).

    Args:
        features: [N, C, H, W] feature maps, any float dtype, any memory format; channels-last
            is the CPU fast path (NCHW maps are copied to channels-last once per call unless
            the crops are sparse against the map).
        boxes: [K, 5] (batch_index, x1, y1, x2, y2) in input pixels, or a list of N [K_i, 4]
            tensors. x1 > x2 (or y1 > y2) flips the crop.
        spatial_scale: feature-map size / input size, e.g. 1/8 for a stride-8 map.
        crop_size: S or (S_h, S_w) samples.
        aligned: the half-pixel (ROIAlignV2) convention with RoIAlign's border rule instead of
            TensorFlow's; see the module docstring.

    Returns:
        Tensor[K, C, S_h, S_w] in the dtype of ``features``. Differentiable w.r.t. ``features``
        and ``boxes``.
    """
    from ._ops import ops

    crop_h, crop_w = _pair(crop_size)
    return ops.crop_and_resize(
        features, boxes_to_rois(boxes), float(spatial_scale), crop_h, crop_w, aligned
    )


class CropAndResize(nn.Module):
    """Module form of :func:`crop_and_resize`.

    Args:
        crop_size: S or (S_h, S_w).
        spatial_scale: feature-map size / input size.
        aligned: half-pixel coordinate convention (see :func:`crop_and_resize`).
    """

    def __init__(
        self, crop_size: Union[int, Tuple[int, int]], spatial_scale: float, aligned: bool = False
    ):
        super().__init__()
        self.crop_size = _pair(crop_size)
        self.spatial_scale = float(spatial_scale)
        self.aligned = aligned

    def forward(self, features: torch.Tensor, boxes: BoxesLike) -> torch.Tensor:
        """[N, C, H, W], [K, 5] -> [K, C, S_h, S_w]."""
        return crop_and_resize(features, boxes, self.spatial_scale, self.crop_size, self.aligned)

    def extra_repr(self) -> str:
        return f"crop_size={self.crop_size}, spatial_scale={self.spatial_scale}, aligned={self.aligned}"


def lattice_rois(boxes: torch.Tensor, batch_index: torch.Tensor, size: int) -> torch.Tensor:
    """[K, 5] rois whose crop_and_resize samples lie on the box's S x S bin centres.

    With ``aligned=True`` the crop of these rois is RoIAlign(aligned=True, sampling_ratio=1) of
    the boxes (bin centres, half-pixel aligned, the same border rule).

    crop_and_resize puts its first and last samples on the box edges; shrinking the box by half
    a bin on each side moves them to the bin centres, the lattice detectron2 pastes masks with.

    Args:
        boxes: [K, 4] (x1, y1, x2, y2) in input pixels.
        batch_index: [K] image index of each box.
    """
    half_bin = (boxes[:, 2:] - boxes[:, :2]) / (2 * size)
    shrunk = torch.cat([boxes[:, :2] + half_bin, boxes[:, 2:] - half_bin], dim=1)
    return torch.cat([batch_index[:, None].to(boxes.dtype), shrunk], dim=1)


# ---------------------------------------------------------------------------------------------
# Pure-PyTorch reference (F.grid_sample), the ground truth the compiled kernels are tested against.


def _axis_positions(start: torch.Tensor, end: torch.Tensor, count: int) -> torch.Tensor:
    """[K] edges -> [K, count] sample coordinates on the edges (the centre when count == 1)."""
    if count == 1:
        return (0.5 * (start + end))[:, None]
    steps = torch.arange(count, dtype=start.dtype, device=start.device) / (count - 1)
    return start[:, None] + (end - start)[:, None] * steps


def sample_positions_reference(
    rois: torch.Tensor,
    spatial_scale: float,
    output_size: Tuple[int, int],
    aligned: bool,
    offsets: Optional[torch.Tensor] = None,
    gamma: float = 0.1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample coordinates in feature pixels (differentiable in ``rois`` and ``offsets``).

    Args:
        rois: [K, 5] (batch_index, x1, y1, x2, y2) in input pixels.
        offsets: optional [K, 2, G, G] sub-box offsets (channel 0 = x, 1 = y) in box units.

    Returns:
        (y, x), each [K, S_h, S_w].
    """
    out_h, out_w = output_size
    pixel_offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale - pixel_offset for i in range(1, 5))
    y = _axis_positions(y1, y2, out_h)[:, :, None].expand(-1, -1, out_w)
    x = _axis_positions(x1, x2, out_w)[:, None, :].expand(-1, out_h, -1)
    if offsets is not None:
        grid = offsets.shape[2]
        cell_h, cell_w = out_h // grid, out_w // grid
        shift = offsets.repeat_interleave(cell_h, dim=2).repeat_interleave(cell_w, dim=3)
        x = x + gamma * shift[:, 0] * (x2 - x1)[:, None, None]
        y = y + gamma * shift[:, 1] * (y2 - y1)[:, None, None]
    return y, x


def bilinear_sample_reference(
    features: torch.Tensor,
    batch_index: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    clamp_border: bool = False,
) -> torch.Tensor:
    """Bilinear samples of ``features[batch_index[k]]`` at (y, x).

    Args:
        features: [N, C, H, W].
        batch_index: [K] int64.
        y, x: [K, S_h, S_w] feature-pixel coordinates (pixel centres at integers).
        clamp_border: RoIAlign's border rule (the ``aligned=True`` convention): a sample within
            one pixel outside the map reads the border value (its coordinate is clamped, so it has
            no position gradient along that axis) and a sample farther out reads 0. Otherwise
            TensorFlow's rule: every sample outside [0, H - 1] x [0, W - 1] reads 0.

    Returns:
        Tensor[K, C, S_h, S_w].
    """
    height, width = features.shape[-2:]
    margin = 1.0 if clamp_border else 0.0
    inside = (
        (y >= -margin) & (y <= height - 1 + margin) & (x >= -margin) & (x <= width - 1 + margin)
    )
    if clamp_border:
        y = y.clamp(0, height - 1)
        x = x.clamp(0, width - 1)
    # align_corners=True maps -1 / +1 to the first / last pixel centres.
    grid_x = 2 * x / (width - 1) - 1 if width > 1 else x * 0
    grid_y = 2 * y / (height - 1) - 1 if height > 1 else y * 0
    grid = torch.stack([grid_x, grid_y], dim=-1).to(features.dtype)  # [K, S_h, S_w, 2]
    num_boxes, out_h, out_w = y.shape
    if num_boxes == 0:
        return features.new_zeros(0, features.shape[1], out_h, out_w) + 0 * features.sum()
    # One grid_sample per image over all its boxes' samples stacked as rows (indexing the map
    # per box would copy it K times), then the boxes back in their order.
    order, pieces = [], []
    for n in batch_index.unique().tolist():
        boxes = (batch_index == n).nonzero().squeeze(1)
        sampled = F.grid_sample(
            features[n : n + 1],
            grid[boxes].reshape(1, -1, out_w, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=True,
        )  # [1, C, K_n * S_h, S_w]
        order.append(boxes)
        pieces.append(sampled[0].unflatten(1, (boxes.numel(), out_h)).transpose(0, 1))
    sampled = torch.cat(pieces)[torch.argsort(torch.cat(order))]
    return sampled * inside[:, None].to(features.dtype)


def crop_and_resize_reference(
    features: torch.Tensor,
    boxes: BoxesLike,
    spatial_scale: float,
    crop_size: Union[int, Tuple[int, int]],
    aligned: bool = False,
) -> torch.Tensor:
    """Pure-PyTorch :func:`crop_and_resize` (slow; for tests and as executable documentation)."""
    rois = boxes_to_rois(boxes)
    y, x = sample_positions_reference(rois, spatial_scale, _pair(crop_size), aligned)
    return bilinear_sample_reference(features, rois[:, 0].long(), y, x, clamp_border=aligned)


__all__: List[str] = [
    "crop_and_resize",
    "CropAndResize",
    "crop_and_resize_reference",
    "boxes_to_rois",
    "sample_positions_reference",
    "bilinear_sample_reference",
]
