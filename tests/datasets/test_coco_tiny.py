"""The partial-supervision data path and the seen / unseen evaluator on real COCO images.

Data: ``$MASKLAB_COCO_TINY`` (80 + 80 real COCO 2017 images with their annotations; `.ci/run`
points it at ../shared/data/coco_tiny). Skipped where absent.
"""

import copy
import io
import logging
import os
import random

import numpy as np
import pytest

pytestmark = pytest.mark.detectron2

COCO_TINY = os.environ.get("MASKLAB_COCO_TINY", "")
if not os.path.isdir(COCO_TINY):
    pytest.skip(
        "MASKLAB_COCO_TINY does not name the coco_tiny folder (real COCO images); .ci/run sets it",
        allow_module_level=True,
    )

import pycocotools.mask as mask_util  # noqa: E402
import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, BoxMode, Instances  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from masklab_d2.config import add_masklab_config  # noqa: E402
from masklab_d2.data import PartialMaskDatasetMapper, register_coco_partial  # noqa: E402
from masklab_d2.data.class_groups import COCO_VOC_CATEGORY_IDS, class_groups_of  # noqa: E402
from masklab_d2.evaluation import PartialCOCOEvaluator  # noqa: E402

SPLITS = {
    "coco_tiny_val": ("annotations/instances_val2017.json", "val2017"),
    "coco_tiny_train": ("annotations/instances_train2017.json", "train2017"),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    for name, (json_file, image_root) in SPLITS.items():
        if name not in DatasetCatalog.list():
            register_coco_partial(
                name, os.path.join(COCO_TINY, json_file), os.path.join(COCO_TINY, image_root)
            )


def _annotation_mask(annotation, height, width):
    segmentation = annotation["segmentation"]
    if isinstance(segmentation, list):
        rles = mask_util.frPyObjects(segmentation, height, width)
        return mask_util.decode(mask_util.merge(rles)).astype(bool)
    if isinstance(segmentation["counts"], list):
        segmentation = mask_util.frPyObjects(segmentation, height, width)
    return mask_util.decode(segmentation).astype(bool)


def _predictions_from_ground_truth(dataset_name, corrupt=False, seed=0):
    """detectron2-style outputs that repeat the ground truth (optionally degraded)."""
    rng = random.Random(seed)
    inputs, outputs = [], []
    for record in DatasetCatalog.get(dataset_name):
        height, width = record["height"], record["width"]
        boxes, classes, masks, scores = [], [], [], []
        for annotation in record["annotations"]:
            if annotation.get("iscrowd", 0):
                continue
            mask = _annotation_mask(annotation, height, width)
            box = BoxMode.convert(annotation["bbox"], annotation["bbox_mode"], BoxMode.XYXY_ABS)
            if corrupt:
                if rng.random() < 0.2:
                    continue  # a miss
                if rng.random() < 0.3:
                    mask = np.roll(mask, rng.randint(2, 12), axis=rng.randint(0, 1))
            boxes.append(box)
            classes.append(annotation["category_id"])  # contiguous, as load_coco_json gives
            masks.append(mask)
            scores.append(rng.random() if corrupt else 1.0)
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


def _evaluate(dataset_name, inputs, outputs, mask_train_classes, use_fast_impl=True, tmp_path=None):
    evaluator = PartialCOCOEvaluator(
        dataset_name,
        tasks=("bbox", "segm"),
        distributed=False,
        output_dir=str(tmp_path) if tmp_path else None,
        use_fast_impl=use_fast_impl,
        mask_train_classes=mask_train_classes,
    )
    evaluator.reset()
    evaluator.process(inputs, outputs)
    return evaluator.evaluate()


def test_ground_truth_scores_100_on_every_split(tmp_path):
    inputs, outputs = _predictions_from_ground_truth("coco_tiny_val")
    results = _evaluate("coco_tiny_val", inputs, outputs, "voc", tmp_path=tmp_path)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)
    for group in ("seen", "unseen", "voc", "nonvoc"):
        assert results["segm"][f"{group}/AP"] == pytest.approx(100.0), group
    if "boundary" in results:  # faster-coco-eval installed
        for key in ("AP", "seen/AP", "unseen/AP", "voc/AP", "nonvoc/AP"):
            assert results["boundary"][key] == pytest.approx(100.0), key


