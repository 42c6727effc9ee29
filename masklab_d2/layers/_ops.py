"""Loads the compiled ops (masklab_d2._C) and registers their fake kernels and autograd formulas.

Imported lazily by the op wrappers, so that the pure-PyTorch parts of `masklab_d2.layers` work
without a build. There is no silent fallback to the reference implementations. Importing
masklab_d2._C alone imports this module too (csrc/masklab.cpp), so a process that only loads the
extension, e.g. to run a model saved with torch.export, has the fake kernels and autograd formulas;
the extension names this module to torch with ``m.set_python_module``, and torch then requires the
fake kernels to be registered from here.
"""

import math
import os
import re
import struct
from typing import List, Optional, Sequence, Tuple

import torch

try:
    from masklab_d2 import _C  # noqa: F401  (registers torch.ops.masklab.*)
except ImportError as error:  # pragma: no cover - exercised only without a build
    raise ImportError(
        "masklab_d2's compiled ops (masklab_d2._C) are not built. From the repository root run\n"
        "    pip install --no-build-isolation -e .\n"
        "(set MASKLAB_CPU_ONLY=1 to skip the CUDA sources). Original error: " + str(error)
    ) from error

ops = torch.ops.masklab


def compiled_with_cuda() -> bool:
    """Whether the CUDA kernels of masklab_d2._C were built."""
    return _C.compiled_with_cuda()


def _parse_arch_list(arch_list: str) -> List[Tuple[Tuple[int, int], bool, bool]]:
    """TORCH_CUDA_ARCH_LIST ("8.0;8.6;9.0+PTX", also space-separated or with a/f suffixes) ->
    [((major, minor), has_ptx, arch_specific)]."""
    parsed = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if match:
            capability = (int(match.group(1)), int(match.group(2)))
            parsed.append((capability, bool(match.group(4)), bool(match.group(3))))
    return parsed


def cuda_arch_covered(capability: Tuple[int, int], arch_list: str) -> bool:
    """Whether kernels built for ``arch_list`` run on a GPU of compute ``capability``.

    A binary for X.Y runs on X.Z with Z >= Y (arch-specific "a"/"f" builds on X.Y only); PTX for
    X.Y is JIT-compiled by the driver for any capability >= X.Y.
    """
    for built, has_ptx, specific in _parse_arch_list(arch_list):
        if built == capability:
            return True
        if not specific and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if has_ptx and built <= capability:
            return True
    return False


def check_cuda_arches(
    capabilities: Sequence[Tuple[str, Tuple[int, int]]], arch_list: Optional[str]
) -> None:
    """Raises ImportError naming every GPU (name, capability) that ``arch_list`` does not cover."""
    if arch_list is None:
        return
    missing = [(name, cap) for name, cap in capabilities if not cuda_arch_covered(cap, arch_list)]
    if missing:
        gpus = ", ".join(f"{name} (compute capability {c[0]}.{c[1]})" for name, c in missing)
        needed = ";".join(sorted({f"{c[0]}.{c[1]}" for _, c in missing}))
        raise ImportError(
            f"masklab_d2._C has no CUDA kernels for {gpus}: it was built for "
            f"TORCH_CUDA_ARCH_LIST={arch_list!r}. Rebuild from the repository root with\n"
            f'    TORCH_CUDA_ARCH_LIST="{needed}" '
            "python3 -m pip install --no-build-isolation -e .\n"
            "(or set MASKLAB_SKIP_ARCH_CHECK=1 to use the ops on the CPU only)."
        )


