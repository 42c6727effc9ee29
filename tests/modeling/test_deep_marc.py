"""Deep-MARC mask heads under detectron2: head shapes and sizes, every Deep-MARC config end to end
(shapes: real partial-mask data loader, training and inference; COCO: one training step on a
synthetic image), batches without masks, and the head-cost tool."""

import copy
import glob
import os

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import build_detection_test_loader, build_detection_train_loader  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.roi_heads import ROI_MASK_HEAD_REGISTRY, build_mask_head  # noqa: E402
from detectron2.modeling.roi_heads.mask_head import BaseMaskRCNNHead  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats  # noqa: E402
from helpers import CONFIGS, tiny_cfg  # noqa: E402
from test_hourglass import EXPECTED_PARAMS, expected_predictor_params  # noqa: E402
from torch import nn  # noqa: E402

import masklab_d2.modeling  # noqa: E402,F401  (registration)
from masklab_d2.config import add_masklab_config, load_config  # noqa: E402
from masklab_d2.data import PartialMaskDatasetMapper  # noqa: E402
from masklab_d2.layers import crop_and_resize  # noqa: E402
from masklab_d2.layers.hourglass import (  # noqa: E402
    HOURGLASS_VARIANTS,
    MASK_NETWORK_NAMES,
    RESNET_VARIANTS,
)
from masklab_d2.modeling.deep_marc_head import HourglassMaskHead, ResNetMaskHead  # noqa: E402
from masklab_d2.tools import profile_heads  # noqa: E402
from masklab_d2.utils.detectron2 import point_rend_available  # noqa: E402

SHAPES_CONFIGS = sorted(
    glob.glob(os.path.join(CONFIGS, "shapes", "deep_marc_*.yaml"))
    + glob.glob(os.path.join(CONFIGS, "shapes-partial", "deep_marc_*.yaml"))
)
COCO_CONFIGS = sorted(
    glob.glob(os.path.join(CONFIGS, "coco", "deep_marc_*.yaml"))
    + glob.glob(os.path.join(CONFIGS, "coco-voc-nonvoc", "deep_marc_*.yaml"))
)


def _name(path):
    return "/".join(os.path.normpath(path).split(os.sep)[-2:])


def _num_params(module):
    return sum(p.numel() for p in module.parameters())


def head_cfg(network, cls_agnostic=True, num_classes=80, num_filters=64):
    cfg = get_cfg()
    add_masklab_config(cfg)
    family = "HourglassMaskHead" if network.startswith("hourglass") else "ResNetMaskHead"
    cfg.MODEL.ROI_MASK_HEAD.NAME = family
    cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = cls_agnostic
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.MODEL.DEEP_MARC.NETWORK = network
    cfg.MODEL.DEEP_MARC.NUM_FILTERS = num_filters
    return cfg


def _train_instances(image_size, boxes, classes, has_mask):
    """Ground truth with a filled-box mask for each instance that has one."""
    height, width = image_size
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for mask, (x0, y0, x1, y1), flag in zip(masks, boxes, has_mask):
        if flag:
            mask[int(y0) : int(y1), int(x0) : int(x1)] = True
    instances = Instances(image_size)
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.gt_classes = torch.tensor(classes)
    instances.gt_masks = BitMasks(masks)
    instances.gt_has_mask = torch.tensor(has_mask)
    return instances


# ------------------------------------------------------------------------------------------------
# The head alone
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("network", MASK_NETWORK_NAMES)
def test_head_shapes_and_parameter_count(network):
    torch.manual_seed(0)
    head = build_mask_head(head_cfg(network), ShapeSpec(channels=256, height=32, width=32))
    expected_type = HourglassMaskHead if network in HOURGLASS_VARIANTS else ResNetMaskHead
    assert type(head) is expected_type and isinstance(head, BaseMaskRCNNHead)
    with torch.no_grad():
        logits = head.eval().layers(torch.randn(2, 256, 32, 32))
    assert logits.shape == (2, 1, 64, 64) and torch.isfinite(logits).all()
    # Head = network + predictor, nothing else; the network is the reference's (test_hourglass).
    assert _num_params(head) == _num_params(head.network) + _num_params(head.predictor)
    assert _num_params(head.network) == EXPECTED_PARAMS[network]
    assert _num_params(head.predictor) == expected_predictor_params(
        head.network.out_channels, 64, 1
    )
    assert not any(isinstance(v, torch.Tensor) for v in vars(head).values())  # no cached outputs


