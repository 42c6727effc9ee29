"""The mask head pictures of :mod:`masklab_d2.tools.visualize` (docs/tools.md) and what they draw
from: :class:`Prediction`, one image through the model with what its mask head recorded
(:func:`masklab_d2.modeling.recording`). Each ``draw_*`` takes a :class:`Prediction` and returns
the path it wrote, or None when the model has nothing of that kind.
"""

import colorsys
import copy
import math
from typing import Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import hsv_to_rgb  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from masklab_d2.utils.detectron2 import require_detectron2  # noqa: E402

require_detectron2("masklab_d2.tools.visualize")

import cv2  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.modeling.postprocessing import detector_postprocess  # noqa: E402
from detectron2.structures import Boxes  # noqa: E402

from masklab_d2.modeling import class_agnostic, recording  # noqa: E402
from masklab_d2.modeling.poolers import DeformableCropAndResizePooler  # noqa: E402


class Prediction:
    """One image through the model, with everything the pictures need.

    Attributes:
        image: [H, W, 3] uint8 RGB original image.
        input_size: (h, w) of the resized network input (boxes of ``raw`` live there).
        raw: detections in input coordinates with ``pred_masks`` [R, 1, M, M] probabilities.
        instances: detections in image coordinates with pasted masks (for the Visualizer).
        order: indices of the detections scoring at least the confidence ``threshold``, by
            decreasing score (the only ones any picture draws).
        model: the model; features: its backbone's feature maps; head: its mask head.
        recorded: what the head computed for this image besides its masks (its
            :func:`~masklab_d2.modeling.recording`; empty for a head that records nothing).
    """

    def __init__(self, model, cfg, image: np.ndarray, confidence_threshold: float = 0.0):
        height, width = image.shape[:2]
        augmentation = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        resized = augmentation.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)).astype("float32"))
        self.image = image[:, :, ::-1].copy() if cfg.INPUT.FORMAT == "BGR" else image.copy()
        self.input_size = tuple(resized.shape[:2])
        self.scale = (width / self.input_size[1], height / self.input_size[0])  # input -> image
        self.model = model
        self.head = getattr(model.roi_heads, "mask_head", None)
        captured = {}
        hook = model.backbone.register_forward_hook(
            lambda module, inputs, outputs: captured.update(features=outputs)
        )
        try:
            with torch.no_grad(), recording(self.head) as self.recorded:
                self.raw = model.inference(
                    [{"image": tensor, "height": height, "width": width}], do_postprocess=False
                )[0]
        finally:
            hook.remove()
        self.features = captured["features"]
        self.raw = self.raw.to("cpu")
        # detector_postprocess scales boxes in place: it gets a copy.
        self.instances = detector_postprocess(copy.deepcopy(self.raw), height, width)
        order = torch.argsort(self.raw.scores, descending=True).tolist()
        self.threshold = confidence_threshold
        self.order = [i for i in order if float(self.raw.scores[i]) >= confidence_threshold]

    def image_box(self, index: int) -> np.ndarray:
        """Detection ``index``'s box in image pixels."""
        return self.raw.pred_boxes.tensor[index].numpy() * np.tile(self.scale, 2)

    def patch(self, index: int, size: int) -> np.ndarray:
        """The image under detection ``index``'s box, resized to size x size (as its mask)."""
        height, width = self.image.shape[:2]
        x1, y1, x2, y2 = self.image_box(index)
        x1 = int(np.clip(math.floor(x1), 0, width - 1))
        y1 = int(np.clip(math.floor(y1), 0, height - 1))
        x2 = int(np.clip(math.ceil(x2), x1 + 1, width))
        y2 = int(np.clip(math.ceil(y2), y1 + 1, height))
        return cv2.resize(self.image[y1:y2, x1:x2], (size, size), interpolation=cv2.INTER_LINEAR)

    def dense_extent(
        self, map_size: Tuple[int, int], stride: int
    ) -> Tuple[Tuple[int, int], Tuple[float, ...]]:
        """The (rows, cols) of a stride-``stride`` map that cover the image (not the batch
        padding), and their imshow extent in image pixels."""
        rows = min(map_size[0], math.ceil(self.input_size[0] / stride))
        cols = min(map_size[1], math.ceil(self.input_size[1] / stride))
        extent = (0, cols * stride * self.scale[0], rows * stride * self.scale[1], 0)
        return (rows, cols), extent

    def title(self, index: int, class_names: Sequence[str]) -> str:
        cls = int(self.raw.pred_classes[index])
        name = class_names[cls] if cls < len(class_names) else str(cls)
        return f"#{index} {name} {float(self.raw.scores[index]):.2f}"

    def show_patch(self, ax, index: int, size: int, class_names: Sequence[str]) -> None:
        """Detection ``index``'s image patch, titled with its class and score."""
        show(ax, self.patch(index, size), self.title(index, class_names))


