"""The crop ops on CUDA: equal to the CPU kernels (forward and every gradient, random and
exact-border boxes, four dtypes, two layouts), gradcheck, low precision, edge cases, no host
sync, the deterministic-algorithms alert, CUDA graphs, torch.compile, device-side checks and
64-bit indexing.

Skipped where there is no GPU. ``python3 -m masklab_d2.tools.gpu_check`` runs this file on a GPU
machine in two steps: the inductor tests (``-k inductor``, slow to compile) and the rest.
"""

import subprocess
import sys

import pytest
import torch
from helpers import wide_rois

from masklab_d2.layers import (
    crop_and_resize,
    crop_and_resize_reference,
    deformable_crop_and_resize,
)
from masklab_d2.layers.crop_and_resize import sample_positions_reference

pytestmark = pytest.mark.cuda

DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# CPU against CUDA, as rtol and as atol relative to the tensor's largest value: the order of the
# CUDA atomics and nvcc's fused multiply-adds change the last bits, and for fp16 / bf16 a result
# may round to the neighbouring value (one ulp: 2^-10 / 2^-7), which the upstream gradient and
# the sums over channels then carry.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(scope="module", autouse=True)
def _built_with_cuda():
    from masklab_d2.layers._ops import compiled_with_cuda

    assert compiled_with_cuda(), "a GPU is present but masklab_d2._C was built without CUDA"


# Exact-border boxes on a 7 x 15 map, 9 x 9 samples: feature-pixel (start, end) pairs whose
# samples land exactly on -1, H - 1 and H (W - 1, W along x), the kinks of the border rule,
# and on whole or half pixels elsewhere (spans of 8 and 16 pixels: steps of 1 and 2), plus
# flipped, zero-size and beyond-the-margin ones. Scale 1/2 keeps the input coordinates exact.
BORDER_HEIGHT, BORDER_WIDTH, BORDER_SIZE, BORDER_GRID, BORDER_GAMMA = 7, 15, 9, 3, 0.25
_Y_EDGES = [(-1, 7), (7, -1), (-2, 6), (0, 8), (-1, 3), (3, 7), (7, 7), (-1, -1), (6, 6)]
_X_EDGES = [(-1, 15), (15, -1), (-2, 14), (0, 16), (-3, 13), (-1, 7), (14, 14), (15, 15), (-1, -1)]


def border_case(aligned):
    """(rois, offsets) in float64 for the exact-border map (BORDER_HEIGHT x BORDER_WIDTH, scale
    1/2): every pair of edges above, and sub-box offsets that move whole sub-boxes by whole or
    half pixels (gamma * offset * span), so the deformable samples stay on the kinks too."""
    pixel_offset = 0.5 if aligned else 0.0
    rows, offsets = [], []
    for i, (y_edges, x_edges) in enumerate((y, x) for y in _Y_EDGES for x in _X_EDGES):
        (y1, y2), (x1, x2) = y_edges, x_edges
        rows.append([i % 2] + [(c + pixel_offset) * 2 for c in (x1, y1, x2, y2)])
        # BORDER_GAMMA * offset * span: x offsets of 1/4 or 1/2 of a 16-pixel span move by 1 or 2
        # pixels; y offsets of 1/2 or 1 of an 8-pixel span likewise.
        x_shift = torch.tensor([0.0, 0.25, -0.5, 0.5, 0.0, -0.25, 0.25, 0.0, -0.5]).roll(i)
        y_shift = torch.tensor([0.5, 0.0, -1.0, 0.0, 1.0, 0.0, -0.5, 1.0, 0.0]).roll(2 * i)
        offsets.append(torch.stack([x_shift.view(3, 3), y_shift.view(3, 3)]))
    rois = torch.tensor(rows, dtype=torch.float64)
    offsets = torch.stack(offsets).double()
    size = (BORDER_SIZE, BORDER_SIZE)
    for shift in (None, offsets):
        y, x = sample_positions_reference(rois, 0.5, size, aligned, shift, BORDER_GAMMA)
        for positions, extent in ((y, BORDER_HEIGHT), (x, BORDER_WIDTH)):
            assert torch.equal(positions * 2, (positions * 2).round()), "not on whole/half pixels"
            for kink in (-1, extent - 1, extent):
                assert (positions == kink).sum() >= 10, f"too few samples exactly at {kink}"
    return rois, offsets


