"""Pictures of what a model predicts and of its mask head's inner maps (PNG files).

    python -m masklab_d2.tools.visualize --config-file configs/shapes/masklab_R_18_FPN.yaml \\
        --dataset shapes_val --num-images 4 --output vis/ MODEL.WEIGHTS output/model_final.pth
    python -m masklab_d2.tools.visualize --config-file CFG --input a.jpg b.jpg --output vis/ \\
        --confidence-threshold 0.3 MODEL.WEIGHTS path/to/model.pth

Config options go last (after ``--output``). MODEL.WEIGHTS may name a training output folder
(its last_checkpoint is loaded); without weights the model keeps its random initialisation (use
``--confidence-threshold 0`` and MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0 to see its detections).
Only detections scoring at least ``--confidence-threshold`` (default 0.5, as detectron2's demo)
are drawn in any picture. Runs on the CPU when there is no GPU. For every image ``<stem>`` it
writes into the output folder:

* ``<stem>_predictions.png``: the detections drawn by detectron2's Visualizer; for images of a
  dataset, beside the ground truth (left panel: ground truth, right: predictions).
* ``<stem>_mask_crops.png`` (every head): the top detections' M x M mask probabilities before
  pasting, under the image patch of their box, with class and score.
* ``<stem>_masklab.png`` (MaskLabHead): the semantic probability of the top detection's class
  over the image (of the foreground with a class-agnostic semantic input); the direction logits colour-coded by direction bin (hue: the most likely of
  the D directions, summed over distance bins; brightness: how sure, from 1/D to 1), also
  weighted by the foreground probability, as the paper's Figures 3 and 7, with the bins' colour
  wheel; and per top detection its semantic crop, assembled direction crop, coarse and refined
  masks.
* ``<stem>_deformable.png`` (box pooler "DeformableCropAndResize"): each top detection's G x G
  sub-boxes shifted by their learned offsets, coloured by grid position (the paper's Figure 8).
  The box pooler runs again on the final boxes, so the offsets are those of the detections.
* ``<stem>_blendmask.png`` (heads with ``last_bases`` / ``last_attentions``, BlendMask): the K
  bases over the image and each top detection's K attention maps (softmax over the bases).
* ``<stem>_point_rend.png`` (detectron2's PointRendMaskHead): per top detection its coarse mask,
  the point head's mask on the first subdivision grid, the points each later subdivision step
  re-predicted (on the final mask) and the final mask.
"""

import argparse
import os
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from masklab_d2.utils.detectron2 import require_detectron2

require_detectron2("masklab_d2.tools.visualize")

import cv2  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import detection_utils  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.visualizer import Visualizer  # noqa: E402
from PIL import Image  # noqa: E402

import masklab_d2.modeling  # noqa: E402,F401  (registers the heads, poolers, backbones)
from masklab_d2.config import load_config  # noqa: E402
from masklab_d2.data import register_coco_datasets  # noqa: E402  (and the shapes datasets)
from masklab_d2.tools.visualize_heads import Prediction  # noqa: E402,F401  (public here too)
from masklab_d2.tools.visualize_heads import (  # noqa: E402
    axes_grid,
    draw_blendmask,
    draw_deformable,
    draw_masklab,
    draw_point_rend,
    save_figure,
)

_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")
# Visualizer text is unreadable on small (shapes: 256 px) images: draw at least this large.
_MIN_DRAW_SIZE = 640


# ------------------------------------------------------------------------------------ model


def setup_cfg(config_file: str, opts: Sequence[str]):
    """The frozen config; CPU when no GPU is visible."""
    cfg = load_config(config_file, opts)
    cfg.freeze()
    return cfg


