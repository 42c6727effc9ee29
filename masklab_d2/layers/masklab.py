"""MaskLab's building blocks (Chen et al., "MaskLab: Instance Segmentation by Refining Object
Detection with Semantic and Direction Features", CVPR 2018), in plain PyTorch.

MaskLab predicts, densely over the image, semantic logits (one channel per class, plus
background) and class-agnostic *direction* logits: D directions x B distance bins (8 x 4 = 32)
that say where a pixel lies relative to the centre of its instance. For each box it crops the
semantic channel of the box's class and all direction channels, *assembles* the direction crop
(each crop pixel takes the channel of the region it occupies relative to the box centre, as in
InstanceFCN/FCIS), fuses the two with a class-agnostic 1x1 conv initialised to (0.5, 1) into
coarse mask logits, and refines them with hypercolumn features through three 5x5 convs.

Choices the paper leaves open (each a config key of MaskLabHead, see docs/heads.md):

* Regions are defined in box-normalised coordinates u = (x - cx) / (w / 2), v = (y - cy) / (h / 2)
  around the box centre. Direction d covers angles [d, d + 1) * 360 / D degrees, measured from
  +x towards +y (image y points down), so bin 0 starts at 0 degrees as the paper's Fig. 3 shows.
* Distance bins split the normalised radius max(|u|, |v|) (concentric box-shaped rings, "box"
  metric, default) or sqrt(u^2 + v^2) ("ellipse" metric) at equal steps of 1 / B; everything
  beyond the last edge (e.g. outside the box) falls in the outer bin.
* One function, :meth:`DirectionBinning.bins`, defines both the pooling regions and the dense
  direction targets, so the two cannot disagree. Targets use the ground-truth box centre by
  default; "mask" uses the mask centroid instead (Uhrig et al.'s choice), normalised by the box.
* Crops sample the ROIAlign lattice of the box (bin centres), so the S x S masks paste into the
  image exactly as detectron2's other heads' masks do.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .crop_and_resize import crop_and_resize


class DirectionBinning:
    """Quantisation of box-relative positions into D directions x B distance bins.

    Args:
        num_directions: D.
        num_distance_bins: B.
        distance_metric: "box" (max(|u|, |v|)) or "ellipse" (sqrt(u^2 + v^2)).
    """

    def __init__(
        self, num_directions: int = 8, num_distance_bins: int = 4, distance_metric: str = "box"
    ):
        if num_directions < 1 or num_distance_bins < 1:
            raise ValueError(
                f"need >= 1 direction and distance bin, got {num_directions}, {num_distance_bins}"
            )
        if distance_metric not in ("box", "ellipse"):
            raise ValueError(f"distance_metric must be 'box' or 'ellipse', got {distance_metric!r}")
        self.num_directions = num_directions
        self.num_distance_bins = num_distance_bins
        self.distance_metric = distance_metric

    @property
    def num_channels(self) -> int:
        return self.num_directions * self.num_distance_bins

    def bins(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Channel index (direction * B + distance bin) of box-normalised positions (u, v).

        Args:
            u, v: tensors of the same shape; (0, 0) is the centre, +-1 the box edges.

        Returns:
            int64 tensor of that shape with values in [0, D * B).
        """
        angle = torch.remainder(torch.atan2(v, u), 2 * math.pi)
        direction = torch.floor(angle / (2 * math.pi / self.num_directions)).long()
        direction = direction.clamp_(0, self.num_directions - 1)
        if self.distance_metric == "box":
            radius = torch.maximum(u.abs(), v.abs())
        else:
            radius = torch.sqrt(u * u + v * v)
        distance = torch.floor(radius * self.num_distance_bins).long()
        distance = distance.clamp_(0, self.num_distance_bins - 1)
        return direction * self.num_distance_bins + distance

    def crop_template(self, size: int, device=None) -> torch.Tensor:
        """[S, S] channel index of each sample of an S x S crop (ROIAlign lattice of the box)."""
        coords = (2 * torch.arange(size, dtype=torch.float32, device=device) + 1) / size - 1
        v, u = torch.meshgrid(coords, coords, indexing="ij")
        return self.bins(u, v)

    def __repr__(self) -> str:
        return (
            f"DirectionBinning(num_directions={self.num_directions}, "
            f"num_distance_bins={self.num_distance_bins}, distance_metric={self.distance_metric!r})"
        )