@pytest.mark.parametrize("use_fast_impl", [True, False])
def test_group_ap_equals_pycocotools_with_restricted_cat_ids(use_fast_impl):
    inputs, outputs = _predictions_from_ground_truth("coco_tiny_val", corrupt=True, seed=3)
    results = _evaluate(
        "coco_tiny_val", copy.deepcopy(inputs), copy.deepcopy(outputs), "voc", use_fast_impl
    )
    all_ap = results["segm"]["AP"]
    assert 20 < all_ap < 95  # degraded predictions: a non-trivial number

    # Independently: pycocotools on the same detections, catIds restricted by hand.
    metadata = MetadataCatalog.get("coco_tiny_val")
    to_dataset = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
    coco_gt = COCO(metadata.json_file)
    detections = []
    for input_, output in zip(inputs, outputs):
        instances = output["instances"]
        for mask, cls, score in zip(
            instances.pred_masks.numpy(), instances.pred_classes.tolist(), instances.scores.tolist()
        ):
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            detections.append(
                {
                    "image_id": input_["image_id"],
                    "category_id": to_dataset[cls],
                    "segmentation": rle,
                    "score": score,
                }
            )
    voc = list(COCO_VOC_CATEGORY_IDS)
    nonvoc = [c for c in coco_gt.getCatIds() if c not in voc]
    for group, cat_ids in (("seen", voc), ("unseen", nonvoc), ("voc", voc), ("nonvoc", nonvoc)):
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(detections)), "segm")
        coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        assert results["segm"][f"{group}/AP"] == pytest.approx(
            coco_eval.stats[0] * 100, abs=1e-6
        ), group
        assert results["segm"][f"{group}/AP50"] == pytest.approx(
            coco_eval.stats[1] * 100, abs=1e-6
        ), group
    # A group AP is pycocotools' own number, not the mean of its per-class APs.
    per_class = [results["segm"][f"AP-{name}"] for name in class_groups_of(metadata)["voc"]]
    assert results["segm"]["seen/AP"] == pytest.approx(np.nanmean(per_class), abs=1e-3)


def test_all_classes_seen_has_no_unseen_group():
    inputs, outputs = _predictions_from_ground_truth("coco_tiny_val")
    evaluator = PartialCOCOEvaluator(
        "coco_tiny_val", tasks=("bbox", "segm"), distributed=False, mask_train_classes="all"
    )
    printed = io.StringIO()
    handler = logging.StreamHandler(printed)
    level = evaluator._logger.level
    evaluator._logger.addHandler(handler)
    evaluator._logger.setLevel(logging.INFO)
    try:
        evaluator.reset()
        evaluator.process(inputs[:10], outputs[:10])
        results = evaluator.evaluate()
    finally:
        evaluator._logger.removeHandler(handler)
        evaluator._logger.setLevel(level)
    assert "unseen/AP" not in results["segm"] and "unseen/AP" not in results.get("boundary", {})
    assert results["segm"]["seen/AP"] == pytest.approx(results["segm"]["AP"])
    # The table still has an unseen row, saying there is nothing to measure; so has Boundary AP's.
    unseen_rows = [line for line in printed.getvalue().splitlines() if line.startswith("| unseen")]
    assert len(unseen_rows) == 1 + ("boundary" in results)
    assert all("|          0 |" in row and "-" in row for row in unseen_rows)


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_voc_filter_keeps_every_box_and_only_voc_masks(mask_format):
    cfg = get_cfg()
    add_masklab_config(cfg)
    cfg.MODEL.MASK_ON = True
    cfg.DATASETS.TRAIN = ("coco_tiny_train",)
    cfg.DATASETS.MASK_TRAIN_CLASSES = "voc"
    cfg.INPUT.MASK_FORMAT = mask_format
    cfg.INPUT.MIN_SIZE_TRAIN = (320,)
    cfg.INPUT.MAX_SIZE_TRAIN = 480
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = PartialMaskDatasetMapper(cfg, is_train=True)
    metadata = MetadataCatalog.get("coco_tiny_train")
    voc_contiguous = {metadata.thing_dataset_id_to_contiguous_id[i] for i in COCO_VOC_CATEGORY_IDS}
    classes_with_boxes, classes_with_masks, total_boxes, expected_boxes = set(), set(), 0, 0
    for record in DatasetCatalog.get("coco_tiny_train"):
        instances = mapper(record)["instances"]
        expected_boxes += sum(1 for a in record["annotations"] if not a.get("iscrowd", 0))
        total_boxes += len(instances)
        classes = instances.gt_classes.tolist()
        has_mask = instances.gt_has_mask.tolist()
        classes_with_boxes.update(classes)
        for cls, flag in zip(classes, has_mask):
            assert flag == (cls in voc_contiguous)
            if flag:
                classes_with_masks.add(cls)
        assert len(instances.gt_masks) == len(instances)
    assert classes_with_boxes == set(range(80))  # every class keeps its boxes
    assert classes_with_masks == voc_contiguous  # and only VOC classes have masks
    # Boxes are only lost when degenerate after resizing (tiny COCO boxes), never for lacking a mask.
    assert total_boxes >= expected_boxes - 5
