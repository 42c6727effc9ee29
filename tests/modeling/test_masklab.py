"""MaskLab: direction binning and targets, direction pooling, fusion init, configs end to end."""

import glob
import math
import os

import pytest
import torch
from helpers import CONFIGS  # noqa: E402

from masklab_d2.layers import crop_and_resize
from masklab_d2.layers.crop_and_resize import lattice_rois
from masklab_d2.layers.masklab import (
    CoarseMaskFusion,
    DirectionBinning,
    dense_targets,
    direction_pool,
)


def _disc(size, cx, cy, radius):
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2


def _box_of(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def test_direction_bins_follow_angle_and_distance():
    binning = DirectionBinning(8, 4)
    # Directions start at 0 degrees (+x) and turn towards +y (image down), 45 degrees each.
    for degrees, expected in [
        (10, 0),
        (50, 1),
        (100, 2),
        (170, 3),
        (200, 4),
        (260, 5),
        (280, 6),
        (350, 7),
    ]:
        angle = math.radians(degrees)
        scale = 0.9 / max(abs(math.cos(angle)), abs(math.sin(angle)))  # max(|u|, |v|) = 0.9
        u, v = torch.tensor([scale * math.cos(angle)]), torch.tensor([scale * math.sin(angle)])
        assert binning.bins(u, v).item() == expected * 4 + 3, degrees
    # Distance: max(|u|, |v|) in quarters; beyond the box stays in the outer bin.
    radii = torch.tensor([0.1, 0.3, 0.6, 0.8, 1.7])
    assert (binning.bins(radii, torch.zeros(5)) % 4).tolist() == [0, 1, 2, 3, 3]
    ellipse = DirectionBinning(8, 4, "ellipse")
    assert ellipse.bins(torch.tensor([0.5]), torch.tensor([0.5])).item() % 4 == 2  # r = 0.71
    assert binning.bins(torch.tensor([0.5]), torch.tensor([0.5])).item() % 4 == 2  # max = 0.5
    assert DirectionBinning(2, 1).num_channels == 2 and DirectionBinning(8, 4).num_channels == 32
    with pytest.raises(ValueError):
        DirectionBinning(8, 4, "manhattan")


def _targets(
    masks, classes=None, has_mask=None, stride=1, center="box", binning=DirectionBinning(8, 4)
):
    boxes = torch.stack([_box_of(m) for m in masks])
    n = len(masks)
    return dense_targets(
        torch.stack(masks),
        boxes,
        torch.tensor(classes if classes is not None else [0] * n),
        torch.tensor(has_mask if has_mask is not None else [True] * n),
        binning,
        stride,
        (
            tuple(masks[0].shape[-2:])
            if stride == 1
            else (masks[0].shape[0] // stride, masks[0].shape[1] // stride)
        ),
        num_classes=3,
        center=center,
    )


def test_direction_targets_on_a_disc():
    disc = _disc(40, 20, 20, 12)
    semantic, direction = _targets([disc])
    assert torch.equal(semantic == 0, disc) and torch.equal(semantic == 3, ~disc)
    assert (direction[~disc] == -1).all()
    # Right of the centre: direction 0; below: 2; left: 4; above: 6 (pixel centres at +0.5).
    assert direction[20, 30].item() // 4 == 0 and direction[20, 30].item() % 4 == 3  # near the edge
    assert direction[30, 18].item() // 4 == 2  # 98 degrees
    assert direction[20, 9].item() // 4 == 3  # just above the -x axis (y = 20.5 > 20): 177 degrees
    assert direction[19, 9].item() // 4 == 4  # just below it: 183 degrees
    assert direction[9, 20].item() // 4 == 6
    assert direction[20, 21].item() % 4 == 0  # at the centre: innermost distance bin
    # All 32 channels occur on a disc.
    assert len(torch.unique(direction[disc])) == 32


def test_direction_targets_on_two_touching_squares():
    left = torch.zeros(30, 40, dtype=torch.bool)
    right = torch.zeros(30, 40, dtype=torch.bool)
    left[5:25, 0:20] = True
    right[5:25, 20:40] = True
    semantic, direction = _targets([left, right], classes=[1, 1])
    # Where the squares touch, the left square's pixels point right (0), the right's point left (4).
    assert direction[15, 19].item() // 4 == 0 and direction[15, 20].item() // 4 == 3
    assert direction[14, 20].item() // 4 == 4
    assert (semantic[left | right] == 1).all()
    # Targets use each instance's own box: the two squares have the same bin layout.
    assert torch.equal(direction[5:25, 0:20], direction[5:25, 20:40])


def test_direction_targets_on_a_ring_and_mask_centre():
    ring = _disc(40, 20, 20, 15) & ~_disc(40, 20, 20, 8)
    _, direction = _targets([ring])
    assert (direction[20, 20] == -1) and (direction[~ring] == -1).all()  # the hole is no target
    # Radii 8..15 in a box of half-size 15: max(|u|, |v|) >= 8 / 15 / sqrt(2) = 0.38, so the
    # innermost bin (< 0.25) never occurs, and along the axes (>= 0.53) only the outer two.
    assert (direction[ring] % 4).min() == 1
    assert (direction[20, 5:13] % 4 >= 2).all()
    # With the mask centroid as centre, a lopsided shape's bins shift towards its mass.
    blob = torch.zeros(40, 40, dtype=torch.bool)
    blob[10:30, 10:30] = True
    blob[10:12, 10:40] = True  # a thin bar to the right stretches the box, not the mass
    _, by_box = _targets([blob])
    _, by_mask = _targets([blob], center="mask")
    assert not torch.equal(by_box, by_mask)


def test_dense_targets_ignore_boxes_without_masks():
    masked = _disc(32, 10, 10, 6)
    unmasked = _disc(32, 24, 24, 6)
    semantic, direction = _targets([masked, unmasked], classes=[0, 2], has_mask=[True, False])
    assert (semantic[masked] == 0).all()
    box = _box_of(unmasked).long()
    assert (semantic[box[1] : box[3], box[0] : box[2]] == -1).all()  # unknown, not background
    assert (direction[unmasked] == -1).all()
    assert (semantic[0, 31] == 3).item()  # background elsewhere
    # At a coarser stride the targets sample cell centres.
    semantic4, _ = _targets([masked, unmasked], classes=[0, 2], has_mask=[True, False], stride=4)
    assert semantic4.shape == (8, 8) and semantic4[2, 2] == 0


@pytest.mark.parametrize("num_directions,num_bins", [(8, 4), (4, 1), (2, 4)])
def test_pooling_a_perfect_direction_map_reproduces_the_mask(num_directions, num_bins):
    """Direction logits that are +10 on each pixel's target channel and -10 elsewhere, assembled
    for a box, give the box's instance mask -- and exclude an overlapping neighbour."""
    binning = DirectionBinning(num_directions, num_bins)
    size = 64
    first = _disc(size, 24, 30, 14)
    second = _disc(size, 44, 34, 14) & ~first
    _, direction = _targets([first, second], binning=binning)
    logits = torch.full((1, binning.num_channels, size, size), -10.0)
    labelled = direction >= 0
    logits[0, direction[labelled], *torch.nonzero(labelled, as_tuple=True)] = 10.0
    crop = 21
    box = _box_of(first)
    rois = lattice_rois(box[None], torch.zeros(1), crop)
    pooled = direction_pool(
        crop_and_resize(logits, rois, 1.0, crop, aligned=True), binning.crop_template(crop)
    )
    target = crop_and_resize(first[None, None].float(), rois, 1.0, crop, aligned=True)[0, 0] > 0.5
    predicted = pooled[0, 0] > 0
    iou = (predicted & target).sum() / (predicted | target).sum()
    assert iou > 0.85, iou
    neighbour = (
        crop_and_resize(second[None, None].float(), rois, 1.0, crop, aligned=True)[0, 0] > 0.5
    )
    if num_directions >= 4:
        assert (predicted & neighbour).sum() <= 0.1 * neighbour.sum()


def test_fusion_is_initialised_to_half_and_one():
    fusion = CoarseMaskFusion()
    assert fusion.conv.weight.flatten().tolist() == [0.5, 1.0] and fusion.conv.bias.item() == 0.0
    assert CoarseMaskFusion(use_semantic=False).conv.weight.flatten().tolist() == [1.0]
    assert CoarseMaskFusion(use_direction=False).conv.weight.flatten().tolist() == [0.5]
    semantic, direction = torch.randn(3, 1, 5, 5), torch.randn(3, 1, 5, 5)
    torch.testing.assert_close(fusion(semantic, direction), 0.5 * semantic + direction)
    with pytest.raises(ValueError):
        CoarseMaskFusion(False, False)


# ---------------------------------------------------------------------------------------------
# detectron2 end to end

MASKLAB_CONFIGS = sorted(
    [
        os.path.join(CONFIGS, "shapes", f)
        for f in ("masklab_R_18_FPN.yaml", "masklab_R_18_C4_os8.yaml")
    ]
    + [
        os.path.join(CONFIGS, "shapes-partial", f)
        for f in ("masklab_R_18_FPN_gtcrop.yaml", "masklab_R_18_C4_os8_gtcrop.yaml")
    ]
    + glob.glob(os.path.join(CONFIGS, "shapes", "masklab-ablations", "*.yaml"))
)


@pytest.mark.detectron2
@pytest.mark.parametrize("config", MASKLAB_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIGS))
def test_shapes_config_trains_and_infers(config):
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)
    from detectron2.data import DatasetCatalog, build_detection_train_loader
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from helpers import tiny_cfg

    from masklab_d2.data import PartialMaskDatasetMapper

    torch.manual_seed(0)
    cfg = tiny_cfg(
        config,
        **{
            "SOLVER.IMS_PER_BATCH": 2,
            "DATALOADER.NUM_WORKERS": 0,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32,
        },
    )
    model = build_model(cfg)
    model.train()
    loader = iter(
        build_detection_train_loader(cfg, mapper=PartialMaskDatasetMapper(cfg, is_train=True))
    )
    with EventStorage():
        for _ in range(2):
            losses = model(next(loader))
            assert all(torch.isfinite(v) for v in losses.values()), losses
            sum(losses.values()).backward()
    assert "loss_mask" in losses
    model.eval()
    record = DatasetCatalog.get("shapes_tiny_val")[0]
    image = torch.rand(3, 128, 128) * 255
    with torch.no_grad():
        instances = model([{"image": image, "height": record["height"], "width": record["width"]}])[
            0
        ]["instances"]
    assert instances.pred_masks.shape[1:] == (record["height"], record["width"])


@pytest.mark.detectron2
def test_intermediates_and_offsets_are_reachable_and_offsets_learn():
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from helpers import image_instances, tiny_cfg

    cfg = tiny_cfg(
        os.path.join(CONFIGS, "shapes", "masklab-ablations", "deformable_box_pooling.yaml")
    )
    model = build_model(cfg)
    model.train()
    head = model.roi_heads.mask_head
    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": image_instances()}]
    with EventStorage(), head.recording() as recorded:
        losses = model(batch)
    sum(losses.values()).backward()
    # Gradients reach the (zero-initialised) offset network through the deformable op.
    offset_net = model.roi_heads.box_pooler.offset_net
    assert offset_net.offsets.weight.grad.abs().sum() > 0
    assert offset_net.offsets.bias.grad.abs().sum() > 0
    pooler = model.roi_heads.box_pooler.level_poolers[0]
    assert pooler.last_offsets.shape[1:] == (2, 7, 7)
    for name in (
        "semantic_logits",
        "direction_logits",
        "semantic_crop",
        "pooled_direction",
        "coarse",
        "refined",
    ):
        assert name in recorded, name
        assert not recorded[name].requires_grad, name
    assert recorded["direction_logits"].shape[1] == 32
    assert recorded["refined"].shape[-1] == cfg.MODEL.MASKLAB.CROP_SIZE
    with EventStorage():
        model(batch)
    assert head._record is None and len(recorded) == 6  # nothing recorded once outside