def load_model(cfg) -> torch.nn.Module:
    """The model in eval mode with MODEL.WEIGHTS (a file, or a folder's last_checkpoint)."""
    torch.manual_seed(0)  # a reproducible random initialisation when there are no weights
    model = build_model(cfg)
    model.eval()
    weights = cfg.MODEL.WEIGHTS
    if weights and os.path.isdir(weights):
        checkpointer = DetectionCheckpointer(model, save_dir=weights)
        if not checkpointer.has_checkpoint():
            raise FileNotFoundError(
                f"MODEL.WEIGHTS {weights!r} is a folder without last_checkpoint"
            )
        checkpointer.load(checkpointer.get_checkpoint_file())
    elif weights:
        DetectionCheckpointer(model).load(weights)
    else:
        print("[visualize] MODEL.WEIGHTS is empty: the model has random weights", file=sys.stderr)
    return model


def load_images(
    cfg, inputs: Sequence[str], dataset: Optional[str], num_images: int
) -> List[Tuple[str, np.ndarray, Optional[dict]]]:
    """[(stem, image in cfg.INPUT.FORMAT, dataset record or None)] from files, else from a
    registered dataset (whose records carry the ground truth)."""
    if inputs:
        records = [{"file_name": p} for p in inputs]
    else:
        records = DatasetCatalog.get(dataset or cfg.DATASETS.TEST[0])[:num_images]
    return [
        (
            os.path.splitext(os.path.basename(r["file_name"]))[0],
            detection_utils.read_image(r["file_name"], format=cfg.INPUT.FORMAT),
            r if "annotations" in r else None,
        )
        for r in records
    ]


# --------------------------------------------------------------------------------- drawings


