"""BlendMask's torch-only parts (masklab_d2/layers/blender.py): blend math, bottom module,
attention network, norms and the thing-only semantic target. No detectron2 needed."""

import pytest
import torch
from torch import nn

from masklab_d2.layers.blender import (
    SEMANTIC_IGNORE_INDEX,
    AttentionNet,
    BasisSemanticHead,
    BottomModule,
    blend,
    get_norm,
    thing_semantic_target,
)


@pytest.mark.parametrize("interp", ["bilinear", "nearest"])
@pytest.mark.parametrize("k", [0, 2, 3])
def test_one_hot_attention_reproduces_that_base_exactly(interp, k):
    torch.manual_seed(0)
    crops = torch.randn(3, 4, 28, 28)
    attentions = torch.zeros(3, 4, 14, 14)
    attentions[:, k] = 1e4  # softmax is exactly one-hot in float32
    out = blend(crops, attentions, interp)
    assert out.shape == (3, 28, 28)
    assert torch.equal(out, crops[:, k])


@pytest.mark.parametrize("interp", ["bilinear", "nearest"])
def test_uniform_attentions_give_the_mean_of_the_bases(interp):
    torch.manual_seed(0)
    crops = torch.randn(5, 4, 56, 56)
    # Equal logits over K at every pixel (whatever their value there): weights 1/K.
    attentions = torch.randn(5, 1, 14, 14).expand(5, 4, 14, 14)
    out = blend(crops, attentions, interp)
    assert out.shape == (5, 56, 56)
    torch.testing.assert_close(out, crops.mean(dim=1), rtol=1e-5, atol=1e-6)


def test_blend_shapes_no_rois_same_size_and_gradients():
    assert blend(torch.zeros(0, 4, 112, 112), torch.zeros(0, 4, 14, 14)).shape == (0, 112, 112)
    crops = torch.randn(2, 1, 28, 28, requires_grad=True)
    attentions = torch.randn(2, 1, 28, 28, requires_grad=True)
    out = blend(crops, attentions)  # K = 1: the softmax is 1, the mask is the base crop
    torch.testing.assert_close(out, crops[:, 0])
    out.sum().backward()
    assert crops.grad is not None and attentions.grad is not None


def test_attention_upsampling_matches_f_interpolate():
    torch.manual_seed(0)
    crops, attentions = torch.randn(2, 3, 28, 28), torch.randn(2, 3, 7, 7)
    weights = nn.functional.interpolate(
        attentions, size=(28, 28), mode="bilinear", align_corners=False
    )
    expected = (crops * weights.softmax(dim=1)).sum(dim=1)
    torch.testing.assert_close(blend(crops, attentions, "bilinear"), expected)


def test_blend_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="disagree"):
        blend(torch.zeros(2, 4, 28, 28), torch.zeros(3, 4, 14, 14))
    with pytest.raises(ValueError, match="disagree"):
        blend(torch.zeros(2, 4, 28, 28), torch.zeros(2, 8, 14, 14))
    with pytest.raises(ValueError, match=r"\[N, K, R, R\]"):
        blend(torch.zeros(2, 28, 28), torch.zeros(2, 4, 14, 14))


