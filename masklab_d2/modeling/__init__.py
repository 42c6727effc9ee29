"""detectron2 adapters: backbones, poolers, the ROI heads and the registered mask heads.

Importing this package registers everything with detectron2's registries.
"""

from masklab_d2.utils.detectron2 import require_detectron2

require_detectron2("masklab_d2.modeling")

from . import backbone as _backbone  # noqa: E402,F401  (registration)
from . import blendmask_head as _blendmask_head  # noqa: E402,F401  (registration)
from . import box_heads as _box_heads  # noqa: E402,F401  (registration)
from . import deep_marc_head as _deep_marc_head  # noqa: E402,F401  (registration)
from . import hypercolumn_head as _hypercolumn_head  # noqa: E402,F401  (registration)
from . import masklab_head as _masklab_head  # noqa: E402,F401  (registration)
from . import point_rend_head as _point_rend_head  # noqa: E402,F401  (registration)
from .checkpoint import MaskLabCheckpointer  # noqa: E402
from .contract import MaskHeadContract, class_agnostic, recording, uses_image_targets  # noqa: E402
from .freeze import freeze_detector, load_detector_weights  # noqa: E402
from .poolers import build_roi_pooler  # noqa: E402
from .roi_heads import PartialROIHeads  # noqa: E402

__all__ = [
    "MaskHeadContract",
    "MaskLabCheckpointer",
    "PartialROIHeads",
    "build_roi_pooler",
    "class_agnostic",
    "freeze_detector",
    "load_detector_weights",
    "recording",
    "uses_image_targets",
]
