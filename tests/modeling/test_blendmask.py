"""BlendMaskHead under detectron2: configs, partial-mask training, semantic loss, inference."""

import math
import os

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from helpers import CONFIGS, image_instances, tiny_cfg  # noqa: E402

import masklab_d2.data  # noqa: E402,F401  (dataset registration)
import masklab_d2.modeling  # noqa: E402,F401  (registration)
from masklab_d2.config import load_config  # noqa: E402
from masklab_d2.data import PartialMaskDatasetMapper  # noqa: E402
from masklab_d2.layers.blender import SEMANTIC_IGNORE_INDEX  # noqa: E402
from masklab_d2.modeling.blendmask_head import BlendMaskHead, semantic_targets  # noqa: E402

SHAPES_CONFIGS = [
    "shapes/blendmask_R_18_FPN.yaml",
    "shapes-partial/blendmask_R_18_FPN.yaml",
    "shapes-partial/blendmask_R_18_FPN_gtcrop.yaml",
]
COCO_CONFIGS = [
    "coco/blendmask_R_50_FPN_1x.yaml",
    "coco-voc-nonvoc/blendmask_R_50_FPN_1x.yaml",
    "coco-voc-nonvoc/blendmask_R_50_FPN_1x_nonvoc_to_voc.yaml",
]
GT_CROP = "shapes-partial/blendmask_R_18_FPN_gtcrop.yaml"


def _train_step(model, batch):
    model.train()
    with EventStorage():
        losses = model(batch)
        sum(losses.values()).backward()
    return losses


def _cells_in_box(box, size, stride):
    """Bool [h, w]: cells whose centre lies in the box (thing_semantic_target's rule)."""
    h, w = size
    cy = (torch.arange(h) + 0.5) * stride
    cx = (torch.arange(w) + 0.5) * stride
    x0, y0, x1, y1 = box
    return ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]


@pytest.mark.parametrize("config", SHAPES_CONFIGS)
def test_shapes_configs_train_with_partial_masks_and_infer_image_size_masks(config):
    cfg = tiny_cfg(config, **{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0})
    assert cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE == ""
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert isinstance(head, BlendMaskHead) and head.uses_image_targets
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mapper = PartialMaskDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get("shapes_tiny_train")
    batches = [[mapper(dict(r)) for r in records[i : i + 2]] for i in (0, 2)]
    flags = torch.cat([x["instances"].gt_has_mask for b in batches for x in b])
    if config != "shapes/blendmask_R_18_FPN.yaml":
        assert flags.any() and not flags.all()  # partial: some instances have no mask
    for batch in batches:
        optimizer.zero_grad()
        with head.recording() as recorded:
            losses = _train_step(model, batch)
        assert {"loss_mask", "loss_basis_sem"} <= set(losses)
        assert all(math.isfinite(v.item()) for v in losses.values()), losses
        optimizer.step()
    assert recorded["bases"].shape[:2] == (2, cfg.MODEL.BLENDMASK.NUM_BASES)
    assert not recorded["bases"].requires_grad and not recorded["attentions"].requires_grad

    model.eval()
    record = DatasetCatalog.get("shapes_tiny_val")[0]
    with torch.no_grad(), head.recording() as recorded:
        output = model([PartialMaskDatasetMapper(cfg, is_train=False)(dict(record))])[0][
            "instances"
        ]
    assert len(output) > 0
    assert output.pred_masks.shape == (len(output), record["height"], record["width"])
    bases = recorded["bases"]
    assert (
        bases.shape[-1] * 4 >= 128 and bases.shape[-1] * 4 < 128 + 32
    )  # stride 4 of the padded image
    assert recorded["attentions"].shape == (len(output), cfg.MODEL.BLENDMASK.NUM_BASES, 14, 14)


@pytest.mark.parametrize("polygons", [False, True])
def test_semantic_target_ignores_exactly_the_maskless_boxes(polygons):
    targets = semantic_targets([image_instances(polygons=polygons)], size=(14, 13), stride=8)
    assert targets.shape == (1, 14, 13)
    target = targets[0]
    maskless = _cells_in_box((50.0, 52.0, 90.0, 88.0), (14, 13), 8)
    masked = _cells_in_box((12.0, 10.0, 44.0, 40.0), (14, 13), 8)
    assert torch.equal(target == SEMANTIC_IGNORE_INDEX, maskless)
    assert torch.equal(target == 1, masked)  # class 0 -> label 1
    assert not target[~(masked | maskless)].any()  # background elsewhere, padding included


def test_semantic_loss_is_finite_and_blind_to_maskless_instances():
    cfg = tiny_cfg(GT_CROP)
    torch.manual_seed(0)
    head = build_model(cfg).roi_heads.mask_head.train()
    features = {
        f: torch.randn(1, 64, 96 // s, 96 // s)
        for f, s in (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32))
    }
    both = image_instances()
    loss = head.semantic_loss(features, [both])
    assert math.isfinite(loss.item()) and loss.item() > 0
    relabelled = image_instances()
    relabelled.gt_classes = torch.tensor([0, 3])  # another class for the mask-less instance
    relabelled.gt_masks.tensor[1, 52:88, 50:90] = True  # and a placeholder that is not empty
    assert head.semantic_loss(features, [relabelled]).item() == pytest.approx(loss.item(), rel=1e-6)
    # Dropping the mask-less instance makes its box background: the loss changes.
    assert head.semantic_loss(features, [both[both.gt_has_mask]]).item() != pytest.approx(
        loss.item(), rel=1e-4
    )
    # Nothing but ignored pixels: a zero loss that still backpropagates.
    everything = Instances((96, 96), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 96.0, 96.0]])))
    everything.gt_classes = torch.tensor([4])
    everything.gt_masks = BitMasks(torch.zeros(1, 96, 96, dtype=torch.bool))
    everything.gt_has_mask = torch.tensor([False])
    zero = head.semantic_loss(features, [everything])
    assert zero.item() == 0.0
    zero.backward()


