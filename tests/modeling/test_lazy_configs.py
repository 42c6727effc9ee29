"""LazyConfig configs (configs/lazy/): each loads with detectron2's loader and builds its model
with the head and protocol its name says; overrides reach the model and the data pieces; a
shapes lazy config and its YAML twin make the same model and the same losses."""

import copy
import glob
import os

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from helpers import CONFIGS, tiny_cfg  # noqa: E402

from masklab_d2.data import PartialMaskDatasetMapper  # noqa: E402
from masklab_d2.data.class_groups import class_groups_of  # noqa: E402
from masklab_d2.evaluation import PartialCOCOEvaluator  # noqa: E402
from masklab_d2.lazy import deformable_box_pooler  # noqa: E402
from masklab_d2.modeling import PartialROIHeads, class_agnostic  # noqa: E402
from masklab_d2.modeling.blendmask_head import BlendMaskHead  # noqa: E402
from masklab_d2.modeling.deep_marc_head import HourglassMaskHead  # noqa: E402
from masklab_d2.modeling.masklab_head import MaskLabHead  # noqa: E402
from masklab_d2.modeling.point_rend_head import PartialPointRendMaskHead  # noqa: E402
from masklab_d2.modeling.poolers import (  # noqa: E402
    CropAndResizePooler,
    DeformableCropAndResizePooler,
)
from masklab_d2.utils.detectron2 import point_rend_available  # noqa: E402

LAZY = os.path.join(CONFIGS, "lazy")
LEAVES = sorted(
    p
    for p in glob.glob(os.path.join(LAZY, "**", "*.py"), recursive=True)
    if os.sep + "common" + os.sep not in p
)
HEADS = {
    "mask_rcnn": MaskRCNNConvUpsampleHead,
    "masklab": MaskLabHead,
    "deep_marc": HourglassMaskHead,
    "blendmask": BlendMaskHead,
    "point_rend": PartialPointRendMaskHead,
}
# (setting, head) pairs without a lazy config: PointRend's are R-50-FPN (COCO) and shapes only.
NOT_IN_SETTING = {("vitdet", "point_rend")}
PARTIAL_GROUPS = ("coco-voc-nonvoc", "shapes-partial")


def _skip_without_point_rend(path):
    if "point_rend" in os.path.basename(path) and not point_rend_available():
        pytest.skip("detectron2.projects.point_rend is not importable (README: Heads, PointRend)")


def _name(path):
    return os.path.relpath(path, LAZY)


def _class_agnostic(head) -> bool:
    """Whether a head predicts one mask for every class: the contract's answer, checked against
    what the head's layers predict."""
    answer = class_agnostic(head)
    if isinstance(head, MaskRCNNConvUpsampleHead):
        assert answer == (head.predictor.out_channels == 1)
    if isinstance(head, PartialPointRendMaskHead):
        assert answer == (head.point_head.predictor.out_channels == 1)
    if isinstance(head, BlendMaskHead):
        assert answer
    return answer


def test_every_head_has_a_lazy_config_per_setting():
    names = {_name(p) for p in LEAVES}
    for group, suffix in [
        ("coco", "R_50_FPN*100ep_LSJ.py"),
        ("coco-voc-nonvoc", "R_50_FPN*100ep_LSJ.py"),
        ("vitdet", "vitdet_b_100ep.py"),
        ("shapes-partial", "R_18_FPN*gtcrop.py"),
    ]:
        for head in HEADS:
            found = glob.glob(os.path.join(LAZY, group, f"{head}_*{suffix}"))
            expected = 0 if (group, head) in NOT_IN_SETTING else 1
            assert len(found) == expected, (group, head, sorted(names))


@pytest.mark.parametrize("path", LEAVES, ids=_name)
def test_lazy_config_loads_and_builds(path):
    _skip_without_point_rend(path)
    if _name(path).startswith("vitdet"):
        pytest.importorskip("timm", reason="detectron2's ViT needs timm (README: Install)")
    cfg = LazyConfig.load(path)
    assert {"model", "dataloader", "optimizer", "lr_multiplier", "train"} <= set(cfg)
    model = instantiate(cfg.model)
    head_name = next(h for h in HEADS if os.path.basename(path).startswith(h))
    assert isinstance(model.roi_heads, PartialROIHeads)
    assert type(model.roi_heads.mask_head) is HEADS[head_name]
    partial = _name(path).split(os.sep)[0] in PARTIAL_GROUPS
    assert cfg.dataloader.mask_train_classes == ("voc" if partial else "all")
    if partial:
        assert model.roi_heads.train_mask_on_gt_boxes
    if _name(path).startswith("coco-voc-nonvoc"):
        assert _class_agnostic(model.roi_heads.mask_head)
    # The data side uses masklab_d2's partial-supervision pieces, all reading one selection.
    assert cfg.dataloader.train.mapper._target_ is PartialMaskDatasetMapper
    assert cfg.dataloader.evaluator._target_ is PartialCOCOEvaluator
    assert cfg.dataloader.evaluator.mask_train_classes == cfg.dataloader.mask_train_classes
    assert cfg.dataloader.train.mapper.mask_class_ids.selection == cfg.dataloader.mask_train_classes
    # Optimizer and schedule build for this model.
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert 0 < instantiate(cfg.lr_multiplier)(0.5) <= 1


