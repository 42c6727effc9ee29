"""The control head of MaskLab's refinement (HypercolumnMaskRCNNHead): the 4-conv head of the
baseline and MaskLab's refinement, on the same maps and the same crop lattice."""

import pytest

pytest.importorskip("detectron2", reason="the mask heads are detectron2 modules")

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from helpers import image_instances, tiny_cfg  # noqa: E402

import masklab_d2.modeling  # noqa: E402,F401  (registration)
from masklab_d2.layers.crop_and_resize import crop_and_resize, lattice_rois  # noqa: E402
from masklab_d2.modeling.hypercolumn_head import resize_to_bin_centres  # noqa: E402


def _shapes(module):
    return [tuple(p.shape) for p in module.parameters()]


@pytest.mark.parametrize("partial", [False, True])
def test_it_is_the_baseline_4conv_head_plus_masklabs_refinement(partial):
    prefix = "shapes-partial/" if partial else "shapes/"
    suffix = "_gtcrop.yaml" if partial else ".yaml"
    control = build_model(tiny_cfg(prefix + "mask_rcnn_hypercolumn_R_18_FPN" + suffix))
    masklab = build_model(tiny_cfg(prefix + "masklab_R_18_FPN" + suffix))
    baseline = build_model(tiny_cfg(prefix + "mask_rcnn_R_18_FPN" + suffix))
    head, masklab_head = control.roi_heads.mask_head, masklab.roi_heads.mask_head
    assert _shapes(head.conv_head) == _shapes(baseline.roi_heads.mask_head)
    assert _shapes(head.refinement) == _shapes(masklab_head.refinement)
    assert head.hypercolumn_features == masklab_head.hypercolumn_features
    assert head.hypercolumn_strides == masklab_head.hypercolumn_strides
    assert head.crop_size == masklab_head.crop_size
    assert head.class_agnostic is partial
    assert type(head.pooler) is type(baseline.roi_heads.mask_pooler)


def test_the_coarse_mask_is_resized_onto_the_hypercolumn_crop_lattice():
    # A map linear in x and y, sampled at a box's 28 x 28 bin centres and resized to 21 x 21,
    # equals its crop at the hypercolumn crops' rois (another alignment would shift it).
    height, width, size, coarse_size = 40, 50, 21, 28
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    image_map = (0.5 * xs + 0.25 * ys)[None, None]
    boxes = torch.tensor([[3.0, 5.0, 31.0, 29.0], [10.5, 2.25, 44.0, 37.5]], dtype=torch.float64)
    batch_index = torch.zeros(2, dtype=torch.float64)
    on_coarse_lattice = crop_and_resize(
        image_map, lattice_rois(boxes, batch_index, coarse_size), 1.0, coarse_size, aligned=True
    )
    on_crop_lattice = crop_and_resize(
        image_map, lattice_rois(boxes, batch_index, size), 1.0, size, aligned=True
    )
    resized = resize_to_bin_centres(on_coarse_lattice, size)
    torch.testing.assert_close(resized, on_crop_lattice)
    shifted = torch.nn.functional.interpolate(
        on_coarse_lattice, size=(size, size), mode="bilinear", align_corners=True
    )
    assert not torch.allclose(shifted, on_crop_lattice, atol=1e-3)


def test_both_losses_train_both_parts():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("shapes-partial/mask_rcnn_hypercolumn_R_18_FPN_gtcrop.yaml"))
    model.train()
    batch = [{"image": torch.rand(3, 96, 96) * 255, "instances": image_instances()}]
    with EventStorage():
        losses = model(batch)
    assert {"loss_mask", "loss_mask_coarse"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["loss_mask"] + losses["loss_mask_coarse"]).backward()
    head = model.roi_heads.mask_head
    for part in (head.conv_head, head.refinement):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
