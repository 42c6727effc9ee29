"""The compiled crop ops against their pure-PyTorch references, TensorFlow semantics, gradients,
layouts, dtypes, bad input and torch.library registration."""

import subprocess
import sys

import pytest
import torch
from helpers import awkward_rois

from masklab_d2.layers import (
    CropAndResize,
    DeformableCropAndResize,
    crop_and_resize,
    crop_and_resize_reference,
    deformable_crop_and_resize,
    deformable_crop_and_resize_reference,
)
from masklab_d2.layers._ops import ops


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("crop_size", [1, 2, (5, 3), 7, 14])
def test_crop_and_resize_matches_reference(crop_size, aligned):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 4, 13, 17, generator=g, dtype=torch.float64)
    rois = awkward_rois(36, 3, extent=34.0, generator=g)
    out = crop_and_resize(features, rois, 0.5, crop_size, aligned)
    ref = crop_and_resize_reference(features, rois, 0.5, crop_size, aligned)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid,output_size", [(1, 3), (2, 4), (2, (6, 4)), (7, 14)])
def test_deformable_matches_reference(grid, output_size):
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 11, 9, generator=g, dtype=torch.float64)
    rois = awkward_rois(24, 2, extent=20.0, generator=g)
    offsets = torch.randn(24, 2, grid, grid, generator=g, dtype=torch.float64)
    for aligned in (False, True):
        out = deformable_crop_and_resize(features, rois, offsets, 0.5, output_size, 0.1, aligned)
        ref = deformable_crop_and_resize_reference(
            features, rois, offsets, 0.5, output_size, 0.1, aligned
        )
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_tensorflow_sampling_semantics():
    """Samples on the box edges, the centre for size 1, zeros outside, flips for flipped boxes."""
    height, width = 8, 10
    ys, xs = torch.meshgrid(
        torch.arange(height.__float__()), torch.arange(width.__float__()), indexing="ij"
    )
    ramp = (xs + 10 * ys)[None, None].double()  # bilinear interpolation of a linear map is exact
    box = torch.tensor([[0, 1.0, 2.0, 5.0, 6.0]], dtype=torch.float64)
    crop = crop_and_resize(ramp, box, 1.0, 3)[0, 0]
    expected = torch.tensor([[21.0, 23, 25], [41, 43, 45], [61, 63, 65]], dtype=torch.float64)
    torch.testing.assert_close(crop, expected)
    # S = 1 samples exactly the box centre: (x, y) = (3, 4).
    assert crop_and_resize(ramp, box, 1.0, 1).item() == pytest.approx(43.0)
    # Odd S: the middle sample is the centre.
    assert crop_and_resize(ramp, box, 1.0, 41)[0, 0, 20, 20].item() == pytest.approx(43.0)
    # Flipped box -> flipped crop.
    flipped = torch.tensor([[0, 5.0, 6.0, 1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(crop_and_resize(ramp, flipped, 1.0, 3)[0, 0], expected.flip(0, 1))
    # Spatial scale: the same box in a 2x larger input.
    torch.testing.assert_close(
        crop_and_resize(ramp, box * torch.tensor([1, 2, 2, 2, 2]), 0.5, 3)[0, 0], expected
    )
    # Half-pixel convention: coordinates shift by -0.5 feature pixels.
    aligned = crop_and_resize(
        ramp, box + torch.tensor([0, 0.5, 0.5, 0.5, 0.5]), 1.0, 3, aligned=True
    )
    torch.testing.assert_close(aligned[0, 0], expected)
    # Samples beyond the map read exactly zero, with no clamping; the last pixel is still inside.
    straddle = torch.tensor([[0, 7.0, 0.0, 11.0, 0.0]], dtype=torch.float64)
    row = crop_and_resize(ramp, straddle, 1.0, (1, 5))[0, 0, 0]
    torch.testing.assert_close(row, torch.tensor([7.0, 8.0, 9.0, 0.0, 0.0], dtype=torch.float64))


def test_deformable_zero_offsets_equal_plain_and_offsets_shift_groups():
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 5, 16, 16, generator=g)
    rois = torch.tensor([[0, 2.0, 3.0, 20.0, 17.0], [1, 5.0, 1.0, 9.0, 30.0]])
    plain = crop_and_resize(features, rois, 0.5, 8)
    zero = deformable_crop_and_resize(features, rois, torch.zeros(2, 2, 4, 4), 0.5, 8)
    assert torch.equal(plain, zero)
    # On a ramp in x, an x-offset of 1 on group (0, 1) moves its samples by gamma * box_w.
    ramp = torch.arange(32.0).repeat(32, 1)[None, None]
    box = torch.tensor([[0, 4.0, 4.0, 20.0, 20.0]])
    offsets = torch.zeros(1, 2, 2, 2)
    offsets[0, 0, 0, 1] = 1.0
    shifted = deformable_crop_and_resize(ramp, box, offsets, 1.0, 4, gamma=0.1)
    base = crop_and_resize(ramp, box, 1.0, 4)
    delta = shifted - base
    torch.testing.assert_close(delta[0, 0, :2, 2:], torch.full((2, 2), 0.1 * 16))
    assert delta[0, 0, 2:].abs().max() == 0 and delta[0, 0, :, :2].abs().max() == 0


def test_empty_inputs():
    features = torch.randn(2, 3, 8, 8, requires_grad=True)
    rois = torch.zeros(0, 5, requires_grad=True)
    out = crop_and_resize(features, rois, 1.0, 7)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))
    offsets = torch.zeros(0, 2, 7, 7, requires_grad=True)
    features.grad = None
    out = deformable_crop_and_resize(features, rois.detach(), offsets, 1.0, 7)
    assert out.shape == (0, 3, 7, 7)
    out.sum().backward()
    assert torch.equal(features.grad, torch.zeros_like(features))
    assert offsets.grad is not None and offsets.grad.shape == (0, 2, 7, 7)


