"""The crop ops on the CPU backend beyond the reference checks of test_ops.py: torch.compile
training, the layout the real and fake backward kernels agree on, the multi-block channel path,
thread-count invariance, low-precision backward, layouts in backward, mixed dtypes and devices,
deterministic mode and empty maps."""

import pytest
import torch
from helpers import regular_rois
from torch._subclasses.fake_tensor import FakeTensorMode

from masklab_d2.layers import (
    crop_and_resize,
    crop_and_resize_reference,
    deformable_crop_and_resize,
    deformable_crop_and_resize_reference,
)
from masklab_d2.layers._ops import ops


def _both_ops(features, rois, offsets, aligned=True):
    """One plain and one deformable crop of the same boxes, as MaskLab's pooler does."""
    plain = crop_and_resize(features, rois, 0.5, 6, aligned)
    deformable = deformable_crop_and_resize(features, rois, offsets, 0.5, 6, 0.1, aligned)
    return plain, deformable


def test_inductor_compiles_forward_and_backward_on_cpu():
    """The CPU backward's feature gradient has the strides the fake kernel promises (it was
    channels-last against a contiguous fake: inductor's stride assertion failed)."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(30)
    features = torch.randn(2, 5, 12, 11, generator=g)
    rois = regular_rois(7, 2, 20.0, g, dtype=torch.float32)
    offsets = 0.3 * torch.randn(7, 2, 3, 3, generator=g)

    def loss(f, b, o):
        plain, deformable = _both_ops(f, b, o)
        return (plain * deformable).sum() + plain.pow(2).mean()

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    for layout in (torch.contiguous_format, torch.channels_last):
        results = []
        for fn in (loss, compiled):
            leaves = [
                features.detach().contiguous(memory_format=layout).requires_grad_(),
                rois.clone().requires_grad_(),
                offsets.clone().requires_grad_(),
            ]
            value = fn(*leaves)
            value.backward()
            assert all(leaf.grad is not None for leaf in leaves)
            results.append([value.detach()] + [leaf.grad for leaf in leaves])
        for eager, inductor in zip(*results):
            torch.testing.assert_close(inductor, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_backward_layout_matches_fake_kernel(layout):
    g = torch.Generator().manual_seed(31)
    base = torch.randn(2, 8, 9, 10, generator=g, dtype=torch.float64)
    features = {
        "contiguous": base,
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": torch.cat([base, base], dim=1)[:, ::2],
    }[layout]
    rois = regular_rois(5, 2, 18.0, g)
    offsets = torch.randn(5, 2, 2, 2, generator=g, dtype=torch.float64)
    grad = torch.randn(5, 8, 4, 4, generator=g, dtype=torch.float64)
    for mask in ([True, True], [True, False], [False, True]):
        real = ops._crop_and_resize_backward(grad, features, rois, 0.5, True, mask)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_inputs = [mode.from_tensor(t) for t in (grad, features, rois)]
            fake = ops._crop_and_resize_backward(*fake_inputs, 0.5, True, mask)
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
        real = ops._deformable_crop_and_resize_backward(
            grad, features, rois, offsets, 0.5, 0.1, True, mask + [mask[1]]
        )
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_inputs = [mode.from_tensor(t) for t in (grad, features, rois, offsets)]
            fake = ops._deformable_crop_and_resize_backward(
                *fake_inputs, 0.5, 0.1, True, mask + [mask[1]]
            )
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)
    assert real[0].stride() == torch.empty_like(features).stride()
    result = torch.library.opcheck(
        ops._crop_and_resize_backward.default, (grad, features, rois, 0.5, True, [True, True])
    )
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("channels", [65, 130])
def test_many_channels_against_reference(channels):
    """C > 64: several channel blocks per image, the last one ragged."""
    g = torch.Generator().manual_seed(32)
    features = torch.randn(2, channels, 9, 8, generator=g, dtype=torch.float64)
    rois = regular_rois(9, 2, 16.0, g)
    offsets = 0.5 * torch.randn(9, 2, 2, 2, generator=g, dtype=torch.float64)
    grad = torch.randn(9, channels, 4, 4, generator=g, dtype=torch.float64)
    results = []
    for op in (deformable_crop_and_resize, deformable_crop_and_resize_reference):
        leaves = [t.clone().requires_grad_() for t in (features, rois, offsets)]
        out = op(leaves[0], leaves[1], leaves[2], 0.5, 4, 0.1, True)
        out.backward(grad)
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for compiled, reference in zip(*results):
        torch.testing.assert_close(compiled, reference, rtol=1e-10, atol=1e-10)
    plain = crop_and_resize(features, rois, 0.5, 5, False)
    torch.testing.assert_close(
        plain, crop_and_resize_reference(features, rois, 0.5, 5, False), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize(
    "channels", [80, 8], ids=["blocks-per-thread", "fewer-blocks-than-threads"]
)
@pytest.mark.parametrize("images", [None, [1]], ids=["spread", "one-image-busy"])
def test_results_and_feature_gradients_do_not_depend_on_thread_count(images, channels):
    """Outputs and all gradients are bit-identical for 1, 2 and 3 threads: each feature
    gradient slice has one owner that walks its boxes in a fixed order, and each box's position
    gradient is summed by one task in a fixed order (the channel block of a feature-gradient
    work item shrinks with the thread count, which changes no sum). ``one-image-busy``: every
    box in image 1 of 3. 8 channels make one block, fewer than the threads: the work is split
    by (image, block) instead of by blocks."""
    g = torch.Generator().manual_seed(33)
    features = torch.randn(3, channels, 15, 13, generator=g)
    rois = regular_rois(40, 3, 26.0, g, dtype=torch.float32, images=images)
    offsets = 0.5 * torch.randn(40, 2, 3, 3, generator=g)
    grad = torch.randn(40, channels, 6, 6, generator=g)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_() for t in (features, rois, offsets)]
            plain, deformable = _both_ops(*leaves)
            torch.autograd.backward([plain, deformable], [grad, grad])
            results.append([plain, deformable] + [leaf.grad for leaf in leaves])
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        for first, value in zip(results[0], other):
            assert torch.equal(first, value)


@pytest.mark.parametrize(
    "layout,shape,num_boxes,size",
    [
        ("nchw", (1, 70, 40, 40), 3, 4),  # few samples against the map: read NCHW in place
        ("channels_last", (1, 70, 40, 40), 3, 4),  # channels-last input: read as it is
        ("copy_to_channels_last", (2, 70, 6, 7), 20, 5),  # many samples: one channels-last copy
    ],
)
@pytest.mark.parametrize("aligned", [False, True])
def test_both_kernel_layouts_against_reference(layout, shape, num_boxes, size, aligned):
    """The CPU kernels read NCHW features in place or channels-last (see
    csrc/common/crop_sampling_cpu.h); each path matches the reference, values and gradients."""
    from masklab_d2 import _C

    g = torch.Generator().manual_seed(37)
    features = torch.randn(*shape, generator=g, dtype=torch.float64)
    if layout == "channels_last":
        features = features.contiguous(memory_format=torch.channels_last)
    assert _C._cpu_layout(features, num_boxes, size * size) == layout
    rois = regular_rois(num_boxes, shape[0], 2.0 * shape[3], g)
    offsets = 0.5 * torch.randn(num_boxes, 2, 1, 1, generator=g, dtype=torch.float64)
    grad = torch.randn(num_boxes, shape[1], size, size, generator=g, dtype=torch.float64)
    results = []
    for op in (deformable_crop_and_resize, deformable_crop_and_resize_reference):
        leaves = [t.clone().requires_grad_() for t in (features, rois, offsets)]
        out = op(leaves[0], leaves[1], leaves[2], 0.5, size, 0.1, aligned)
        out.backward(grad)
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for compiled, reference in zip(*results):
        torch.testing.assert_close(compiled, reference, rtol=1e-10, atol=1e-10)
    assert results[0][1].stride() == torch.empty_like(features).stride()


@pytest.mark.parametrize(
    "dtype,ulp", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)], ids=["fp16", "bf16"]
)
def test_low_precision_backward_against_float64(dtype, ulp):
    """Half / bfloat16 backward accumulates in fp32 and rounds once: the feature gradient is
    within one ulp (relative) of float64 on the same rounded inputs. Many boxes overlap, so an
    accumulation in the low-precision dtype would be off by several ulps (checked below)."""
    g = torch.Generator().manual_seed(34)
    features = torch.randn(1, 4, 10, 10, generator=g).to(dtype)
    num_boxes = 300
    rois = torch.tensor([[0, 2.0, 2.0, 16.0, 16.0]]).repeat(num_boxes, 1)
    rois[:, 1:] += torch.rand(num_boxes, 4, generator=g) * 1.5  # all overlap the centre
    offsets = (0.3 * torch.randn(num_boxes, 2, 2, 2, generator=g)).to(dtype)
    grad = (torch.rand(num_boxes, 4, 6, 6, generator=g) + 0.5).to(dtype)
    leaves = [features.clone().requires_grad_(), rois.clone().requires_grad_()]
    leaves.append(offsets.clone().requires_grad_())
    deformable_crop_and_resize(leaves[0], leaves[1], leaves[2], 0.5, 6, 0.1, True).backward(grad)
    assert leaves[0].grad.dtype == dtype and leaves[1].grad.dtype == torch.float32
    assert leaves[2].grad.dtype == dtype

    exact = [t.double().requires_grad_() for t in (features, rois, offsets)]
    deformable_crop_and_resize(exact[0], exact[1], exact[2], 0.5, 6, 0.1, True).backward(
        grad.double()
    )
    reference = exact[0].grad

    def within_one_ulp(value):
        error = (value.double() - reference).abs()
        return bool((error <= ulp * reference.abs() + 1e-6 * reference.abs().max()).all())

    assert within_one_ulp(leaves[0].grad)
    # Box gradients are sums in fp32 of products of exactly representable values.
    torch.testing.assert_close(
        leaves[1].grad.double(), exact[1].grad, rtol=1e-4, atol=1e-4 * exact[1].grad.abs().max()
    )
    # The tolerance is tight enough: summing the per-box gradients in the low-precision dtype
    # (fewer roundings than a per-sample accumulation would make) falls outside it.
    low_precision_sum = torch.zeros_like(features)
    for k in range(num_boxes):
        single = features.double().requires_grad_()
        deformable_crop_and_resize(
            single, exact[1][k : k + 1].detach(), exact[2][k : k + 1].detach(), 0.5, 6, 0.1, True
        ).backward(grad[k : k + 1].double())
        low_precision_sum += single.grad.to(dtype)
    assert not within_one_ulp(low_precision_sum)


def test_layouts_in_backward():
    """Channels-last and sliced features give the same gradients to features, boxes and offsets
    (the position gradient reads the features, so it is the layout-dependent path)."""
    g = torch.Generator().manual_seed(35)
    base = torch.randn(2, 70, 12, 14, generator=g, dtype=torch.float64)
    strided = torch.randn(2, 140, 12, 14, generator=g, dtype=torch.float64)
    strided[:, ::2] = base
    rois = regular_rois(10, 2, 24.0, g)
    offsets = torch.randn(10, 2, 5, 5, generator=g, dtype=torch.float64)
    results = []
    for variant in (base, base.contiguous(memory_format=torch.channels_last), strided[:, ::2]):
        leaves = [variant.clone() if variant is base else variant, rois.clone(), offsets.clone()]
        leaves = [leaf.detach().requires_grad_() for leaf in leaves]
        if variant is not base:
            assert not leaves[0].is_contiguous()
        out = deformable_crop_and_resize(leaves[0], leaves[1], leaves[2], 0.5, 5, 0.1, True)
        out.pow(2).sum().backward()
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for other in results[1:]:
        for first, value in zip(results[0], other):
            torch.testing.assert_close(value, first, rtol=1e-12, atol=1e-12)


def test_mixed_dtypes_and_devices():
    features = torch.randn(1, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    offsets = torch.zeros(1, 2, 2, 2)
    with pytest.raises(RuntimeError, match="boxes are Double but features are Float"):
        crop_and_resize(features, rois.double(), 1.0, 4)
    with pytest.raises(RuntimeError, match="boxes are Half but features are Float"):
        crop_and_resize(features, rois.half(), 1.0, 4)
    with pytest.raises(RuntimeError, match="offsets are Double but features are Float"):
        deformable_crop_and_resize(features, rois, offsets.double(), 1.0, 4)
    with pytest.raises(RuntimeError, match="boxes are Double but features are BFloat16"):
        crop_and_resize(features.bfloat16(), rois.double(), 1.0, 4)
    # float32 geometry with half features is the AMP case: accepted, gradients in each dtype.
    for dtype in (torch.float16, torch.bfloat16):
        leaves = [features.to(dtype).requires_grad_(), rois.clone().requires_grad_()]
        leaves.append(offsets.clone().requires_grad_())
        deformable_crop_and_resize(*leaves, 1.0, 4).float().sum().backward()
        assert [leaf.grad.dtype for leaf in leaves] == [dtype, torch.float32, torch.float32]
    # Another device (meta stands in for a GPU here; test_ops_cuda.py checks CPU vs CUDA).
    with pytest.raises(RuntimeError, match="boxes are on meta but features are on cpu"):
        crop_and_resize(features, rois.to("meta"), 1.0, 4)
    with pytest.raises(RuntimeError, match="offsets are on meta but features are on cpu"):
        deformable_crop_and_resize(features, rois, offsets.to("meta"), 1.0, 4)


def test_deterministic_mode_on_cpu():
    """The CPU backward has no atomics: deterministic mode neither warns nor raises, and two
    runs agree bit for bit."""
    g = torch.Generator().manual_seed(36)
    features = torch.randn(2, 6, 10, 10, generator=g)
    rois = regular_rois(12, 2, 18.0, g, dtype=torch.float32)
    offsets = torch.randn(12, 2, 2, 2, generator=g)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (features, rois, offsets)]
            sum(o.sum() for o in _both_ops(*leaves)).backward()
            runs.append([leaf.grad for leaf in leaves])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(2, 3, 0, 5), (2, 3, 4, 0)])
def test_empty_maps_read_zero(shape):
    features = torch.randn(*shape, requires_grad=True)
    rois = torch.tensor([[0, -1.0, -1.0, 3.0, 3.0], [1, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    offsets = torch.randn(2, 2, 1, 1, requires_grad=True)
    for aligned in (False, True):
        plain, deformable = (
            crop_and_resize(features, rois, 1.0, 3, aligned),
            deformable_crop_and_resize(features, rois, offsets, 1.0, 3, 0.1, aligned),
        )
        assert torch.equal(plain, torch.zeros(2, 3, 3, 3))
        assert torch.equal(deformable, torch.zeros(2, 3, 3, 3))
        (plain.sum() + deformable.sum()).backward()
        assert torch.equal(rois.grad, torch.zeros_like(rois))
        assert torch.equal(offsets.grad, torch.zeros_like(offsets))
