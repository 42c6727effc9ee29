"""COCO evaluation with mask and Boundary AP on class groups: seen / unseen and named.

All-class box and mask AP come from detectron2's COCOEvaluator unchanged. Group AP is pycocotools'
own number with ``params.catIds`` restricted to the group (not an average of per-class APs), for:

* ``seen``: the classes of DATASETS.MASK_TRAIN_CLASSES (all classes for "all");
* ``unseen``: the other classes (printed as "-", not computed, when there are none);
* each named class group of the dataset (COCO: ``voc`` / ``nonvoc``).

Results land in ``results["segm"]["<group>/AP"]`` (also AP50, AP75, APs, APm, APl), hence in
metrics.json as ``segm/<group>/AP``, and are printed as a table.

Boundary AP (:mod:`masklab_d2.evaluation.boundary`, by faster-coco-eval) is a task of its own
beside ``segm`` with the same keys: ``results["boundary"]["AP"]``, ``["AP-<class>"]``,
``["<group>/AP"]``, ... (metrics.json: ``boundary/AP``, ``boundary/seen/AP``), for every
evaluation that has masks; without faster-coco-eval it is left out with a warning.
"""

import contextlib
import io
import itertools
from typing import Dict, List, Optional, Sequence

from detectron2.evaluation import COCOEvaluator
from detectron2.evaluation.fast_eval_api import COCOeval_opt
from detectron2.utils.logger import create_small_table
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

from masklab_d2.data.class_groups import class_groups_of, resolve_class_selection
from masklab_d2.data.datasets import ensure_materialized
from masklab_d2.evaluation.boundary import INSTALL_HINT, boundary_ap_available, evaluate_boundary

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def evaluate_on_categories(
    coco_gt,
    coco_results: List[dict],
    iou_type: str,
    category_ids: Sequence[int],
    img_ids: Optional[Sequence[int]] = None,
    max_dets_per_image: Optional[Sequence[int]] = None,
    use_fast_impl: bool = True,
) -> Dict[str, float]:
    """COCO AP metrics (0-100, NaN where undefined) over ``category_ids`` only.

    Args:
        coco_gt: a pycocotools COCO object.
        coco_results: detections in COCO result format, with dataset category ids.
        iou_type: "bbox" or "segm".
        category_ids: dataset category ids to evaluate (pycocotools ``params.catIds``).
    """
    if iou_type == "segm":
        # As detectron2 does: without "bbox", pycocotools takes object size from the mask area.
        coco_results = [{k: v for k, v in r.items() if k != "bbox"} for r in coco_results]
    results = [r for r in coco_results if r["category_id"] in set(category_ids)]
    if not results:
        # No detection in the group: AP is 0 where it has ground truth, undefined where not.
        value = 0.0 if _has_ground_truth(coco_gt, category_ids, img_ids) else float("nan")
        return {metric: value for metric in METRICS}
    evaluator_class = COCOeval_opt if use_fast_impl else COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = evaluator_class(coco_gt, coco_gt.loadRes(results), iou_type)
        coco_eval.params.catIds = list(category_ids)
        if img_ids is not None:
            coco_eval.params.imgIds = list(img_ids)
        if max_dets_per_image is not None:
            coco_eval.params.maxDets = list(max_dets_per_image)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {
        metric: float(value * 100) if value >= 0 else float("nan")
        for metric, value in zip(METRICS, coco_eval.stats[: len(METRICS)])
    }


def _has_ground_truth(coco_gt, category_ids, img_ids) -> bool:
    ids = coco_gt.getAnnIds(
        imgIds=list(img_ids) if img_ids is not None else [], catIds=list(category_ids)
    )
    return len(ids) > 0


class PartialCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator that adds mask AP on seen / unseen / named class groups and Boundary AP
    (module docstring).

    Args:
        dataset_name: a registered COCO-format dataset.
        mask_train_classes: the DATASETS.MASK_TRAIN_CLASSES the model was trained with.
        boundary_ap: also evaluate Boundary AP where masks are evaluated (needs
            faster-coco-eval; without it, a warning and no Boundary AP).
        kwargs: see detectron2's COCOEvaluator.
    """

    def __init__(
        self,
        dataset_name: str,
        *args,
        mask_train_classes: str = "all",
        boundary_ap: bool = True,
        **kwargs,
    ):
        metadata = ensure_materialized(dataset_name)
        super().__init__(dataset_name, *args, **kwargs)
        self._boundary_ap = boundary_ap and boundary_ap_available()
        if boundary_ap and not self._boundary_ap:
            self._logger.warning(
                f"Boundary AP needs faster-coco-eval ({INSTALL_HINT}); evaluating without it."
            )
        thing_classes = list(metadata.thing_classes)
        named_groups = class_groups_of(metadata)
        seen = resolve_class_selection(mask_train_classes, thing_classes, named_groups)
        groups = {"seen": seen, "unseen": [i for i in range(len(thing_classes)) if i not in seen]}
        for name, members in named_groups.items():
            groups[name] = [thing_classes.index(c) for c in members]
        # Contiguous ids -> dataset category ids, as in the results pycocotools sees.
        to_dataset = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
        # An empty group (unseen, under full supervision) stays, to be printed as such.
        self._class_groups = {
            name: [to_dataset[i] for i in members] for name, members in groups.items()
        }

    def _eval_predictions(self, predictions, img_ids=None):
        # COCOEvaluator rewrites category ids of the result dicts in place; keep our own copies.
        results = [dict(r) for r in itertools.chain(*[x["instances"] for x in predictions])]
        super()._eval_predictions(predictions, img_ids)
        if not self._do_evaluation or "segm" not in self._results:
            return
        to_dataset = {v: k for k, v in self._metadata.thing_dataset_id_to_contiguous_id.items()}
        for result in results:
            result["category_id"] = to_dataset[result["category_id"]]
        if results:
            self._eval_mask_groups(results, img_ids)
        if self._boundary_ap:
            self._eval_boundary(results, img_ids)

    def _eval_mask_groups(self, results: List[dict], img_ids) -> None:
        """Mask AP per class group: ``self._results["segm"]["<group>/<metric>"]``."""
        rows = []
        for name, category_ids in self._class_groups.items():
            if not category_ids:
                rows.append([name, 0, "-", "-", "-"])
                continue
            metrics = evaluate_on_categories(
                self._coco_api,
                results,
                "segm",
                category_ids,
                img_ids=img_ids,
                max_dets_per_image=self._max_dets_per_image,
                use_fast_impl=self._use_fast_impl,
            )
            for metric, value in metrics.items():
                self._results["segm"][f"{name}/{metric}"] = value
            rows.append([name, len(category_ids)] + [metrics[m] for m in ("AP", "AP50", "AP75")])
        self._logger.info("Mask AP by class group:\n" + group_table(rows))

    def _eval_boundary(self, results: List[dict], img_ids) -> None:
        """Boundary AP over all classes, per class and per group: ``self._results["boundary"]``."""
        metrics = evaluate_boundary(
            self._coco_api,
            results,
            {name: ids for name, ids in self._class_groups.items() if ids},
            class_names=self._metadata.get("thing_classes"),
            img_ids=img_ids,
            max_dets_per_image=self._max_dets_per_image,
        )
        self._results["boundary"] = metrics
        self._logger.info(
            "Evaluation results for boundary:\n"
            + create_small_table({m: metrics[m] for m in METRICS})
        )
        if not results:
            return
        rows = [
            [name, len(ids)] + ([metrics[f"{name}/{m}"] for m in METRICS[:3]] if ids else ["-"] * 3)
            for name, ids in self._class_groups.items()
        ]
        self._logger.info("Boundary AP by class group:\n" + group_table(rows, "boundary AP"))


def group_table(rows: Sequence[Sequence], metric: str = "mask AP") -> str:
    """The group AP table; rows are [group, #classes, AP, AP50, AP75], a metric may be "-";
    ``metric`` heads the AP column.

    Numbers are formatted here: tabulate's floatfmt skips a column that also holds text, and
    would print 15.011713670497247 next to a "-" row.
    """
    formatted = [
        [name, str(count)] + [m if isinstance(m, str) else f"{m:.2f}" for m in metrics]
        for name, count, *metrics in rows
    ]
    return tabulate(
        formatted,
        headers=["group", "#classes", metric, "AP50", "AP75"],
        tablefmt="pipe",
        colalign=("left", "right", "right", "right", "right"),
        disable_numparse=True,
    )