@pytest.mark.parametrize("gt_crop", [True, False])
def test_batch_without_any_mask_trains_with_zero_mask_loss(gt_crop):
    cfg = tiny_cfg(GT_CROP, **{"MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES": gt_crop})
    model = build_model(cfg)
    targets = [image_instances(), image_instances()]
    for t in targets:
        t.gt_has_mask[:] = False
    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": t} for t in targets]
    losses = _train_step(model, batch)
    assert losses["loss_mask"].item() == 0.0
    assert math.isfinite(losses["loss_basis_sem"].item())  # background pixels still train it
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_mask_loss_ignores_maskless_instances():
    cfg = tiny_cfg(GT_CROP)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    image = torch.rand(3, 96, 96) * 255
    both = image_instances()
    with EventStorage():
        loss_both = model([{"image": image, "instances": both}])["loss_mask"]
        loss_masked = model([{"image": image, "instances": both[both.gt_has_mask]}])["loss_mask"]
    assert loss_both.item() == pytest.approx(loss_masked.item(), rel=1e-6)


@pytest.mark.parametrize("resolution,num_bases", [(28, 1), (112, 8)])
def test_head_sweeps_and_zero_detections(resolution, num_bases):
    cfg = tiny_cfg(
        GT_CROP,
        **{"MODEL.BLENDMASK.BOTTOM_RESOLUTION": resolution, "MODEL.BLENDMASK.NUM_BASES": num_bases}
    )
    head = build_model(cfg).roi_heads.mask_head.eval()
    features = {
        f: torch.randn(2, 64, 128 // s, 128 // s)
        for f, s in (("p2", 4), ("p3", 8), ("p4", 16), ("p5", 32))
    }
    detections = []
    for n in (3, 0):  # the second image has no detections
        instances = Instances((128, 128))
        instances.pred_boxes = Boxes(torch.tensor([[4.0, 4.0, 60.0, 70.0]]).repeat(n, 1))
        instances.pred_classes = torch.zeros(n, dtype=torch.int64)
        detections.append(instances)
    with torch.no_grad(), head.recording() as recorded:
        out = head(features, detections)
    assert out[0].pred_masks.shape == (3, 1, resolution, resolution)
    assert out[1].pred_masks.shape == (0, 1, resolution, resolution)
    assert ((out[0].pred_masks >= 0) & (out[0].pred_masks <= 1)).all()
    assert recorded["bases"].shape == (2, num_bases, 32, 32)
    with torch.no_grad():
        empty = head(features, [detections[1], detections[1]])
    assert empty[0].pred_masks.shape == (0, 1, resolution, resolution)


def test_semantic_loss_weight_zero_builds_no_seg_head():
    cfg = tiny_cfg(GT_CROP, **{"MODEL.BLENDMASK.SEMANTIC_LOSS_WEIGHT": 0.0})
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert head.seg_head is None and not head.uses_image_targets
    losses = _train_step(
        model, [{"image": torch.rand(3, 96, 96) * 255, "instances": image_instances()}]
    )
    assert "loss_basis_sem" not in losses and math.isfinite(losses["loss_mask"].item())


def test_bottom_features_must_reach_the_head():
    cfg = tiny_cfg(GT_CROP, **{"MODEL.ROI_MASK_HEAD.IN_FEATURES": ["p4", "p5"]})
    with pytest.raises(ValueError, match="BOTTOM_IN_FEATURES"):
        build_model(cfg)


@pytest.mark.parametrize("config", COCO_CONFIGS)
def test_coco_configs_build_and_train_one_step(config):
    cfg = load_config(os.path.join(CONFIGS, config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    assert cfg.MODEL.ROI_MASK_HEAD.NAME == "BlendMaskHead"
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert head.bases_stride == 4 and head.attn_in_features == ["p2", "p3", "p4", "p5"]
    losses = _train_step(
        model, [{"image": torch.rand(3, 96, 128) * 255, "instances": image_instances(96, 128)}]
    )
    assert math.isfinite(losses["loss_mask"].item()) and math.isfinite(
        losses["loss_basis_sem"].item()
    )
    assert head.attention.predictor.weight.grad is not None


def test_frozen_detector_switches_the_semantic_loss_off():
    """The seg head reads the FPN; a frozen FPN makes its loss unable to reach the masks."""
    cfg = tiny_cfg(GT_CROP, **{"MODEL.FREEZE_DETECTOR": True})
    assert cfg.MODEL.BLENDMASK.SEMANTIC_LOSS_WEIGHT > 0
    head = build_model(cfg).roi_heads.mask_head
    assert head.seg_head is None and not head.uses_image_targets
    cfg = tiny_cfg(GT_CROP)
    assert build_model(cfg).roi_heads.mask_head.seg_head is not None


@pytest.mark.parametrize(
    "config",
    ["shapes/blendmask_R_18_FPN.yaml", GT_CROP] + COCO_CONFIGS,
)
def test_blendmask_configs_train_the_blender_on_ground_truth_boxes(config):
    """As the paper and AdelaiDet; shapes-partial/blendmask_R_18_FPN.yaml is the proposal variant."""
    assert load_config(os.path.join(CONFIGS, config)).MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES
    proposals = load_config(os.path.join(CONFIGS, "shapes-partial/blendmask_R_18_FPN.yaml"))
    assert not proposals.MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES
