"""detectron2's PointRend head in the comparison: the COCO configs (YAML and lazy) train a step,
the shapes configs train head-only on a saved detector and evaluate through the seen / unseen
evaluator, mask-less instances give no mask loss, the frozen detector stays frozen, pictures and
cost row, and a clear error where detectron2.projects.point_rend is missing."""

import copy
import json
import os
import textwrap

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.roi_heads import build_mask_head  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from helpers import (  # noqa: E402
    CONFIGS,
    REPO,
    TINY_YAML_OPTS,
    image_instances,
    run_python,
    tiny_cfg,
)

import masklab_d2.modeling  # noqa: E402,F401  (registration)
from masklab_d2.config import POINT_REND_KEYS, load_config  # noqa: E402
from masklab_d2.data import PartialMaskDatasetMapper  # noqa: E402
from masklab_d2.modeling import freeze_detector  # noqa: E402
from masklab_d2.utils.detectron2 import point_rend_available  # noqa: E402

needs_point_rend = pytest.mark.skipif(
    not point_rend_available(),
    reason="detectron2.projects.point_rend is not importable (detectron2 installed from its "
    "repository includes it; README: Heads, PointRend)",
)

if point_rend_available():
    from detectron2.projects.point_rend import PointRendMaskHead

GT_CROP = "shapes-partial/point_rend_R_18_FPN_gtcrop.yaml"
COCO_YAML = [
    "coco/point_rend_R_50_FPN_1x.yaml",
    "coco-voc-nonvoc/point_rend_R_50_FPN_1x.yaml",
    "coco-voc-nonvoc/point_rend_R_50_FPN_1x_nonvoc_to_voc.yaml",
]
COCO_LAZY = [
    "lazy/coco/point_rend_R_50_FPN_100ep_LSJ.py",
    "lazy/coco-voc-nonvoc/point_rend_R_50_FPN_100ep_LSJ.py",
]
# The shapes configs and the detector each trains on: the shared detector of its suite.
SHAPES = [
    ("shapes/point_rend_R_18_FPN.yaml", "shapes/mask_rcnn_R_18_FPN.yaml"),
    (GT_CROP, "shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml"),
]
LOSSES = {
    "loss_rpn_cls",
    "loss_rpn_loc",
    "loss_cls",
    "loss_box_reg",
    "loss_mask",
    "loss_mask_point",
}


def _mask_classes(head) -> int:
    """K as the layers have it: the coarse head's and the point head's output channels."""
    coarse = head.coarse_head.output_shape[0]
    assert head.point_head.predictor.out_channels == coarse
    return coarse


def _instances(image_size, boxes, classes, has_mask):
    """Ground truth with a filled-box bitmask for each instance that has one (the mapper's empty
    placeholder for the others)."""
    height, width = image_size
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for mask, (x0, y0, x1, y1), flag in zip(masks, boxes, has_mask):
        if flag:
            mask[y0:y1, x0:x1] = True
    instances = Instances(image_size)
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.gt_classes = torch.tensor(classes)
    instances.gt_masks = BitMasks(masks)
    instances.gt_has_mask = torch.tensor(has_mask)
    return instances


