"""Box heads: MaskLab's box classifier, a duplicated atrous res5 (Res5BoxHead)."""

from typing import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY
from torch import nn

from .backbone import build_resnet_stage


@ROI_BOX_HEAD_REGISTRY.register()
class Res5BoxHead(nn.Module):
    """A copy of the backbone's res5 stage run on pooled res4 crops, then global average pooling.

    MaskLab (after TF's Faster R-CNN): crops of 14 x 14 are max-pooled to 7 x 7 and go through a
    duplicated res5 with its own atrous rates (1, 2, 4) and stride 1; the semantic / direction
    branch keeps the backbone's own res5.

    Args:
        input_shape: the pooled features, [R, C_res4, P, P].
        res5: the stage (built by :func:`build_resnet_stage`).
        pool_first: 2 x 2 max-pool the crops before res5.
    """

    # A pretrained backbone's res5 initialises the duplicate too (the paper's "BC"; see
    # masklab_d2.modeling.checkpoint).
    pretrained_sources = {"res5": "res5"}

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, res5: nn.Module, pool_first: bool = True):
        super().__init__()
        self.res5 = res5
        self.pool_first = pool_first
        self._output_size = res5[-1].out_channels

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        rates: Sequence[int] = cfg.MODEL.ROI_BOX_HEAD.RES5_RATES
        res5 = nn.Sequential(*build_resnet_stage(cfg, 3, rates, first_stride=1))
        if res5[0].in_channels != input_shape.channels:
            raise ValueError(
                f"Res5BoxHead expects pooled res4 features with {res5[0].in_channels} channels, "
                f"got {input_shape.channels}"
            )
        return {
            "input_shape": input_shape,
            "res5": res5,
            "pool_first": cfg.MODEL.ROI_BOX_HEAD.RES5_POOL_FIRST,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[R, C_res4, P, P] -> [R, C_res5]."""
        if self.pool_first:
            x = F.max_pool2d(x, kernel_size=2, stride=2)
        return self.res5(x).mean(dim=(2, 3))

    @property
    def output_shape(self) -> ShapeSpec:
        return ShapeSpec(channels=self._output_size)