@pytest.mark.detectron2
def test_dense_auxiliary_losses_train_and_ignore_maskless_instances():
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from helpers import image_instances, tiny_cfg

    cfg = tiny_cfg(
        os.path.join(CONFIGS, "shapes-partial", "masklab_R_18_FPN_gtcrop.yaml"),
        **{"MODEL.MASKLAB.SEMANTIC_LOSS_WEIGHT": 0.5, "MODEL.MASKLAB.DIRECTION_LOSS_WEIGHT": 0.5},
    )
    model = build_model(cfg)
    model.train()
    assert model.roi_heads.mask_head.uses_image_targets
    targets = image_instances()
    with EventStorage():
        losses = model([{"image": torch.rand(3, 96, 96) * 255, "instances": targets}])
    assert losses["loss_semantic"] > 0 and losses["loss_direction"] > 0
    targets.gt_has_mask[:] = False
    with EventStorage():
        losses = model([{"image": torch.rand(3, 96, 96) * 255, "instances": targets}])
    assert losses["loss_direction"].item() == 0.0 and losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()


@pytest.mark.detectron2
@pytest.mark.parametrize(
    "config",
    [
        "coco/masklab_R_50_FPN_1x.yaml",
        "coco/masklab_R_101_C4_os8.yaml",
        "coco/masklab_R_101_C4_os8_deformable.yaml",
        "coco-voc-nonvoc/masklab_R_50_FPN_1x.yaml",
        "coco-voc-nonvoc/masklab_R_101_C4_os8.yaml",
        "coco-voc-nonvoc/masklab_R_50_FPN_1x_nonvoc_to_voc.yaml",
    ],
)
def test_coco_configs_build_and_train_one_step(config):
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from helpers import image_instances

    from masklab_d2.config import load_config

    cfg = load_config(os.path.join(CONFIGS, config), ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    model = build_model(cfg)
    model.train()
    with EventStorage():
        losses = model([{"image": torch.rand(3, 96, 96) * 255, "instances": image_instances()}])
    assert torch.isfinite(sum(losses.values()))


def test_offsets_are_bounded():
    from masklab_d2.layers.deformable_pooling import SubBoxOffsetNet

    net = SubBoxOffsetNet(4, 7, 7, hidden_dim=8, max_offset=2.0)
    torch.nn.init.constant_(net.offsets.weight, 1e3)  # as if an optimiser had run away
    offsets = net(torch.rand(3, 4, 7, 7) * 100)
    assert offsets.abs().max() <= 2.0 and offsets.abs().max() > 1.9


@pytest.mark.detectron2
def test_offset_network_learns_at_its_lr_factor():
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)
    from detectron2.modeling import build_model
    from helpers import tiny_cfg

    import train_net

    cfg = tiny_cfg(
        os.path.join(CONFIGS, "shapes", "masklab-ablations", "deformable_box_pooling.yaml")
    )
    model = build_model(cfg)
    optimizer = train_net.Trainer.build_optimizer(cfg, model)
    offset_params = {id(p) for p in model.roi_heads.box_pooler.offset_net.parameters()}
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    factor = cfg.MODEL.ROI_BOX_HEAD.DEFORMABLE_LR_FACTOR
    assert factor < 1
    for param_id in offset_params:
        assert rates[param_id] == pytest.approx(cfg.SOLVER.BASE_LR * factor)
    others = [rate for param_id, rate in rates.items() if param_id not in offset_params]
    assert max(others) == pytest.approx(cfg.SOLVER.BASE_LR)


