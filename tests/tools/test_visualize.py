"""Visualizations: the drawing helpers, and the tool end to end on shapes images (random weights,
SCORE_THRESH_TEST 0 and a confidence threshold of 0 so that there are detections)."""

import math
import os

import numpy as np
import pytest

pytestmark = pytest.mark.detectron2

import cv2  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.poolers import assign_boxes_to_levels  # noqa: E402
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from helpers import CONFIGS  # noqa: E402
from matplotlib.colors import rgb_to_hsv  # noqa: E402
from PIL import Image  # noqa: E402

from masklab_d2.layers.masklab import DirectionBinning  # noqa: E402
from masklab_d2.tools import visualize, visualize_heads  # noqa: E402

MASK_RCNN = os.path.join(CONFIGS, "shapes-partial", "mask_rcnn_R_18_FPN_gtcrop.yaml")
MASKLAB = os.path.join(CONFIGS, "shapes", "masklab_R_18_FPN.yaml")
DEFORMABLE = os.path.join(CONFIGS, "shapes", "masklab-ablations", "deformable_box_pooling.yaml")
BLENDMASK = os.path.join(CONFIGS, "shapes", "blendmask_R_18_FPN.yaml")
TINY = [
    "DATASETS.TEST", "('shapes_tiny_val',)",
    "INPUT.MIN_SIZE_TEST", "128",
    "INPUT.MAX_SIZE_TEST", "128",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "TEST.DETECTIONS_PER_IMAGE", "20",
]  # fmt: skip


def assert_picture(path, min_std=8.0, size=None):
    """The PNG exists, opens, has the expected size and is not blank."""
    assert os.path.isfile(path), path
    with Image.open(path) as image:
        if size is not None:
            assert image.size == size, (path, image.size)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > min_std, (path, pixels.std())
    return pixels


# ---------------------------------------------------------------------------- helpers


def test_sub_boxes_shift_by_gamma_offset_box_size():
    box = np.array([10.0, 20.0, 50.0, 100.0])  # 40 x 80
    offsets = np.zeros((2, 2, 2))
    plain = visualize_heads.sub_boxes(box, offsets, gamma=0.1)
    assert plain[0, 0].tolist() == [10, 20, 30, 60] and plain[1, 1].tolist() == [30, 60, 50, 100]
    offsets[0, 0, 1] = 1.0  # sub-box (row 0, column 1) moves right by 0.1 * 40
    offsets[1, 1, 0] = -2.0  # sub-box (row 1, column 0) moves up by 0.2 * 80
    moved = visualize_heads.sub_boxes(box, offsets, gamma=0.1)
    assert moved[0, 1].tolist() == [34, 20, 54, 60]
    assert moved[1, 0].tolist() == [10, 44, 30, 84]
    assert np.array_equal(moved[0, 0], plain[0, 0])


@pytest.mark.parametrize("num_directions", [4, 8])
def test_direction_colours_match_the_wheel_and_the_bins(num_directions):
    binning = DirectionBinning(num_directions, 2)
    wheel = visualize_heads.direction_wheel(num_directions, size=41)
    logits = torch.zeros(num_directions * 2, 1, num_directions)
    for direction in range(num_directions):
        logits[direction * 2 + 1, 0, direction] = 8.0  # pixel d is sure of direction d
    colors, largest = visualize_heads.direction_colors(logits, num_directions, 2)
    assert largest > 0.9
    for direction in range(num_directions):
        angle = (direction + 0.5) * 2 * math.pi / num_directions
        u, v = 0.8 * math.cos(angle), 0.8 * math.sin(angle)
        assert binning.bins(torch.tensor([u]), torch.tensor([v])).item() // 2 == direction
        row, col = round((v + 1) * 20), round((u + 1) * 20)  # +y is down the image
        assert np.allclose(wheel[row, col, :3], colors[0, direction], atol=1e-6)
    hues = rgb_to_hsv(colors[0])[:, 0]
    assert len(set(np.round(hues, 3))) == num_directions
    # An undecided map is dark in absolute terms; relative brightness still shows it.
    flat, largest = visualize_heads.direction_colors(
        torch.zeros(num_directions * 2, 3, 3), num_directions, 2, relative=False
    )
    assert largest == 0.0 and flat.max() == 0.0


