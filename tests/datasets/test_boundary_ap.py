"""Boundary AP: Boundary IoU of small masks worked out by hand, and Boundary AP per class group.

Every hand case is a 100 x 100 image, so the boundary width is d = round(0.02 * 141.4) = 3
pixels: a mask's boundary is its pixels within chessboard distance 3 of a pixel outside it or
of the image border, and a detection matches at min(mask IoU, boundary IoU). With one ground
truth and one detection, AP is the fraction of the ten IoU thresholds 0.50:0.95 the match IoU
reaches. The library-level tests need faster-coco-eval only; the evaluator's also need
detectron2 (marked).
"""

import copy
import logging
import random

import numpy as np
import pytest

pytest.importorskip(
    "faster_coco_eval",
    reason="faster-coco-eval is not installed: python3 -m pip install faster-coco-eval (README)",
)

import pycocotools.mask as mask_util  # noqa: E402
from faster_coco_eval import COCO, COCOeval_faster  # noqa: E402
from faster_coco_eval.core import mask as boundary_util  # noqa: E402

SIZE = 100


def _mask(*boxes, holes=()):
    """A SIZE x SIZE mask: the union of [y0:y1, x0:x1] boxes, less the holes."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    for y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = 1
    for y0, y1, x0, x1 in holes:
        mask[y0:y1, x0:x1] = 0
    return mask


def _rle(mask):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _ground_truth(masks_per_image, num_categories=1):
    """A COCO dataset dict; masks_per_image: per image a list of (category id, mask)."""
    images, annotations = [], []
    for image_id, masks in enumerate(masks_per_image, start=1):
        images.append({"id": image_id, "height": SIZE, "width": SIZE, "file_name": f"{image_id}"})
        for category_id, mask in masks:
            rle = _rle(mask)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": rle,
                    "area": float(mask.sum()),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": f"c{i}"} for i in range(1, num_categories + 1)]
    return {"images": images, "annotations": annotations, "categories": categories}


def _quiet(*args, **kwargs):
    pass


def _library_eval(dataset, detections, iou_type, category_ids=None):
    """faster-coco-eval on its own: ``detections`` of ``category_ids`` only, as pycocotools
    evaluates one class group."""
    coco_gt = COCO(copy.deepcopy(dataset))
    if category_ids is not None:
        detections = [d for d in detections if d["category_id"] in category_ids]
    coco_eval = COCOeval_faster(
        coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), iou_type, print_function=_quiet
    )
    if category_ids is not None:
        coco_eval.params.catIds = list(category_ids)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def _library_percent(value):
    """A library statistic as the evaluator reports it: percent, NaN for its -1 (undefined)."""
    return pytest.approx(value * 100 if value >= 0 else float("nan"), abs=1e-9, nan_ok=True)


def _boundary_area(mask):
    return int(boundary_util.area([boundary_util.rleToBoundary(_rle(mask), 0.02)])[0])


# (ground truth, detection, mask IoU, boundary IoU, mask AP, boundary AP), worked out by hand.
HAND_CASES = {
    # 20 x 20 square and the same square one pixel to the right. Mask IoU: 20 x 19 over
    # 400 + 20 = 380 / 420. Boundaries: 3-pixel rings of 400 - 14 x 14 = 204 pixels each; they
    # share the top and bottom bands (6 rows x 19 shared columns = 114) and, in the 14 middle
    # rows, the columns both rings cover ({41, 42, 58, 59}: 4 x 14 = 56): 170 / (408 - 170).
    # Match IoU 5/7 = 0.714: thresholds 0.50-0.70, AP 50, where mask AP is 90 (0.905).
    "square_shifted": (
        _mask((40, 60, 40, 60)),
        _mask((40, 60, 41, 61)),
        380 / 420,
        170 / 238,
        90.0,
        50.0,
    ),
    # A square ring 4 pixels wide (30 x 30 less 22 x 22: 416 pixels), thinner than 2d + 1 = 7,
    # so all of it is boundary and boundary IoU is mask IoU. Shifted one pixel to the right:
    # the top and bottom bands share 8 rows x 29 columns = 232, the 22 middle rows the columns
    # {31, 32, 33, 57, 58, 59} (6 x 22 = 132): 364 / (832 - 364) = 7/9 = 0.778, AP 60.
    "thin_ring": (
        _mask((30, 60, 30, 60), holes=[(34, 56, 34, 56)]),
        _mask((30, 60, 31, 61), holes=[(34, 56, 35, 57)]),
        364 / 468,
        364 / 468,
        60.0,
        60.0,
    ),
    # A 20 x 20 square in the image's corner against a 20 x 23 one. The image border counts as
    # contour, so the boundaries are full 3-pixel rings: 204 and 460 - 14 x 17 = 222 pixels,
    # sharing the top and bottom bands (2 x 3 x 20 = 120) and, in the 14 middle rows, the left
    # band on the image border (3 x 14 = 42): 162 / (426 - 162) = 0.614, thresholds 0.50-0.60,
    # AP 30. (Without the border rule it would be 60 / 171 = 0.35.) Mask IoU 400 / 460 = 0.870.
    "border": (
        _mask((0, 20, 0, 20)),
        _mask((0, 20, 0, 23)),
        400 / 460,
        162 / 264,
        80.0,
        30.0,
    ),
}


@pytest.mark.parametrize("case", list(HAND_CASES))
def test_boundary_iou_and_ap_of_small_masks_match_the_hand_computation(case):
    truth, detection, mask_iou, boundary_iou, mask_ap, boundary_ap = HAND_CASES[case]
    dataset = _ground_truth([[(1, truth)]])
    detections = [{"image_id": 1, "category_id": 1, "segmentation": _rle(detection), "score": 0.9}]
    segm = _library_eval(dataset, detections, "segm")
    boundary = _library_eval(dataset, detections, "boundary")
    # COCOeval.ious holds the match IoU of each (image, category): min(mask, boundary IoU).
    assert float(segm.ious[1, 1][0][0]) == pytest.approx(mask_iou, abs=1e-12)
    assert float(boundary.ious[1, 1][0][0]) == pytest.approx(min(mask_iou, boundary_iou), abs=1e-12)
    assert segm.stats[0] * 100 == pytest.approx(mask_ap)
    assert boundary.stats[0] * 100 == pytest.approx(boundary_ap)


def test_boundary_widths_by_hand():
    # d = 3: a 20 x 20 square keeps a 14 x 14 interior, in the middle of the image and in its
    # corner alike (the border is contour); a ring thinner than 7 pixels is all boundary.
    assert _boundary_area(_mask((40, 60, 40, 60))) == 400 - 14 * 14
    assert _boundary_area(_mask((0, 20, 0, 20))) == 400 - 14 * 14
    ring = HAND_CASES["thin_ring"][0]
    assert _boundary_area(ring) == int(ring.sum()) == 416


def _random_scene(seed, num_images=12, num_categories=4):
    """Ground truth of random boxes and ellipses, and detections that degrade it: masks shifted
    by up to 2 pixels, some a row thinner, misses, duplicates, false positives, random scores."""
    rng = random.Random(seed)
    truth, detections = [], []
    for image_id in range(1, num_images + 1):
        masks = []
        for _ in range(rng.randint(1, 5)):
            category_id = rng.randint(1, num_categories)
            y, x = rng.randint(0, 80), rng.randint(0, 80)
            h, w = rng.randint(6, 40), rng.randint(6, 40)
            if rng.random() < 0.5:
                mask = _mask((y, y + h, x, x + w))
            else:
                ys, xs = np.mgrid[:SIZE, :SIZE]
                mask = (((ys - y) / h) ** 2 + ((xs - x) / w) ** 2 < 1).astype(np.uint8)
            masks.append((category_id, mask))
        truth.append(masks)
        for category_id, mask in masks:
            if rng.random() < 0.15:
                continue  # a miss
            for _ in range(1 + (rng.random() < 0.2)):  # sometimes a duplicate
                shifted = np.roll(mask, rng.randint(-2, 2), axis=rng.randint(0, 1))
                if rng.random() < 0.3:
                    shifted = shifted & np.roll(shifted, 1, axis=0)  # one row thinner
                detections.append(
                    {
                        "image_id": image_id,
                        "category_id": category_id,
                        "segmentation": _rle(shifted),
                        "score": rng.random(),
                    }
                )
        for _ in range(rng.randint(0, 2)):  # false positives
            y, x = rng.randint(0, 80), rng.randint(0, 80)
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": rng.randint(1, num_categories),
                    "segmentation": _rle(_mask((y, y + 15, x, x + 15))),
                    "score": rng.random(),
                }
            )
    return _ground_truth(truth, num_categories), detections


# ---------------------------------------------------------------- our evaluation (detectron2)


@pytest.mark.detectron2
@pytest.mark.parametrize("case", list(HAND_CASES))
def test_evaluate_boundary_on_the_hand_cases(case):
    from pycocotools.coco import COCO as PycocoCOCO

    from masklab_d2.evaluation.boundary import evaluate_boundary

    truth, detection, *_, boundary_ap = HAND_CASES[case]
    coco_gt = PycocoCOCO()
    coco_gt.dataset = _ground_truth([[(1, truth)]])
    coco_gt.createIndex()
    before = copy.deepcopy(coco_gt.dataset)
    result = {"image_id": 1, "category_id": 1, "segmentation": _rle(detection), "score": 0.9}
    # A box, if any, is ignored: object size comes from the mask, as for mask AP.
    results = [dict(result, bbox=[0.0, 0.0, 99.0, 99.0])]
    metrics = evaluate_boundary(coco_gt, results, {"seen": [1]}, class_names=["thing"])
    assert metrics["AP"] == pytest.approx(boundary_ap)
    assert metrics["AP-thing"] == pytest.approx(boundary_ap)
    assert metrics["seen/AP"] == pytest.approx(boundary_ap)
    assert metrics["APs"] == pytest.approx(boundary_ap)  # under 32 x 32 pixels: small
    assert np.isnan(metrics["APl"])  # no large ground truth: undefined, as in detectron2
    assert coco_gt.dataset == before and results == [dict(result, bbox=[0.0, 0.0, 99.0, 99.0])]


@pytest.mark.detectron2
def test_group_boundary_ap_equals_evaluating_each_group_alone():
    from pycocotools.coco import COCO as PycocoCOCO

    from masklab_d2.evaluation.boundary import METRICS, evaluate_boundary

    dataset, detections = _random_scene(seed=5)
    coco_gt = PycocoCOCO()
    coco_gt.dataset = copy.deepcopy(dataset)
    coco_gt.createIndex()
    groups = {"seen": [1, 2], "unseen": [3, 4], "odd": [1, 3]}
    metrics = evaluate_boundary(coco_gt, detections, groups)
    everything = _library_eval(dataset, detections, "boundary")
    assert 10 < metrics["AP"] < 90  # degraded detections: a non-trivial number
    for index, metric in enumerate(METRICS):
        assert metrics[metric] == _library_percent(everything.stats[index]), metric
    for group, category_ids in groups.items():
        alone = _library_eval(dataset, detections, "boundary", category_ids)
        for index, metric in enumerate(METRICS):
            expected = _library_percent(alone.stats[index])
            assert metrics[f"{group}/{metric}"] == expected, (group, metric)
    # A group AP is the library's number over its categories, here also their mean AP.
    per_class = [metrics[f"AP-c{i}"] for i in (1, 2)]
    assert metrics["seen/AP"] == pytest.approx(np.mean(per_class), abs=1e-6)


def _shapes_predictions(dataset_name, degrade, seed=0):
    """detectron2 outputs that repeat the ground truth of a shapes split, maybe degraded."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, BoxMode, Instances

    rng = random.Random(seed)
    inputs, outputs = [], []
    for record in DatasetCatalog.get(dataset_name):
        height, width = record["height"], record["width"]
        boxes, classes, masks, scores = [], [], [], []
        for annotation in record["annotations"]:
            segmentation = annotation["segmentation"]
            if isinstance(segmentation, list):
                rles = mask_util.frPyObjects(segmentation, height, width)
                mask = mask_util.decode(mask_util.merge(rles)).astype(bool)
            else:
                mask = mask_util.decode(segmentation).astype(bool)
            if degrade:
                if rng.random() < 0.1:
                    continue
                mask = np.roll(mask, rng.randint(-4, 4), axis=rng.randint(0, 1))
            boxes.append(
                BoxMode.convert(annotation["bbox"], annotation["bbox_mode"], BoxMode.XYXY_ABS)
            )
            classes.append(annotation["category_id"])
            masks.append(mask)
            scores.append(rng.random() if degrade else 1.0)
        instances = Instances((height, width))
        instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.pred_classes = torch.tensor(classes, dtype=torch.int64)
        instances.scores = torch.tensor(scores, dtype=torch.float32)
        instances.pred_masks = torch.from_numpy(
            np.stack(masks) if masks else np.zeros((0, height, width), bool)
        )
        inputs.append({"image_id": record["image_id"], "height": height, "width": width})
        outputs.append({"instances": instances})
    return inputs, outputs