def _forward_backward(device, dtype, layout, features, rois, offsets, aligned, spec, grads):
    """Both ops on ``device`` and every gradient; geometry in fp32 with fp16 / bf16 features.
    ``layout`` None keeps the features' strides (when already on ``device`` in ``dtype``)."""
    geometry = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    leaf = features.to(device, dtype)
    leaf = (leaf if layout is None else leaf.contiguous(memory_format=layout)).requires_grad_()
    boxes = rois.to(device, geometry).requires_grad_()
    shifts = offsets.to(device, geometry).requires_grad_()
    scale, plain_size, deformable_size, gamma = spec
    plain = crop_and_resize(leaf, boxes, scale, plain_size, aligned)
    deformable = deformable_crop_and_resize(
        leaf, boxes, shifts, scale, deformable_size, gamma, aligned
    )
    torch.autograd.backward([plain, deformable], [g.to(device, dtype) for g in grads])
    if device == "cuda":  # the layout the fake kernel promises (inductor asserts it)
        assert leaf.grad.stride() == torch.empty_like(leaf).stride()
    return {
        "crop_and_resize": plain.detach(),
        "deformable_crop_and_resize": deformable.detach(),
        "features.grad": leaf.grad,
        "boxes.grad": boxes.grad,
        "offsets.grad": shifts.grad,
    }


def _assert_close(actual, expected, dtype, what):
    tolerance = TOLERANCE[dtype]
    expected = expected.cpu().double()
    scale = max(expected.abs().max().item(), 1e-3) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.cpu().double(),
        expected,
        rtol=tolerance,
        atol=tolerance * scale,
        equal_nan=True,
        msg=lambda message: f"{what}: {message}",
    )