def test_trailing_options_after_inputs_are_config_options(tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    inputs, opts = visualize._split_trailing_opts(
        [str(image), "MODEL.WEIGHTS", "w.pth"], ["X.Y", "1"]
    )
    assert inputs == [str(image)] and opts == ["MODEL.WEIGHTS", "w.pth", "X.Y", "1"]


# -------------------------------------------------------------------------- end to end


def test_any_head_predictions_and_mask_crops_from_files(tmp_path):
    """Generic pictures for Mask R-CNN's head, from image files, options after --input."""
    record = DatasetCatalog.get("shapes_tiny_val")[0]
    inputs = []
    for index in range(2):
        path = str(tmp_path / f"shape{index}.png")
        cv2.imwrite(path, cv2.imread(record["file_name"]))
        inputs.append(path)
    out = str(tmp_path / "vis")
    written = visualize.main(
        ["--config-file", MASK_RCNN, "--output", out, "--top-k", "4", "--confidence-threshold", "0"]
        + ["--input", *inputs]
        + TINY
    )
    assert sorted(written) == ["shape0", "shape1"]
    assert sorted(os.path.basename(p) for p in written["shape0"]) == [
        "shape0_mask_crops.png",
        "shape0_predictions.png",
    ]
    height, width = record["height"], record["width"]
    scale = max(1.0, 640 / max(height, width))  # drawn at least 640 px
    assert_picture(
        os.path.join(out, "shape0_predictions.png"),
        size=(round(width * scale), round(height * scale)),
    )
    crops = assert_picture(os.path.join(out, "shape0_mask_crops.png"), size=(4 * 220, 480))
    assert crops.shape == (480, 880, 3)


def test_confidence_threshold_and_ground_truth_panel(tmp_path):
    """Dataset images get the ground truth beside the predictions; only detections above the
    confidence threshold are drawn (the config's SCORE_THRESH_TEST keeps them all here)."""
    record = DatasetCatalog.get("shapes_tiny_val")[0]
    cfg = visualize.setup_cfg(MASK_RCNN, TINY)
    model = visualize.load_model(cfg)
    image = cv2.imread(record["file_name"])
    everything = visualize.Prediction(model, cfg, image, confidence_threshold=0.0)
    scores = everything.raw.scores
    assert len(everything.order) == len(scores) > 2
    threshold = float(scores.median())
    kept = visualize.Prediction(model, cfg, image, confidence_threshold=threshold)
    assert 0 < len(kept.order) < len(scores)
    assert all(float(scores[i]) >= threshold for i in kept.order)
    assert kept.order == [i for i in everything.order if float(scores[i]) >= threshold]

    out = str(tmp_path / "vis")
    written = visualize.main(
        ["--config-file", MASK_RCNN, "--output", out, "--dataset", "shapes_tiny_val"]
        + ["--num-images", "1", "--confidence-threshold", "0"]
        + TINY
    )
    (paths,) = written.values()
    predictions = next(p for p in paths if p.endswith("_predictions.png"))
    scale = max(1.0, 640 / max(record["height"], record["width"]))
    width, height = round(record["width"] * scale), round(record["height"] * scale)
    pixels = assert_picture(predictions, size=(2 * width + 8, height + 28))
    # Two different panels: the ground truth (left) is not the predictions (right).
    left, right = pixels[28:, :width], pixels[28:, width + 8 :]
    assert np.abs(left - right).mean() > 1.0
    with pytest.raises(SystemExit, match="confidence-threshold"):
        visualize.main(["--config-file", MASK_RCNN, "--output", out, "--confidence-threshold", "5"])


@pytest.mark.parametrize("semantic_input", ["class", "agnostic"])
def test_masklab_maps_and_crops(tmp_path, semantic_input):
    """Both semantic inputs: the agnostic one has no channel per class to draw (it crashed)."""
    out = str(tmp_path / "vis")
    cfg = visualize.setup_cfg(MASKLAB, TINY + ["MODEL.MASKLAB.SEMANTIC_INPUT", semantic_input])
    written = visualize.visualize(
        cfg, out, dataset="shapes_tiny_val", num_images=1, top_k=3, confidence_threshold=0.0
    )
    (paths,) = written.values()
    names = sorted(os.path.basename(p).split("_", 1)[1] for p in paths)
    assert names == ["mask_crops.png", "masklab.png", "predictions.png"]
    stem = list(written)[0]
    pixels = assert_picture(os.path.join(out, f"{stem}_masklab.png"), size=(5 * 260, 4 * 260 + 40))
    # The direction panel (row 0, column 2) is colourful, not black or white.
    panel = pixels[60:240, 2 * 260 + 30 : 3 * 260 - 30]
    saturation = rgb_to_hsv(panel / 255.0)[..., 1]
    assert saturation.mean() > 0.3


def test_deformable_sub_boxes_use_the_offsets_of_the_final_detections(tmp_path):
    """The offsets gathered from the level poolers belong to the right boxes, whichever FPN
    level each was pooled from, and the sub-box picture is drawn."""
    cfg = visualize.setup_cfg(DEFORMABLE, TINY)
    model = build_model(cfg)
    with torch.no_grad():  # offsets that depend on the box content (zero-initialised otherwise)
        offset_layer = model.roi_heads.box_pooler.offset_net.offsets
        offset_layer.weight.normal_(std=2e-4, generator=torch.Generator().manual_seed(0))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    cfg = visualize.setup_cfg(DEFORMABLE, TINY + ["MODEL.WEIGHTS", str(tmp_path / "model.pth")])

    loaded = visualize.load_model(cfg)
    image = cv2.imread(DatasetCatalog.get("shapes_tiny_val")[1]["file_name"])
    prediction = visualize.Prediction(loaded, cfg, image)
    boxes = torch.tensor([[4.0, 6, 20, 24], [0, 0, 127, 126], [30, 40, 60, 70], [10, 8, 120, 125]])
    prediction.raw = Instances(prediction.input_size, pred_boxes=Boxes(boxes))
    levels = assign_boxes_to_levels([Boxes(boxes)], 2, 5, 224, 4)
    assert len(set(levels.tolist())) > 1  # the boxes span FPN levels
    offsets, gamma = visualize_heads.deformable_offsets(loaded, prediction, [2, 0, 3, 1])
    assert gamma == cfg.MODEL.ROI_BOX_HEAD.DEFORMABLE_GAMMA
    pooler = loaded.roi_heads.box_pooler
    features = [prediction.features[f] for f in loaded.roi_heads.box_in_features]
    for row, index in enumerate([2, 0, 3, 1]):
        with torch.no_grad():
            pooler(features, [Boxes(boxes[index : index + 1])])  # this box alone: one level
        (level,) = [p for p in pooler.level_poolers if len(p.last_rois) == 1]
        assert offsets[row].abs().sum() > 0
        assert torch.allclose(offsets[row], level.last_offsets[0], rtol=1e-4, atol=1e-5), index

    out = str(tmp_path / "vis")
    written = visualize.visualize(
        cfg, out, dataset="shapes_tiny_val", num_images=1, top_k=4, confidence_threshold=0.0
    )
    (paths,) = written.values()
    deformable = [p for p in paths if p.endswith("_deformable.png")]
    assert len(deformable) == 1
    assert_picture(deformable[0], size=(6 * 300, 340))
    assert any(p.endswith("_masklab.png") for p in paths)


def test_blendmask_bases_and_attentions(tmp_path):
    if "BlendMaskHead" not in ROI_MASK_HEAD_REGISTRY:
        pytest.skip("BlendMaskHead is not registered")
    out = str(tmp_path / "vis")
    cfg = visualize.setup_cfg(BLENDMASK, TINY)
    written = visualize.visualize(
        cfg, out, dataset="shapes_tiny_val", num_images=1, top_k=3, confidence_threshold=0.0
    )
    (paths,) = written.values()
    blendmask = [p for p in paths if p.endswith("_blendmask.png")]
    assert len(blendmask) == 1
    num_bases = cfg.MODEL.BLENDMASK.NUM_BASES
    assert_picture(blendmask[0], size=(round((num_bases + 2) * 240), 4 * 240 + 40))