def test_select_semantic_classes_drops_channels_and_reindexes_targets():
    from masklab_d2.layers.masklab import select_semantic_classes

    logits = torch.arange(5.0).view(1, 5, 1, 1).expand(1, 5, 2, 2).clone()  # K = 4, bg = 4
    targets = torch.tensor([[[0, 2], [4, -1]]])
    kept_logits, kept_targets = select_semantic_classes(logits, targets, [2, 0])
    assert kept_logits[0, :, 0, 0].tolist() == [2.0, 0.0, 4.0]
    assert kept_targets.tolist() == [[[1, 0], [2, -1]]]
    # A dropped class in the targets (never the case for correct targets) is ignored.
    _, dropped = select_semantic_classes(logits, torch.tensor([[[1]]]), [0, 2])
    assert dropped.item() == -1


def _masklab_model(config, **overrides):
    from detectron2.modeling import build_model
    from helpers import tiny_cfg

    torch.manual_seed(0)
    cfg = tiny_cfg(os.path.join(CONFIGS, config), **overrides)
    model = build_model(cfg)
    model.train()
    return cfg, model


def _train_step(model, instances=None, loss_names=None):
    from detectron2.utils.events import EventStorage
    from helpers import image_instances

    instances = instances if instances is not None else image_instances()
    with EventStorage() as storage:
        losses = model([{"image": torch.rand(3, 96, 96) * 255, "instances": instances}])
        total = sum(v for k, v in losses.items() if loss_names is None or k in loss_names)
        total.backward()
    return losses, storage


@pytest.mark.detectron2
def test_logged_mask_metrics_are_the_refined_masks_not_the_coarse():
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)

    _, model = _masklab_model("shapes/masklab_R_18_FPN.yaml")
    head = model.roi_heads.mask_head
    with torch.no_grad():  # coarse: every pixel negative; refined: every pixel positive
        head.fusion.conv.weight.zero_()
        head.fusion.conv.bias.fill_(-10.0)
        head.refinement.predictor.weight.zero_()
        head.refinement.predictor.bias.fill_(10.0)
    _, storage = _train_step(model)
    latest = {k: v for k, (v, _) in storage.latest().items()}
    # The ground-truth mask fills its box: the refined mask is all right, the coarse all wrong.
    assert latest["mask_rcnn/accuracy"] == 1.0 and latest["mask_rcnn/false_negative"] == 0.0
    assert latest["coarse/mask_rcnn/accuracy"] == 0.0
    assert latest["coarse/mask_rcnn/false_negative"] == 1.0