@pytest.mark.parametrize("norm", ["BN", "GN", ""])
def test_bottom_module_outputs_k_bases_at_stride_4_from_p3(norm):
    torch.manual_seed(0)
    # A 256 x 384 image: p3 (stride 8), p4, p5 with different channel counts.
    levels = [
        torch.randn(2, c, 256 // s, 384 // s, requires_grad=True)
        for c, s in ((16, 8), (24, 16), (8, 32))
    ]
    bottom = BottomModule([16, 24, 8], num_bases=5, conv_dim=32, num_convs=2, norm=norm)
    bases = bottom(levels)
    assert bases.shape == (2, 5, 256 // 4, 384 // 4)
    bases.square().mean().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in levels)  # every level fused
    convs = [m for m in bottom.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3 + 2 + 1 + 1  # refine per level, tower, after-upsample, 1x1 to K
    assert all((c.bias is None) == bool(norm) for c in convs[:-1]) and convs[-1].bias is not None


def test_bottom_module_odd_sizes_and_level_count():
    bottom = BottomModule([8, 8, 8], num_bases=4, conv_dim=32, num_convs=1, norm="")
    bases = bottom([torch.randn(1, 8, 13, 17), torch.randn(1, 8, 7, 9), torch.randn(1, 8, 4, 5)])
    assert bases.shape == (1, 4, 26, 34)
    with pytest.raises(ValueError, match="expected 3 feature levels"):
        bottom([torch.randn(1, 8, 13, 17)])


def test_attention_net_shapes_and_initialisation():
    torch.manual_seed(0)
    net = AttentionNet(in_channels=64, num_bases=4, conv_dim=32, num_convs=2)
    assert net(torch.randn(6, 64, 14, 14)).shape == (6, 4, 14, 14)
    assert net(torch.zeros(0, 64, 14, 14)).shape == (0, 4, 14, 14)
    assert net.predictor.kernel_size == (1, 1)
    assert torch.all(net.predictor.bias == 0)
    assert net.predictor.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert (
        len([m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]) == 2
    )
    single = AttentionNet(in_channels=64, num_bases=8, num_convs=0)
    assert single(torch.randn(2, 64, 7, 7)).shape == (2, 8, 7, 7)


def test_semantic_head_shape():
    head = BasisSemanticHead(in_channels=16, num_classes=10, conv_dim=32, norm="BN")
    assert head(torch.randn(2, 16, 12, 12)).shape == (2, 11, 12, 12)


def test_get_norm_names():
    assert isinstance(get_norm("BN", 64), nn.BatchNorm2d)
    assert isinstance(get_norm("SyncBN", 64), nn.SyncBatchNorm)
    gn = get_norm("GN", 64)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 32
    assert get_norm("", 64) is None and get_norm(None, 64) is None
    with pytest.raises(ValueError, match="Unknown norm 'LN'"):
        get_norm("LN", 64)
    with pytest.raises(ValueError, match="divisible"):
        get_norm("GN", 48)
    # SyncBN works as BN on one process and on the CPU (no process group).
    sync = get_norm("SyncBN", 8).train()
    assert sync(torch.randn(2, 8, 4, 4)).shape == (2, 8, 4, 4)


def test_thing_semantic_target_labels_ignores_and_pads():
    masks = torch.zeros(1, 64, 64, dtype=torch.bool)
    masks[0, 0:32, 0:32] = True
    target = thing_semantic_target(
        masks, torch.tensor([2]), torch.tensor([[40.0, 40.0, 64.0, 64.0]]), size=(10, 9), stride=8
    )
    expected = torch.zeros(10, 9, dtype=torch.int64)
    expected[0:4, 0:4] = 3  # cell centres 4, 12, 20, 28 lie in the mask; class 2 -> label 3
    expected[5:8, 5:8] = SEMANTIC_IGNORE_INDEX  # centres 44, 52, 60 lie in the mask-less box
    assert torch.equal(target, expected)  # rows 8-9 and column 8 are padding: background


def test_thing_semantic_target_masks_win_over_maskless_boxes_and_later_masks_win():
    masks = torch.zeros(2, 32, 32, dtype=torch.bool)
    masks[0, 0:16, :] = True
    masks[1, 8:24, :] = True
    target = thing_semantic_target(
        masks, torch.tensor([0, 5]), torch.tensor([[0.0, 0.0, 32.0, 32.0]]), size=(4, 4), stride=8
    )
    assert target[:, 0].tolist() == [1, 6, 6, SEMANTIC_IGNORE_INDEX]


def test_thing_semantic_target_without_instances_is_background():
    target = thing_semantic_target(
        torch.zeros(0, 1, 1, dtype=torch.bool),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 4),
        (3, 5),
        4,
    )
    assert target.shape == (3, 5) and not target.any()