def test_masklab_on_resnet_fpn_reads_bottom_up_hypercolumn_features():
    cfg = LazyConfig.load(os.path.join(LAZY, "coco", "masklab_R_50_FPN_100ep_LSJ.py"))
    model = instantiate(cfg.model)
    shapes = model.backbone.output_shape()
    # conv1 (stride 2, before the max-pool) and res2 pass through the FPN for the refinement.
    assert (shapes["conv1"].stride, shapes["conv1"].channels) == (2, 64)
    assert (shapes["res2"].stride, shapes["res2"].channels) == (4, 256)
    head = model.roi_heads.mask_head
    assert head.hypercolumn_features == ["conv1", "res2"]
    assert model.roi_heads.mask_pooler is None
    assert model.roi_heads.mask_in_features == ["p2", "p3", "p4", "p5", "conv1", "res2"]


@pytest.mark.parametrize("config", ["coco-voc-nonvoc/masklab_R_50_FPN_100ep_LSJ.py"])
def test_partial_data_pieces_of_a_coco_config_instantiate(config):
    """The COCO config's mapper and evaluator, pointed at a registered dataset, select the
    configured classes' masks and report seen / unseen groups."""
    cfg = LazyConfig.load(os.path.join(LAZY, config))
    cfg = LazyConfig.apply_overrides(
        cfg,
        [
            "dataloader.train.dataset.names=shapes_tiny_train",
            "dataloader.test.dataset.names=shapes_tiny_val",
        ],
    )
    mapper = instantiate(cfg.dataloader.train.mapper)
    metadata = MetadataCatalog.get("shapes_tiny_train")
    voc = {metadata.thing_classes.index(c) for c in class_groups_of(metadata)["voc"]}
    assert isinstance(mapper, PartialMaskDatasetMapper) and mapper.mask_class_ids == voc
    evaluator = instantiate(cfg.dataloader.evaluator)
    assert isinstance(evaluator, PartialCOCOEvaluator)
    assert len(evaluator._class_groups["seen"]) == len(voc)
    assert len(evaluator._class_groups["unseen"]) == len(metadata.thing_classes) - len(voc)


def test_overrides_reach_the_model_and_the_data():
    cfg = LazyConfig.load(os.path.join(LAZY, "shapes-partial", "masklab_R_18_FPN_gtcrop.py"))
    cfg = LazyConfig.apply_overrides(
        cfg,
        [
            "model.roi_heads.num_classes=7",
            "model.roi_heads.mask_head.crop_size=15",
            "model.roi_heads.mask_head.binning.num_directions=4",
            "dataloader.mask_train_classes=nonvoc",
            "dataloader.train.dataset.names=shapes_tiny_train",
        ],
    )
    model = instantiate(cfg.model)
    head = model.roi_heads.mask_head
    assert head.crop_size == 15 and head.binning.num_directions == 4
    # num_classes reaches the head by interpolation, the box predictor too.
    assert head.num_classes == 7 and model.roi_heads.box_predictor.num_classes == 7
    mapper = instantiate(cfg.dataloader.train.mapper)
    metadata = MetadataCatalog.get("shapes_tiny_train")
    nonvoc = {metadata.thing_classes.index(c) for c in class_groups_of(metadata)["nonvoc"]}
    assert mapper.mask_class_ids == nonvoc
    with pytest.raises(ValueError, match="not_a_class"):
        cfg.dataloader.mask_train_classes = "voc,not_a_class"
        instantiate(cfg.dataloader.train.mapper)


