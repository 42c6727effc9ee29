"""Boundary AP of masklab_d2's evaluator (faster-coco-eval) against the authors' reference
implementation (bowenc0221/boundary-iou-api), on the same ground truth and detections.

    git clone https://github.com/bowenc0221/boundary-iou-api /path/to/boundary-iou-api
    python3 projects/boundary-ap-check/compare_reference.py --reference /path/to/boundary-iou-api \
        --coco-tiny ../shared/data/coco_tiny \
        [--shapes-results output/run/inference/coco_instances_results.json] [--markdown out.md]

The reference is imported from its folder (``--reference``), not installed: it needs only
pycocotools, OpenCV and numpy for COCO instance segmentation. Its COCOeval evaluates a class
group with ``params.catIds`` restricted and the detections filtered; ours slices one evaluation
(masklab_d2.evaluation.boundary), so the group rows also check that equivalence.

Cases: for each COCO split of ``--coco-tiny`` (real COCO masks, crowd regions included) and for
the shapes split, the ground truth itself as detections, then detections made from it that shift,
erode or dilate the masks (several pixels, a mask's size apart), drop some, duplicate some with a
lower score and add false positives with random scores; and, with ``--shapes-results``, a shapes
model's own detections (detectron2's ``coco_instances_results.json`` of ``shapes_val``).
"""

import argparse
import contextlib
import copy
import io
import itertools
import json
import os
import random
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from tabulate import tabulate

from masklab_d2.evaluation.boundary import DILATION_RATIO, METRICS, evaluate_boundary

SHAPES_SPLIT = "shapes_val"


def _rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _degrade(mask: np.ndarray, rng: random.Random, strength: int) -> np.ndarray:
    """The mask shifted by up to ``strength`` pixels, eroded or dilated up to ``strength // 2``
    times with a 3 x 3 kernel, or both."""
    kind = rng.choice(["shift", "erode", "dilate", "shift+dilate"])
    if "shift" in kind:
        mask = np.roll(mask, rng.randint(-strength, strength), axis=0)
        mask = np.roll(mask, rng.randint(-strength, strength), axis=1)
    iterations = rng.randint(1, max(1, strength // 2))
    if kind.endswith("erode"):
        mask = cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=iterations)
    if kind.endswith("dilate"):
        mask = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=iterations)
    return mask


def detections_from_ground_truth(coco: COCO, strength: int = 0, seed: int = 0) -> List[dict]:
    """COCO results from the non-crowd ground truth: as it is (score 1, ``strength`` 0), or
    degraded (see _degrade) with misses, duplicates and false positives and random scores."""
    rng = random.Random(seed)
    category_ids = coco.getCatIds()
    results = []

    def add(annotation, mask, score, category_id=None):
        category_id = category_id or annotation["category_id"]
        results.append(
            {"image_id": annotation["image_id"], "category_id": category_id,
             "segmentation": _rle(mask), "score": score}
        )  # fmt: skip

    for image_id in sorted(coco.getImgIds()):
        for annotation in coco.imgToAnns[image_id]:
            if annotation.get("iscrowd", 0):
                continue
            mask = coco.annToMask(annotation)
            if not strength:
                add(annotation, mask, 1.0)
                continue
            if rng.random() < 0.15:
                continue  # a miss
            score = rng.random()
            add(annotation, _degrade(mask, rng, strength), score)
            if rng.random() < 0.2:  # a duplicate, lower
                add(annotation, _degrade(mask, rng, strength), score * rng.random())
            if rng.random() < 0.2:  # a false positive: the object under another class
                category_id = rng.choice(category_ids)
                add(annotation, _degrade(mask, rng, strength), rng.random(), category_id)
    return results


