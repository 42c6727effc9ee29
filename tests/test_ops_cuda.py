"""The crop ops on CUDA: equal to the CPU kernels, low precision, edge cases, no host sync,
the deterministic-algorithms alert, device-side checks and 64-bit indexing. Skipped where there
is no GPU; ``python3 -m masklab_d2.tools.gpu_check`` runs them on a GPU machine."""

import subprocess
import sys

import pytest
import torch

from masklab_d2.layers import (
    crop_and_resize,
    crop_and_resize_reference,
    deformable_crop_and_resize,
)

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def _built_with_cuda():
    from masklab_d2.layers._ops import compiled_with_cuda

    assert compiled_with_cuda(), "a GPU is present but masklab_d2._C was built without CUDA"


def _rois(num_boxes, batch_size, extent, generator, dtype=torch.float64):
    """Boxes inside, across and far outside the map, zero-size and flipped."""
    xy = torch.rand(num_boxes, 2, generator=generator, dtype=dtype) * 1.5 * extent - extent / 4
    wh = (torch.rand(num_boxes, 2, generator=generator, dtype=dtype) - 0.2) * extent / 2
    wh[::7] = 0
    index = torch.arange(num_boxes, dtype=dtype)[:, None] % batch_size
    return torch.cat([index, xy, xy + wh], dim=1)


def _run(device, features, rois, offsets, aligned, grad_seed=0):
    leaves = [t.to(device).requires_grad_() for t in (features, rois, offsets)]
    deformable = deformable_crop_and_resize(leaves[0], leaves[1], leaves[2], 0.5, 8, 0.1, aligned)
    plain = crop_and_resize(leaves[0], leaves[1], 0.5, 7, aligned)
    (deformable.sin().sum() + plain.cos().sum()).backward()
    return [deformable, plain] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("aligned", [False, True])
def test_cpu_and_cuda_agree_float64(aligned):
    g = torch.Generator().manual_seed(40)
    features = torch.randn(3, 70, 20, 24, generator=g, dtype=torch.float64)
    rois = _rois(64, 3, 40.0, g)
    offsets = torch.randn(64, 2, 2, 2, generator=g, dtype=torch.float64)
    cpu = _run("cpu", features, rois, offsets, aligned)
    cuda = _run("cuda", features, rois, offsets, aligned)
    for c, d in zip(cpu, cuda):
        torch.testing.assert_close(d.cpu(), c, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "dtype,ulp", [(torch.float16, 2.0**-10), (torch.bfloat16, 2.0**-7)], ids=["fp16", "bf16"]
)
def test_low_precision_forward_and_backward(dtype, ulp):
    """fp32 accumulation, one rounding: within one ulp of float64 on the same rounded inputs,
    with 300 overlapping boxes so that an fp16 accumulation would not be."""
    g = torch.Generator().manual_seed(41)
    features = torch.randn(1, 4, 10, 10, generator=g).to(dtype)
    rois = torch.tensor([[0, 2.0, 2.0, 16.0, 16.0]]).repeat(300, 1)
    rois[:, 1:] += torch.rand(300, 4, generator=g) * 1.5
    grad = (torch.rand(300, 4, 6, 6, generator=g) + 0.5).to(dtype)
    leaf = features.cuda().requires_grad_()
    out = crop_and_resize(leaf, rois.cuda(), 0.5, 6, True)
    out.backward(grad.cuda())
    exact = features.double().requires_grad_()
    reference = crop_and_resize(exact, rois.double(), 0.5, 6, True)
    reference.backward(grad.double())
    for value, ref in ((out, reference), (leaf.grad, exact.grad)):
        error = (value.detach().double().cpu() - ref.detach()).abs()
        assert (error <= ulp * ref.detach().abs() + 1e-6 * ref.detach().abs().max()).all()


def test_non_finite_values_do_not_leak_into_outside_samples():
    """An inf at the map's first element: samples outside the map read 0 (not 0 * inf)."""
    features = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    features[0, :, 0, 0] = float("inf")
    rois = torch.tensor(
        [[0, 20.0, 20.0, 30.0, 30.0], [0, -9.0, 3.0, -4.0, 6.0], [0, 2.0, 2.0, 6.0, 6.0]],
        dtype=torch.float64,
    )
    for aligned in (False, True):
        cpu = crop_and_resize(features, rois, 1.0, 4, aligned)
        cuda = crop_and_resize(features.cuda(), rois.cuda(), 1.0, 4, aligned).cpu()
        assert torch.equal(cpu, cuda) and torch.isfinite(cuda).all()