def direction_pool(direction_crops: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """Assembles direction crops: each pixel takes the channel its region names.

    Args:
        direction_crops: [K, D * B, S, S] crops of the direction logits.
        template: [S, S] int64 channel index per pixel (:meth:`DirectionBinning.crop_template`).

    Returns:
        Tensor[K, 1, S, S].
    """
    index = template.to(direction_crops.device)[None, None].expand(
        direction_crops.shape[0], 1, -1, -1
    )
    return torch.gather(direction_crops, 1, index)


class SemanticDirectionBranch(nn.Module):
    """Dense branch: input maps -> "top" feature map -> semantic and direction logits (1x1 convs).

    With ``conv_dim > 0`` the input levels are merged Panoptic-FPN style (each level goes through
    3x3 conv + norm + ReLU blocks, with 2x bilinear upsampling, until it reaches the common
    stride, then the levels are summed) -- the FPN variant. With ``conv_dim == 0`` the single
    input map is itself the top feature map -- the C4 variant, where MaskLab's 1x1 convs sit on
    the (atrous, multi-grid) res5.

    Args:
        in_channels: channels of each input level.
        in_strides: stride of each input level.
        common_stride: stride of the output maps.
        conv_dim: width of the merge convs, 0 for none.
        num_semantic_channels: channels of the semantic logits (K + 1, background last; 2 for
            a class-agnostic foreground / background pair); 0 builds no semantic conv.
        num_direction_channels: D * B; 0 builds no direction conv.
        norm: a callable channels -> norm module (or None).

    Only the 1x1 convs whose logits are used are built: a conv whose output reaches no loss
    would leave parameters without gradients, which detectron2's DDP wrapper
    (find_unused_parameters=False) rejects.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_strides: Sequence[int],
        common_stride: int,
        conv_dim: int,
        num_semantic_channels: int,
        num_direction_channels: int,
        norm=None,
    ):
        super().__init__()
        self.common_stride = common_stride
        if conv_dim == 0:
            if len(in_channels) != 1 or in_strides[0] != common_stride:
                raise ValueError(
                    "without merge convs the branch reads one map at the common stride"
                )
            self.scale_heads = None
            top_channels = in_channels[0]
        else:
            self.scale_heads = nn.ModuleList()
            for channels, stride in zip(in_channels, in_strides):
                if stride < common_stride:
                    raise ValueError(
                        f"input stride {stride} is finer than the common stride {common_stride}"
                    )
                steps = max(1, int(math.log2(stride // common_stride)))
                layers = []
                for step in range(steps):
                    conv = nn.Conv2d(
                        channels if step == 0 else conv_dim,
                        conv_dim,
                        3,
                        padding=1,
                        bias=norm is None,
                    )
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    layers += [conv] + ([norm(conv_dim)] if norm else []) + [nn.ReLU(inplace=True)]
                    if stride > common_stride:
                        layers.append(
                            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
                        )
                        stride //= 2
                self.scale_heads.append(nn.Sequential(*layers))
            top_channels = conv_dim
        if not (num_semantic_channels or num_direction_channels):
            raise ValueError("the dense branch needs semantic or direction logits, or both")
        self.semantic = self.direction = None
        if num_semantic_channels:
            self.semantic = nn.Conv2d(top_channels, num_semantic_channels, 1)
        if num_direction_channels:
            self.direction = nn.Conv2d(top_channels, num_direction_channels, 1)
        for conv in (self.semantic, self.direction):
            if conv is not None:
                nn.init.normal_(conv.weight, std=0.01)
                nn.init.zeros_(conv.bias)

    def forward(
        self, features: List[torch.Tensor]
    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Input maps (fine to coarse) -> (semantic [N, C_sem, h, w], direction [N, D*B, h, w]).

        A logit map whose conv was not built is None.
        """
        if self.scale_heads is None:
            top = features[0]
        else:
            top = None
            for head, feature in zip(self.scale_heads, features):
                out = head(feature)
                if top is None:
                    top = out
                    continue
                if out.shape[-2:] != top.shape[-2:]:
                    # Input sizes that are not multiples of the coarsest stride leave the
                    # upsampled levels a pixel off.
                    out = F.interpolate(
                        out, size=top.shape[-2:], mode="bilinear", align_corners=False
                    )
                top = top + out
        semantic = self.semantic(top) if self.semantic is not None else None
        direction = self.direction(top) if self.direction is not None else None
        return semantic, direction


class CoarseMaskFusion(nn.Module):
    """Class-agnostic 1x1 conv over [semantic crop, pooled direction] -> coarse mask logits.

    Initialised to weight (0.5, 1) and bias 0, the paper's initialisation ("a slightly larger
    weight on the direction features"); with one input kind only, its weight alone.

    Args:
        use_semantic: include the semantic crop.
        use_direction: include the pooled direction crop.
    """

    def __init__(self, use_semantic: bool = True, use_direction: bool = True):
        super().__init__()
        if not (use_semantic or use_direction):
            raise ValueError("MaskLab needs semantic or direction features, or both")
        self.use_semantic, self.use_direction = use_semantic, use_direction
        init = ([0.5] if use_semantic else []) + ([1.0] if use_direction else [])
        self.conv = nn.Conv2d(len(init), 1, kernel_size=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(init).view(1, -1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, semantic_crop: torch.Tensor, pooled_direction: torch.Tensor) -> torch.Tensor:
        """[K, 1, S, S], [K, 1, S, S] -> [K, 1, S, S] (an unused input may be None)."""
        inputs = ([semantic_crop] if self.use_semantic else []) + (
            [pooled_direction] if self.use_direction else []
        )
        return self.conv(torch.cat(inputs, dim=1))


def hypercolumn_crops(
    maps: Sequence[torch.Tensor], strides: Sequence[int], rois: torch.Tensor, size: int
) -> torch.Tensor:
    """The refinement's input: every map cropped at the boxes' S x S bin centres, concatenated.

    Args:
        maps: [N, C_i, H_i, W_i] feature maps (e.g. conv1, res2) with their ``strides``.
        rois: [K, 5] (batch index, x1, y1, x2, y2) from
            :func:`~masklab_d2.layers.crop_and_resize.lattice_rois` for ``size``.
        size: S.

    Returns:
        [K, sum C_i, S, S].
    """
    crops = [
        crop_and_resize(m, rois, 1.0 / stride, size, aligned=True)
        for m, stride in zip(maps, strides)
    ]
    return torch.cat(crops, dim=1)


class HypercolumnRefinement(nn.Module):
    """[coarse logits, hypercolumn crops] -> convs -> refined mask logits (paper's Fig. 4).

    The paper: "three 5x5 convolution layers with 64 filters". A 1x1 conv then predicts the
    logits (our reading: the paper does not say how 64 channels become one mask).

    Args:
        in_channels: channels of the concatenated hypercolumn crops (without the coarse logits).
        num_convs: number of k x k convs.
        conv_dim: their width.
        kernel_size: k.
    """

    def __init__(
        self, in_channels: int, num_convs: int = 3, conv_dim: int = 64, kernel_size: int = 5
    ):
        super().__init__()
        layers = []
        channels = in_channels + 1
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, conv_dim, kernel_size, padding=kernel_size // 2)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = conv_dim
        self.convs = nn.Sequential(*layers)
        self.predictor = nn.Conv2d(channels, 1, 1)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, coarse: torch.Tensor, hypercolumn: torch.Tensor) -> torch.Tensor:
        """[K, 1, S, S], [K, C, S, S] -> [K, 1, S, S]."""
        return self.predictor(self.convs(torch.cat([coarse, hypercolumn], dim=1)))


def crop_semantic_channels(
    semantic_logits: torch.Tensor,
    rois: torch.Tensor,
    classes: torch.Tensor,
    spatial_scale: float,
    size: int,
) -> torch.Tensor:
    """Crops, per roi, the semantic channel of its class.

    Args:
        semantic_logits: [N, K + 1, h, w].
        rois: [R, 5] lattice rois (:func:`~masklab_d2.layers.crop_and_resize.lattice_rois`).
        classes: [R] int64 class of each roi.

    Returns:
        Tensor[R, 1, S, S].
    """
    crops = crop_and_resize(semantic_logits, rois, spatial_scale, size, aligned=True)
    return crops[torch.arange(len(classes), device=crops.device), classes][:, None]


def dense_targets(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    classes: torch.Tensor,
    has_mask: torch.Tensor,
    binning: DirectionBinning,
    stride: int,
    output_size: Tuple[int, int],
    num_classes: int,
    center: str = "box",
    ignore_value: int = -1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel semantic and direction targets of one image, at the dense branch's stride.

    Pixels of an instance with a mask get its class and its direction bin (relative to its box,
    or mask centroid with ``center="mask"``, normalised by its box). Pixels inside the box of an
    instance without a mask, and not in any mask, are unknown (``ignore_value``) for the semantic
    target; the rest is background (``num_classes``). Direction is ``ignore_value`` outside masks.

    Args:
        masks: [n, H, W] bool instance masks at input resolution (placeholders where no mask).
        boxes: [n, 4] (x1, y1, x2, y2) input pixels.
        classes: [n] int64.
        has_mask: [n] bool.
        stride: stride of the targets.
        output_size: (h, w) of the targets.

    Returns:
        (semantic [h, w] int64, direction [h, w] int64).
    """
    if center not in ("box", "mask"):
        raise ValueError(f"center must be 'box' or 'mask', got {center!r}")
    height, width = output_size
    device = boxes.device
    # Input-pixel coordinates of the target grid's cell centres.
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * stride
    semantic = torch.full((height, width), num_classes, dtype=torch.int64, device=device)
    direction = torch.full((height, width), ignore_value, dtype=torch.int64, device=device)
    if len(boxes) == 0:
        return semantic, direction
    # Sample masks at the cell centres; cells beyond the masks (batch padding) are in none.
    mask_h, mask_w = masks.shape[-2:]
    rows, cols = ys.long(), xs.long()
    valid = (rows < mask_h)[:, None] & (cols < mask_w)[None, :]
    sampled = masks[:, rows.clamp(max=mask_h - 1)][:, :, cols.clamp(max=mask_w - 1)] & valid
    in_mask = sampled & has_mask[:, None, None]
    for index in torch.nonzero(~has_mask).flatten().tolist():
        x1, y1, x2, y2 = boxes[index].tolist()
        inside = (
            (ys[:, None] >= y1) & (ys[:, None] <= y2) & (xs[None, :] >= x1) & (xs[None, :] <= x2)
        )
        semantic[inside] = ignore_value
    v_grid, u_grid = ys[:, None].expand(height, width), xs[None, :].expand(height, width)
    for index in torch.nonzero(has_mask).flatten().tolist():
        region = in_mask[index]
        if not region.any():
            continue
        x1, y1, x2, y2 = boxes[index].tolist()
        half_w, half_h = max((x2 - x1) / 2, 1e-6), max((y2 - y1) / 2, 1e-6)
        if center == "box":
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        else:
            cy, cx = (float(c) for c in torch.nonzero(masks[index]).float().mean(0))
            cx, cy = cx + 0.5, cy + 0.5
        semantic[region] = classes[index]
        u = (u_grid[region] - cx) / half_w
        v = (v_grid[region] - cy) / half_h
        direction[region] = binning.bins(u, v)
    return semantic, direction


def select_semantic_classes(
    logits: torch.Tensor,
    targets: torch.Tensor,
    class_ids: Sequence[int],
    ignore_value: int = -1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Restricts a per-pixel softmax over K classes + background to ``class_ids`` + background.

    Under partial supervision a class without masks never appears in the semantic targets; left
    in the softmax it would be pushed below background at every labelled pixel, i.e. trained to
    mean "never this class". Dropping its channel from the loss leaves it unconstrained (ignored,
    not background).

    Args:
        logits: [N, K + 1, h, w], background last.
        targets: [N, h, w] int64 in [0, K] or ``ignore_value``.
        class_ids: the classes that keep their channel (sorted or not, no duplicates).

    Returns:
        (logits [N, len(class_ids) + 1, h, w], targets [N, h, w] re-indexed to match; pixels of a
        dropped class, which a correct target never has, become ``ignore_value``).
    """
    num_classes = logits.shape[1] - 1
    keep = torch.tensor(list(class_ids) + [num_classes], dtype=torch.long, device=logits.device)
    lookup = torch.full((num_classes + 1,), ignore_value, dtype=torch.long, device=logits.device)
    lookup[keep] = torch.arange(len(keep), device=logits.device)
    labelled = targets != ignore_value
    remapped = torch.full_like(targets, ignore_value)
    remapped[labelled] = lookup[targets[labelled]]
    return logits.index_select(1, keep), remapped