@pytest.mark.parametrize("network", ["hourglass20", "resnet8"])
def test_class_specific_head_trains_and_picks_the_predicted_class(network):
    torch.manual_seed(0)
    num_classes = 5
    cfg = head_cfg(network, cls_agnostic=False, num_classes=num_classes, num_filters=16)
    head = build_mask_head(cfg, ShapeSpec(channels=64, height=16, width=16))
    x = torch.randn(3, 64, 16, 16)
    with torch.no_grad():
        logits = head.eval().layers(x)
    assert logits.shape == (3, num_classes, 32, 32)

    detections = Instances((100, 100))
    detections.pred_boxes = Boxes(
        torch.tensor([[0.0, 0, 50, 50], [10, 10, 90, 60], [5, 5, 20, 95]])
    )
    detections.pred_classes = torch.tensor([4, 0, 2])
    with torch.no_grad():
        out = head(x, [detections])[0]
    assert out.pred_masks.shape == (3, 1, 32, 32)
    assert torch.allclose(
        out.pred_masks[:, 0], logits[torch.arange(3), detections.pred_classes].sigmoid()
    )

    head.train()
    targets = _train_instances((100, 100), [[0, 0, 50, 50], [10, 10, 90, 60]], [4, 1], [True, True])
    targets.proposal_boxes = targets.gt_boxes
    with EventStorage():
        losses = head(x[:2], [targets])
    assert set(losses) == {"loss_mask"} and losses["loss_mask"].item() > 0
    losses["loss_mask"].backward()
    assert all(p.grad is not None for p in head.parameters())


def test_mismatched_network_and_missing_pooler_raise():
    shape = ShapeSpec(channels=64, height=16, width=16)
    cfg = head_cfg("resnet8")
    cfg.MODEL.ROI_MASK_HEAD.NAME = "HourglassMaskHead"
    with pytest.raises(
        ValueError, match=r"HourglassMaskHead takes network \(MODEL.DEEP_MARC.NETWORK\)"
    ) as err:
        build_mask_head(cfg, shape)
    assert all(name in str(err.value) for name in HOURGLASS_VARIANTS) and "resnet8" in str(
        err.value
    )
    cfg = head_cfg("hourglass52")
    cfg.MODEL.ROI_MASK_HEAD.NAME = "ResNetMaskHead"
    with pytest.raises(ValueError, match="resnet20"):
        build_mask_head(cfg, shape)
    with pytest.raises(ValueError, match="POOLER_TYPE"):
        HourglassMaskHead(
            {"p2": ShapeSpec(channels=64, stride=4)}, network="hourglass10", num_classes=1
        )
    # Through a whole shapes model.
    config = os.path.join(CONFIGS, "shapes-partial", "deep_marc_R_18_FPN_resnet4_gtcrop.yaml")
    with pytest.raises(ValueError, match="ResNetMaskHead takes .*'hourglass52'"):
        build_model(tiny_cfg(config, **{"MODEL.DEEP_MARC.NETWORK": "hourglass52"}))


# ------------------------------------------------------------------------------------------------
# Configs end to end
# ------------------------------------------------------------------------------------------------
def test_every_variant_has_a_shapes_sweep_config():
    names = {_name(p) for p in SHAPES_CONFIGS}
    assert "shapes/deep_marc_R_18_FPN_hourglass52.yaml" in names
    for network in ["hourglass10", "hourglass20", "hourglass52"] + sorted(RESNET_VARIANTS):
        assert f"shapes-partial/deep_marc_R_18_FPN_{network}_gtcrop.yaml" in names, network
    assert len(COCO_CONFIGS) == 3