# Each shapes lazy config and the YAML config it mirrors.
TWINS = [
    ("shapes/mask_rcnn_R_18_FPN.py", "shapes/mask_rcnn_R_18_FPN.yaml"),
    (
        "shapes-partial/mask_rcnn_R_18_FPN_gtcrop.py",
        "shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml",
    ),
    ("shapes-partial/masklab_R_18_FPN_gtcrop.py", "shapes-partial/masklab_R_18_FPN_gtcrop.yaml"),
    (
        "shapes-partial/deep_marc_R_18_FPN_hourglass52_gtcrop.py",
        "shapes-partial/deep_marc_R_18_FPN_hourglass52_gtcrop.yaml",
    ),
    (
        "shapes-partial/blendmask_R_18_FPN_gtcrop.py",
        "shapes-partial/blendmask_R_18_FPN_gtcrop.yaml",
    ),
    ("shapes/point_rend_R_18_FPN.py", "shapes/point_rend_R_18_FPN.yaml"),
    (
        "shapes-partial/point_rend_R_18_FPN_gtcrop.py",
        "shapes-partial/point_rend_R_18_FPN_gtcrop.yaml",
    ),
]


@pytest.fixture(scope="module")
def shapes_batch():
    """Two tiny shapes training images through the partial mapper (voc masks only)."""
    cfg = tiny_cfg("shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml")
    mapper = PartialMaskDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get("shapes_tiny_train")[:2]
    batch = [mapper(copy.deepcopy(r)) for r in records]
    has_mask = torch.cat([x["instances"].gt_has_mask for x in batch])
    assert has_mask.any() and not has_mask.all()  # partial: some boxes have no mask
    return batch


@pytest.mark.parametrize("lazy, yaml", TWINS, ids=[t[0] for t in TWINS])
def test_lazy_and_yaml_configs_make_the_same_model(lazy, yaml, shapes_batch):
    _skip_without_point_rend(lazy)
    models = []
    for build in (
        lambda: instantiate(LazyConfig.load(os.path.join(LAZY, lazy)).model),
        lambda: build_model(tiny_cfg(yaml)),
    ):
        torch.manual_seed(0)
        models.append(build())
    lazy_model, yaml_model = models
    assert type(lazy_model.roi_heads.mask_head) is type(yaml_model.roi_heads.mask_head)
    count = [sum(p.numel() for p in m.parameters()) for m in models]
    assert count[0] == count[1]
    lazy_state, yaml_state = lazy_model.state_dict(), yaml_model.state_dict()
    assert list(lazy_state) == list(yaml_state)
    for name, value in lazy_state.items():
        assert torch.equal(value, yaml_state[name]), name
    assert type(lazy_model.roi_heads.box_pooler) is CropAndResizePooler
    losses = []
    for model in models:
        model.train()
        torch.manual_seed(1)  # proposal sampling
        with EventStorage():
            losses.append(model(copy.deepcopy(shapes_batch)))
    assert sorted(losses[0]) == sorted(losses[1]) and "loss_mask" in losses[0]
    for name, value in losses[0].items():
        torch.testing.assert_close(value, losses[1][name], msg=name)
    assert all(torch.isfinite(v) for v in losses[0].values())


def test_deformable_box_pooler_builds_the_yaml_keys_model_and_trains_its_offsets(shapes_batch):
    """lazy.deformable_box_pooler is MODEL.ROI_BOX_HEAD.POOLER_TYPE "DeformableCropAndResize":
    the same parameters, and a training step reaches the offset network."""
    cfg = LazyConfig.load(os.path.join(LAZY, "shapes", "mask_rcnn_R_18_FPN.py"))
    deformable_box_pooler(cfg.model)
    lazy_model = instantiate(cfg.model)
    yaml_cfg = tiny_cfg(
        "shapes/mask_rcnn_R_18_FPN.yaml",
        **{"MODEL.ROI_BOX_HEAD.POOLER_TYPE": "DeformableCropAndResize"},
    )
    yaml_model = build_model(yaml_cfg)
    for model in (lazy_model, yaml_model):
        assert type(model.roi_heads.box_pooler) is DeformableCropAndResizePooler
    lazy_shapes = {k: v.shape for k, v in lazy_model.state_dict().items()}
    assert lazy_shapes == {k: v.shape for k, v in yaml_model.state_dict().items()}

    lazy_model.train()
    with EventStorage():
        losses = lazy_model(copy.deepcopy(shapes_batch))
    sum(losses.values()).backward()
    offset_grads = [p.grad for p in lazy_model.roi_heads.box_pooler.parameters()]
    assert offset_grads and all(g is not None for g in offset_grads)
    assert any(g.abs().sum() > 0 for g in offset_grads)
