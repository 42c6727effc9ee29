"""LazyConfig pieces: each mask head on detectron2's LazyConfig models, and partial supervision
in their dataloaders (see ``configs/lazy/`` and docs/lazyconfig.md)."""

from masklab_d2.utils.detectron2 import require_detectron2

require_detectron2("masklab_d2.lazy")

from .data import (  # noqa: E402
    checked_detection_dataset_dicts,
    mask_class_ids,
    partial_supervision,
)
from .models import (  # noqa: E402
    crop_and_resize_poolers,
    deformable_box_pooler,
    feature_shapes,
    hypercolumn_fpn,
    hypercolumn_resnet,
    partial_roi_heads,
    use_blendmask_head,
    use_deep_marc_head,
    use_mask_rcnn_head,
    use_masklab_head,
    use_point_rend_head,
)

__all__ = [
    "checked_detection_dataset_dicts",
    "crop_and_resize_poolers",
    "deformable_box_pooler",
    "feature_shapes",
    "hypercolumn_fpn",
    "hypercolumn_resnet",
    "mask_class_ids",
    "partial_roi_heads",
    "partial_supervision",
    "use_blendmask_head",
    "use_deep_marc_head",
    "use_mask_rcnn_head",
    "use_masklab_head",
    "use_point_rend_head",
]