@pytest.mark.parametrize("config_file", SHAPES_CONFIGS, ids=_name)
def test_shapes_config_trains_and_predicts(config_file):
    torch.manual_seed(0)
    cfg = tiny_cfg(config_file)
    network = cfg.MODEL.DEEP_MARC.NETWORK
    assert network in os.path.basename(config_file)
    partial = cfg.DATASETS.MASK_TRAIN_CLASSES != "all"
    assert cfg.MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES and cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert head.network_name == network and head.predictor.num_classes == 1
    resolution = cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION
    assert model.roi_heads.mask_pooler.output_size == (resolution, resolution)

    loader = iter(build_detection_train_loader(cfg, mapper=PartialMaskDatasetMapper(cfg, True)))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    flags, rois_seen = [], []
    hook = head.network.register_forward_hook(lambda m, args, out: rois_seen.append(len(args[0])))
    with EventStorage():
        for _ in range(2):
            batch = next(loader)
            flags.append(torch.cat([x["instances"].gt_has_mask for x in batch]))
            losses = model(batch)
            assert torch.isfinite(losses["loss_mask"])
            assert (losses["loss_mask"].item() > 0) == bool(flags[-1].any())
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    hook.remove()
    assert rois_seen == [int(f.sum()) for f in flags]  # each instance with a mask, once, on its box
    flags = torch.cat(flags)
    assert flags.any() and flags.all() != partial  # partial: some boxes come without a mask

    model.eval()
    test_mapper = PartialMaskDatasetMapper(cfg, is_train=False)
    inputs = [
        next(iter(build_detection_test_loader(cfg, cfg.DATASETS.TEST[0], mapper=test_mapper)))[0]
    ]
    height, width = inputs[0]["height"], inputs[0]["width"]
    input_size = tuple(inputs[0]["image"].shape[-2:])  # resized to 128 px
    given = Instances(input_size)
    given.pred_boxes = Boxes(torch.tensor([[4.0, 6.0, 60.0, 50.0], [30.0, 40.0, 120.0, 126.0]]))
    given.pred_classes = torch.tensor([3, 12])
    with torch.no_grad():
        detected = model(inputs)[0]["instances"]  # the whole detector (may find nothing yet)
        instances = model.inference(inputs, detected_instances=[given])[0]["instances"]
    # detector_postprocess pastes the [N, 1, 2R, 2R] head output into [N, H, W] image masks.
    assert detected.pred_masks.shape == (len(detected), height, width)
    assert instances.pred_masks.shape == (2, height, width)
    assert instances.pred_masks.dtype == torch.bool