def _with_batch_index(batch_index, coordinates):
    """gradcheck perturbs every input element; keep the (integer) batch index out of it."""
    return torch.cat([batch_index[:, None], coordinates], dim=1)


def test_gradcheck_features_and_boxes():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64, requires_grad=True)
    # Boxes whose samples stay away from the map border, where the in/out switch is discontinuous.
    batch_index = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    coordinates = torch.tensor(
        [[1.3, 2.1, 9.7, 10.2], [11.1, 9.4, 3.2, 1.7], [6.3, 4.1, 6.3, 8.9]],
        dtype=torch.float64,
        requires_grad=True,
    )
    for aligned in (False, True):
        assert torch.autograd.gradcheck(
            lambda f, c: crop_and_resize(
                f, _with_batch_index(batch_index, c), 0.5, (3, 4), aligned
            ),
            (features, coordinates),
        )


def test_gradcheck_deformable_offsets():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(1, 2, 9, 9, generator=g, dtype=torch.float64, requires_grad=True)
    batch_index = torch.zeros(2, dtype=torch.float64)
    coordinates = torch.tensor(
        [[3.3, 4.1, 12.7, 13.2], [11.1, 12.4, 5.2, 4.7]], dtype=torch.float64, requires_grad=True
    )
    offsets = (0.5 * torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, c, o: deformable_crop_and_resize(
            f, _with_batch_index(batch_index, c), o, 0.5, 4, 0.1
        ),
        (features, coordinates, offsets),
    )


