"""Every YAML config loads, names registered components, and every added key is documented."""

import glob
import os
import re

import pytest

pytestmark = pytest.mark.detectron2

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY  # noqa: E402
from detectron2.modeling.roi_heads import (  # noqa: E402
    ROI_BOX_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
)
from helpers import REPO  # noqa: E402

import masklab_d2.modeling  # noqa: E402,F401  (registration)
from masklab_d2.config import POINT_REND_KEYS, add_masklab_config  # noqa: E402
from masklab_d2.utils.detectron2 import point_rend_available  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def _added_keys():
    """Flattened names of the keys add_masklab_config adds to detectron2's defaults, but for
    PointRend's own (detectron2's add_pointrend_config, documented in its config.py)."""

    def flatten(node, prefix=""):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if hasattr(value, "items"):
                yield from flatten(value, name + ".")
            else:
                yield name

    base = set(flatten(get_cfg()))
    cfg = get_cfg()
    add_masklab_config(cfg)
    return sorted(k for k in set(flatten(cfg)) - base if not k.startswith(POINT_REND_KEYS))


def test_every_added_key_is_in_the_config_key_reference():
    reference = open(os.path.join(REPO, "docs", "config_keys.md")).read()
    keys = _added_keys()
    assert len(keys) > 40
    missing = [key for key in keys if f"`{key}`" not in reference]
    assert not missing, (
        f"docs/config_keys.md lacks {missing}; run "
        "python3 -m masklab_d2.utils.config_reference --write"
    )


def test_every_added_key_has_a_one_line_comment():
    source = open(os.path.join(REPO, "masklab_d2", "config.py")).read().splitlines()
    for index, line in enumerate(source):
        if re.match(r"\s*_C\.[A-Z0-9_.]+ = (?!CN\(\))", line):
            assert source[index - 1].strip().startswith("#"), f"no comment above: {line.strip()}"


@pytest.mark.parametrize(
    "path", CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "configs"))
)
def test_config_loads_and_names_registered_parts(path):
    if "point_rend" in os.path.basename(path) and not point_rend_available():
        pytest.skip("detectron2.projects.point_rend is not importable (README: Heads, PointRend)")
    cfg = get_cfg()
    add_masklab_config(cfg)
    cfg.merge_from_file(path)
    if (
        os.path.basename(path).startswith("Base-")
        and cfg.MODEL.ROI_HEADS.NAME == "StandardROIHeads"
    ):
        return  # partial bases without heads
    assert cfg.MODEL.ROI_HEADS.NAME in ROI_HEADS_REGISTRY
    assert cfg.MODEL.ROI_MASK_HEAD.NAME in ROI_MASK_HEAD_REGISTRY
    assert cfg.MODEL.ROI_BOX_HEAD.NAME in ROI_BOX_HEAD_REGISTRY
    assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY
    if "shapes" in path:
        assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 16
        assert cfg.DATASETS.TRAIN[0].startswith("shapes_")