@pytest.mark.parametrize("config_file", COCO_CONFIGS, ids=_name)
def test_coco_config_builds_and_trains_one_step(config_file):
    torch.manual_seed(0)
    cfg = load_config(config_file, ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    assert cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE == "ROIAlignV2"
    assert cfg.MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES and cfg.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK
    model = build_model(cfg)
    head = model.roi_heads.mask_head
    assert isinstance(head, HourglassMaskHead) and head.network_name == "hourglass52"
    assert model.roi_heads.mask_pooler.output_size == (32, 32)
    assert _num_params(head.network) == EXPECTED_PARAMS["hourglass52"]

    # One 96x128 image: two instances with masks, one box-only instance.
    targets = _train_instances(
        (96, 128),
        [[8, 8, 60, 70], [70, 20, 120, 90], [30, 50, 100, 94]],
        [0, 17, 40],
        [True, True, False],
    )
    model.train()
    with EventStorage():
        losses = model([{"image": torch.rand(3, 96, 128) * 255, "instances": targets}])
    assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"].item() > 0
    sum(losses.values()).backward()
    assert head.network.input_conv.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gt_crop", [True, False])
def test_batch_without_masks_gives_zero_mask_loss(gt_crop):
    """R = 0: the head sees no RoI; loss_mask is 0, keeps the graph, and BN statistics stay put."""
    config = os.path.join(CONFIGS, "shapes-partial", "deep_marc_R_18_FPN_hourglass52_gtcrop.yaml")
    model = build_model(tiny_cfg(config, **{"MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES": gt_crop}))
    model.train()
    head = model.roi_heads.mask_head
    bn = next(m for m in head.network.modules() if isinstance(m, nn.BatchNorm2d))
    running_mean = bn.running_mean.clone()
    batch = [
        {
            "image": torch.rand(3, 96, 96) * 255,
            "instances": _train_instances(
                (96, 96), [[10, 10, 50, 60], [40, 30, 90, 90]], [0, 9], [False, False]
            ),
        }
        for _ in range(2)
    ]
    with EventStorage():
        losses = model(batch)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_mask"].requires_grad
    sum(losses.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in head.parameters())
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    assert torch.equal(bn.running_mean, running_mean)


class _HeadLayers(nn.Module):
    """A mask head's layers as a model of pooled features, for fvcore's update_bn_stats."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head.layers(x)


@pytest.mark.parametrize("network", ["hourglass10", "resnet4"])
def test_precise_bn_passes_over_batches_without_rois(network):
    """TEST.PRECISE_BN: fvcore's update_bn_stats divides by the batch size of each BN call, so a
    batch with no RoI for the head (under partial supervision: no image with a masked instance)
    must not reach a BN layer (it raised ZeroDivisionError); the statistics are then those of the
    batches with RoIs. With R = 0 every parameter still gets a (zero) gradient, as DDP needs."""
    torch.manual_seed(0)
    head = build_mask_head(head_cfg(network), ShapeSpec(channels=16, height=8, width=8)).train()
    empty, rois = torch.zeros(0, 16, 8, 8), torch.randn(3, 16, 8, 8) * 2 + 1
    reference = copy.deepcopy(head)
    update_bn_stats(_HeadLayers(reference), [rois], 1)
    update_bn_stats(_HeadLayers(head), [empty, rois, empty], 3)
    for bn, expected in zip(get_bn_modules(head), get_bn_modules(reference)):
        assert torch.equal(bn.running_mean, expected.running_mean)
        assert torch.equal(bn.running_var, expected.running_var)

    logits = head.layers(empty)
    assert logits.shape == (0, 1, 16, 16)
    logits.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())


# ------------------------------------------------------------------------------------------------
# Head-cost tool
# ------------------------------------------------------------------------------------------------
def test_profile_heads_smoke(tmp_path):
    configs = [
        os.path.join(CONFIGS, "shapes", "mask_rcnn_R_18_FPN.yaml"),
        os.path.join(CONFIGS, "shapes-partial", "deep_marc_R_18_FPN_hourglass52_gtcrop.yaml"),
    ]
    out = tmp_path / "heads.md"
    table = profile_heads.main(
        ["--config-file", *configs, "--detections", "2", "--repeat", "1", "--warmup", "0"]
        + ["--device", "cpu", "--markdown", str(out)]
    )
    assert out.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| shapes")]
    assert len(rows) == 2
    assert "mask_rcnn_R_18_FPN.yaml" in rows[0] and "MaskRCNNConvUpsampleHead" in rows[0]
    assert "hourglass52_gtcrop.yaml" in rows[1] and "network=hourglass52" in rows[1]
    # Pooled heads are profiled with their pooler, as the ROI heads run them.
    assert "CropAndResize 16 on p2,p3,p4,p5" in rows[1]


@ROI_MASK_HEAD_REGISTRY.register()
class _DictInputTestHead(BaseMaskRCNNHead):
    """A POOLER_TYPE "" head (like MaskLab's): crops p2 itself with masklab's crop_and_resize."""

    def __init__(self, cfg, input_shape):
        super().__init__()
        self.conv = nn.Conv2d(input_shape["p2"].channels, 1, 1)

    def forward(self, features, instances):
        boxes = [x.pred_boxes.tensor for x in instances]
        crops = crop_and_resize(features["p2"], boxes, 0.25, 14, aligned=True)
        return super().forward(crops, instances)

    def layers(self, x):
        return self.conv(x)


def test_profile_heads_feature_dict_head_and_crop_flops():
    config = os.path.join(CONFIGS, "shapes", "mask_rcnn_R_18_FPN.yaml")
    entry = config + "@MODEL.ROI_MASK_HEAD.NAME=_DictInputTestHead@MODEL.ROI_MASK_HEAD.POOLER_TYPE="
    (row,) = profile_heads.profile_config(
        entry, [], [3], ["cpu"], repeat=1, warmup=0, image_size=(256, 256)
    )
    assert row["input"] == "p2,p3,p4,p5" and row["params"] == 64 + 1
    crop = 4 * 3 * 64 * 14 * 14  # bilinear: 4 multiply-adds per output element and channel
    conv = 3 * 64 * 14 * 14  # 1x1 conv, 64 -> 1
    assert row["gflops"][3] * 1e9 == pytest.approx(crop + conv)
    assert "masklab::crop_and_resize" not in row["not_counted"]


# ------------------------------------------------------------------------------------------------
# Eval-time normalisation
# ------------------------------------------------------------------------------------------------
def _batch_norms(module):
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("network, reference", [("hourglass10", 0.9), ("resnet4", 0.01)])
def test_bn_momentum_is_a_config_key(network, reference, tmp_path):
    head = build_mask_head(
        head_cfg(network, num_filters=8), ShapeSpec(channels=8, height=8, width=8)
    )
    assert {m.momentum for m in _batch_norms(head.network)} == {reference}
    config = tmp_path / "momentum.yaml"
    base = os.path.join(CONFIGS, "shapes-partial", f"deep_marc_R_18_FPN_{network}_gtcrop.yaml")
    config.write_text(f"_BASE_: {base}\nMODEL:\n  DEEP_MARC:\n    BN_MOMENTUM: 0.1\n")
    model = build_model(tiny_cfg(str(config)))
    assert {m.momentum for m in _batch_norms(model.roi_heads.mask_head.network)} == {0.1}


def test_comparison_configs_evaluate_with_precise_bn_and_coco_deep_marc_syncs_bn():
    configs = glob.glob(os.path.join(CONFIGS, "shapes*", "*.yaml")) + glob.glob(
        os.path.join(CONFIGS, "coco*", "*FPN*.yaml")
    )
    if not point_rend_available():  # PointRend's configs need its keys
        configs = [p for p in configs if "point_rend" not in os.path.basename(p)]
    assert len(configs) > 20
    for path in configs:
        assert load_config(path).TEST.PRECISE_BN.ENABLED, path
    for path in COCO_CONFIGS:
        assert load_config(path).MODEL.DEEP_MARC.NORM == "SyncBN", path


def test_precise_bn_eval_reevaluates_with_recomputed_statistics(tmp_path):
    from masklab_d2.modeling import MaskLabCheckpointer
    from masklab_d2.tools import precise_bn_eval

    config = os.path.join(CONFIGS, "shapes-partial", "deep_marc_R_18_FPN_hourglass10_gtcrop.yaml")
    torch.manual_seed(0)
    cfg = tiny_cfg(config, **{"TEST.DETECTIONS_PER_IMAGE": 5})
    model = build_model(cfg)
    for bn in _batch_norms(model):  # statistics as if from one odd last batch
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(0.01)
    MaskLabCheckpointer(model, save_dir=str(tmp_path)).save("model")
    weights = str(tmp_path / "model.pth")

    precise = build_model(cfg)
    MaskLabCheckpointer(precise).load(weights)
    assert precise_bn_eval.recompute_bn_statistics(cfg, precise, num_iter=2) > 0
    first = _batch_norms(precise.roi_heads.mask_head)[0]
    assert not torch.allclose(first.running_mean, torch.full_like(first.running_mean, 3.0))

    rows = precise_bn_eval.precise_bn_comparison(cfg, weights, num_iter=2)
    assert [r["statistics"].split()[0] for r in rows] == ["as", "precise"]
    assert all("bbox/AP" in r and r["dataset"] == "shapes_tiny_val" for r in rows)
    table = precise_bn_eval.format_rows(rows)
    assert "bbox/AP" in table and "as trained" in table and "precise (2 batches" in table
