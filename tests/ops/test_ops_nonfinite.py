"""Ops that reject what they cannot compute (issue 25, item 3): non-finite ``spatial_scale`` and
``gamma`` raise an error naming the argument (real and fake kernels, forward and backward);
sample positions that overflow read 0 with zero gradient, never NaN; non-finite upstream
gradients give exactly 0 along clamped axes on every device; the backward ops check ``grad``;
the fake kernels check what the real ones check; and the extension alone (``import
masklab_d2._C``) registers the fake kernels and autograd formulas, so a model saved with
torch.export runs in a process that imports nothing else. CPU tests run everywhere; the ``cuda``
tests need a GPU."""

import subprocess
import sys
import textwrap

import pytest
import torch

from masklab_d2.layers import crop_and_resize, deformable_crop_and_resize
from masklab_d2.layers._ops import ops

# Non-finite, and finite in float64 but inf once cast to float32 (positions are computed in
# float32 for float32, half and bfloat16 features).
BAD_FACTORS = [float("nan"), float("inf"), float("-inf"), 1e300]
BAD_IDS = ["nan", "inf", "-inf", "1e300"]


def _inputs(device="cpu", dtype=torch.float32):
    """Features [2, 3, 8, 8], boxes [2, 5] and offsets [2, 2, 2, 2]."""
    g = torch.Generator().manual_seed(250)
    features = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype).to(device)
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 2.0, 0.5, 7.0, 4.0]], dtype=dtype)
    offsets = torch.randn(2, 2, 2, 2, generator=g, dtype=dtype)
    return features, rois.to(device), offsets.to(device)


def _op_calls(features, rois, offsets, scale=0.5, gamma=0.1):
    """Every op entry point that takes spatial_scale (and gamma), as name -> thunk."""
    grad = torch.ones(2, 3, 4, 4, dtype=features.dtype, device=features.device)
    return {
        "crop": lambda: ops.crop_and_resize(features, rois, scale, 4, 4, True),
        "deformable": lambda: ops.deformable_crop_and_resize(
            features, rois, offsets, scale, 4, 4, gamma, True
        ),
        "crop backward": lambda: ops._crop_and_resize_backward(
            grad, features, rois, scale, True, [True, True]
        ),
        "deformable backward": lambda: ops._deformable_crop_and_resize_backward(
            grad, features, rois, offsets, scale, gamma, True, [True, True, True]
        ),
    }


# ---------------------------------------------------------------------------------------------
# Non-finite spatial_scale and gamma


@pytest.mark.parametrize("device", ["cpu", "meta"], ids=["real", "fake"])
@pytest.mark.parametrize("scale", BAD_FACTORS, ids=BAD_IDS)
def test_non_finite_spatial_scale_is_rejected(scale, device):
    """NaN or inf (also after the cast to float32) spatial_scale: an error naming it, from the
    C++ kernels (direct op calls, forward and backward) and from the fake kernels (meta tensors,
    as torch.compile and torch.export trace), instead of a crop of NaN."""
    for call in _op_calls(*_inputs(device), scale=scale).values():
        with pytest.raises(RuntimeError, match="spatial_scale must be finite"):
            call()


@pytest.mark.parametrize("device", ["cpu", "meta"], ids=["real", "fake"])
@pytest.mark.parametrize("gamma", BAD_FACTORS, ids=BAD_IDS)
def test_non_finite_gamma_is_rejected(gamma, device):
    """The same for the deformable op's gamma."""
    calls = _op_calls(*_inputs(device), gamma=gamma)
    for name in ("deformable", "deformable backward"):
        with pytest.raises(RuntimeError, match="gamma must be finite"):
            calls[name]()


def test_non_finite_factors_through_the_wrappers():
    """The issue's reproduction, through the public wrappers."""
    features, rois, offsets = _inputs()
    with pytest.raises(RuntimeError, match="crop_and_resize: spatial_scale must be finite"):
        crop_and_resize(features, rois, float("nan"), 3)
    with pytest.raises(RuntimeError, match="spatial_scale must be finite .*got inf"):
        crop_and_resize(features, rois, float("inf"), 3)
    with pytest.raises(RuntimeError, match="deformable_crop_and_resize: gamma must be finite"):
        deformable_crop_and_resize(features, rois, offsets, 1.0, 4, gamma=float("nan"))


def test_large_finite_factors_are_fine_in_float64():
    """1e300 is finite in float64, where float64 features compute positions: accepted (every
    sample lands far outside the map and reads 0)."""
    calls = _op_calls(*_inputs(dtype=torch.float64), scale=1e300, gamma=1e300)
    assert (calls["crop"]() == 0).all() and (calls["deformable"]() == 0).all()
    for name in ("crop backward", "deformable backward"):
        assert all(torch.isfinite(grad).all() for grad in calls[name]())


