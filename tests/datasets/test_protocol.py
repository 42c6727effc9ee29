"""The partially supervised protocol under detectron2: mapper, ROI heads, freezing, bad input."""

import json

import pytest

pytestmark = pytest.mark.detectron2

import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from helpers import image_instances, tiny_cfg  # noqa: E402

import masklab_d2.modeling  # noqa: E402,F401  (registration)
from masklab_d2.data import (  # noqa: E402
    PartialMaskDatasetMapper,
    check_coco_json,
    mask_train_class_ids,
    resolve_class_selection,
)
from masklab_d2.data.datasets import DatasetFormatError
from masklab_d2.data.supervision import check_mask_supervision  # noqa: E402
from masklab_d2.modeling import freeze_detector, load_detector_weights  # noqa: E402
from masklab_d2.modeling.roi_heads import PartialROIHeads  # noqa: E402

CONFIG = "shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml"


def test_gt_box_training_uses_each_masked_instance_once():
    cfg = tiny_cfg(CONFIG)
    model = build_model(cfg)
    roi_heads = model.roi_heads
    assert isinstance(roi_heads, PartialROIHeads) and roi_heads.train_mask_on_gt_boxes
    targets = [image_instances(), image_instances()]
    targets[1].gt_has_mask[:] = False
    selected = roi_heads._mask_training_instances([], targets)
    assert [len(x) for x in selected] == [1, 0]
    assert torch.equal(selected[0].proposal_boxes.tensor, targets[0].gt_boxes.tensor[:1])
    assert selected[0].gt_has_mask.all()


def test_proposal_training_drops_maskless_matches():
    cfg = tiny_cfg(CONFIG, **{"MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES": False})
    roi_heads = build_model(cfg).roi_heads
    proposals = Instances((96, 96))
    proposals.proposal_boxes = Boxes(
        torch.tensor([[12.0, 10.0, 44.0, 41.0], [50.0, 50.0, 90.0, 88.0], [0.0, 0.0, 5.0, 5.0]])
    )
    proposals.gt_classes = torch.tensor([0, 9, cfg.MODEL.ROI_HEADS.NUM_CLASSES])
    proposals.gt_has_mask = torch.tensor([True, False, False])
    selected = roi_heads._mask_training_instances([proposals], None)
    assert len(selected[0]) == 1 and selected[0].gt_classes.tolist() == [0]


@pytest.mark.parametrize("gt_crop", [True, False])
def test_images_without_any_mask_train_and_give_zero_mask_loss(gt_crop):
    cfg = tiny_cfg(CONFIG, **{"MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES": gt_crop})
    model = build_model(cfg)
    model.train()
    targets = image_instances()
    targets.gt_has_mask[:] = False
    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": targets}]
    with EventStorage():
        losses = model(batch)
    assert losses["loss_mask"].item() == 0.0
    sum(losses.values()).backward()  # no error; box and RPN losses still train
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0


def test_mask_loss_ignores_maskless_instances():
    """The mask loss on a masked + mask-less image equals the loss on the masked one alone."""
    cfg = tiny_cfg(CONFIG)
    model = build_model(cfg)
    model.train()
    torch.manual_seed(0)
    image = torch.rand(3, 96, 96) * 255
    both = image_instances()
    only_masked = both[both.gt_has_mask]
    with EventStorage():
        loss_both = model([{"image": image, "instances": both}])["loss_mask"]
        loss_masked = model([{"image": image, "instances": only_masked}])["loss_mask"]
    assert loss_both.item() == pytest.approx(loss_masked.item(), rel=1e-6)


def test_freeze_detector_trains_only_the_mask_branch():
    cfg = tiny_cfg(CONFIG)
    model = freeze_detector(build_model(cfg))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("roi_heads.mask_") for n in trainable)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    model.train()
    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": image_instances()}]
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with EventStorage():
        sum(model(batch).values()).backward()
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(before[name], value), name  # BN statistics frozen too
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)


def test_mapper_flags_masks_by_class():
    cfg = tiny_cfg(CONFIG)
    metadata = MetadataCatalog.get("shapes_tiny_train")
    voc = set(resolve_class_selection("voc", metadata.thing_classes, metadata.class_groups))
    assert mask_train_class_ids(cfg) == sorted(voc)
    mapper = PartialMaskDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get("shapes_tiny_train")[:8]
    seen_flags = []
    for record in records:
        instances = mapper(record)["instances"]
        flags = instances.gt_has_mask.tolist()
        assert flags == [c in voc for c in instances.gt_classes.tolist()]
        masks = instances.gt_masks.tensor
        assert all(masks[i].any() for i, f in enumerate(flags) if f)
        assert not any(masks[i].any() for i, f in enumerate(flags) if not f)  # placeholders
        seen_flags += flags
    assert any(seen_flags) and not all(seen_flags)