def _check_visible_gpus() -> None:
    """Fail at import, not with "no kernel image is available" in the middle of training."""
    if os.environ.get("MASKLAB_SKIP_ARCH_CHECK") == "1" or not compiled_with_cuda():
        return
    if not torch.cuda.is_available():
        return
    try:
        from masklab_d2._build_info import CUDA_ARCH_LIST
    except ImportError:  # built before build info existed: nothing to check against
        return
    # Device properties come from the runtime without creating a context on each GPU.
    capabilities = [
        (torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
        for i in range(torch.cuda.device_count())
    ]
    check_cuda_arches(capabilities, CUDA_ARCH_LIST)


_check_visible_gpus()


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _finite_in(value: float, dtype: torch.dtype) -> bool:
    """Whether ``value`` stays finite cast to the dtype sample positions are computed in (float64
    for float64 features, else float32), as the C++ kernels cast it."""
    if not math.isfinite(value):
        return False
    if dtype == torch.float64:
        return True
    try:
        # Rounds to float32 as a C++ cast does; the standard-size format ("<f", unlike native
        # "f") raises where that rounds to inf.
        struct.pack("<f", value)
    except OverflowError:
        return False
    return True


def check_crop_arguments(
    op_name: str,
    features,
    boxes,
    offsets,
    output_size: Sequence[int],
    spatial_scale: float,
    gamma: Optional[float] = None,
):
    """Shape, dtype, device and parameter checks of the fake kernels: those the C++ kernels make
    on real tensors (csrc/common/crop_sampling.cpp), with the same messages up to how dtypes
    print, so that torch.compile and torch.export reject what eager execution rejects. The box
    and offset values (finite, batch indices) are data, which fake tensors do not have.

    Args:
        op_name: prefix of the error messages.
        features: [N, C, H, W].
        boxes: [K, 5].
        offsets: [K, 2, G, G], or None for the plain op.
        output_size: (out_h, out_w).
        spatial_scale: must be finite in the features' compute dtype.
        gamma: the deformable op's offset scale (same rule), or None for the plain op.
    """
    torch._check(
        features.dim() == 4,
        lambda: f"{op_name}: features must be a 4-D [N, C, H, W] tensor, got {tuple(features.shape)}",
    )
    torch._check(
        boxes.dim() == 2 and boxes.shape[1] == 5,
        lambda: f"{op_name}: boxes must be a [K, 5] tensor of (batch_index, x1, y1, x2, y2), "
        f"got {tuple(boxes.shape)}",
    )
    for name, tensor in (("features", features), ("boxes", boxes), ("offsets", offsets)):
        torch._check(
            tensor is None or tensor.dtype.is_floating_point,
            lambda: f"{op_name}: {name} must be floating point, got {tensor.dtype}",
        )
    for name, geometry in (("boxes", boxes), ("offsets", offsets)):
        if geometry is None:
            continue
        torch._check(
            geometry.device == features.device,
            lambda: f"{op_name}: {name} are on {geometry.device} but features are on "
            f"{features.device}",
        )
        torch._check(
            geometry.dtype == features.dtype
            or (geometry.dtype == torch.float32 and features.dtype in _HALF_DTYPES),
            lambda: f"{op_name}: {name} are {geometry.dtype} but features are {features.dtype}; "
            f"pass {name} in the features' dtype (float32 {name} are also accepted with half or "
            "bfloat16 features)",
        )
    torch._check(
        output_size[0] > 0 and output_size[1] > 0,
        lambda: f"{op_name}: output size must be positive, got {tuple(output_size)}",
    )
    if offsets is not None:
        # G > 0 before the divisibility test below divides by it.
        torch._check(
            offsets.dim() == 4
            and offsets.shape[0] == boxes.shape[0]
            and offsets.shape[1] == 2
            and offsets.shape[2] == offsets.shape[3]
            and offsets.shape[2] > 0,
            lambda: f"{op_name}: offsets must be [K, 2, G, G] with K = {boxes.shape[0]} boxes, "
            f"got shape {tuple(offsets.shape)}",
        )
        torch._check(
            output_size[0] % offsets.shape[2] == 0 and output_size[1] % offsets.shape[2] == 0,
            lambda: f"{op_name}: output size {tuple(output_size)} must be divisible by the "
            f"offset grid {offsets.shape[2]}",
        )
    opmath = torch.float64 if features.dtype == torch.float64 else torch.float32
    for name, value in (("spatial_scale", spatial_scale), ("gamma", gamma)):
        if value is None:
            continue
        torch._check(
            _finite_in(value, opmath),
            lambda: f"{op_name}: {name} must be finite (in {str(opmath)[len('torch.'):]}, the "
            f"dtype sample positions are computed in), got {value}",
        )


def check_grad_argument(op_name: str, grad, features, boxes):
    """The backward ops' checks of ``grad`` (csrc/common/crop_sampling.cpp, check_grad_output):
    [K, C, out_h, out_w], on the features' device and in their dtype."""
    torch._check(
        grad.dim() == 4 and grad.shape[0] == boxes.shape[0] and grad.shape[1] == features.shape[1],
        lambda: f"{op_name}: grad must be [K, C, out_h, out_w] = [{boxes.shape[0]}, "
        f"{features.shape[1]}, ...], got {tuple(grad.shape)}",
    )
    torch._check(
        grad.device == features.device,
        lambda: f"{op_name}: grad is on {grad.device} but features are on {features.device}",
    )
    torch._check(
        grad.dtype == features.dtype,
        lambda: f"{op_name}: grad is {grad.dtype} but features are {features.dtype}; pass grad in "
        "the features' dtype (the dtype of the op's output)",
    )


# ---------------------------------------------------------------------------------------------
# crop_and_resize


@torch.library.register_fake("masklab::crop_and_resize")
def _crop_and_resize_fake(features, boxes, spatial_scale, crop_height, crop_width, aligned=False):
    check_crop_arguments(
        "crop_and_resize", features, boxes, None, (crop_height, crop_width), spatial_scale
    )
    return features.new_empty((boxes.shape[0], features.shape[1], crop_height, crop_width))


# The feature gradient has the layout of empty_like(features) on every device (channels-last in,
# channels-last gradient out); the C++ kernels return exactly that, so inductor's stride
# assertions hold. Box and offset gradients are fresh contiguous tensors.
@torch.library.register_fake("masklab::_crop_and_resize_backward")
def _crop_and_resize_backward_fake(grad, features, boxes, spatial_scale, aligned, output_mask):
    op_name = "crop_and_resize backward"
    torch._check(grad.dim() == 4, lambda: f"{op_name}: grad must be 4-D, got {tuple(grad.shape)}")
    check_crop_arguments(op_name, features, boxes, None, grad.shape[2:], spatial_scale)
    check_grad_argument(op_name, grad, features, boxes)
    return (
        torch.empty_like(features),
        torch.empty_like(boxes, memory_format=torch.contiguous_format),
    )


def _crop_and_resize_setup_context(ctx, inputs, output):
    features, boxes, spatial_scale, _, _, aligned = inputs
    ctx.save_for_backward(features, boxes)
    ctx.spatial_scale = spatial_scale
    ctx.aligned = aligned


def _crop_and_resize_backward(ctx, grad):
    features, boxes = ctx.saved_tensors
    needs_features, needs_boxes = ctx.needs_input_grad[:2]
    grad_features, grad_boxes = ops._crop_and_resize_backward(
        grad, features, boxes, ctx.spatial_scale, ctx.aligned, [needs_features, needs_boxes]
    )
    return (
        grad_features if needs_features else None,
        grad_boxes if needs_boxes else None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "masklab::crop_and_resize",
    _crop_and_resize_backward,
    setup_context=_crop_and_resize_setup_context,
)


# ---------------------------------------------------------------------------------------------
# deformable_crop_and_resize


@torch.library.register_fake("masklab::deformable_crop_and_resize")
def _deformable_fake(
    features, boxes, offsets, spatial_scale, output_height, output_width, gamma=0.1, aligned=False
):
    check_crop_arguments(
        "deformable_crop_and_resize",
        features,
        boxes,
        offsets,
        (output_height, output_width),
        spatial_scale,
        gamma,
    )
    return features.new_empty((boxes.shape[0], features.shape[1], output_height, output_width))


@torch.library.register_fake("masklab::_deformable_crop_and_resize_backward")
def _deformable_backward_fake(
    grad, features, boxes, offsets, spatial_scale, gamma, aligned, output_mask
):
    op_name = "deformable_crop_and_resize backward"
    torch._check(grad.dim() == 4, lambda: f"{op_name}: grad must be 4-D, got {tuple(grad.shape)}")
    check_crop_arguments(op_name, features, boxes, offsets, grad.shape[2:], spatial_scale, gamma)
    check_grad_argument(op_name, grad, features, boxes)
    return (
        torch.empty_like(features),
        torch.empty_like(boxes, memory_format=torch.contiguous_format),
        torch.empty_like(offsets, memory_format=torch.contiguous_format),
    )


def _deformable_setup_context(ctx, inputs, output):
    features, boxes, offsets, spatial_scale, _, _, gamma, aligned = inputs
    ctx.save_for_backward(features, boxes, offsets)
    ctx.spatial_scale = spatial_scale
    ctx.gamma = gamma
    ctx.aligned = aligned


def _deformable_backward(ctx, grad):
    features, boxes, offsets = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    grad_features, grad_boxes, grad_offsets = ops._deformable_crop_and_resize_backward(
        grad, features, boxes, offsets, ctx.spatial_scale, ctx.gamma, ctx.aligned, needs
    )
    return (
        grad_features if needs[0] else None,
        grad_boxes if needs[1] else None,
        grad_offsets if needs[2] else None,
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "masklab::deformable_crop_and_resize",
    _deformable_backward,
    setup_context=_deformable_setup_context,
)