# ---------------------------------------------------------------------------------------------
# Positions that overflow


# Finite inputs whose float32 sample positions, or factors of their gradients, overflow: box
# (input pixels), spatial_scale, offsets (every entry) and gamma, and whether the plain crop of
# the box reads 0 everywhere too.
OVERFLOWING = {
    # The issue's: each edge overflows to inf, the extent is inf - inf = NaN.
    "edges": ([0, 3e38, 3e38, 3e38, 3e38], 2.0, 0.5, 0.1, True),
    # Finite edges, but their difference (the extent) overflows: NaN at sample 0 (start + inf *
    # 0) and inf elsewhere; the offset gradient's factor gamma * extent is inf there too.
    "extent": ([1, -3e38, 1.0, 3e38, 5.0], 1.0, 0.5, 0.1, True),
    # A regular box; gamma * offset overflows, so the deformable shift does.
    "shift": ([0, 1.0, 1.0, 5.0, 6.0], 0.5, 3e38, 10.0, False),
}


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("case", list(OVERFLOWING))
def test_overflowing_positions_read_zero_not_nan(case, aligned):
    """A sample whose position overflows reads 0 and gets zero gradient, in both ops and every
    gradient: the inside-the-map test counts a NaN position as outside (it counted it as inside
    and cast floor(NaN) to an integer), and the chain rule to boxes and offsets does not turn
    0 * inf (an overflowed extent or shift) into NaN."""
    box, scale, offset, gamma, plain_overflows = OVERFLOWING[case]
    features, _, _ = _inputs()
    features.requires_grad_()
    rois = torch.tensor([box, [1, 2.0, 0.5, 7.0, 4.0]], requires_grad=True)
    offsets = torch.full((2, 2, 2, 2), offset)
    offsets[1] = 0.5
    offsets.requires_grad_()
    plain = crop_and_resize(features, rois, scale, 4, aligned)
    deformable = deformable_crop_and_resize(features, rois, offsets, scale, 4, gamma, aligned)
    for out in (plain, deformable):
        assert torch.isfinite(out).all(), out
    assert (deformable[0] == 0).all()
    assert (plain[0] == 0).all() == plain_overflows
    (plain.sum() + deformable.sum()).backward()
    for leaf in (features, rois, offsets):
        assert torch.isfinite(leaf.grad).all(), leaf.grad
    assert (offsets.grad[0] == 0).all() and (rois.grad[0] == 0).all() == plain_overflows
    # The second, regular box is unaffected by the first.
    expected = crop_and_resize(features.detach(), rois[1:].detach(), scale, 4, aligned)
    torch.testing.assert_close(plain[1:].detach(), expected, rtol=0, atol=0)