def _evaluator_results(inputs, outputs, mask_train_classes="voc", **kwargs):
    from masklab_d2.evaluation import PartialCOCOEvaluator

    evaluator = PartialCOCOEvaluator(
        "shapes_tiny_val",
        tasks=("bbox", "segm"),
        distributed=False,
        mask_train_classes=mask_train_classes,
        **kwargs,
    )
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator, evaluator.evaluate()


@pytest.mark.detectron2
def test_evaluator_reports_boundary_ap_beside_mask_ap_with_the_same_keys():
    from detectron2.data import MetadataCatalog

    import masklab_d2.data  # noqa: F401  (registers the shapes splits)

    inputs, outputs = _shapes_predictions("shapes_tiny_val", degrade=False)
    _, results = _evaluator_results(inputs, outputs)
    assert set(results) == {"bbox", "segm", "boundary"}
    assert set(results["boundary"]) == set(results["segm"])  # AP..APl, AP-<class>, <group>/...
    for group in ("seen", "unseen", "voc", "nonvoc"):
        assert results["boundary"][f"{group}/AP"] == pytest.approx(100.0), group
    assert results["boundary"]["AP"] == pytest.approx(100.0)

    # Degraded: each group's Boundary AP is the library's on that group's detections alone.
    inputs, outputs = _shapes_predictions("shapes_tiny_val", degrade=True, seed=1)
    evaluator, results = _evaluator_results(inputs, outputs)
    boundary, segm = results["boundary"], results["segm"]
    assert 10 < boundary["AP"] < segm["AP"] < 95  # shifts cost boundaries more than areas
    metadata = MetadataCatalog.get("shapes_tiny_val")
    dataset = copy.deepcopy(evaluator._coco_api.dataset)
    to_dataset = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
    detections = []
    for input_, output in zip(inputs, outputs):
        instances = output["instances"]
        for mask, cls, score in zip(
            instances.pred_masks.numpy(), instances.pred_classes.tolist(), instances.scores.tolist()
        ):
            detections.append(
                {
                    "image_id": input_["image_id"],
                    "category_id": to_dataset[cls],
                    "segmentation": _rle(mask),
                    "score": score,
                }
            )
    for group, category_ids in evaluator._class_groups.items():
        alone = _library_eval(dataset, detections, "boundary", category_ids)
        assert boundary[f"{group}/AP"] == _library_percent(alone.stats[0]), group
        assert boundary[f"{group}/AP75"] == _library_percent(alone.stats[2]), group


