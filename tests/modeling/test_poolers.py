"""The comparison configs' cropping convention: CropAndResizePooler == ROIAlignV2, sampling 1."""

import pytest
import torch

pytestmark = [
    pytest.mark.detectron2,
]


def _pool(pooler_type, features, boxes, output_size=7):
    from detectron2.modeling.poolers import ROIPooler
    from detectron2.structures import Boxes

    from masklab_d2.modeling.poolers import CropAndResizePooler

    scales = (1 / 4, 1 / 8, 1 / 16)
    if pooler_type == "CropAndResize":
        pooler = CropAndResizePooler(output_size, scales)
    else:
        pooler = ROIPooler(output_size, scales, sampling_ratio=1, pooler_type="ROIAlignV2")
    return pooler(features, [Boxes(b) for b in boxes])


@pytest.mark.parametrize("constant", [True, False], ids=["ones", "random"])
def test_crop_and_resize_pooler_equals_roi_align_v2_with_one_sample(constant):
    torch.manual_seed(0)
    image = 128
    features = [
        (
            torch.ones(2, 3, image // s, image // s)
            if constant
            else torch.randn(2, 3, image // s, image // s)
        )
        for s in (4, 8, 16)
    ]
    # Boxes on every image border, boxes wholly inside, large ones (coarser levels), tiny ones.
    boxes = [
        torch.tensor(
            [[0.0, 0.0, 40.0, 30.0], [90.0, 100.0, 128.0, 128.0], [0.0, 0.0, 128.0, 128.0]]
        ),
        torch.tensor([[10.3, 20.7, 50.1, 90.2], [120.0, 3.0, 128.0, 9.0], [0.0, 60.0, 6.0, 128.0]]),
    ]
    ours = _pool("CropAndResize", [f.clone().requires_grad_() for f in features], boxes)
    reference = _pool("ROIAlignV2", features, boxes)
    assert torch.allclose(ours, reference, atol=1e-5), (ours - reference).abs().max()
    if constant:  # no zeros at the image border
        assert torch.allclose(ours, torch.ones_like(ours))


def test_crop_and_resize_pooler_feature_gradient_equals_roi_align_v2():
    torch.manual_seed(0)
    boxes = [torch.tensor([[0.0, 0.0, 40.0, 30.0], [60.0, 50.0, 128.0, 128.0]])]
    grads = []
    for pooler_type in ("CropAndResize", "ROIAlignV2"):
        features = [torch.randn(1, 2, 128 // s, 128 // s, requires_grad=True) for s in (4, 8, 16)]
        torch.manual_seed(1)
        out = _pool(pooler_type, features, boxes)
        (out * torch.randn_like(out)).sum().backward()
        grads.append([f.grad for f in features])
    for ours, reference in zip(*grads):
        assert torch.allclose(ours, reference, atol=1e-5)


def test_comparison_configs_share_one_cropping_convention():
    """Bin-centre, half-pixel, one sample per bin: CropAndResize (shapes) or ROIAlignV2 at ratio 1
    (COCO) for every pooled mask input, and the heads that crop for themselves do the same."""
    import glob
    import os

    from masklab_d2.config import load_config
    from masklab_d2.utils.detectron2 import point_rend_available

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    paths = [
        p
        for folder in ("shapes", "shapes-partial", "coco", "coco-voc-nonvoc")
        for p in glob.glob(os.path.join(root, folder, "*.yaml"))
        if not os.path.basename(p).startswith("Base-")
        and "C4" not in p  # C4: MaskLab's paper model
        and (point_rend_available() or "point_rend" not in p)  # its configs need its keys
    ]
    assert len(paths) > 25
    for path in paths:
        cfg = load_config(path)
        box, mask = cfg.MODEL.ROI_BOX_HEAD, cfg.MODEL.ROI_MASK_HEAD
        if "shapes" in path:
            assert box.POOLER_TYPE == "CropAndResize", path
            assert mask.POOLER_TYPE in ("CropAndResize", ""), path
        else:
            assert box.POOLER_TYPE == "ROIAlignV2", path
            assert mask.POOLER_TYPE in ("ROIAlignV2", ""), path
        # The ROIAlignV2 poolers a head builds for itself (BlendMask's attention) read it.
        assert mask.POOLER_SAMPLING_RATIO == 1, path


@pytest.mark.parametrize(
    "config",
    [
        "shapes/blendmask_R_18_FPN.yaml",
        "shapes-partial/blendmask_R_18_FPN_gtcrop.yaml",
        "lazy/shapes-partial/blendmask_R_18_FPN_gtcrop.py",
    ],
)
def test_blendmask_attention_pooler_takes_one_sample_per_bin(config):
    """The attention pooler of the comparison's BlendMask models (YAML and lazy) follows the
    shared convention; the shapes configs left it at detectron2's adaptive default."""
    import os

    from detectron2.config import LazyConfig, instantiate
    from detectron2.modeling import build_model
    from helpers import CONFIGS, tiny_cfg

    if config.endswith(".py"):
        model = instantiate(LazyConfig.load(os.path.join(CONFIGS, config)).model)
    else:
        model = build_model(tiny_cfg(config))
    level_poolers = model.roi_heads.mask_head.attn_pooler.level_poolers
    assert [pooler.sampling_ratio for pooler in level_poolers] == [1] * len(level_poolers)
