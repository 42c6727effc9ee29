"""Boundary AP (Cheng, Girshick, Dollár, Berg, Kirillov, CVPR 2021) by faster-coco-eval.

Boundary AP is COCO mask AP with one change: a detection matches a ground-truth mask at
min(mask IoU, boundary IoU), the boundary of a mask being its pixels within d pixels of its
contour, the image border included, with d = 2% of the image diagonal (at least 1 pixel);
crowd regions keep mask IoU. faster-coco-eval's ``iouType="boundary"`` computes it; its numbers
are the authors' reference implementation's (``projects/boundary-ap-check``), but where d is
exactly k + 0.5 pixels with k odd (a 525 x 700 image: 17.5) it rounds d down, the reference up.

Every category is evaluated once; a class group's AP is the library's summary over the group's
categories only (``COCOeval._summarize(catIds=...)``). With per-category evaluation (``useCats``)
that is exactly pycocotools' number with ``params.catIds`` restricted to the group, as mask AP's
groups are computed (tested), while the boundaries, the costly part, are computed once and not
once per group.
"""

import importlib.util
from typing import Dict, List, Mapping, Optional, Sequence

DILATION_RATIO = 0.02  # the paper's d for COCO: 2% of the image diagonal
INSTALL_HINT = "python3 -m pip install faster-coco-eval"
# Metric name -> the (IoU threshold, area range) it summarizes, in detectron2's order.
METRICS = {
    "AP": (None, "all"),
    "AP50": (0.5, "all"),
    "AP75": (0.75, "all"),
    "APs": (None, "small"),
    "APm": (None, "medium"),
    "APl": (None, "large"),
}


def boundary_ap_available() -> bool:
    """Whether faster-coco-eval, which computes Boundary AP, is installed."""
    return importlib.util.find_spec("faster_coco_eval") is not None


def _quiet(*args, **kwargs) -> None:
    """faster-coco-eval's print_function: the evaluator logs the numbers itself."""


def _percent(value: float) -> float:
    # The library's -1 means "no ground truth": NaN, as detectron2 reports it.
    return float(value * 100) if value >= 0 else float("nan")


def evaluate_boundary(
    coco_gt,
    coco_results: Sequence[dict],
    category_groups: Optional[Mapping[str, Sequence[int]]] = None,
    class_names: Optional[Sequence[str]] = None,
    img_ids: Optional[Sequence[int]] = None,
    max_dets_per_image: Optional[Sequence[int]] = None,
    dilation_ratio: float = DILATION_RATIO,
) -> Dict[str, float]:
    """Boundary AP metrics (0-100, NaN where undefined) of mask detections, keyed as detectron2
    keys mask AP: "AP", "AP50", "AP75", "APs", "APm", "APl", "AP-<class>" and
    "<group>/<metric>" for each non-empty group.

    Args:
        coco_gt: the ground truth, a pycocotools COCO object (detectron2's evaluator's); read,
            not modified.
        coco_results: mask detections in COCO result format, with dataset category ids (RLE
            "segmentation", "score"); not modified. A "bbox" is ignored: object size comes from
            the mask area, as detectron2 does for mask AP.
        category_groups: {group name: dataset category ids}; an empty group is left out.
        class_names: one name per category of ``coco_gt`` in id order (detectron2's
            ``thing_classes``); default: the categories' names.
        img_ids: evaluate these images only (default: all of ``coco_gt``).
        max_dets_per_image: COCOeval's ``maxDets`` (default [1, 10, 100]); AP at the last.
        dilation_ratio: the boundary width as a fraction of the image diagonal.

    Returns:
        The metrics; all NaN, without groups, when there is no detection (as detectron2 does
        for mask AP).
    """
    if not coco_results:
        return {metric: float("nan") for metric in METRICS}
    from faster_coco_eval import COCO, COCOeval_faster

    # faster-coco-eval writes each annotation's RLE and boundary into its dict: give it copies,
    # so detectron2's COCO object stays as it was (and does not keep them in memory).
    dataset = dict(coco_gt.dataset)
    dataset["annotations"] = [dict(a) for a in dataset.get("annotations", [])]
    ground_truth = COCO(dataset, print_function=_quiet)
    detections = ground_truth.loadRes(
        [{k: v for k, v in r.items() if k != "bbox"} for r in coco_results]
    )
    coco_eval = COCOeval_faster(
        ground_truth,
        detections,
        "boundary",
        print_function=_quiet,
        boundary_dilation_ratio=dilation_ratio,
    )
    if img_ids is not None:
        coco_eval.params.imgIds = list(img_ids)
    if max_dets_per_image is not None:
        coco_eval.params.maxDets = list(max_dets_per_image)
    coco_eval.evaluate()
    coco_eval.accumulate()

    # The library's summaries, over all categories or some; its precision array's category axis
    # follows params.catIds (sorted by evaluate()).
    index_of = {int(c): i for i, c in enumerate(coco_eval.params.catIds)}
    max_dets = coco_eval.params.maxDets[-1]

    def summary(indices: Optional[List[int]]) -> Dict[str, float]:
        return {
            metric: _percent(
                coco_eval._summarize(1, iouThr=iou, areaRng=area, maxDets=max_dets, catIds=indices)
            )
            for metric, (iou, area) in METRICS.items()
        }

    results = summary(None)
    names = list(class_names) if class_names is not None else []
    if len(names) != len(index_of):
        names = [c["name"] for c in coco_gt.loadCats(sorted(index_of))]
    for index, name in enumerate(names):
        results[f"AP-{name}"] = _percent(coco_eval._summarize(1, maxDets=max_dets, catIds=[index]))
    for group, category_ids in (category_groups or {}).items():
        indices = sorted(index_of[int(c)] for c in category_ids if int(c) in index_of)
        if not indices:
            continue
        for metric, value in summary(indices).items():
            results[f"{group}/{metric}"] = value
    return results