def save_figure(figure, path: str, title: str) -> str:
    """Titles, lays out, writes and closes ``figure``; returns ``path``."""
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def axes_grid(rows: int, cols: int, cell: float = 2.2):
    figure, axes = plt.subplots(rows, cols, figsize=(cols * cell, rows * cell + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return figure, axes


def show(ax, values, title: str, cmap: Optional[str] = None, **kwargs) -> None:
    """``ax.imshow`` with a small title; with a colour map, of values in [0, 1] unless told."""
    if cmap is not None:
        kwargs = {"cmap": cmap, "vmin": 0, "vmax": 1, **kwargs}
    ax.imshow(values, **kwargs)
    ax.set_title(title, fontsize=8)


def _outline(box, **style) -> Rectangle:
    """An unfilled rectangle over ``box`` (x1, y1, x2, y2)."""
    return Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False, **style)


def _symmetric(ax, values: np.ndarray, title: str, **kwargs):
    limit = float(np.abs(values).max()) or 1.0
    show(ax, values, title, "RdBu_r", vmin=-limit, vmax=limit, **kwargs)


def draw_mask_crops(prediction: Prediction, class_names, path: str, top_k: int) -> Optional[str]:
    """Each top detection: its box's image patch over its M x M mask probabilities."""
    if not prediction.raw.has("pred_masks"):
        return None
    top = prediction.order[:top_k]
    figure, axes = axes_grid(2, max(1, len(top)))
    if not top:
        axes[0, 0].text(0.5, 0.5, "no detections", ha="center", va="center")
    for column, index in enumerate(top):
        mask = prediction.raw.pred_masks[index, 0].numpy()
        prediction.show_patch(axes[0, column], index, mask.shape[-1], class_names)
        show(axes[1, column], mask, f"mask {mask.shape[-1]}x{mask.shape[-1]}", "viridis")
    return save_figure(figure, path, "mask crops before pasting (probabilities)")


def direction_colors(
    direction_logits: torch.Tensor, num_directions: int, num_bins: int, relative: bool = True
) -> Tuple[np.ndarray, float]:
    """[D*B, h, w] direction logits -> ([h, w, 3] RGB, the largest sureness): the colour code of
    docs/tools.md, from a softmax over all D*B channels (as the direction loss); ``relative``
    divides by the map's largest sureness, so that an undecided model still shows directions."""
    probabilities = torch.softmax(direction_logits.float(), dim=0)
    by_direction = probabilities.view(num_directions, num_bins, *probabilities.shape[-2:]).sum(1)
    confidence, direction = by_direction.max(0)
    chance, sureness = 1.0 / num_directions, confidence
    if num_directions > 1:
        sureness = ((confidence - chance) / (1 - chance)).clamp(0, 1)
    largest = float(sureness.max()) if sureness.numel() else 0.0
    value = sureness / max(largest, 1e-12) if relative else sureness
    hue = (direction.float() + 0.5) / num_directions
    hsv = torch.stack([hue, torch.ones_like(hue), value], dim=-1).numpy()
    return hsv_to_rgb(hsv), largest


def direction_wheel(num_directions: int, size: int = 101) -> np.ndarray:
    """[size, size, 4] RGBA legend: the colour of each direction bin around a centre, with
    angles from +x towards +y (image y points down), as the bins are defined."""
    coords = np.linspace(-1, 1, size)
    v, u = np.meshgrid(coords, coords, indexing="ij")
    angle = np.mod(np.arctan2(v, u), 2 * np.pi)
    direction = np.minimum(np.floor(angle / (2 * np.pi / num_directions)), num_directions - 1)
    hsv = np.stack([(direction + 0.5) / num_directions, np.ones_like(u), np.ones_like(u)], axis=-1)
    return np.concatenate([hsv_to_rgb(hsv), (np.hypot(u, v) <= 1)[..., None].astype(float)], -1)


def draw_masklab(prediction: Prediction, class_names, path: str, top_k: int) -> Optional[str]:
    """MaskLab's semantic and direction maps and the top detections' crops (docs/tools.md)."""
    head = prediction.head
    maps = prediction.recorded
    if "semantic_logits" not in maps and "direction_logits" not in maps:
        return None
    top = prediction.order[:top_k]
    stride = head.common_stride
    figure, axes = axes_grid(1 + len(top), 5, cell=2.6)
    title = f"image, top detection {prediction.title(top[0], class_names)}" if top else "image"
    show(axes[0, 0], prediction.image, title)
    if top:
        axes[0, 0].add_patch(_outline(prediction.image_box(top[0]), color="yellow", lw=1.5))
    foreground = None
    if "semantic_logits" in maps:
        logits = maps["semantic_logits"][0].float().cpu()
        (rows, cols), extent = prediction.dense_extent(tuple(logits.shape[-2:]), stride)
        probabilities = torch.softmax(logits, dim=0)[:, :rows, :cols]
        foreground = (1 - probabilities[-1]).numpy()  # background is the last channel
        # A class-agnostic semantic input (MODEL.MASKLAB.SEMANTIC_INPUT) has one foreground
        # channel and the background: there is no channel of the detection's class to show.
        cls = int(prediction.raw.pred_classes[top[0]]) if top and not class_agnostic(head) else None
        axes[0, 1].imshow(prediction.image)
        if cls is not None:
            name = class_names[cls] if cls < len(class_names) else cls
            values, title = probabilities[cls].numpy(), f"semantic p({name})"
        else:
            values, title = foreground, "semantic p(foreground)"
        show(axes[0, 1], values, title, "magma", alpha=0.65, extent=extent)
    if "direction_logits" in maps:
        logits = maps["direction_logits"][0].float().cpu()
        (rows, cols), extent = prediction.dense_extent(tuple(logits.shape[-2:]), stride)
        binning = head.binning
        colors, largest = direction_colors(
            logits[:, :rows, :cols], binning.num_directions, binning.num_distance_bins
        )
        title = f"direction: hue; sureness / max ({largest:.2f}): brightness"
        panels = [(axes[0, 2], colors, title)]
        if foreground is not None and foreground.shape == colors.shape[:2]:
            panels.append((axes[0, 3], colors * foreground[..., None], "direction x p(foreground)"))
        for ax, values, title in panels:
            show(ax, values, title, extent=extent, interpolation="nearest")
            ax.set_xlim(0, prediction.image.shape[1])
            ax.set_ylim(prediction.image.shape[0], 0)
        wheel = direction_wheel(binning.num_directions)
        show(axes[0, 4], wheel, "direction bins (+x right, +y down)")
    crops = [
        ("semantic_crop", "semantic crop (logit)", False),
        ("pooled_direction", "assembled direction (logit)", False),
        ("coarse", "coarse mask", True),
        ("refined", "refined mask", True),
    ]
    for row, index in enumerate(top, start=1):
        prediction.show_patch(axes[row, 0], index, head.crop_size, class_names)
        for column, (key, title, probability) in enumerate(crops, start=1):
            if key not in maps or index >= len(maps[key]):
                continue
            values = maps[key][index, 0].float().cpu()
            if probability:
                show(axes[row, column], torch.sigmoid(values).numpy(), title, "viridis")
            else:
                _symmetric(axes[row, column], values.numpy(), title)
    return save_figure(figure, path, "MaskLab: semantic and direction features")


def deformable_offsets(
    model, prediction: Prediction, indices: Sequence[int]
) -> Optional[Tuple[torch.Tensor, float]]:
    """([n, 2, G, G] offsets of detections ``indices``, gamma), or None when the box pooler is
    not deformable. The box pooler runs on the final boxes, so these are their offsets."""
    pooler = getattr(model.roi_heads, "box_pooler", None)
    if not isinstance(pooler, DeformableCropAndResizePooler) or not indices:
        return None
    device = next(model.parameters()).device
    boxes = prediction.raw.pred_boxes.tensor[list(indices)].to(device)
    features = [prediction.features[f] for f in model.roi_heads.box_in_features]
    for level in pooler.level_poolers:
        level.last_rois = level.last_offsets = None
    with torch.no_grad():
        pooler(features, [Boxes(boxes)])
    # Each level pooler saw the boxes of its FPN level: put their offsets back in box order.
    grid = pooler.offset_net.grid
    offsets = torch.zeros(len(indices), 2, grid, grid)
    for level in pooler.level_poolers:
        if level.last_rois is None or len(level.last_rois) == 0:
            continue
        distance = torch.cdist(level.last_rois[:, 1:].float().cpu(), boxes.float().cpu())
        offsets[distance.argmin(dim=1)] = level.last_offsets.float().cpu()
    return offsets, float(pooler.level_poolers[0].gamma)


def sub_boxes(box: np.ndarray, offsets: np.ndarray, gamma: float) -> np.ndarray:
    """[G, G, 4] shifted sub-boxes (x1, y1, x2, y2) of a box: the G x G cells of the crop
    lattice, each moved by gamma * offset * (box width, box height)."""
    grid = offsets.shape[-1]
    x1, y1, x2, y2 = box
    width, height = x2 - x1, y2 - y1
    gi, gj = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    dx, dy = gamma * offsets[0] * width, gamma * offsets[1] * height
    left, right = x1 + gj * width / grid + dx, x1 + (gj + 1) * width / grid + dx
    top, bottom = y1 + gi * height / grid + dy, y1 + (gi + 1) * height / grid + dy
    return np.stack([left, top, right, bottom], axis=-1)


def grid_colors(grid: int) -> np.ndarray:
    """[G, G, 3] colours by grid position: hue along x, brightness along y."""
    value = [1.0 - 0.55 * gi / max(1, grid - 1) for gi in range(grid)]
    return np.array([[colorsys.hsv_to_rgb(gj / grid, 0.9, v) for gj in range(grid)] for v in value])


def draw_deformable(prediction: Prediction, class_names, path: str, top_k: int) -> Optional[str]:
    """The top detections' learned sub-boxes (docs/tools.md)."""
    top = prediction.order[:top_k]
    result = deformable_offsets(prediction.model, prediction, top)
    if result is None:
        return None
    offsets, gamma = result
    grid = offsets.shape[-1]
    colors = grid_colors(grid)
    figure, axes = axes_grid(1, len(top) + 2, cell=3.0)
    show(axes[0, 0], prediction.image, "top detections")
    for column, (index, offset) in enumerate(zip(top, offsets.numpy()), start=1):
        box = prediction.image_box(index)
        cells = sub_boxes(box, offset, gamma)
        ax = axes[0, column]
        ax.imshow(prediction.image)
        for target in (ax, axes[0, 0]):
            target.add_patch(_outline(box, color="white", ls="--", lw=1))
        axes[0, 0].text(box[0], box[1], f"#{index}", color="white", fontsize=7, va="bottom")
        for gi in range(grid):
            for gj in range(grid):
                ax.add_patch(_outline(cells[gi, gj], color=colors[gi, gj], lw=1.2))
        # A square window around the box with a margin, so shifted sub-boxes that leave the box
        # stay visible and thin boxes do not make thin panels.
        half = 0.5 * 1.6 * max(box[2] - box[0], box[3] - box[1], 8.0)
        center_x, center_y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        ax.set_xlim(center_x - half, center_x + half)
        ax.set_ylim(center_y + half, center_y - half)
        mean_shift = gamma * float(np.abs(offset).mean())
        ax.set_title(
            f"{prediction.title(index, class_names)}\nmean |shift| {mean_shift:.3f} box", fontsize=8
        )
    title = f"sub-box colour by grid position ({grid}x{grid})"
    show(axes[0, -1], colors, title, interpolation="nearest")
    return save_figure(figure, path, f"deformable crop-and-resize sub-boxes (gamma {gamma:g})")


def draw_blendmask(prediction: Prediction, class_names, path: str, top_k: int) -> Optional[str]:
    """BlendMask's bases and the top detections' attentions (docs/tools.md)."""
    bases = prediction.recorded.get("bases")
    attentions = prediction.recorded.get("attentions")
    if bases is None or attentions is None:
        return None
    bases = bases[0].float().cpu()
    attentions = attentions.float().cpu()
    num_bases = bases.shape[0]
    top = [i for i in prediction.order[:top_k] if i < len(attentions)]
    stride = getattr(prediction.head, "bases_stride", None) or max(
        1, round(prediction.input_size[0] / bases.shape[-2])
    )
    (rows, cols), extent = prediction.dense_extent(tuple(bases.shape[-2:]), stride)
    figure, axes = axes_grid(1 + len(top), num_bases + 2, cell=2.4)
    show(axes[0, 0], prediction.image, "image")
    for k in range(num_bases):
        _symmetric(axes[0, k + 1], bases[k, :rows, :cols].numpy(), f"base {k}", extent=extent)
    for row, index in enumerate(top, start=1):
        mask = prediction.raw.pred_masks[index, 0].numpy()
        prediction.show_patch(axes[row, 0], index, mask.shape[-1], class_names)
        weights = torch.softmax(attentions[index], dim=0).numpy()
        for k in range(num_bases):
            show(axes[row, k + 1], weights[k], f"attention {k}", "viridis")
        show(axes[row, -1], mask, "mask", "viridis")
    title = "BlendMask: bases (logits) and attentions (softmax over bases)"
    return save_figure(figure, path, title)


def draw_point_rend(prediction: Prediction, class_names, path: str, top_k: int) -> Optional[str]:
    """PointRend's coarse masks and where it re-predicted points, for the top detections
    (docs/tools.md): probabilities of the detection's class channel (the only one when
    class-agnostic)."""
    record = prediction.recorded
    steps = record.get("steps") or []
    top = [i for i in prediction.order[:top_k] if "coarse" in record and i < len(record["coarse"])]
    if not steps or not top:
        return None
    coarse = record["coarse"]
    grid_points, grid_logits = steps[0]
    init = round(grid_points.shape[1] ** 0.5)
    side = coarse.shape[-1]
    figure, axes = axes_grid(len(top), len(steps) + 3, cell=2.4)
    for row, index in enumerate(top):
        channel = int(prediction.raw.pred_classes[index]) if coarse.shape[1] > 1 else 0
        mask = prediction.raw.pred_masks[index, 0].numpy()
        size = mask.shape[-1]
        prediction.show_patch(axes[row, 0], index, size, class_names)
        coarse_mask = torch.sigmoid(coarse[index, channel]).numpy()
        show(axes[row, 1], coarse_mask, f"coarse {side}x{side}", "viridis")
        first = torch.sigmoid(grid_logits[index, channel]).view(init, init).numpy()
        show(axes[row, 2], first, f"points on a {init}x{init} grid", "viridis")
        for step, (points, _) in enumerate(steps[1:], start=1):
            ax = axes[row, 2 + step]
            xy = points[index].numpy() * size - 0.5  # box-normalised -> mask pixel centres
            show(ax, mask, f"step {step}: {len(xy)} points at {init * 2**step}", "gray")
            ax.scatter(xy[:, 0], xy[:, 1], s=2, c="orangered", linewidths=0)
            ax.set_xlim(-0.5, size - 0.5)
            ax.set_ylim(size - 0.5, -0.5)
        show(axes[row, -1], mask, f"mask {size}x{size}", "viridis")
    return save_figure(figure, path, "PointRend: coarse mask and subdivision points")


# The pictures each image gets, where the model has what they draw: (file name suffix, drawing,
# at most this many of the top-k detections, or None: all of them).
PICTURES = (
    ("mask_crops", draw_mask_crops, None),
    ("masklab", draw_masklab, 3),
    ("deformable", draw_deformable, 4),
    ("blendmask", draw_blendmask, 3),
    ("point_rend", draw_point_rend, 3),
)
