"""The crop ops at the map border: ``aligned=True`` follows RoIAlign's border rule (a sample within
one pixel outside the map reads the border value, farther out 0), ``aligned=False`` stays
TensorFlow's (0 outside the map). Checked against torchvision's roi_align, the grid_sample
references and gradcheck."""

import pytest
import torch
from torchvision.ops import roi_align

from masklab_d2.layers import (
    crop_and_resize,
    crop_and_resize_reference,
    deformable_crop_and_resize,
    deformable_crop_and_resize_reference,
)
from masklab_d2.layers.crop_and_resize import sample_positions_reference


def _roi_align_equivalent_boxes(rois: torch.Tensor, size: int) -> torch.Tensor:
    """Crop boxes that sample exactly where roi_align(rois, size, sampling_ratio=1) does.

    roi_align's one sample per bin sits at the bin centre, X1 + (j + 0.5) (X2 - X1) / S; the crop
    samples the box edges, x1 + j (x2 - x1) / (S - 1). Shrinking the box by half a bin per side
    makes the two lattices coincide (for S = 1 both sample the centre).
    """
    half_bin = (rois[:, 3:5] - rois[:, 1:3]) / (2 * size)
    return torch.cat([rois[:, :1], rois[:, 1:3] + half_bin, rois[:, 3:5] - half_bin], dim=1)