@pytest.mark.detectron2
def test_evaluator_without_boundary_ap_or_without_faster_coco_eval(monkeypatch):
    import masklab_d2.data  # noqa: F401
    from masklab_d2.evaluation import partial_coco

    inputs, outputs = _shapes_predictions("shapes_tiny_val", degrade=False)
    _, results = _evaluator_results(inputs[:4], outputs[:4], boundary_ap=False)
    assert "boundary" not in results and "seen/AP" in results["segm"]
    monkeypatch.setattr(partial_coco, "boundary_ap_available", lambda: False)
    warnings = []
    monkeypatch.setattr(
        logging.getLogger(partial_coco.COCOEvaluator.__module__),
        "warning",
        lambda message, *args, **kwargs: warnings.append(message),
    )
    _, results = _evaluator_results(inputs[:4], outputs[:4])
    assert "boundary" not in results and "seen/AP" in results["segm"]
    assert any("pip install faster-coco-eval" in w for w in warnings), warnings
    # No detection at all: NaN, as detectron2 reports mask AP then.
    monkeypatch.undo()
    for output in outputs:
        output["instances"] = output["instances"][:0]
    _, results = _evaluator_results(inputs[:4], outputs[:4], mask_train_classes="all")
    assert np.isnan(results["boundary"]["AP"]) and np.isnan(results["segm"]["AP"])
