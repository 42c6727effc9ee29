"""Pictures of what a model predicts and of its mask head's inner maps (PNG files).

    python -m masklab_d2.tools.visualize --config-file configs/shapes/masklab_R_18_FPN.yaml \\
        --dataset shapes_val --num-images 4 --output vis/ MODEL.WEIGHTS output/model_final.pth
    python -m masklab_d2.tools.visualize --config-file CFG --input a.jpg b.jpg --output vis/ \\
        --confidence-threshold 0.3 MODEL.WEIGHTS path/to/model.pth

Config options go last (after ``--output``); MODEL.WEIGHTS may name a training output folder
(its last_checkpoint is loaded). Runs on the CPU when there is no GPU. Per image it writes
``<stem>_predictions.png`` and the pictures of the mask head described in docs/tools.md.
"""

import argparse
import os
import re
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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
from masklab_d2.tools.visualize_heads import PICTURES, Prediction  # noqa: E402

_CONFIG_KEY = re.compile(r"^[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+$")
# Visualizer text is unreadable on small (shapes: 256 px) images: draw at least this large.
_MIN_DRAW_SIZE = 640


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
        weights = checkpointer.get_checkpoint_file()
    if weights:
        DetectionCheckpointer(model).load(weights)
    else:
        print("[visualize] MODEL.WEIGHTS is empty: the model has random weights", file=sys.stderr)
    return model


def load_images(
    cfg, inputs: Sequence[str], dataset: Optional[str], num_images: int
) -> Iterator[Tuple[str, np.ndarray, Optional[dict]]]:
    """(stem, image in cfg.INPUT.FORMAT, dataset record or None) from files, else from a
    registered dataset (whose records carry the ground truth)."""
    if inputs:
        records = [{"file_name": p} for p in inputs]
    else:
        records = DatasetCatalog.get(dataset or cfg.DATASETS.TEST[0])[:num_images]
    for r in records:
        image = detection_utils.read_image(r["file_name"], format=cfg.INPUT.FORMAT)
        stem = os.path.splitext(os.path.basename(r["file_name"]))[0]
        yield stem, image, (r if "annotations" in r else None)


def _titled(panel: np.ndarray, title: str, height: int = 28) -> np.ndarray:
    """``panel`` [H, W, 3] uint8 under a white strip with ``title``."""
    strip = np.full((height, panel.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(strip, title, (6, height - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    return np.concatenate([strip, panel], axis=0)


def draw_predictions(prediction: Prediction, metadata, path: str, max_draw: int, record) -> str:
    """detectron2's Visualizer drawing of the top ``max_draw`` detections (those above the
    confidence threshold), to the right of the ground truth when ``record`` (a dataset record
    with "annotations") is given."""
    height, width = prediction.image.shape[:2]
    scale = max(1.0, _MIN_DRAW_SIZE / max(height, width))
    keep = prediction.order[:max_draw]
    visualizer = Visualizer(prediction.image, metadata, scale=scale)
    picture = visualizer.draw_instance_predictions(prediction.instances[keep]).get_image()
    if record is not None:
        truth = Visualizer(prediction.image, metadata, scale=scale).draw_dataset_dict(record)
        gap = np.full((picture.shape[0], 8, 3), 255, dtype=np.uint8)
        panels = [
            _titled(truth.get_image(), f"ground truth ({len(record['annotations'])})"),
            _titled(gap, ""),
            _titled(picture, f"predictions, score >= {prediction.threshold:g} ({len(keep)})"),
        ]
        picture = np.concatenate(panels, axis=1)
    Image.fromarray(picture).save(path)
    return path


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
        inputs: image files (``--input``); the other arguments are the options of their names.

    Returns:
        {stem: [paths written]}.
    """
    os.makedirs(output_dir, exist_ok=True)
    model = load_model(cfg)
    metadata = MetadataCatalog.get(
        dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    )
    class_names = metadata.get("thing_classes", None) or [
        str(i) for i in range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    ]
    written: Dict[str, List[str]] = {}
    for stem, image, record in list(load_images(cfg, inputs, dataset, num_images)):
        prediction = Prediction(model, cfg, image, confidence_threshold)
        base = os.path.join(output_dir, stem)
        paths = [
            draw_predictions(prediction, metadata, f"{base}_predictions.png", max_draw, record)
        ]
        for name, draw, most in PICTURES:
            count = top_k if most is None else min(top_k, most)
            paths.append(draw(prediction, class_names, f"{base}_{name}.png", count))
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
    parser.add_argument("--max-draw", type=int, default=30, help="detections in the predictions")
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
    sizes = (args.num_images, args.top_k, args.max_draw, args.confidence_threshold)
    return visualize(cfg, args.output, inputs, args.dataset, *sizes)


if __name__ == "__main__":
    main()
