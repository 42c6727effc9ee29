"""A default is written once: every constructor argument a YAML key sets has, with the YAML
defaults (detectron2's + add_masklab_config), the constructor's own default; a key whose default
drifts from its constructor's fails here."""

import inspect

import pytest

pytestmark = pytest.mark.detectron2

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402

from masklab_d2.config import add_masklab_config, default_of  # noqa: E402
from masklab_d2.layers.masklab import DirectionBinning  # noqa: E402
from masklab_d2.modeling import PartialROIHeads, build_roi_pooler  # noqa: E402
from masklab_d2.modeling.blendmask_head import BlendMaskHead  # noqa: E402
from masklab_d2.modeling.box_heads import Res5BoxHead  # noqa: E402
from masklab_d2.modeling.deep_marc_head import HourglassMaskHead, ResNetMaskHead  # noqa: E402
from masklab_d2.modeling.masklab_head import MaskLabHead  # noqa: E402
from masklab_d2.modeling.poolers import DeformableCropAndResizePooler  # noqa: E402

PYRAMID = {f"p{i}": ShapeSpec(channels=16, stride=2**i) for i in range(2, 7)}
HYPERCOLUMN = {"conv1": ShapeSpec(channels=8, stride=2), "res2": ShapeSpec(channels=8, stride=4)}
# Arguments a YAML key sets to a value other than the constructor's default, on purpose.
DIFFER_ON_PURPOSE = {
    # detectron2's own MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO (0, adaptive), which every mask
    # pooler shares; the head's default, 1, is the one-sample-per-bin convention of its configs.
    (BlendMaskHead, "attn_sampling_ratio"),
}


def _default_cfg():
    cfg = get_cfg()
    add_masklab_config(cfg)
    return cfg


def _plain(value):
    """A value as the comparison sees it: sequences as lists, a binning by its parameters."""
    if isinstance(value, DirectionBinning):
        return ("binning", value.num_directions, value.num_distance_bins, value.distance_metric)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _defaults(constructor):
    parameters = inspect.signature(constructor).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize(
    "constructor, from_config",
    [
        (MaskLabHead, lambda cfg: MaskLabHead.from_config(cfg, {**PYRAMID, **HYPERCOLUMN})),
        (BlendMaskHead, lambda cfg: BlendMaskHead.from_config(cfg, PYRAMID)),
        (
            HourglassMaskHead,
            lambda cfg: HourglassMaskHead.from_config(cfg, ShapeSpec(channels=16, height=8)),
        ),
        (
            ResNetMaskHead,
            lambda cfg: ResNetMaskHead.from_config(
                cfg.merge_from_list(["MODEL.DEEP_MARC.NETWORK", "resnet8"]) or cfg,
                ShapeSpec(channels=16, height=8),
            ),
        ),
        (
            PartialROIHeads,
            lambda cfg: PartialROIHeads.from_config(
                cfg.merge_from_list(
                    [
                        "MODEL.ROI_BOX_HEAD.NAME",
                        "FastRCNNConvFCHead",
                        "MODEL.ROI_BOX_HEAD.NUM_FC",
                        1,
                    ]
                )
                or cfg,
                {"res4": ShapeSpec(channels=16, stride=16)},
            ),
        ),
        (
            Res5BoxHead,
            lambda cfg: Res5BoxHead.from_config(cfg, ShapeSpec(channels=1024, height=14)),
        ),
    ],
    ids=lambda x: getattr(x, "__name__", ""),
)
def test_yaml_defaults_are_the_constructors_defaults(constructor, from_config):
    kwargs = from_config(_default_cfg())
    defaults = _defaults(constructor)
    if constructor is MaskLabHead:  # None means DirectionBinning's defaults
        defaults["binning"] = DirectionBinning()
    compared = 0
    for name, default in defaults.items():
        if name not in kwargs or (constructor, name) in DIFFER_ON_PURPOSE:
            continue
        assert _plain(kwargs[name]) == _plain(default), (constructor.__name__, name)
        compared += 1
    assert compared >= 1


def test_the_deformable_pooler_keys_are_its_defaults():
    cfg = _default_cfg()
    cfg.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "DeformableCropAndResize"
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
    pooler, _ = build_roi_pooler(cfg.MODEL.ROI_BOX_HEAD, PYRAMID, ["p2"])
    defaults = _defaults(DeformableCropAndResizePooler)
    assert pooler.offset_net.grid == defaults["grid"]
    assert pooler.offset_net.hidden.out_features == defaults["hidden_dim"]
    assert pooler.offset_net.max_offset == defaults["max_offset"]
    assert pooler.offset_net.lr_factor == defaults["lr_factor"]
    assert pooler.level_poolers[0].gamma == defaults["gamma"]


def test_default_of_refuses_an_argument_without_a_default():
    assert default_of(MaskLabHead, "dense_in_features") == ["p2", "p3", "p4", "p5"]
    with pytest.raises(TypeError, match="num_classes has no default"):
        default_of(MaskLabHead, "num_classes")