# ------------------------------------------------------------------------------------------------
# COCO configs: one training step on the CPU
# ------------------------------------------------------------------------------------------------
def _coco_model(config):
    """(model with random weights, whether the config is partially supervised)."""
    torch.manual_seed(0)
    if config.endswith(".py"):
        cfg = LazyConfig.load(os.path.join(CONFIGS, config))
        assert cfg.dataloader.train.mapper.instance_mask_format == "bitmask"
        return instantiate(cfg.model), cfg.dataloader.mask_train_classes != "all"
    cfg = load_config(os.path.join(CONFIGS, config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    assert cfg.INPUT.MASK_FORMAT == "bitmask" and cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE == ""
    assert cfg.MODEL.ROI_MASK_HEAD.POINT_HEAD_ON
    return build_model(cfg), cfg.DATASETS.MASK_TRAIN_CLASSES != "all"


@needs_point_rend
@pytest.mark.parametrize("config", COCO_YAML + COCO_LAZY)
def test_coco_configs_build_and_train_one_step(config):
    model, partial = _coco_model(config)
    head = model.roi_heads.mask_head
    assert isinstance(head, PointRendMaskHead)  # detectron2's, through the thin adapter
    assert model.roi_heads.mask_pooler is None and model.roi_heads.mask_in_features == ["p2"]
    assert head.mask_point_on and list(head.mask_point_in_features) == ["p2"]
    assert model.roi_heads.train_mask_on_gt_boxes == partial
    # Partial supervision: one mask for every class (unseen classes' included).
    assert _mask_classes(head) == (1 if partial else 80)

    # One 96x128 image: two instances with masks, one box-only instance.
    targets = _instances(
        (96, 128),
        [[8, 8, 60, 70], [70, 20, 120, 90], [30, 50, 100, 94]],
        [0, 17, 40],
        [True, True, False],
    )
    model.train()
    with EventStorage():
        losses = model([{"image": torch.rand(3, 96, 128) * 255, "instances": targets}])
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_mask"] > 0 and losses["loss_mask_point"] > 0
    sum(losses.values()).backward()
    assert head.point_head.predictor.weight.grad.abs().sum() > 0
    assert head.coarse_head.prediction.weight.grad.abs().sum() > 0


@needs_point_rend
@pytest.mark.parametrize("lazy, yaml", [(COCO_LAZY[0], COCO_YAML[0]), (COCO_LAZY[1], COCO_YAML[1])])
def test_coco_lazy_and_yaml_configs_make_the_same_head(lazy, yaml):
    """The lazy head is built by the YAML path's function from the same keys: same layers."""
    cfg = LazyConfig.load(os.path.join(CONFIGS, lazy))
    lazy_head = instantiate(cfg.model.roi_heads.mask_head)
    yaml_cfg = load_config(os.path.join(CONFIGS, yaml), ["MODEL.DEVICE", "cpu"])
    yaml_head = build_mask_head(yaml_cfg, {"p2": ShapeSpec(channels=256, stride=4)})
    assert type(lazy_head) is type(yaml_head)
    assert {k: v.shape for k, v in lazy_head.state_dict().items()} == {
        k: v.shape for k, v in yaml_head.state_dict().items()
    }
    assert lazy_head.extra_repr() == yaml_head.extra_repr()


# ------------------------------------------------------------------------------------------------
# Shapes configs: head-only on a saved detector, through train_net.py and the seen / unseen
# evaluator
# ------------------------------------------------------------------------------------------------
# helpers' tiny run, with a 2-iteration warm-up. A random detector's scores are about uniform:
# keep a few detections per image, whatever their score, so that every group is evaluated at a
# bounded cost.
TINY = TINY_YAML_OPTS + [
    "SOLVER.WARMUP_ITERS", "2",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    "TEST.DETECTIONS_PER_IMAGE", "5",
]  # fmt: skip


@needs_point_rend
@pytest.mark.parametrize("config, detector_config", SHAPES, ids=[c for c, _ in SHAPES])
def test_shapes_configs_train_head_only_and_evaluate(config, detector_config, tmp_path):
    # The shared detector of the config's suite, with random weights: the key names it has.
    torch.manual_seed(0)
    detector = build_model(tiny_cfg(detector_config))
    DetectionCheckpointer(detector, save_dir=str(tmp_path)).save("detector")
    weights = tmp_path / "detector.pth"

    output = tmp_path / "run"
    result = run_python(
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        os.path.join(CONFIGS, config),
        *TINY,
        "MODEL.FREEZE_DETECTOR", "True",
        "MODEL.WEIGHTS", str(weights),
        "SOLVER.MAX_ITER", "3",
        "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", str(output),
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Detector frozen; training" in result.stdout
    assert "Mask AP by class group" in result.stdout

    with open(output / "metrics.json") as f:
        metrics = [json.loads(line) for line in f if line.strip()]
    trained = [m for m in metrics if "loss_mask_point" in m]
    assert trained and all(
        abs(trained[-1][k]) < float("inf") for k in ("loss_mask", "loss_mask_point")
    )
    final = [m for m in metrics if "segm/AP" in m][-1]
    partial = "partial" in config
    for key in ["bbox/AP", "segm/AP", "segm/seen/AP"] + ["segm/unseen/AP"] * partial:
        assert key in final, sorted(final)

    # The detector came from the checkpoint and did not move; the mask head is PointRend's.
    before = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    after = torch.load(output / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    for name, value in after.items():
        if name.startswith(("backbone.", "proposal_generator.", "roi_heads.box_")):
            assert torch.equal(value, before[name]), name
    head_keys = {k.split(".")[2] for k in after if k.startswith("roi_heads.mask_head.")}
    assert head_keys == {"coarse_head", "point_head"}


@needs_point_rend
@pytest.mark.parametrize("config", ["shapes/point_rend_R_18_FPN.yaml", GT_CROP])
def test_shapes_masks_are_class_agnostic_exactly_under_partial_supervision(config):
    cfg = tiny_cfg(config)
    head = build_model(cfg).roi_heads.mask_head
    partial = cfg.DATASETS.MASK_TRAIN_CLASSES != "all"
    assert _mask_classes(head) == (1 if partial else cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    # The shapes sizing: 7x7 coarse masks, subdivision 14 -> 56 at 196 points per step.
    assert head.coarse_head.output_shape[1:] == (7, 7)
    assert head.mask_point_subdivision_init_resolution == 14
    assert head.mask_point_subdivision_steps == 2
    head.eval()
    detections = Instances((128, 128))
    detections.pred_boxes = Boxes(
        torch.tensor([[4.0, 6.0, 60.0, 50.0], [30.0, 40.0, 120.0, 126.0]])
    )
    detections.pred_classes = torch.tensor([3, 12])
    with torch.no_grad():
        (out,) = head({"p2": torch.randn(1, 64, 32, 32)}, [detections])
    assert out.pred_masks.shape == (2, 1, 56, 56)


@needs_point_rend
def test_point_rend_configs_share_one_sizing():
    """The full and partial shapes configs (and the COCO ones) differ in the protocol only."""
    protocol = ("CLS_AGNOSTIC_MASK", "TRAIN_ON_GT_BOXES")
    for group in (
        ["shapes/point_rend_R_18_FPN.yaml", "shapes-partial/point_rend_R_18_FPN.yaml", GT_CROP],
        COCO_YAML,
    ):
        cfgs = [load_config(os.path.join(CONFIGS, c)) for c in group]
        for cfg in cfgs[1:]:
            assert cfg.MODEL.POINT_HEAD == cfgs[0].MODEL.POINT_HEAD
            mask = {k: v for k, v in cfg.MODEL.ROI_MASK_HEAD.items() if k not in protocol}
            reference = {k: v for k, v in cfgs[0].MODEL.ROI_MASK_HEAD.items() if k not in protocol}
            assert mask == reference


# ------------------------------------------------------------------------------------------------
# Partial supervision and the frozen detector
# ------------------------------------------------------------------------------------------------
@needs_point_rend
@pytest.mark.parametrize("gt_crop", [True, False])
def test_instances_without_masks_give_no_mask_loss(gt_crop):
    """A batch whose instances all lack masks: PointRend sees none of them (their placeholder
    masks, all background, would give a positive loss) and the losses are zero, in the graph."""
    cfg = tiny_cfg(GT_CROP, **{"MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES": gt_crop})
    model = build_model(cfg)
    model.train()
    batch = []
    for _ in range(2):
        targets = image_instances()
        targets.gt_has_mask[:] = False
        batch.append({"image": torch.rand(3, 96, 96) * 255, "instances": targets})
    with EventStorage():
        losses = model(batch)
    for key in ("loss_mask", "loss_mask_point"):
        assert losses[key].item() == 0.0 and losses[key].requires_grad, key
    sum(losses.values()).backward()
    head = model.roi_heads.mask_head
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


@needs_point_rend
def test_mask_losses_ignore_maskless_instances():
    """With ground-truth crops, the PointRend losses of an image with a masked and a mask-less
    instance equal those of the masked instance alone (same random point draws)."""
    model = build_model(tiny_cfg(GT_CROP))
    model.train()
    torch.manual_seed(0)
    features = model.backbone(torch.rand(1, 3, 96, 96))
    both = image_instances()
    only_masked = both[both.gt_has_mask]
    losses = []
    for targets in ([both], [only_masked]):
        torch.manual_seed(1)  # PointRend's training points are drawn at random
        with EventStorage():
            losses.append(model.roi_heads._forward_mask(features, [], targets))
    assert set(losses[0]) == {"loss_mask", "loss_mask_point"}
    for key in losses[0]:
        assert losses[0][key].item() > 0
        torch.testing.assert_close(losses[0][key], losses[1][key], msg=key)


@needs_point_rend
def test_frozen_detector_stays_frozen_while_point_rend_trains():
    cfg = tiny_cfg(GT_CROP)
    model = freeze_detector(build_model(cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head_names = {
        f"roi_heads.mask_head.{n}" for n, _ in model.roi_heads.mask_head.named_parameters()
    }
    assert trainable == head_names
    records = DatasetCatalog.get("shapes_tiny_train")[:2]
    mapper = PartialMaskDatasetMapper(cfg, is_train=True)
    batch = [mapper(copy.deepcopy(r)) for r in records]
    assert torch.cat([x["instances"].gt_has_mask for x in batch]).any()
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    with EventStorage():
        for _ in range(2):
            losses = model(copy.deepcopy(batch))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    after = model.state_dict()
    for name, value in after.items():  # BatchNorm statistics included
        if not name.startswith("roi_heads.mask_head."):
            assert torch.equal(value, before[name]), name
    assert all(not torch.equal(after[n], before[n]) for n in head_names)


# ------------------------------------------------------------------------------------------------
# Errors, pictures, cost
# ------------------------------------------------------------------------------------------------
@needs_point_rend
def test_point_rend_keys_leave_the_other_heads_alone_and_are_recognised():
    """add_masklab_config adds PointRend's keys, but its ROI_MASK_HEAD.IN_FEATURES default ("p2"
    only) does not reach the other heads; every key it adds is one load_config recognises as
    PointRend's where PointRend is missing (to say how to install it)."""
    from detectron2.config import get_cfg
    from detectron2.projects.point_rend import add_pointrend_config

    def flatten(node, prefix=""):
        for key, value in node.items():
            if hasattr(value, "items"):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    cfg = get_cfg()
    add_pointrend_config(cfg)
    added = set(flatten(cfg)) - set(flatten(get_cfg())) - {"MODEL.ROI_MASK_HEAD.IN_FEATURES"}
    assert len(added) > 15 and all(k.startswith(POINT_REND_KEYS) for k in added), sorted(added)
    for config in ("shapes/mask_rcnn_R_18_FPN.yaml", "coco/deep_marc_R_50_FPN_hg52_1x.yaml"):
        cfg = load_config(os.path.join(CONFIGS, config))
        assert cfg.MODEL.ROI_MASK_HEAD.IN_FEATURES == []  # PartialROIHeads: the box branch's maps
        assert build_model(tiny_cfg(config)).roi_heads.mask_in_features == ["p2", "p3", "p4", "p5"]


@needs_point_rend
def test_inputs_point_rend_cannot_read_fail_clearly():
    with pytest.raises(ValueError, match="POOLER_TYPE"):
        build_model(tiny_cfg(GT_CROP, **{"MODEL.ROI_MASK_HEAD.POOLER_TYPE": "ROIAlignV2"}))
    with pytest.raises(ValueError, match="must be among them"):
        build_model(tiny_cfg(GT_CROP, **{"MODEL.POINT_HEAD.IN_FEATURES": ["p3"]}))
    # An empty IN_FEATURES gives PartialROIHeads' default maps, which PointRend cannot concatenate.
    with pytest.raises(ValueError, match="IN_FEATURES, which is empty"):
        build_model(tiny_cfg(GT_CROP, **{"MODEL.ROI_MASK_HEAD.IN_FEATURES": []}))


NO_POINT_REND = textwrap.dedent("""
    import sys
    sys.modules["detectron2.projects.point_rend"] = None  # as where detectron2 lacks its projects

    import masklab_d2.lazy
    import masklab_d2.modeling
    import masklab_d2.tools.visualize
    from detectron2.config import LazyConfig
    from detectron2.modeling import build_model
    from masklab_d2.config import load_config

    def attempt(name, fn):
        try:
            fn()
            print(name, "LOADED")
        except ImportError as error:
            print(name, "IMPORT_ERROR", " ".join(str(error).split()))

    cpu = ["MODEL.DEVICE", "cpu"]
    build_model(load_config("configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml", cpu))
    LazyConfig.load("configs/lazy/shapes-partial/masklab_R_18_FPN_gtcrop.py")
    print("OTHER_HEADS_OK")
    attempt("yaml", lambda: load_config("configs/shapes-partial/point_rend_R_18_FPN_gtcrop.yaml"))
    attempt("coco", lambda: load_config("configs/coco/point_rend_R_50_FPN_1x.yaml"))
    attempt("option", lambda: load_config(
        "configs/shapes/mask_rcnn_R_18_FPN.yaml", ["MODEL.POINT_HEAD.FC_DIM", "64"]))
    attempt("lazy", lambda: LazyConfig.load("configs/lazy/coco/point_rend_R_50_FPN_100ep_LSJ.py"))
    attempt("name", lambda: build_model(load_config(
        "configs/shapes/mask_rcnn_R_18_FPN.yaml",
        cpu + ["MODEL.ROI_MASK_HEAD.NAME", "PartialPointRendMaskHead"])))
    """)


def test_without_point_rend_its_configs_fail_clearly_and_nothing_else_breaks():
    result = run_python("-c", NO_POINT_REND, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "OTHER_HEADS_OK" in result.stdout
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if "IMPORT_ERROR" in line}
    assert sorted(lines) == ["coco", "lazy", "name", "option", "yaml"], result.stdout[-3000:]
    install = "pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2"
    for line in lines.values():
        assert "detectron2.projects.point_rend is not importable" in line, line
        assert install in line, line
    for name in ("yaml", "coco", "option"):
        assert "a key of detectron2's PointRend project" in lines[name], lines[name]


@needs_point_rend
def test_visualize_draws_the_coarse_masks_and_subdivision_points(tmp_path):
    from masklab_d2.tools import visualize

    out = tmp_path / "vis"
    written = visualize.main(
        ["--config-file", os.path.join(CONFIGS, GT_CROP), "--dataset", "shapes_tiny_val"]
        + ["--num-images", "1", "--output", str(out), "--top-k", "2"]
        + ["--confidence-threshold", "0", "DATASETS.TEST", "('shapes_tiny_val',)"]
        + ["INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "128"]
        + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "TEST.DETECTIONS_PER_IMAGE", "5"]
    )
    (paths,) = written.values()
    names = sorted(os.path.basename(p).split("_", 1)[1] for p in paths)
    assert names == ["mask_crops.png", "point_rend.png", "predictions.png"]
    from PIL import Image

    with Image.open(next(p for p in paths if p.endswith("_point_rend.png"))) as image:
        # 2 detections; image, coarse, first grid, 2 subdivision steps, final mask.
        assert image.size == (round(6 * 240), 2 * 240 + 40)
    # The recording leaves the head as it was.
    model = visualize.load_model(visualize.setup_cfg(os.path.join(CONFIGS, GT_CROP), []))
    assert "_get_point_logits" not in vars(model.roi_heads.mask_head)


@needs_point_rend
def test_profile_heads_has_a_point_rend_row():
    from masklab_d2.tools import profile_heads

    rows = profile_heads.profile_config(
        os.path.join(CONFIGS, GT_CROP),
        [],
        [2, 8],
        ["cpu"],
        repeat=1,
        warmup=0,
        image_size=(128, 128),
    )
    (row,) = rows
    head = build_model(tiny_cfg(GT_CROP)).roi_heads.mask_head
    assert row["head"].startswith("PartialPointRendMaskHead (mask_classes=1")
    assert row["params"] == sum(p.numel() for p in head.parameters())
    assert 0 < row["gflops"][2] < row["gflops"][8]  # the points' MLP and sampling are counted
    assert all(row["ms"][d] > 0 for d in (2, 8))
