"""The ResNet and ResNet-FPN backbones of this project.

detectron2's `build_resnet_backbone` fixes R-18/34 at 64 res2 channels and allows res5 dilation 1
or 2 only. These builders add what the mask-head experiments need, and nothing head-specific:

* any width for basic-block ResNets (`RESNETS.STEM_OUT_CHANNELS` / `RES2_OUT_CHANNELS`), so the
  shapes configs can train a slim R-18 from scratch on 2 CPU cores;
* atrous convolution for output stride 8 (`RESNETS.RES4_DILATION: 2`, `RES5_DILATION: 4`) with
  DeepLab-style multi-grid rates in res5 (`RESNETS.RES5_MULTI_GRID`), as in MaskLab;
* the first convolution's output ("conv1", stride 2, before the max-pool) as a feature, for
  MaskLab's hypercolumn refinement, and bottom-up features passed through the FPN
  (`FPN.HYPERCOLUMN_FEATURES`).

With none of those options set, the networks (and their parameter names) are detectron2's.
"""

import inspect
from typing import Dict, List, Optional, Sequence

import torch.nn.functional as F
from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet
from fvcore.nn import weight_init


class DilatedBasicBlock(CNNBlockBase):
    """detectron2's BasicBlock (two 3x3 convs) with a dilation for atrous ResNet-18/34."""

    def __init__(self, in_channels, out_channels, *, stride=1, dilation=1, norm="BN"):
        super().__init__(in_channels, out_channels, stride)
        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels,
                out_channels,
                kernel_size=1,
                stride=stride,
                bias=False,
                norm=get_norm(norm, out_channels),
            )
        else:
            self.shortcut = None
        self.conv1 = Conv2d(
            in_channels,
            out_channels,
            kernel_size=3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        self.conv2 = Conv2d(
            out_channels,
            out_channels,
            kernel_size=3,
            stride=1,
            padding=dilation,
            dilation=dilation,
            bias=False,
            norm=get_norm(norm, out_channels),
        )
        for layer in [self.conv1, self.conv2, self.shortcut]:
            if layer is not None:
                weight_init.c2_msra_fill(layer)

    def forward(self, x):
        out = F.relu_(self.conv1(x))
        out = self.conv2(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out + shortcut)


class HypercolumnResNet(ResNet):
    """A ResNet that can also return "conv1", the stem convolution before its max-pool.

    MaskLab's refinement reads "conv1" (stride 2) and "res2" (stride 4); detectron2's "stem"
    output is already max-pooled to stride 4.
    """

    def __init__(self, stem: BasicStem, stages, out_features: Sequence[str], freeze_at: int = 0):
        stage_features = [f for f in out_features if f != "conv1"] or ["stem"]
        super().__init__(stem, stages, out_features=stage_features, freeze_at=freeze_at)
        if "conv1" in out_features:
            self._out_features = list(out_features)
            self._out_feature_strides["conv1"] = stem.stride // 2
            self._out_feature_channels["conv1"] = stem.out_channels

    def forward(self, x) -> Dict[str, "torch.Tensor"]:  # noqa: F821
        outputs = {}
        x = F.relu_(self.stem.conv1(x))
        if "conv1" in self._out_features:
            outputs["conv1"] = x
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name, stage in zip(self.stage_names, self.stages):
            x = stage(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs


_BLOCKS = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


def _stage_dilations(
    depth: int, res4_dilation: int, res5_dilation: int, res5_multi_grid: Sequence[int]
) -> List[List[int]]:
    """Per-block dilation of res2..res5."""
    if depth not in _BLOCKS:
        raise ValueError(
            f"depth (MODEL.RESNETS.DEPTH) must be one of {sorted(_BLOCKS)}, got {depth}"
        )
    num_blocks = _BLOCKS[depth]
    multi_grid = list(res5_multi_grid) or [1] * num_blocks[3]
    if res4_dilation not in (1, 2):
        raise ValueError(
            f"res4_dilation (MODEL.RESNETS.RES4_DILATION) must be 1 or 2, got {res4_dilation}"
        )
    if res5_dilation not in (1, 2, 4):
        raise ValueError(
            f"res5_dilation (MODEL.RESNETS.RES5_DILATION) must be 1, 2 or 4, got {res5_dilation}"
        )
    if res4_dilation == 2 and res5_dilation == 1:
        raise ValueError(
            "res4_dilation 2 (MODEL.RESNETS.RES4_DILATION) needs res5_dilation >= 2 "
            "(RES5_DILATION): res5 cannot downsample after it"
        )
    if len(multi_grid) != num_blocks[3]:
        raise ValueError(
            f"res5_multi_grid (MODEL.RESNETS.RES5_MULTI_GRID) needs one rate per res5 block "
            f"({num_blocks[3]} for R-{depth}), got {multi_grid}"
        )
    return [
        [1] * num_blocks[0],
        [1] * num_blocks[1],
        [res4_dilation] * num_blocks[2],
        [res5_dilation * rate for rate in multi_grid],
    ]


def resnet_stage(
    stage_index: int,
    dilations: Sequence[int],
    first_stride: int,
    *,
    depth: int,
    norm: str = "FrozenBN",
    stem_out_channels: int = 64,
    res2_out_channels: Optional[int] = None,
    stride_in_1x1: bool = True,
    num_groups: int = 1,
    width_per_group: int = 64,
):
    """Blocks of stage res{stage_index + 2}, one per entry of ``dilations``.

    Shared by the backbones and by :class:`~masklab_d2.modeling.box_heads.Res5BoxHead`, whose
    box classifier is a duplicate of res5. Arguments are the MODEL.RESNETS keys of the same
    names; ``res2_out_channels`` defaults to detectron2's widths (64 for R-18/34, else 256).
    """
    res2_out_channels = res2_out_channels or (64 if depth in (18, 34) else 256)
    out_channels = res2_out_channels * 2**stage_index
    kwargs = {
        "num_blocks": len(dilations),
        "stride_per_block": [first_stride] + [1] * (len(dilations) - 1),
        "dilation_per_block": list(dilations),
        "in_channels": stem_out_channels if stage_index == 0 else out_channels // 2,
        "out_channels": out_channels,
        "norm": norm,
    }
    if depth in (18, 34):
        if num_groups != 1:
            raise ValueError(
                "R-18/34 use basic blocks: num_groups (MODEL.RESNETS.NUM_GROUPS) must be 1"
            )
        kwargs["block_class"] = DilatedBasicBlock
    else:
        kwargs.update(
            block_class=BottleneckBlock,
            bottleneck_channels=num_groups * width_per_group * 2**stage_index,
            stride_in_1x1=stride_in_1x1,
            num_groups=num_groups,
        )
    return ResNet.make_stage(**kwargs)


def _resnet_widths(cfg) -> Dict[str, object]:
    """The :func:`resnet_stage` arguments of cfg.MODEL.RESNETS."""
    resnets = cfg.MODEL.RESNETS
    # fmt: off
    return {
        "depth":             resnets.DEPTH,
        "norm":              resnets.NORM,
        "stem_out_channels": resnets.STEM_OUT_CHANNELS,
        "res2_out_channels": resnets.RES2_OUT_CHANNELS,
        "stride_in_1x1":     resnets.STRIDE_IN_1X1,
        "num_groups":        resnets.NUM_GROUPS,
        "width_per_group":   resnets.WIDTH_PER_GROUP,
    }
    # fmt: on


def build_resnet_stage(cfg, stage_index: int, dilations: Sequence[int], first_stride: int):
    """:func:`resnet_stage` with the widths of cfg.MODEL.RESNETS."""
    return resnet_stage(stage_index, dilations, first_stride, **_resnet_widths(cfg))


def hypercolumn_resnet(
    *,
    out_features: Sequence[str],
    res4_dilation: int = 1,
    res5_dilation: int = 1,
    res5_multi_grid: Sequence[int] = (),
    freeze_at: int = 0,
    in_channels: int = 3,
    **widths,
) -> "HypercolumnResNet":
    """masklab_d2's ResNet: any width for R-18/34, atrous res4 / res5 with multi-grid rates, and
    a "conv1" output (module docstring); for LazyCall, and behind the YAML builders.

    Arguments are the MODEL.RESNETS keys of the same names and MODEL.BACKBONE.FREEZE_AT;
    ``widths`` are :func:`resnet_stage`'s (``depth``, required, ``norm``, ``stem_out_channels``,
    ``res2_out_channels``, ...), with its defaults.
    """
    stage_parameters = inspect.signature(resnet_stage).parameters.values()
    widths = {
        **{p.name: p.default for p in stage_parameters if p.kind is p.KEYWORD_ONLY},
        **widths,
    }
    if widths["depth"] is inspect.Parameter.empty:
        raise TypeError("hypercolumn_resnet needs depth (MODEL.RESNETS.DEPTH)")
    dilations = _stage_dilations(widths["depth"], res4_dilation, res5_dilation, res5_multi_grid)
    stem = BasicStem(
        in_channels=in_channels, out_channels=widths["stem_out_channels"], norm=widths["norm"]
    )
    stages = []
    for index, stage_dilations in enumerate(dilations):
        # A dilated stage keeps the resolution of the previous one instead of downsampling.
        first_stride = 1 if index == 0 or stage_dilations[0] > 1 else 2
        stages.append(resnet_stage(index, stage_dilations, first_stride, **widths))
    return HypercolumnResNet(stem, stages, out_features, freeze_at=freeze_at)


def build_hypercolumn_resnet(cfg, input_shape: ShapeSpec, out_features: Sequence[str]):
    """:func:`hypercolumn_resnet` from cfg.MODEL.RESNETS and MODEL.BACKBONE.FREEZE_AT."""
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        raise ValueError("MODEL.RESNETS.DEFORM_ON_PER_STAGE is not supported by this backbone")
    resnets = cfg.MODEL.RESNETS
    return hypercolumn_resnet(
        out_features=out_features,
        res4_dilation=resnets.RES4_DILATION,
        res5_dilation=resnets.RES5_DILATION,
        res5_multi_grid=resnets.RES5_MULTI_GRID,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels,
        **_resnet_widths(cfg),
    )


@BACKBONE_REGISTRY.register()
def build_masklab_resnet_backbone(cfg, input_shape: ShapeSpec):
    """ResNet (C4-style, optionally atrous) whose outputs are MODEL.RESNETS.OUT_FEATURES."""
    return build_hypercolumn_resnet(cfg, input_shape, cfg.MODEL.RESNETS.OUT_FEATURES)


class HypercolumnFPN(FPN):
    """An FPN that also returns some bottom-up features ("conv1", "res2", ...) unchanged."""

    def __init__(self, *args, hypercolumn_features: Sequence[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        bottom_up_shapes = self.bottom_up.output_shape()
        missing = [f for f in hypercolumn_features if f not in bottom_up_shapes]
        if missing:
            raise ValueError(
                f"FPN.HYPERCOLUMN_FEATURES {missing} are not bottom-up features "
                f"(available: {sorted(bottom_up_shapes)})"
            )
        self._hypercolumn_shapes = {f: bottom_up_shapes[f] for f in hypercolumn_features}

    def forward(self, x):
        if not self._hypercolumn_shapes:
            return super().forward(x)
        # FPN.forward keeps the bottom-up outputs to itself; catch them on the way.
        bottom_up_outputs = {}
        handle = self.bottom_up.register_forward_hook(
            lambda module, inputs, outputs: bottom_up_outputs.update(outputs)
        )
        try:
            results = super().forward(x)
        finally:
            handle.remove()
        results.update({f: bottom_up_outputs[f] for f in self._hypercolumn_shapes})
        return results

    def output_shape(self):
        return {**super().output_shape(), **self._hypercolumn_shapes}


@BACKBONE_REGISTRY.register()
def build_masklab_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """ResNet-FPN (P2-P6) over :func:`build_hypercolumn_resnet`, plus FPN.HYPERCOLUMN_FEATURES."""
    in_features = list(cfg.MODEL.FPN.IN_FEATURES)
    hypercolumn = list(cfg.MODEL.FPN.HYPERCOLUMN_FEATURES)
    bottom_up = build_hypercolumn_resnet(
        cfg, input_shape, in_features + [f for f in hypercolumn if f not in in_features]
    )
    return HypercolumnFPN(
        bottom_up=bottom_up,
        in_features=in_features,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
        hypercolumn_features=hypercolumn,
    )