def _titled(panel: np.ndarray, title: str, height: int = 28) -> np.ndarray:
    """``panel`` [H, W, 3] uint8 under a white strip with ``title``."""
    strip = np.full((height, panel.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(strip, title, (6, height - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    return np.concatenate([strip, panel], axis=0)


def draw_predictions(
    prediction: Prediction,
    metadata,
    path: str,
    max_draw: int,
    record: Optional[dict] = None,
    confidence_threshold: float = 0.0,
) -> str:
    """detectron2's Visualizer drawing of the top ``max_draw`` detections (those above the
    confidence threshold), to the right of the ground truth when ``record`` (a dataset record
    with "annotations") is given."""
    height, width = prediction.image.shape[:2]
    scale = max(1.0, _MIN_DRAW_SIZE / max(height, width))
    keep = prediction.order[:max_draw]
    drawn = Visualizer(prediction.image, metadata, scale=scale).draw_instance_predictions(
        prediction.instances[keep].to("cpu")
    )
    picture = drawn.get_image()
    if record is not None:
        truth = Visualizer(prediction.image, metadata, scale=scale).draw_dataset_dict(record)
        gap = np.full((picture.shape[0], 8, 3), 255, dtype=np.uint8)
        picture = np.concatenate(
            [
                _titled(truth.get_image(), f"ground truth ({len(record['annotations'])})"),
                _titled(gap, ""),
                _titled(picture, f"predictions, score >= {confidence_threshold:g} ({len(keep)})"),
            ],
            axis=1,
        )
    Image.fromarray(picture).save(path)
    return path


def draw_mask_crops(prediction: Prediction, class_names, path: str, top_k: int) -> str:
    """Each top detection: its box's image patch over its M x M mask probabilities."""
    top = prediction.order[:top_k]
    figure, axes = axes_grid(2, max(1, len(top)))
    if not top:
        axes[0, 0].text(0.5, 0.5, "no detections", ha="center", va="center")
    for column, index in enumerate(top):
        mask = prediction.raw.pred_masks[index, 0].numpy()
        axes[0, column].imshow(prediction.patch(index, mask.shape[-1]))
        axes[0, column].set_title(prediction.title(index, class_names), fontsize=8)
        axes[1, column].imshow(mask, cmap="viridis", vmin=0, vmax=1)
        axes[1, column].set_title(f"mask {mask.shape[-1]}x{mask.shape[-1]}", fontsize=8)
    figure.suptitle("mask crops before pasting (probabilities)", fontsize=10)
    figure.tight_layout()
    return save_figure(figure, path)


# ------------------------------------------------------------------------------------- main


def visualize(
    cfg,
    output_dir: str,
    inputs: Sequence[str] = (),
    dataset: Optional[str] = None,
    num_images: int = 4,
    top_k: int = 6,
    max_draw: int = 30,
    confidence_threshold: float = 0.5,
) -> Dict[str, List[str]]:
    """Writes every picture that applies to the model, for each image.

    Args:
        cfg: a config from :func:`setup_cfg`.
        output_dir: where the PNGs go.
        inputs: image files; when empty, the first ``num_images`` of ``dataset`` (default: the
            config's first test dataset).
        top_k: detections shown in the crop pictures (fewer for MaskLab's and the sub-boxes').
        max_draw: detections drawn on the predictions picture.
        confidence_threshold: detections scoring less are drawn in no picture.

    Returns:
        {stem: [paths written]}.
    """
    os.makedirs(output_dir, exist_ok=True)
    model = load_model(cfg)
    metadata_name = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    metadata = MetadataCatalog.get(metadata_name)
    class_names = metadata.get("thing_classes", None) or [
        str(i) for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    ]
    written: Dict[str, List[str]] = {}
    for stem, image, record in load_images(cfg, inputs, dataset, num_images):
        prediction = Prediction(model, cfg, image, confidence_threshold)
        base = os.path.join(output_dir, stem)
        paths = [
            draw_predictions(
                prediction,
                metadata,
                f"{base}_predictions.png",
                max_draw,
                record,
                confidence_threshold,
            ),
            (
                draw_mask_crops(prediction, class_names, f"{base}_mask_crops.png", top_k)
                if prediction.raw.has("pred_masks")
                else None
            ),
            draw_masklab(prediction, class_names, f"{base}_masklab.png", min(top_k, 3)),
            draw_deformable(
                model, prediction, class_names, f"{base}_deformable.png", min(top_k, 4)
            ),
            draw_blendmask(prediction, class_names, f"{base}_blendmask.png", min(top_k, 3)),
            draw_point_rend(prediction, class_names, f"{base}_point_rend.png", min(top_k, 3)),
        ]
        written[stem] = [p for p in paths if p]
        for path in written[stem]:
            print(f"[visualize] wrote {path}")
    return written


def _split_trailing_opts(inputs: List[str], opts: List[str]) -> Tuple[List[str], List[str]]:
    """``--input a.jpg MODEL.WEIGHTS w.pth`` puts the options into --input: move them back."""
    for position, item in enumerate(inputs):
        if _CONFIG_KEY.match(item) and not os.path.exists(item):
            return inputs[:position], inputs[position:] + opts
    return inputs, opts


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m masklab_d2.tools.visualize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--input", nargs="+", default=[], help="image files")
    parser.add_argument(
        "--dataset", help="a registered dataset to draw images from (default: DATASETS.TEST[0])"
    )
    parser.add_argument("--num-images", type=int, default=4, help="images taken from --dataset")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--top-k", type=int, default=6, help="detections in the crop pictures")
    parser.add_argument(
        "--max-draw", type=int, default=30, help="detections on the predictions picture"
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="draw only detections scoring at least this (detectron2's demo default, 0.5)",
    )
    parser.add_argument(
        "--coco-dataset",
        action="append",
        metavar="NAME=JSON:IMAGE_ROOT",
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config options KEY VALUE ... (last)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    args = build_argument_parser().parse_args(argv)
    inputs, opts = _split_trailing_opts(args.input, list(args.opts))
    register_coco_datasets(args.coco_dataset)
    cfg = setup_cfg(args.config_file, opts)
    if not 0.0 <= args.confidence_threshold <= 1.0:
        raise SystemExit(
            f"--confidence-threshold must be in [0, 1], got {args.confidence_threshold}"
        )
    return visualize(
        cfg,
        args.output,
        inputs,
        args.dataset,
        args.num_images,
        args.top_k,
        args.max_draw,
        args.confidence_threshold,
    )


if __name__ == "__main__":
    main()
