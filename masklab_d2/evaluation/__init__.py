"""Evaluation: COCO box, mask and Boundary AP, also on seen / unseen / named class groups."""

from masklab_d2.utils.detectron2 import require_detectron2

require_detectron2("masklab_d2.evaluation")

from .boundary import evaluate_boundary  # noqa: E402
from .partial_coco import PartialCOCOEvaluator, evaluate_on_categories  # noqa: E402

__all__ = ["PartialCOCOEvaluator", "evaluate_boundary", "evaluate_on_categories"]
