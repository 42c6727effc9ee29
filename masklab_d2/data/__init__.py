"""Data: the built-in shapes dataset, COCO class groups, checked loading, the partial-mask mapper.

Importing this package registers the shapes datasets with detectron2 (see `datasets.py`).
"""

from masklab_d2.utils.detectron2 import require_detectron2

require_detectron2("masklab_d2.data")

from .class_groups import class_groups_of, resolve_class_selection  # noqa: E402
from .datasets import (  # noqa: E402
    check_coco_json,
    ensure_materialized,
    load_coco_json_checked,
    register_coco_datasets,
    register_coco_partial,
    register_shapes_datasets,
)
from .mapper import PartialMaskDatasetMapper, mask_train_class_ids  # noqa: E402
from .supervision import (  # noqa: E402
    check_mask_supervision,
    checked_detection_dataset_dicts,
    mask_class_ids,
)

register_shapes_datasets()

__all__ = [k for k in globals().keys() if not k.startswith("_")]