@pytest.mark.parametrize("shape", [(2, 3, 0, 5), (2, 3, 4, 0), (2, 0, 4, 4)])
def test_empty_maps_and_no_boxes(shape):
    features = torch.randn(*shape, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, -1.0, -1.0, 3.0, 3.0], [1, 0.0, 0.0, 2.0, 2.0]], device="cuda")
    out = crop_and_resize(features, rois, 1.0, 3, True)
    assert out.shape == (2, shape[1], 3, 3) and (out == 0).all()
    out.sum().backward()
    none = crop_and_resize(features, rois[:0], 1.0, 3, True)
    assert none.shape == (0, shape[1], 3, 3)
    torch.cuda.synchronize()


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts_on_cuda(layout):
    g = torch.Generator().manual_seed(42)
    base = torch.randn(2, 8, 12, 14, generator=g, dtype=torch.float64)
    variant = (
        base.contiguous(memory_format=torch.channels_last)
        if layout == "channels_last"
        else torch.cat([base, base], 1)[:, ::2]
    )
    rois = _rois(10, 2, 24.0, g)
    offsets = torch.randn(10, 2, 2, 2, generator=g, dtype=torch.float64)
    expected = _run("cpu", base, rois, offsets, True)
    leaves = [variant.cuda().requires_grad_(), rois.cuda(), offsets.cuda()]
    leaves = [leaves[0]] + [t.requires_grad_() for t in leaves[1:]]
    out = deformable_crop_and_resize(leaves[0], leaves[1], leaves[2], 0.5, 8, 0.1, True)
    plain = crop_and_resize(leaves[0], leaves[1], 0.5, 7, True)
    (out.sin().sum() + plain.cos().sum()).backward()
    assert leaves[0].grad.stride() == torch.empty_like(leaves[0]).stride()
    for c, d in zip(expected, [out, plain] + [leaf.grad for leaf in leaves]):
        torch.testing.assert_close(d.cpu(), c, rtol=1e-9, atol=1e-9)


def test_no_host_sync():
    """Forward and backward never synchronise with the host (no .cpu() value checks)."""
    features = torch.randn(2, 8, 16, 16, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 12.0], [1, 3.0, 2.0, 14.0, 6.0]], device="cuda")
    rois.requires_grad_()
    offsets = torch.zeros(2, 2, 2, 2, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = deformable_crop_and_resize(features, rois, offsets, 1.0, 4, 0.1, True)
        grads = torch.autograd.grad(out.sum(), [features, rois, offsets])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(g is not None for g in grads)


def test_deterministic_mode_alerts():
    """The feature gradient uses atomics: deterministic mode raises as for roi_align."""
    features = torch.randn(1, 2, 8, 8, device="cuda", requires_grad=True)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device="cuda")
    out = crop_and_resize(features, rois, 1.0, 4)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_device_mismatch_is_rejected():
    features = torch.randn(1, 2, 8, 8, device="cuda")
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(RuntimeError, match="boxes are on cpu but features are on cuda"):
        crop_and_resize(features, rois, 1.0, 4)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="but features are on cuda:0"):
            crop_and_resize(features, rois.to("cuda:1"), 1.0, 4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    g = torch.Generator().manual_seed(43)
    features = torch.randn(2, 4, 10, 10, generator=g)
    rois = _rois(8, 2, 20.0, g, dtype=torch.float32)
    expected = crop_and_resize(features, rois, 0.5, 5, True)
    out = crop_and_resize(features.to("cuda:1"), rois.to("cuda:1"), 0.5, 5, True)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), expected)


def test_opcheck_on_cuda():
    g = torch.Generator().manual_seed(44)
    features = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64).cuda()
    rois = torch.tensor(
        [[0, 1.0, 2.0, 9.0, 8.0], [1, 7.0, 1.0, 2.0, 6.0]], dtype=torch.float64
    ).cuda()
    offsets = torch.randn(2, 2, 2, 2, generator=g, dtype=torch.float64).cuda()
    from masklab_d2.layers._ops import ops

    for op, args in [
        (ops.crop_and_resize.default, (features, rois, 0.5, 5, 3, True)),
        (ops.deformable_crop_and_resize.default, (features, rois, offsets, 0.5, 4, 6, 0.1, True)),
    ]:
        leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        result = torch.library.opcheck(op, tuple(leaves))
        assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize(
    "bad,message",
    [("batch", "batch indices"), ("nan", "NaN or infinite")],
)
def test_bad_box_values_trip_a_device_side_assert(bad, message):
    """No host-side value checks on CUDA: the kernels assert on the device. A device-side
    assert poisons the CUDA context, so this runs in a subprocess."""
    value = "5.0" if bad == "batch" else "float('nan')"
    column = 0 if bad == "batch" else 2
    code = (
        "import torch\n"
        "from masklab_d2.layers import crop_and_resize\n"
        "f = torch.randn(2, 3, 8, 8, device='cuda')\n"
        "b = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device='cuda')\n"
        f"b[0, {column}] = {value}\n"
        "crop_and_resize(f, b, 1.0, 4)\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "device-side assert" in result.stderr or message in result.stderr, result.stderr


def test_more_than_2_to_the_31_output_elements():
    """K * C * S * S > 2^31 (64-bit indexing): spot-check boxes against the CPU."""
    num_boxes, channels, size = 2048, 256, 65
    assert num_boxes * channels * size * size > 2**31
    g = torch.Generator().manual_seed(45)
    features = torch.randn(1, channels, 20, 20, generator=g).half()
    rois = torch.cat([torch.zeros(num_boxes, 1), torch.rand(num_boxes, 2, generator=g) * 20], dim=1)
    rois = torch.cat([rois, rois[:, 1:3] + 8], dim=1)
    out = crop_and_resize(features.cuda(), rois.cuda(), 1.0, size, True)
    for k in (0, num_boxes // 2, num_boxes - 1):
        expected = crop_and_resize_reference(
            features.double(), rois[k : k + 1].double(), 1.0, size, True
        )
        torch.testing.assert_close(out[k : k + 1].double().cpu(), expected, rtol=2e-3, atol=2e-3)
    del out
    torch.cuda.empty_cache()
