"""Loads the compiled ops (masklab_d2._C) and registers their fake kernels and autograd formulas.

Imported lazily by the op wrappers, so that the pure-PyTorch parts of `masklab_d2.layers` work
without a build. There is no silent fallback to the reference implementations.
"""

from typing import Sequence

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


def check_crop_arguments(op_name: str, features, boxes, offsets, output_size: Sequence[int]):
    """Shape checks shared by the fake kernels (the C++ kernels repeat them on real tensors)."""
    torch._check(
        features.dim() == 4,
        lambda: f"{op_name}: features must be a 4-D [N, C, H, W] tensor, got {tuple(features.shape)}",
    )
    torch._check(
        boxes.dim() == 2 and boxes.shape[1] == 5,
        lambda: f"{op_name}: boxes must be a [K, 5] tensor of (batch_index, x1, y1, x2, y2), "
        f"got {tuple(boxes.shape)}",
    )
    torch._check(
        output_size[0] > 0 and output_size[1] > 0,
        lambda: f"{op_name}: output size must be positive, got {tuple(output_size)}",
    )
    if offsets is not None:
        torch._check(
            offsets.dim() == 4
            and offsets.shape[0] == boxes.shape[0]
            and offsets.shape[1] == 2
            and offsets.shape[2] == offsets.shape[3],
            lambda: f"{op_name}: offsets must be [K, 2, G, G], got {tuple(offsets.shape)}",
        )
        torch._check(
            output_size[0] % offsets.shape[2] == 0 and output_size[1] % offsets.shape[2] == 0,
            lambda: f"{op_name}: output size {tuple(output_size)} must be divisible by the "
            f"offset grid {offsets.shape[2]}",
        )


# ---------------------------------------------------------------------------------------------
# crop_and_resize


@torch.library.register_fake("masklab::crop_and_resize")
def _crop_and_resize_fake(features, boxes, spatial_scale, crop_height, crop_width, aligned=False):
    check_crop_arguments("crop_and_resize", features, boxes, None, (crop_height, crop_width))
    return features.new_empty((boxes.shape[0], features.shape[1], crop_height, crop_width))


@torch.library.register_fake("masklab::_crop_and_resize_backward")
def _crop_and_resize_backward_fake(grad, features, boxes, spatial_scale, aligned, output_mask):
    return (
        torch.empty_like(features, memory_format=torch.contiguous_format),
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
        "deformable_crop_and_resize", features, boxes, offsets, (output_height, output_width)
    )
    return features.new_empty((boxes.shape[0], features.shape[1], output_height, output_width))


@torch.library.register_fake("masklab::_deformable_crop_and_resize_backward")
def _deformable_backward_fake(
    grad, features, boxes, offsets, spatial_scale, gamma, aligned, output_mask
):
    return (
        torch.empty_like(features, memory_format=torch.contiguous_format),
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