def test_gradients_match_reference():
    g = torch.Generator().manual_seed(5)
    features = torch.randn(3, 6, 12, 10, generator=g, dtype=torch.float64)
    rois = awkward_rois(30, 3, extent=20.0, generator=g)
    offsets = torch.randn(30, 2, 3, 3, generator=g, dtype=torch.float64)
    grads = []
    for op in (deformable_crop_and_resize, deformable_crop_and_resize_reference):
        leaves = [t.clone().requires_grad_() for t in (features, rois, offsets)]
        out = op(leaves[0], leaves[1], leaves[2], 0.5, 6, 0.1, True)
        out.backward(
            torch.ones_like(out) + torch.arange(out.numel(), dtype=out.dtype).view_as(out) % 7
        )
        grads.append([leaf.grad for leaf in leaves])
    for compiled, reference in zip(*grads):
        torch.testing.assert_close(compiled, reference, rtol=1e-10, atol=1e-10)
    assert torch.all(grads[0][1][:, 0] == 0)  # no gradient to the batch index


def test_non_contiguous_and_channels_last_inputs():
    g = torch.Generator().manual_seed(6)
    features = torch.randn(2, 8, 12, 14, generator=g)
    rois = awkward_rois(10, 2, extent=24.0, generator=g, dtype=torch.float32)
    expected = crop_and_resize(features, rois, 0.5, 5)
    channels_last = features.contiguous(memory_format=torch.channels_last)
    strided = torch.randn(2, 16, 12, 14, generator=g)
    strided[:, ::2] = features
    transposed_rois = rois.t().contiguous().t()
    for variant in (channels_last, strided[:, ::2]):
        assert not variant.is_contiguous()
        torch.testing.assert_close(crop_and_resize(variant, rois, 0.5, 5), expected)
    assert not transposed_rois.is_contiguous()
    torch.testing.assert_close(crop_and_resize(features, transposed_rois, 0.5, 5), expected)
    # Gradients do not depend on the input layout either.
    grads = []
    for variant in (features, channels_last):
        leaf = variant.clone().requires_grad_()
        deformable_crop_and_resize(leaf, rois, torch.ones(10, 2, 5, 5), 0.5, 5).pow(
            2
        ).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype):
    g = torch.Generator().manual_seed(7)
    features = torch.randn(2, 4, 10, 10, generator=g)
    rois = awkward_rois(12, 2, extent=16.0, generator=g, dtype=torch.float32)
    out = crop_and_resize(features.to(dtype), rois, 0.5, 7)
    assert out.dtype == dtype
    reference = crop_and_resize_reference(features.to(dtype).double(), rois.double(), 0.5, 7)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.double(), reference, rtol=tolerance, atol=tolerance * 4)


def test_list_of_boxes_and_modules():
    g = torch.Generator().manual_seed(8)
    features = torch.randn(2, 3, 9, 9, generator=g)
    per_image = [
        torch.tensor([[1.0, 1.0, 6.0, 7.0]]),
        torch.tensor([[0.0, 2.0, 3.0, 8.0], [2.0, 2.0, 5.0, 5.0]]),
    ]
    rois = torch.tensor([[0, 1.0, 1.0, 6.0, 7.0], [1, 0.0, 2.0, 3.0, 8.0], [1, 2.0, 2.0, 5.0, 5.0]])
    torch.testing.assert_close(
        crop_and_resize(features, per_image, 1.0, 4), crop_and_resize(features, rois, 1.0, 4)
    )
    module = CropAndResize(4, 1.0)
    assert repr(module) == "CropAndResize(crop_size=(4, 4), spatial_scale=1.0, aligned=False)"
    torch.testing.assert_close(module(features, rois), crop_and_resize(features, rois, 1.0, 4))
    deformable = DeformableCropAndResize(4, 1.0, grid=2)
    assert "grid=2" in repr(deformable) and "gamma=0.1" in repr(deformable)
    torch.testing.assert_close(
        deformable(features, rois, torch.zeros(3, 2, 2, 2)), module(features, rois)
    )
    with pytest.raises(ValueError, match="divisible"):
        DeformableCropAndResize(5, 1.0, grid=2)
    with pytest.raises(ValueError, match=r"\[K, 2, 2, 2\]"):
        deformable(features, rois, torch.zeros(3, 2, 4, 4))