@pytest.mark.parametrize("aligned", [False, True], ids=["tf", "aligned"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("boxes", ["random", "border"])
def test_cpu_and_cuda_agree(boxes, dtype, layout, aligned):
    """Forward and the feature, box and offset gradients of both ops, CUDA against the CPU."""
    g = torch.Generator().manual_seed(40)
    if boxes == "random":
        features = torch.randn(3, 70, 20, 24, generator=g, dtype=torch.float64)
        rois = wide_rois(64, 3, 40.0, g)
        offsets = torch.randn(64, 2, 2, 2, generator=g, dtype=torch.float64)
        spec = (0.5, (7, 7), (8, 8), 0.1)
    else:
        features = torch.randn(2, 5, BORDER_HEIGHT, BORDER_WIDTH, generator=g, dtype=torch.float64)
        rois, offsets = border_case(aligned)
        spec = (0.5, (BORDER_SIZE,) * 2, (BORDER_SIZE,) * 2, BORDER_GAMMA)
    channels, count = features.shape[1], rois.shape[0]
    grads = [
        torch.randn(count, channels, *size, generator=g, dtype=torch.float64) for size in spec[1:3]
    ]
    arguments = (DTYPES[dtype], LAYOUTS[layout], features, rois, offsets, aligned, spec, grads)
    cpu = _forward_backward("cpu", *arguments)
    cuda = _forward_backward("cuda", *arguments)
    for name, expected in cpu.items():
        _assert_close(cuda[name], expected, DTYPES[dtype], name)


def _assert_away_from_kinks(y, x, height, width, distance=1e-3):
    """gradcheck's finite differences need every sample away from the clamp points 0 and size - 1,
    the cut-offs -1 and size, and the integer grid lines (test_ops_border.py's rule)."""
    for coordinate, size in ((y, height), (x, width)):
        inside = (coordinate > -1) & (coordinate < size)
        assert ((coordinate - coordinate.round()).abs()[inside] > distance).all()
        assert ((coordinate + 1).abs() > distance).all()
        assert ((coordinate - size).abs() > distance).all()


def _with_batch_index(batch_index, coordinates):
    return torch.cat([batch_index[:, None], coordinates], dim=1)


# test_ops_border.py's gradcheck cases on a 6 x 7 map (aligned, scale 1: feature X = x - 0.5):
# (batch index, box, crop size, offsets). Box edges in the clamp zones [-1, 0) and (size - 1,
# size], one box beyond the margin, one flipped; offsets push sub-boxes across the border.
_OFFSETS = [[[-0.4, 0.37], [0.21, 0.6]], [[0.33, -0.3], [0.52, -0.24]]]
GRADCHECK_CASES = {
    "crop_and_resize": (
        [0.0, 1.0, 0.0, 1.0],
        [[0.2, -0.25, 7.13, 6.2], [-0.35, 0.27, 3.3, 6.33], [-1.1, 2.3, 4.37, 5.9],
         [6.85, 5.85, 0.15, 0.42]],
        (3, 4),
        None,
    ),
    "deformable_crop_and_resize": (
        [0.0, 0.0], [[0.2, -0.25, 7.1, 6.2], [-0.3, 0.3, 6.8, 3.3]], (4, 4), [_OFFSETS] * 2
    ),
}  # fmt: skip


@pytest.mark.parametrize("aligned", [False, True], ids=["tf", "aligned"])
@pytest.mark.parametrize("op", list(GRADCHECK_CASES))
def test_gradcheck_on_cuda(op, aligned):
    """float64 gradcheck of every input on the GPU. Unaligned, the boxes move by half a pixel so
    that the samples sit where the aligned ones do (away from every kink); the feature gradient's
    atomics may change the last bits from one backward to the next, hence ``nondet_tol``."""
    g = torch.Generator().manual_seed(21)
    height, width = 6, 7
    batch_index, boxes, size, offsets = GRADCHECK_CASES[op]
    batch_index = torch.tensor(batch_index, dtype=torch.float64)
    coordinates = torch.tensor(boxes, dtype=torch.float64) - (0 if aligned else 0.5)
    offsets = None if offsets is None else torch.tensor(offsets, dtype=torch.float64)
    rois = _with_batch_index(batch_index, coordinates)
    y, x = sample_positions_reference(rois, 1.0, size, aligned, offsets, 0.1)
    _assert_away_from_kinks(y, x, height, width)
    assert ((y > -1) & (y < 0)).any() and ((x > width - 1) & (x < width)).any()
    features = torch.randn(2, 2, height, width, generator=g, dtype=torch.float64)
    index = batch_index.cuda()
    if offsets is None:
        inputs = [t.cuda().requires_grad_() for t in (features, coordinates)]

        def fn(f, c):
            return crop_and_resize(f, _with_batch_index(index, c), 1.0, size, aligned)

    else:
        inputs = [t.cuda().requires_grad_() for t in (features, coordinates, offsets)]

        def fn(f, c, o):
            rois = _with_batch_index(index, c)
            return deformable_crop_and_resize(f, rois, o, 1.0, size, 0.1, aligned)

    assert torch.autograd.gradcheck(fn, tuple(inputs), nondet_tol=1e-10)


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


def test_non_finite_upstream_gradients_agree():
    """inf / NaN in the upstream gradient: CUDA gives what the CPU gives (NaN where the CPU has
    NaN), clamped border samples included."""
    g = torch.Generator().manual_seed(47)
    features = torch.randn(2, 3, 8, 9, generator=g, dtype=torch.float64)
    rois = wide_rois(20, 2, 16.0, g)
    grad = torch.randn(20, 3, 5, 5, generator=g, dtype=torch.float64)
    grad[::3, :, 0, :] = float("inf")
    grad[1::4, :, :, -1] = float("nan")
    results = []
    for device in ("cpu", "cuda"):
        leaf, boxes = features.to(device).requires_grad_(), rois.to(device).requires_grad_()
        crop_and_resize(leaf, boxes, 0.5, 5, True).backward(grad.to(device))
        results.append([leaf.grad.cpu(), boxes.grad.cpu()])
    for cpu, cuda in zip(*results):
        torch.testing.assert_close(cuda, cpu, rtol=1e-9, atol=1e-9, equal_nan=True)


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


def test_sliced_features_on_cuda():
    """A channel-strided view (neither NCHW nor channels-last contiguous) equals its copy."""
    g = torch.Generator().manual_seed(42)
    base = torch.randn(2, 8, 12, 14, generator=g, dtype=torch.float64)
    rois = wide_rois(10, 2, 24.0, g)
    offsets = torch.randn(10, 2, 2, 2, generator=g, dtype=torch.float64)
    grads = [torch.randn(10, 8, 7, 7, generator=g, dtype=torch.float64)] * 2
    spec = (0.5, (7, 7), (7, 7), 0.1)
    arguments = (rois, offsets, True, spec, grads)
    expected = _forward_backward("cpu", torch.float64, None, base, *arguments)
    sliced = torch.cat([base, base], 1).cuda()[:, ::2]  # sliced on the GPU: .cuda() would copy
    assert not sliced.is_contiguous() and not sliced.is_contiguous(
        memory_format=torch.channels_last
    )
    actual = _forward_backward("cuda", torch.float64, None, sliced, *arguments)
    for name in expected:
        _assert_close(actual[name], expected[name], torch.float64, name)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_no_host_sync(dtype, layout):
    """Forward and backward of both ops never synchronise with the host (no value checks on the
    host, no .item()): usable in CUDA graphs and overlapped with the CPU."""
    features = torch.randn(2, 8, 16, 16, device="cuda", dtype=DTYPES[dtype])
    features = features.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    rois = torch.tensor([[0, 1.0, 1.0, 9.0, 12.0], [1, 3.0, 2.0, 14.0, 6.0]], device="cuda")
    rois.requires_grad_()
    offsets = torch.zeros(2, 2, 2, 2, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        deformable = deformable_crop_and_resize(features, rois, offsets, 1.0, 4, 0.1, True)
        plain = crop_and_resize(features, rois, 1.0, 5, False)
        loss = deformable.float().sum() + plain.float().square().sum()
        grads = torch.autograd.grad(loss, [features, rois, offsets])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("op", ["crop_and_resize", "deformable_crop_and_resize"])
def test_deterministic_mode_alerts(op):
    """The feature gradient scatters with atomics: with deterministic algorithms on, it raises
    (warns with ``warn_only``) as roi_align's does; the forward and the box and offset
    gradients (sums in a fixed order) do not."""
    features = torch.randn(1, 2, 8, 8, device="cuda")
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device="cuda", requires_grad=True)
    offsets = torch.zeros(1, 2, 2, 2, device="cuda", requires_grad=True)

    def run(f):
        if op == "crop_and_resize":
            return crop_and_resize(f, rois, 1.0, 4)
        return deformable_crop_and_resize(f, rois, offsets, 1.0, 4, 0.1)

    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        geometry = [rois] if op == "crop_and_resize" else [rois, offsets]
        torch.autograd.grad(run(features).sum(), geometry)  # no feature gradient: fine
        leaf = features.clone().requires_grad_()
        with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
            run(leaf).sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
            torch.autograd.grad(run(leaf).sum(), [leaf])
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn_only)


def test_cuda_graph_capture_and_replay():
    """Forward and backward of both ops captured in one CUDA graph, replayed on new values,
    equal eager (possible only without host syncs)."""
    g = torch.Generator().manual_seed(46)

    def new_values():
        features = torch.randn(2, 6, 16, 18, generator=g)
        offsets = 0.3 * torch.randn(12, 2, 2, 2, generator=g)
        return features, wide_rois(12, 2, 30.0, g, torch.float32), offsets

    static = [t.cuda().requires_grad_() for t in new_values()]

    def step():
        plain = crop_and_resize(static[0], static[1], 0.5, 6, True)
        deformable = deformable_crop_and_resize(*static, 0.5, 6, 0.1, True)
        loss = (plain * deformable).sum() + plain.square().sum()
        return [plain, deformable, *torch.autograd.grad(loss, static)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for tensor, value in zip(static, new_values()):
            tensor.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    for replayed, eager in zip(captured, step()):
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_inductor_forward_and_backward_on_cuda(layout):
    """torch.compile (inductor, fullgraph) of both ops with their backward equals eager."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(30)
    features = torch.randn(2, 5, 12, 11, generator=g)
    rois = wide_rois(7, 2, 20.0, g, dtype=torch.float32)
    offsets = 0.3 * torch.randn(7, 2, 3, 3, generator=g)

    def loss(f, b, o):
        plain = crop_and_resize(f, b, 0.5, 6, True)
        deformable = deformable_crop_and_resize(f, b, o, 0.5, 6, 0.1, True)
        return (plain * deformable).sum() + plain.pow(2).mean()

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    results = []
    for fn in (loss, compiled):
        leaves = [
            features.cuda().contiguous(memory_format=LAYOUTS[layout]).requires_grad_(),
            rois.cuda().requires_grad_(),
            offsets.cuda().requires_grad_(),
        ]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach()] + [leaf.grad for leaf in leaves])
    for eager, inductor in zip(*results):
        torch.testing.assert_close(inductor, eager, rtol=1e-4, atol=1e-5)


def test_device_mismatch_is_rejected():
    features = torch.randn(1, 2, 8, 8, device="cuda")
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(RuntimeError, match="boxes are on cpu but features are on cuda"):
        crop_and_resize(features, rois, 1.0, 4)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="but features are on cuda:0"):
            crop_and_resize(features, rois.to("cuda:1"), 1.0, 4)


def _run_python(code):
    """A snippet in a fresh process: a bad access or a device-side assert poisons the CUDA
    context of the process it happens in."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_backward_rejects_a_gradient_on_another_device():
    """A direct call of a backward op with the upstream gradient on the CPU and the features on
    the GPU is an error, not a kernel reading a host pointer."""
    result = _run_python(
        "import torch\n"
        "from masklab_d2.layers._ops import ops\n"
        "f = torch.randn(1, 2, 8, 8, device='cuda')\n"
        "b = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device='cuda')\n"
        "o = torch.zeros(1, 2, 1, 1, device='cuda')\n"
        "g = torch.ones(1, 2, 3, 3)\n"
        "calls = [lambda: ops._crop_and_resize_backward(g, f, b, 1.0, True, [True, True]),\n"
        "         lambda: ops._deformable_crop_and_resize_backward(\n"
        "             g, f, b, o, 1.0, 0.1, True, [True, True, True])]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "        torch.cuda.synchronize()\n"
        "        print('accepted')\n"
        "    except RuntimeError as error:\n"
        "        print('rejected:', str(error).splitlines()[0])\n"
    )
    # Rejected up front, naming the CPU: not a CUDA error (an illegal address) after the launch.
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout + result.stderr
    for line in lines:
        assert line.startswith("rejected") and "CUDA error" not in line, line
        assert "cpu" in line or "device" in line, line


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    g = torch.Generator().manual_seed(43)
    features = torch.randn(2, 4, 10, 10, generator=g)
    rois = wide_rois(8, 2, 20.0, g, dtype=torch.float32)
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
    """No host-side value checks on CUDA: the kernels assert on the device."""
    value = "5.0" if bad == "batch" else "float('nan')"
    column = 0 if bad == "batch" else 2
    result = _run_python(
        "import torch\n"
        "from masklab_d2.layers import crop_and_resize\n"
        "f = torch.randn(2, 3, 8, 8, device='cuda')\n"
        "b = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]], device='cuda')\n"
        f"b[0, {column}] = {value}\n"
        "crop_and_resize(f, b, 1.0, 4)\n"
        "torch.cuda.synchronize()\n"
    )
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