def reference_metrics(reference_gt, results: List[dict], category_ids=None) -> Dict[str, float]:
    """The reference's Boundary AP (0-100, NaN where undefined), on ``category_ids`` only."""
    from boundary_iou.coco_instance_api.cocoeval import COCOeval

    if category_ids is not None:
        results = [r for r in results if r["category_id"] in set(category_ids)]
    # Without "bbox", as detectron2 and masklab_d2 evaluate masks: object size (APs / APm / APl)
    # is then the mask's area, not the box's.
    results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        detections = reference_gt.loadRes(copy.deepcopy(results))
        coco_eval = COCOeval(reference_gt, detections, "boundary", dilation_ratio=DILATION_RATIO)
        if category_ids is not None:
            coco_eval.params.catIds = list(category_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {
        metric: float(value * 100) if value >= 0 else float("nan")
        for metric, value in zip(METRICS, coco_eval.stats)
    }


def compare(
    name: str,
    json_file: str,
    cases: Sequence[Tuple[str, List[dict]]],
    groups: Dict[str, List[int]],
) -> List[list]:
    """One row per case: sizes, our and the reference's AP, the largest difference and times."""
    from boundary_iou.coco_instance_api.coco import COCO as ReferenceCOCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(json_file)
        started = time.perf_counter()
        reference_gt = ReferenceCOCO(json_file, get_boundary=True, dilation_ratio=DILATION_RATIO)
    seconds = time.perf_counter() - started
    print(f"{name}: the reference's ground-truth boundaries took {seconds:.1f} s")
    rows = []
    for case, results in cases:
        started = time.perf_counter()
        ours = evaluate_boundary(coco, results, groups)
        ours_seconds = time.perf_counter() - started
        started = time.perf_counter()
        reference = reference_metrics(reference_gt, results)
        for group, category_ids in groups.items():
            for metric, value in reference_metrics(reference_gt, results, category_ids).items():
                reference[f"{group}/{metric}"] = value
        reference_seconds = time.perf_counter() - started
        differences = [
            abs(ours[key] - reference[key])
            for key in reference
            if not (np.isnan(ours[key]) and np.isnan(reference[key]))
        ]
        rows.append(
            [
                name,
                case,
                len(coco.getImgIds()),
                len(results),
                ours["AP"],
                reference["AP"],
                " / ".join(f"{ours[f'{g}/AP']:.3f}" for g in groups),
                " / ".join(f"{reference[f'{g}/AP']:.3f}" for g in groups),
                max(differences) if differences else float("nan"),
                ours_seconds,
                reference_seconds,
            ]
        )
        print(f"{name} {case}: max |ours - reference| = {rows[-1][8]:.2e}", flush=True)
    return rows


def _cases(coco: COCO, seeds: Sequence[int]) -> List[Tuple[str, List[dict]]]:
    """The ground truth, and for each seed mildly (3 pixels) and strongly (8) degraded."""
    cases = [("ground truth", detections_from_ground_truth(coco))]
    for strength, seed in itertools.product((3, 8), seeds):
        detections = detections_from_ground_truth(coco, strength, seed)
        cases.append((f"degraded {strength} px, seed {seed}", detections))
    return cases


def coco_tiny_cases(folder: str, seeds: Sequence[int]) -> List[list]:
    from masklab_d2.data.class_groups import COCO_VOC_CATEGORY_IDS

    rows = []
    for split in ("val2017", "train2017"):
        json_file = os.path.join(folder, "annotations", f"instances_{split}.json")
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(json_file)
        voc = [c for c in coco.getCatIds() if c in COCO_VOC_CATEGORY_IDS]
        groups = {"voc": voc, "nonvoc": [c for c in coco.getCatIds() if c not in voc]}
        rows += compare(f"coco_tiny {split}", json_file, _cases(coco, seeds), groups)
    return rows


def shapes_cases(results_file: Optional[str], seeds: Sequence[int]) -> List[list]:
    import masklab_d2.data  # noqa: F401  (registers the shapes splits)
    from masklab_d2.data.class_groups import class_groups_of
    from masklab_d2.data.datasets import ensure_materialized

    metadata = ensure_materialized(SHAPES_SPLIT)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(metadata.json_file)
    to_dataset = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
    groups = {
        name: [to_dataset[metadata.thing_classes.index(c)] for c in members]
        for name, members in class_groups_of(metadata).items()
    }
    cases = _cases(coco, seeds)
    if results_file:
        with open(results_file) as f:
            cases.append(("a model's detections", json.load(f)))
    return compare(SHAPES_SPLIT, metadata.json_file, cases, groups)


def main(argv: Optional[Sequence[str]] = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", required=True, help="a clone of boundary-iou-api")
    parser.add_argument("--coco-tiny", help="COCO-format folder with annotations/instances_*.json")
    parser.add_argument(
        "--shapes-results", help=f"a model's coco_instances_results.json on {SHAPES_SPLIT}"
    )
    parser.add_argument("--no-shapes", action="store_true", help=f"skip {SHAPES_SPLIT}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.reference))
    if "float" not in np.__dict__:
        # The reference's accumulate() uses np.float, an alias of float that NumPy 1.24 removed.
        np.float = float

    rows = []
    if args.coco_tiny:
        rows += coco_tiny_cases(args.coco_tiny, args.seeds)
    if not args.no_shapes:
        rows += shapes_cases(args.shapes_results, args.seeds)
    group_names = "voc / nonvoc"
    table = tabulate(
        rows,
        headers=["data", "detections", "images", "#", "AP ours", "AP reference",
                 f"{group_names} ours", f"{group_names} reference", "max abs diff",
                 "s ours", "s reference"],  # fmt: skip
        tablefmt="pipe",
        floatfmt=("", "", "", "", ".3f", ".3f", "", "", ".1e", ".1f", ".1f"),
    )
    worst = max(r[8] for r in rows)
    summary = (
        f"Largest |ours - reference| over every row and metric (AP, AP50, AP75, APs, APm, APl, "
        f"each overall and per group): {worst:.2e}"
    )
    print(table + "\n\n" + summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n\n" + summary + "\n")
    return worst


if __name__ == "__main__":
    main()