def test_unknown_mask_class_names_are_rejected():
    cfg = tiny_cfg(CONFIG, **{"DATASETS.MASK_TRAIN_CLASSES": "voc,dodecahedron"})
    with pytest.raises(ValueError, match="dodecahedron.*Valid"):
        mask_train_class_ids(cfg)


def test_no_class_with_masks_is_an_error():
    records = [{"annotations": [{"category_id": 0, "bbox": [0, 0, 5, 5]}]}]
    with pytest.raises(ValueError, match="No training annotation has a mask"):
        check_mask_supervision(records, None, "all")
    records[0]["annotations"][0]["segmentation"] = [[0, 0, 5, 0, 5, 5]]
    with pytest.raises(ValueError, match="No training annotation has a mask"):
        check_mask_supervision(records, [3], "triangle")
    assert check_mask_supervision(records, [0], "circle")[0] == 1


def _write_json(path, images, annotations, categories):
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return str(path)


def test_corrupt_coco_json_errors_name_the_problem(tmp_path, caplog):
    images = [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}]
    categories = [{"id": 1, "name": "thing"}]
    good = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 0}
    with pytest.raises(DatasetFormatError, match="annotation id 8 references image_id 2"):
        check_coco_json(
            _write_json(
                tmp_path / "a.json", images, [good, {**good, "id": 8, "image_id": 2}], categories
            )
        )
    with pytest.raises(DatasetFormatError, match="annotation id 9 references category_id 5"):
        check_coco_json(
            _write_json(
                tmp_path / "b.json", images, [good, {**good, "id": 9, "category_id": 5}], categories
            )
        )
    with pytest.raises(DatasetFormatError, match="malformed bbox"):
        check_coco_json(
            _write_json(tmp_path / "c.json", images, [{**good, "bbox": [1, 2]}], categories)
        )
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid json"):
        check_coco_json(str(tmp_path / "d.json"))
    outside = [
        good,
        {**good, "id": 10, "bbox": [8, 8, 6, 6]},
        {**good, "id": 11, "bbox": [20, 20, 2, 2]},
    ]
    with caplog.at_level("WARNING"):
        check_coco_json(_write_json(tmp_path / "e.json", images, outside, categories))
    assert "annotation 10 in a.jpg" in caplog.text and "annotation 11 in a.jpg" in caplog.text


def test_undecodable_image_is_skipped_in_training_and_an_error_in_evaluation(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    record = {"file_name": str(bad), "height": 10, "width": 10, "image_id": 0, "annotations": []}
    cfg = tiny_cfg(CONFIG)
    assert PartialMaskDatasetMapper(cfg, is_train=True)(dict(record)) is None
    with pytest.raises(RuntimeError, match="cannot read image .*broken.jpg"):
        PartialMaskDatasetMapper(cfg, is_train=False)(dict(record))


def test_conflicting_box_choices_are_rejected():
    cfg = tiny_cfg(CONFIG, **{"MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": True})
    with pytest.raises(ValueError, match="set only one"):
        build_model(cfg)


def test_mask_training_proposals_can_be_capped_per_image():
    cfg = tiny_cfg(
        CONFIG,
        **{
            "MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES": False,
            "MODEL.ROI_MASK_HEAD.MAX_TRAIN_ROIS_PER_IMAGE": 3,
        },
    )
    roi_heads = build_model(cfg).roi_heads
    proposals = Instances((96, 96))
    proposals.proposal_boxes = Boxes(torch.tensor([[10.0, 10.0, 40.0, 40.0]]).repeat(8, 1))
    proposals.gt_classes = torch.tensor([0, 1, 2, 3, 4, 5, 16, 16])
    proposals.gt_has_mask = torch.tensor([True] * 5 + [False] * 3)
    few = proposals[:2]
    selected = roi_heads._mask_training_instances([proposals, few], None)
    assert [len(x) for x in selected] == [3, 2]
    assert set(selected[0].gt_classes.tolist()) <= {0, 1, 2, 3, 4}  # only masked foreground


def test_head_only_load_keeps_the_fresh_mask_branch(tmp_path):
    """MODEL.WEIGHTS fills the detector; a same-architecture mask head in it is not loaded."""
    cfg = tiny_cfg(CONFIG)
    trained = build_model(cfg)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(1.0)  # "trained": every weight differs from a fresh model's
    DetectionCheckpointer(trained, save_dir=str(tmp_path)).save("trained")

    torch.manual_seed(1)
    model = freeze_detector(build_model(cfg))
    fresh_head = {k: v.clone() for k, v in model.roi_heads.mask_head.state_dict().items()}
    load_detector_weights(DetectionCheckpointer(model), str(tmp_path / "trained.pth"))
    for name, value in model.roi_heads.mask_head.state_dict().items():
        assert torch.equal(value, fresh_head[name]), name
    trained_state = trained.state_dict()
    for name, value in model.state_dict().items():
        if name.startswith(("backbone.", "proposal_generator.", "roi_heads.box_")):
            assert torch.allclose(value, trained_state[name]), name