def test_offset_gradient_of_a_box_near_the_float_range():
    """The extent in the offset gradient is the kernels' (each edge scaled, then subtracted):
    x from -2e38 to 2e38 at scale 0.5 spans 2e38 feature pixels, finite in float32, though
    (x2 - x1) * scale overflows. The centre sample (x = 0) is inside the map, so the offset
    gradient gamma * extent * d(value)/dx is finite and equals float64's."""
    grads = []
    for dtype in (torch.float32, torch.float64):
        ramp = torch.arange(8, dtype=dtype) * 0.01  # d(value)/dx = 0.01
        features = ramp.expand(1, 1, 6, 8).clone().requires_grad_()
        rois = torch.tensor([[0, -2e38, 1.0, 2e38, 5.0]], dtype=dtype, requires_grad=True)
        offsets = torch.zeros(1, 2, 1, 1, dtype=dtype, requires_grad=True)
        deformable_crop_and_resize(features, rois, offsets, 0.5, 3, 0.1).sum().backward()
        grads.append(offsets.grad)
    assert torch.isfinite(grads[0]).all(), grads[0]
    # gamma * extent * (3 rows * 0.01) = 0.1 * 2e38 * 0.03
    torch.testing.assert_close(grads[0].double(), grads[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(grads[1][0, 0, 0, 0].item(), 6e35, rtol=1e-9, atol=0)


def test_overflowing_positions_in_float64():
    """The same in float64: a box at 1e308 with spatial_scale 10 overflows float64."""
    features, _, offsets = _inputs(dtype=torch.float64)
    rois = torch.tensor([[0, 1e308, 1e308, 1e308, 1e308]], dtype=torch.float64)
    assert (crop_and_resize(features, rois, 10.0, 3) == 0).all()
    out = deformable_crop_and_resize(features, rois, offsets[:1], 10.0, 4)
    assert (out == 0).all()


# ---------------------------------------------------------------------------------------------
# Non-finite upstream gradients along clamped axes


def _clamped_y_case(dtype=torch.float64):
    """One aligned box whose samples all lie at feature y = -0.7 (clamped to row 0, so the value
    does not depend on y) with x spread inside the map, and an upstream gradient of inf and NaN."""
    features = torch.randn(1, 3, 6, 7, generator=torch.Generator().manual_seed(251), dtype=dtype)
    # aligned: feature Y = y - 0.5, so y = -0.2 gives Y = -0.7; X from 1.2 to 4.8.
    rois = torch.tensor([[0, 1.7, -0.2, 5.3, -0.2]], dtype=dtype)
    grad = torch.ones(1, 3, 3, 4, dtype=dtype)
    grad[0, 0, 0, :] = float("inf")
    grad[0, 1, 1, 1] = float("nan")
    grad[0, 2, 2, :] = float("-inf")
    return features, rois, grad


def _box_and_feature_grads(features, rois, grad):
    leaves = [features.clone().requires_grad_(), rois.clone().requires_grad_()]
    crop_and_resize(*leaves, 1.0, (3, 4), True).backward(grad)
    return [leaf.grad for leaf in leaves]


def test_non_finite_upstream_gradient_gives_exact_zero_along_a_clamped_axis():
    """The clamped axis gets exactly 0 (no g * 0 = NaN); the other axis carries the non-finite
    gradient as it should. The CUDA test below checks that CUDA gives the same."""
    features, rois, grad = _clamped_y_case()
    _, box_grad = _box_and_feature_grads(features, rois, grad)
    assert (box_grad[0, [2, 4]] == 0).all(), box_grad  # y1, y2: clamped
    assert not torch.isfinite(box_grad[0, [1, 3]]).any(), box_grad  # x1, x2: moving


# ---------------------------------------------------------------------------------------------
# Backward ops check grad


def test_backward_rejects_grad_of_another_dtype():
    """A direct backward call with a float64 grad for float32 features: an error naming grad
    (it was silently converted)."""
    features, rois, offsets = _inputs()
    grad = torch.ones(2, 3, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grad is Double but features are Float"):
        ops._crop_and_resize_backward(grad, features, rois, 0.5, True, [True, True])
    with pytest.raises(RuntimeError, match="grad is Double but features are Float"):
        ops._deformable_crop_and_resize_backward(
            grad, features, rois, offsets, 0.5, 0.1, True, [True, True, True]
        )


def test_fake_backward_checks_grad():
    """The fake backward kernels check grad's device, dtype and shape as the real ones do (meta
    stands in for another device here: a meta grad sends the call to the fake kernel; the cuda
    test below calls the CUDA kernel with a CPU grad)."""
    features, rois, offsets = _inputs()
    grad = torch.ones(2, 3, 4, 4)
    meta = [t.to("meta") for t in (features, rois, offsets)]
    cases = [
        (grad.to("meta"), (features, rois, offsets), "grad is on meta but features are on cpu"),
        (grad.double().to("meta"), meta, "grad is torch.float64 but features are torch.float32"),
        (grad[:1].to("meta"), meta, r"grad must be \[K, C, out_h, out_w\] = \[2, 3, ...\]"),
    ]
    for bad_grad, args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops._crop_and_resize_backward(bad_grad, *args[:2], 0.5, True, [True, True])
        with pytest.raises(RuntimeError, match=message):
            ops._deformable_crop_and_resize_backward(
                bad_grad, *args, 0.5, 0.1, True, [True, True, True]
            )
    # The real kernels give the same shape message.
    with pytest.raises(RuntimeError, match=cases[-1][-1]):
        ops._crop_and_resize_backward(grad[:1], features, rois, 0.5, True, [True, True])


# ---------------------------------------------------------------------------------------------
# Fake kernels check what the real ones check


def _bad_crop_arguments():
    """(id, op, arguments, message) that the real kernels reject, with CPU tensors."""
    features, rois, offsets = _inputs()
    return [
        ("grid-0", "deformable", (features, rois, offsets[:, :, :0, :0]), r"\[K, 2, G, G\]"),
        ("offsets-3d", "deformable", (features, rois, offsets[0]), r"\[K, 2, G, G\]"),
        ("offsets-K", "deformable", (features, rois, offsets[:1]), r"\[K, 2, G, G\]"),
        (
            "grid-3",
            "deformable",
            (features, rois, offsets.repeat(1, 1, 2, 2)[:, :, :3, :3]),
            "divisible by the offset grid 3",
        ),
        ("long-features", "crop", (features.long(), rois), "features must be floating point"),
        ("long-boxes", "crop", (features, rois.long()), "boxes must be floating point"),
        (
            "long-offsets",
            "deformable",
            (features, rois, offsets.long()),
            "offsets must be floating point",
        ),
        ("3d-features", "crop", (features[0], rois), "4-D"),
        ("boxes-4", "crop", (features, rois[:, :4]), r"\[K, 5\]"),
        ("double-boxes", "crop", (features, rois.double()), "boxes are .* but features are"),
    ]


@pytest.mark.parametrize(
    "op,arguments,message",
    [case[1:] for case in _bad_crop_arguments()],
    ids=[case[0] for case in _bad_crop_arguments()],
)
def test_fake_kernels_reject_what_the_real_ones_reject(op, arguments, message):
    """The same bad input fails with the same message on CPU tensors (C++) and on meta tensors
    (the fake kernels that torch.compile and torch.export trace with). An offset grid of 0 was
    a ZeroDivisionError in the fake kernel, integer features passed it."""
    for device in ("cpu", "meta"):
        args = [t.to(device) for t in arguments]
        with pytest.raises(RuntimeError, match=message):
            if op == "crop":
                ops.crop_and_resize(*args, 0.5, 4, 4, True)
            else:
                ops.deformable_crop_and_resize(*args, 0.5, 4, 4, 0.1, True)


# ---------------------------------------------------------------------------------------------
# The extension alone: set_python_module, and torch.export in a fresh process


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )


def test_the_extension_alone_registers_fake_kernels_and_autograd():
    """``import masklab_d2._C`` alone (no import of the op wrappers) gives the fake kernels and
    the autograd formulas, and the ops name their Python module to torch (m.set_python_module)."""
    result = _fresh_python("""
        import torch
        import masklab_d2._C  # the extension alone
        for op in ("crop_and_resize", "deformable_crop_and_resize",
                   "_crop_and_resize_backward", "_deformable_crop_and_resize_backward"):
            stub = torch._C._dispatch_pystub("masklab::" + op, "")
            assert stub is not None and stub[0] == "masklab_d2.layers._ops", (op, stub)
        f = torch.randn(1, 2, 6, 6, requires_grad=True)
        b = torch.tensor([[0, 1.0, 1.0, 4.0, 5.0]], requires_grad=True)
        o = torch.zeros(1, 2, 1, 1, requires_grad=True)
        m = torch.ops.masklab
        (m.crop_and_resize(f, b, 1.0, 3, 3).sum()
         + m.deformable_crop_and_resize(f, b, o, 1.0, 3, 3).sum()).backward()
        assert f.grad is not None and b.grad is not None and o.grad is not None
        meta = m.deformable_crop_and_resize(f.to("meta"), b.to("meta"), o.to("meta"), 1.0, 3, 3)
        assert meta.shape == (1, 2, 3, 3) and meta.device.type == "meta"
        print("ok")
        """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


class _BothOps(torch.nn.Module):
    """A small model: a conv, then both crop ops on its output, offsets from a linear layer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.offsets = torch.nn.Linear(4 * 4 * 4, 2 * 2 * 2)

    def forward(self, images, rois):
        features = self.conv(images)
        plain = crop_and_resize(features, rois, 0.5, 4, aligned=True)
        offsets = self.offsets(plain.flatten(1)).view(-1, 2, 2, 2)
        deformable = deformable_crop_and_resize(features, rois, offsets, 0.5, 4, 0.1, True)
        return plain + deformable


def test_torch_export_round_trip_in_a_fresh_process(tmp_path):
    """torch.export a model using both ops, torch.export.save it, and torch.export.load it in a
    fresh process that imports only torch and the extension: the same output as the eager
    model, and gradients through the loaded program (the autograd formulas are there)."""
    torch.manual_seed(252)
    model = _BothOps().eval()
    images = torch.randn(2, 3, 12, 12)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 16.0], [1, 14.0, 2.0, 4.0, 12.0], [1, 3, 3, 9, 9.5]])
    exported = torch.export.export(model, (images, rois))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"masklab.crop_and_resize.default", "masklab.deformable_crop_and_resize.default"} <= (
        targets
    ), targets
    torch.export.save(exported, tmp_path / "model.pt2")
    images.requires_grad_()
    expected = model(images, rois)
    (expected_grad,) = torch.autograd.grad(expected.sum(), images)
    torch.save((images.detach(), rois, expected.detach(), expected_grad), tmp_path / "io.pt")
    result = _fresh_python(f"""
        import torch
        import masklab_d2._C  # the extension alone
        program = torch.export.load({str(tmp_path / "model.pt2")!r})
        images, rois, expected, expected_grad = torch.load({str(tmp_path / "io.pt")!r})
        images.requires_grad_()
        out = program.module()(images, rois)
        assert torch.equal(out, expected), (out - expected).abs().max()
        (grad,) = torch.autograd.grad(out.sum(), images)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
        print("ok")
        """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


# ---------------------------------------------------------------------------------------------
# CUDA


def _cuda_subprocess(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in its own process: if it trips a device-side assert or an illegal access,
    the CUDA context of this process stays usable for the other tests."""
    return _fresh_python("import torch\nfrom masklab_d2.layers import *\n" + textwrap.dedent(code))


@pytest.mark.cuda
@pytest.mark.parametrize("scale", BAD_FACTORS, ids=BAD_IDS)
def test_non_finite_factors_are_rejected_on_cuda(scale):
    """A host-side error before any kernel runs (no device-side assert blaming the boxes)."""
    for call in _op_calls(*_inputs("cuda"), scale=scale).values():
        with pytest.raises(RuntimeError, match="spatial_scale must be finite"):
            call()
    calls = _op_calls(*_inputs("cuda"), gamma=scale)
    for name in ("deformable", "deformable backward"):
        with pytest.raises(RuntimeError, match="gamma must be finite"):
            calls[name]()


@pytest.mark.cuda
def test_overflowing_positions_read_zero_on_cuda():
    """CUDA reads 0 where the CPU does (it tripped the position assert, with a message blaming
    the boxes), with the same gradients; in a subprocess, as a failing assert poisons the
    context."""
    result = _cuda_subprocess(f"""
        g = torch.Generator().manual_seed(253)
        features = torch.randn(2, 3, 8, 8, generator=g)
        for box, scale, offset, gamma, _ in {list(OVERFLOWING.values())!r}:
            for aligned in (False, True):
                rois = torch.tensor([box, [1, 2.0, 0.5, 7.0, 4.0]])
                offsets = torch.full((2, 2, 2, 2), offset)
                offsets[1] = 0.5
                results = []
                for device in ("cpu", "cuda"):
                    leaves = [t.to(device).requires_grad_() for t in (features, rois, offsets)]
                    plain = crop_and_resize(*leaves[:2], scale, 4, aligned)
                    deformable = deformable_crop_and_resize(*leaves, scale, 4, gamma, aligned)
                    (plain.sum() + deformable.sum()).backward()
                    results.append([plain, deformable] + [leaf.grad for leaf in leaves])
                torch.cuda.synchronize()
                for cpu, cuda in zip(*results):
                    assert torch.isfinite(cuda).all(), (box, cuda)
                    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)
        print("ok")
        """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_finite_upstream_gradient_on_a_clamped_axis_agrees_on_cuda(dtype):
    """CUDA gives exactly 0 along the clamped axis, as the CPU (it computed g * 0 = NaN), and
    the same non-finite values elsewhere."""
    features, rois, grad = _clamped_y_case(dtype)
    cpu = _box_and_feature_grads(features, rois, grad)
    cuda = _box_and_feature_grads(features.cuda(), rois.cuda(), grad.cuda())
    assert (cuda[1][0, [2, 4]] == 0).all(), cuda[1]
    for c, d in zip(cpu, cuda):
        torch.testing.assert_close(d.cpu(), c, rtol=1e-6, atol=1e-6, equal_nan=True)


@pytest.mark.cuda
def test_backward_rejects_a_grad_on_another_device():
    """A CPU grad with CUDA features: an error naming grad (the CUDA kernel read the host
    pointer); in a subprocess, as an illegal access would poison the context."""
    result = _cuda_subprocess("""
        from masklab_d2.layers._ops import ops
        features = torch.randn(2, 3, 8, 8, device="cuda")
        rois = torch.tensor([[0, 1.0, 1.0, 5.0, 6.0], [1, 2.0, 0.5, 7.0, 4.0]], device="cuda")
        offsets = torch.zeros(2, 2, 2, 2, device="cuda")
        grad = torch.ones(2, 3, 4, 4)
        calls = [
            lambda: ops._crop_and_resize_backward(grad, features, rois, 0.5, True, [True, True]),
            lambda: ops._deformable_crop_and_resize_backward(
                grad, features, rois, offsets, 0.5, 0.1, True, [True, True, True]),
        ]
        for call in calls:
            try:
                call()
                torch.cuda.synchronize()
            except RuntimeError as error:
                assert "grad is on cpu but features are on cuda" in str(error), error
            else:
                raise AssertionError("no error")
        print("ok")
        """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