@pytest.mark.detectron2
@pytest.mark.parametrize(
    "config, overrides",
    [
        ("shapes/masklab-ablations/semantic_only.yaml", {}),
        ("shapes/masklab-ablations/direction_only.yaml", {}),
        ("shapes/masklab_R_18_FPN.yaml", {}),
        (
            "shapes-partial/masklab_R_18_FPN_gtcrop.yaml",
            {"MODEL.MASKLAB.SEMANTIC_INPUT": "agnostic"},
        ),
        ("shapes-partial/masklab_R_18_FPN_gtcrop.yaml", {"MODEL.MASKLAB.SEMANTIC_INPUT": "class"}),
    ],
)
def test_every_mask_head_parameter_gets_a_gradient(config, overrides):
    """detectron2's DDP (find_unused_parameters=False) fails on a parameter without gradient."""
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)

    _, model = _masklab_model(config, **overrides)
    _train_step(model)
    unused = [n for n, p in model.roi_heads.mask_head.named_parameters() if p.grad is None]
    assert not unused, unused


@pytest.mark.detectron2
def test_agnostic_semantic_input_trains_every_channel_unseen_classes_read():
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)

    config = "shapes-partial/masklab_R_18_FPN_gtcrop.yaml"
    # "class": only the masked class's row (0) and nothing of class 9 (mask-less) is trained.
    _, model = _masklab_model(config, **{"MODEL.MASKLAB.SEMANTIC_INPUT": "class"})
    _train_step(model, loss_names={"loss_mask", "loss_mask_coarse"})
    grad = model.roi_heads.mask_head.dense_branch.semantic.weight.grad.flatten(1).abs().sum(1)
    assert grad[0] > 0 and grad[9] == 0
    # "agnostic": one foreground channel (and background), trained by every mask.
    _, model = _masklab_model(config, **{"MODEL.MASKLAB.SEMANTIC_INPUT": "agnostic"})
    head = model.roi_heads.mask_head
    assert head.dense_branch.semantic.out_channels == 2
    _train_step(model, loss_names={"loss_mask", "loss_mask_coarse"})
    assert head.dense_branch.semantic.weight.grad[0].abs().sum() > 0
    # At test time the class of a box does not change which semantic channel it reads.
    from detectron2.structures import Boxes, Instances

    model.eval()
    features = model.backbone(torch.rand(1, 3, 96, 96))
    masks = []
    for cls in (0, 9):
        instances = Instances((96, 96))
        instances.pred_boxes = Boxes(torch.tensor([[12.0, 10.0, 44.0, 40.0]]))
        instances.pred_classes = torch.tensor([cls])
        with torch.no_grad():
            masks.append(head(features, [instances])[0].pred_masks)
    assert torch.equal(masks[0], masks[1])


@pytest.mark.detectron2
def test_dense_semantic_loss_leaves_classes_without_masks_out_of_the_softmax():
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)
    from masklab_d2.data import mask_train_class_ids

    cfg, model = _masklab_model(
        "shapes-partial/masklab_R_18_FPN_gtcrop.yaml",
        **{"MODEL.MASKLAB.SEMANTIC_LOSS_WEIGHT": 1.0, "MODEL.MASKLAB.SEMANTIC_INPUT": "class"},
    )
    seen = mask_train_class_ids(cfg)
    unseen = sorted(set(range(cfg.MODEL.ROI_HEADS.NUM_CLASSES)) - set(seen))
    assert 0 in seen and 9 in unseen and len(unseen) == 8
    losses, _ = _train_step(model, loss_names={"loss_semantic"})
    assert losses["loss_semantic"] > 0
    grad = model.roi_heads.mask_head.dense_branch.semantic.weight.grad.flatten(1).abs().sum(1)
    assert (grad[unseen] == 0).all(), grad  # ignored, not pushed towards background
    assert (grad[seen] > 0).all() and grad[-1] > 0


@pytest.mark.detectron2
def test_partial_masklab_configs_use_the_agnostic_semantic_input():
    import masklab_d2.modeling  # noqa: F401  (registers the heads and backbones)
    from masklab_d2.config import load_config

    paths = glob.glob(os.path.join(CONFIGS, "*", "masklab_*.yaml")) + glob.glob(
        os.path.join(CONFIGS, "shapes", "masklab-ablations", "*.yaml")
    )
    assert len(paths) > 15
    for path in paths:
        cfg = load_config(path)
        partial = cfg.DATASETS.MASK_TRAIN_CLASSES != "all"
        expected = "agnostic" if partial else "class"  # "class": the paper, full supervision
        assert cfg.MODEL.MASKLAB.SEMANTIC_INPUT == expected, path
