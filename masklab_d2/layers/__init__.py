"""Torch-only building blocks and op wrappers. Nothing here imports detectron2."""

from .crop_and_resize import CropAndResize, crop_and_resize, crop_and_resize_reference
from .deformable_crop_and_resize import (
    DeformableCropAndResize,
    deformable_crop_and_resize,
    deformable_crop_and_resize_reference,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
