"""The mask-head contract (masklab_d2.modeling.contract): every head of the project answers its
three questions, the answers match what the head's layers do, and the errors name both the
constructor argument and the YAML key."""

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from helpers import image_instances, tiny_cfg  # noqa: E402
from torch import nn  # noqa: E402

from masklab_d2.modeling import (  # noqa: E402
    MaskHeadContract,
    class_agnostic,
    recording,
    uses_image_targets,
)
from masklab_d2.modeling.blendmask_head import BlendMaskHead  # noqa: E402
from masklab_d2.modeling.deep_marc_head import HourglassMaskHead  # noqa: E402
from masklab_d2.modeling.masklab_head import MaskLabHead  # noqa: E402
from masklab_d2.utils.detectron2 import point_rend_available  # noqa: E402

# config -> (class-agnostic, uses image targets, what it records at inference)
HEADS = {
    "shapes/mask_rcnn_R_18_FPN.yaml": (False, False, set()),
    "shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml": (True, False, set()),
    "shapes/masklab_R_18_FPN.yaml": (
        False,
        False,
        {"semantic_logits", "direction_logits", "semantic_crop", "pooled_direction", "coarse"}
        | {"refined"},
    ),
    "shapes-partial/masklab_R_18_FPN_gtcrop.yaml": (
        True,
        False,
        {"semantic_logits", "direction_logits", "semantic_crop", "pooled_direction", "coarse"}
        | {"refined"},
    ),
    "shapes/mask_rcnn_hypercolumn_R_18_FPN.yaml": (False, False, {"coarse", "refined"}),
    "shapes-partial/mask_rcnn_hypercolumn_R_18_FPN_gtcrop.yaml": (
        True,
        False,
        {"coarse", "refined"},
    ),
    "shapes/blendmask_R_18_FPN.yaml": (True, True, {"bases", "attentions"}),
    "shapes-partial/deep_marc_R_18_FPN_hourglass52_gtcrop.yaml": (True, False, set()),
    "shapes/deep_marc_R_18_FPN_hourglass52.yaml": (True, False, set()),
    "shapes/point_rend_R_18_FPN.yaml": (False, False, {"coarse", "steps"}),
    "shapes-partial/point_rend_R_18_FPN_gtcrop.yaml": (True, False, {"coarse", "steps"}),
}


def _masks_per_class(head) -> int:
    """How many mask channels the head's layers predict, read from the layers themselves."""
    if isinstance(head, MaskLabHead):  # the semantic logits: K classes + background, or 1 + 1
        return head.dense_branch.semantic.out_channels - 1
    if isinstance(head, BlendMaskHead):
        return 1  # the blender makes one mask per box
    if hasattr(head, "conv_head"):  # the 4-conv head + hypercolumn refinement: its 4-conv's
        return head.conv_head.predictor.out_channels
    if hasattr(head, "point_head"):
        return head.point_head.predictor.out_channels
    return head.predictor.out_channels


@pytest.mark.parametrize("config", sorted(HEADS))
def test_every_head_answers_the_contract_as_its_layers_behave(config):
    if "point_rend" in config and not point_rend_available():
        pytest.skip("detectron2.projects.point_rend is not importable (README: Heads, PointRend)")
    agnostic, image_targets, records = HEADS[config]
    cfg = tiny_cfg(config, **{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert class_agnostic(head) is agnostic
    assert (_masks_per_class(head) == 1) is agnostic
    assert uses_image_targets(head) is image_targets
    if type(head).__module__.startswith("masklab_d2"):
        assert isinstance(head, MaskHeadContract)

    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": image_instances()}]
    model.eval()
    with torch.no_grad(), recording(head) as recorded:
        (output,) = model.inference(batch, do_postprocess=False)
    assert len(output) > 0
    assert set(recorded) == records
    for value in recorded.values():
        assert not isinstance(value, torch.Tensor) or not value.requires_grad
    if isinstance(head, MaskHeadContract):
        assert head._record is None  # recording ends with the block
        with torch.no_grad():
            model.inference(batch, do_postprocess=False)
        assert set(recorded) == records
    model.train()
    with EventStorage():
        losses = model(batch)
    assert "loss_mask" in losses


def test_a_head_outside_the_contract_is_asked_to_join_it():
    class Plain(nn.Module):
        pass

    with pytest.raises(TypeError, match="subclass masklab_d2.modeling.MaskHeadContract"):
        class_agnostic(Plain())
    assert not uses_image_targets(Plain())
    with recording(Plain()) as recorded:
        assert recorded == {}


@pytest.mark.parametrize(
    "build, argument, key",
    [
        (
            lambda: MaskLabHead(
                {"p2": ShapeSpec(channels=8, stride=4)},
                num_classes=3,
                dense_in_features=["p2"],
                hypercolumn_features=[],
                semantic_input="per-class",
            ),
            "semantic_input",
            "MODEL.MASKLAB.SEMANTIC_INPUT",
        ),
        (
            lambda: MaskLabHead(
                {"p2": ShapeSpec(channels=8, stride=4)}, num_classes=3, dense_in_features=["p2"]
            ),
            "hypercolumn_features",
            "MODEL.MASKLAB.DENSE_IN_FEATURES, HYPERCOLUMN_FEATURES",
        ),
        (
            lambda: BlendMaskHead(
                {"p2": ShapeSpec(channels=8, stride=4)}, bottom_in_features=["p3"]
            ),
            "bottom_in_features",
            "MODEL.BLENDMASK.BOTTOM_IN_FEATURES",
        ),
        (
            lambda: HourglassMaskHead(
                ShapeSpec(channels=8, height=8, width=8), network="resnet8", num_classes=1
            ),
            "network",
            "MODEL.DEEP_MARC.NETWORK",
        ),
    ],
)
def test_constructor_errors_name_the_argument_and_the_yaml_key(build, argument, key):
    with pytest.raises(ValueError) as error:
        build()
    assert argument in str(error.value) and key in str(error.value), str(error.value)