def _edge_rois(height: int, width: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Boxes (input pixels) whose edges lie on, just inside, just outside and far outside the
    borders of an H x W map at ``scale``, in both images of a batch of 2."""
    # Edge positions in feature pixels (aligned: the image border is at -0.5 and size - 0.5).
    near_low = [-2.5, -1.3, -0.5, -0.2, 0.0, 0.4, 1.7]
    rows = []
    for i in range(48):
        choice = torch.randint(len(near_low), (4,), generator=generator).tolist()
        x1, y1 = near_low[choice[0]], near_low[choice[1]]
        x2 = width - 1 - near_low[choice[2]]
        y2 = height - 1 - near_low[choice[3]]
        jitter = (torch.rand(4, generator=generator, dtype=torch.float64) * 0.1).tolist()
        box = [x1 + jitter[0], y1 + jitter[1], x2 - jitter[2], y2 - jitter[3]]
        if i % 4 == 1:  # only one edge at the border, the other inside
            box[2], box[3] = box[0] + width / 3, box[1] + height / 4
        if i % 4 == 2:  # a thin box along the bottom-right border
            box[0], box[1] = box[2] - 1.5, box[3] - 0.7
        # feature X = x * scale - 0.5  ->  x = (X + 0.5) / scale
        rows.append([float(i % 2)] + [(c + 0.5) / scale for c in box])
    return torch.tensor(rows, dtype=torch.float64)


def test_issue_repro_all_ones_box_on_the_border():
    """All-ones 16x16, box (0, 0, 8, 8), crop 8, aligned: no row or column reads 0."""
    features = torch.ones(1, 1, 16, 16)
    box = torch.tensor([[0, 0.0, 0.0, 8.0, 8.0]])
    crop = crop_and_resize(features, box, 1.0, 8, aligned=True)
    torch.testing.assert_close(crop, torch.ones(1, 1, 8, 8), rtol=0, atol=0)
    torch.testing.assert_close(crop, roi_align(features, box, 8, 1.0, 1, True))
    # TensorFlow's convention is unchanged: the outer samples at -0.5 read 0 there only when
    # aligned; unaligned, the same box starts exactly on the first pixel centre.
    torch.testing.assert_close(
        crop_and_resize(features, box, 1.0, 8, aligned=False), torch.ones(1, 1, 8, 8)
    )


@pytest.mark.parametrize("size", [1, 2, 7, 14])
@pytest.mark.parametrize("kind", ["ones", "random"])
def test_aligned_matches_roi_align_at_the_border(size, kind):
    """Forward and feature gradient of edge boxes equal roi_align(aligned, sampling_ratio=1)."""
    g = torch.Generator().manual_seed(20 + size)
    height, width, scale = 11, 13, 0.5
    if kind == "ones":
        features = torch.ones(2, 3, height, width, dtype=torch.float64)
    else:
        features = torch.randn(2, 3, height, width, generator=g, dtype=torch.float64)
    rois = _edge_rois(height, width, scale, g)
    crop_boxes = _roi_align_equivalent_boxes(rois, size)
    grad = torch.randn(rois.shape[0], 3, size, size, generator=g, dtype=torch.float64)
    results = []
    for op, boxes in [
        (lambda f, b: roi_align(f, b, size, scale, 1, True), rois),
        (lambda f, b: crop_and_resize(f, b, scale, size, aligned=True), crop_boxes),
        (lambda f, b: crop_and_resize_reference(f, b, scale, size, aligned=True), crop_boxes),
        (
            lambda f, b: deformable_crop_and_resize(
                f, b, torch.zeros(b.shape[0], 2, 1, 1, dtype=b.dtype), scale, size, 0.1, True
            ),
            crop_boxes,
        ),
    ]:
        leaf = features.clone().requires_grad_()
        out = op(leaf, boxes)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    if kind == "ones":
        # Sanity: some boxes do reach beyond the border and some samples lie beyond the margin.
        assert (results[0][0] == 1).any() and (results[0][0] == 0).any()
    for out, feature_grad in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=1e-12)
        torch.testing.assert_close(feature_grad, results[0][1], rtol=0, atol=1e-12)


def test_unaligned_keeps_tensorflow_zeros_outside():
    """aligned=False: a sample half a pixel outside reads 0 (TensorFlow), not the border."""
    features = torch.ones(1, 1, 6, 6, dtype=torch.float64)
    box = torch.tensor([[0, -0.5, 2.0, 5.5, 2.0]], dtype=torch.float64)  # x from -0.5 to 5.5
    row = crop_and_resize(features, box, 1.0, (1, 7), aligned=False)[0, 0, 0]
    torch.testing.assert_close(row, torch.tensor([0.0, 1, 1, 1, 1, 1, 0], dtype=torch.float64))
    # The same feature positions with the aligned convention (+0.5 input pixels) read the border
    # value within one pixel outside, and 0 beyond.
    aligned = crop_and_resize(
        features, box + torch.tensor([0, 0.5, 0.5, 0.5, 0.5]), 1.0, (1, 7), True
    )
    torch.testing.assert_close(aligned[0, 0, 0], torch.ones(7, dtype=torch.float64))
    far = torch.tensor([[0, -1.2, 2.5, 7.7, 2.5]], dtype=torch.float64)  # X from -1.7 to 7.2
    row = crop_and_resize(features, far, 1.0, (1, 2), aligned=True)[0, 0, 0]
    torch.testing.assert_close(row, torch.zeros(2, dtype=torch.float64))


def test_border_gradient_goes_to_the_border_pixel():
    """A sample in [-1, 0) x (W - 1, W] reads, and sends its gradient to, the corner pixel."""
    features = torch.arange(30.0, dtype=torch.float64).view(1, 1, 5, 6).requires_grad_()
    # Feature position (y, x) = (-0.6, 5.4): clamped to (0, 5).
    box = torch.tensor([[0, 5.9, -0.1, 5.9, -0.1]], dtype=torch.float64, requires_grad=True)
    out = crop_and_resize(features, box, 1.0, 1, aligned=True)
    assert out.item() == 5.0
    out.sum().backward()
    expected = torch.zeros(1, 1, 5, 6, dtype=torch.float64)
    expected[0, 0, 0, 5] = 1
    torch.testing.assert_close(features.grad, expected, rtol=0, atol=0)
    # Both axes are clamped, so the value does not depend on the box position.
    torch.testing.assert_close(box.grad, torch.zeros_like(box), rtol=0, atol=0)


def _assert_away_from_kinks(y, x, height, width, distance=1e-3):
    """gradcheck's finite differences need every sample away from the rule's kinks: the clamp
    points 0 and size - 1, the cut-offs -1 and size, and the integer grid lines."""
    for coordinate, size in ((y, height), (x, width)):
        inside = (coordinate > -1) & (coordinate < size)
        frac = coordinate - coordinate.round()
        assert (frac.abs()[inside] > distance).all()
        assert ((coordinate + 1).abs() > distance).all() and (
            (coordinate - size).abs() > distance
        ).all()


def _with_batch_index(batch_index, coordinates):
    return torch.cat([batch_index[:, None], coordinates], dim=1)


def test_gradcheck_at_the_border():
    g = torch.Generator().manual_seed(21)
    height, width = 6, 7
    features = torch.randn(2, 2, height, width, generator=g, dtype=torch.float64)
    batch_index = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    # Aligned, scale 1: feature X = x - 0.5. Edges in the clamp zones [-1, 0) and (size-1, size],
    # one box reaching beyond the margin, one flipped.
    coordinates = torch.tensor(
        [
            [0.2, -0.25, 7.13, 6.2],
            [-0.35, 0.27, 3.3, 6.33],
            [-1.1, 2.3, 4.37, 5.9],
            [6.85, 5.85, 0.15, 0.42],
        ],
        dtype=torch.float64,
    )
    y, x = sample_positions_reference(
        _with_batch_index(batch_index, coordinates), 1.0, (3, 4), True
    )
    _assert_away_from_kinks(y, x, height, width)
    assert ((y > -1) & (y < 0)).any() and ((x > width - 1) & (x < width)).any()
    assert (x < -1).any()
    inputs = (features.requires_grad_(), coordinates.requires_grad_())
    assert torch.autograd.gradcheck(
        lambda f, c: crop_and_resize(f, _with_batch_index(batch_index, c), 1.0, (3, 4), True),
        inputs,
    )
    assert torch.autograd.gradcheck(
        lambda f, c: crop_and_resize_reference(
            f, _with_batch_index(batch_index, c), 1.0, (3, 4), True
        ),
        inputs,
    )


def test_gradcheck_deformable_at_the_border():
    g = torch.Generator().manual_seed(22)
    height, width = 6, 7
    features = torch.randn(1, 2, height, width, generator=g, dtype=torch.float64)
    batch_index = torch.zeros(2, dtype=torch.float64)
    coordinates = torch.tensor([[0.2, -0.25, 7.1, 6.2], [-0.3, 0.3, 6.8, 3.3]], dtype=torch.float64)
    # Offsets push sub-boxes across the border and into the clamp zones.
    offsets = torch.tensor(
        [[[[-0.4, 0.37], [0.21, 0.6]], [[0.33, -0.3], [0.52, -0.24]]]] * 2, dtype=torch.float64
    )
    y, x = sample_positions_reference(
        _with_batch_index(batch_index, coordinates), 1.0, (4, 4), True, offsets, 0.1
    )
    _assert_away_from_kinks(y, x, height, width)
    assert ((y > -1) & (y < 0)).any() and ((x > width - 1) & (x < width)).any()
    inputs = tuple(t.requires_grad_() for t in (features, coordinates, offsets))
    assert torch.autograd.gradcheck(
        lambda f, c, o: deformable_crop_and_resize(
            f, _with_batch_index(batch_index, c), o, 1.0, 4, 0.1, True
        ),
        inputs,
    )
    # And the compiled op equals its reference there, values and all three gradients.
    grads = []
    for op in (deformable_crop_and_resize, deformable_crop_and_resize_reference):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = op(leaves[0], _with_batch_index(batch_index, leaves[1]), leaves[2], 1.0, 4, 0.1, True)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out).cos())
        grads.append([out.detach()] + [leaf.grad for leaf in leaves])
    for compiled, reference in zip(*grads):
        torch.testing.assert_close(compiled, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("aligned", [False, True])
def test_deformable_matches_reference_at_the_border(aligned):
    g = torch.Generator().manual_seed(23)
    height, width, scale = 9, 10, 0.5
    features = torch.randn(2, 4, height, width, generator=g, dtype=torch.float64)
    rois = _edge_rois(height, width, scale, g)
    offsets = 0.5 * torch.randn(rois.shape[0], 2, 2, 2, generator=g, dtype=torch.float64)
    out = deformable_crop_and_resize(features, rois, offsets, scale, 6, 0.1, aligned)
    ref = deformable_crop_and_resize_reference(features, rois, offsets, scale, 6, 0.1, aligned)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