@pytest.mark.parametrize(
    "make_args,message",
    [
        (lambda f, b: (f[0], b), "4-D"),
        (lambda f, b: (f, b[:, :4]), r"\[K, 5\]"),
        (lambda f, b: (f, b[0]), r"\[K, 5\]"),
        (lambda f, b: (f, b.index_fill(1, torch.tensor([0]), 2.0)), "batch indices"),
        (lambda f, b: (f, b.index_fill(1, torch.tensor([0]), -1.0)), "batch indices"),
        (lambda f, b: (f, b.index_fill(1, torch.tensor([0]), 0.5)), "batch indices"),
        (lambda f, b: (f, b.index_fill(1, torch.tensor([3]), float("nan"))), "NaN"),
        (lambda f, b: (f, b.index_fill(1, torch.tensor([2]), float("inf"))), "NaN or infinite"),
        (lambda f, b: (f.long(), b), "floating point"),
        (lambda f, b: (f, b.long()), "floating point"),
    ],
)
def test_bad_input_raises_clear_errors(make_args, message):
    features = torch.randn(2, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0], [1, 2.0, 2.0, 6.0, 7.0]])
    args = make_args(features, rois)
    with pytest.raises(RuntimeError, match=message):
        crop_and_resize(*args, 1.0, 4)


def test_bad_offsets_raise_clear_errors():
    features = torch.randn(1, 3, 8, 8)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(RuntimeError, match="divisible"):
        deformable_crop_and_resize(features, rois, torch.zeros(1, 2, 3, 3), 1.0, 4)
    with pytest.raises(RuntimeError, match=r"\[K, 2, G, G\]"):
        deformable_crop_and_resize(features, rois, torch.zeros(2, 2, 2, 2), 1.0, 4)
    with pytest.raises(RuntimeError, match="offsets contain NaN"):
        deformable_crop_and_resize(features, rois, torch.full((1, 2, 2, 2), float("nan")), 1.0, 4)
    with pytest.raises(RuntimeError, match="output size must be positive"):
        crop_and_resize(features, rois, 1.0, 0)
    with pytest.raises(ValueError, match=r"boxes\[0\] must be a \[K_i, 4\]"):
        crop_and_resize(features, [torch.zeros(2, 5)], 1.0, 4)


def test_opcheck():
    g = torch.Generator().manual_seed(9)
    features = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(
        [[0, 1.0, 2.0, 9.0, 8.0], [1, 7.0, 1.0, 2.0, 6.0], [1, 3.0, 3.0, 3.5, 12.0]],
        dtype=torch.float64,
        requires_grad=True,
    )
    offsets = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    for args in [(features, rois, 0.5, 5, 3, False), (features, rois, 1.0, 1, 1, True)]:
        result = torch.library.opcheck(ops.crop_and_resize.default, args)
        assert set(result.values()) == {"SUCCESS"}, result
    result = torch.library.opcheck(
        ops.deformable_crop_and_resize.default, (features, rois, offsets, 0.5, 4, 6, 0.1, True)
    )
    assert set(result.values()) == {"SUCCESS"}, result


def test_missing_extension_error_says_how_to_build():
    code = (
        "import sys; sys.modules['masklab_d2._C'] = None\n"
        "import torch\n"
        "from masklab_d2.layers import crop_and_resize, crop_and_resize_reference\n"
        "f = torch.zeros(1, 1, 4, 4); b = torch.tensor([[0., 0., 0., 3., 3.]])\n"
        "assert crop_and_resize_reference(f, b, 1.0, 2).shape == (1, 1, 2, 2)\n"
        "try:\n"
        "    crop_and_resize(f, b, 1.0, 2)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "pip install --no-build-isolation -e ." in result.stdout


def test_layers_import_without_detectron2():
    code = (
        "import sys; sys.modules['detectron2'] = None\n"
        "import masklab_d2, masklab_d2.layers\n"
        "assert not any(m.startswith('detectron2') and sys.modules[m] is not None for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# CUDA tests: tests/ops/test_ops_cuda.py
