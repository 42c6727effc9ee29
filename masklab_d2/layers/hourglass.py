"""Deep-MARC mask-head networks (hourglass and ResNet-N baselines) in plain PyTorch.

Deep-MARC (Birodkar et al., "The surprising impact of mask-head architecture on novel class
segmentation", ICCV 2021) shows that, once the mask head is trained on crops of *ground-truth*
boxes only, a much deeper mask head generalises far better to classes that had no mask labels
(COCO VOC -> non-VOC). Its Mask R-CNN head replaces the usual 4-conv head with an hourglass:

    RoIAlign 32x32x256 -> HourglassNetwork (nc=64, no initial downsampling) -> [R, 2nc, 32, 32]
    -> DeepMaskPredictor: ConvTranspose 2x2/2 (nc filters) + BN + ReLU -> 1x1 conv -> 64x64 logits

This module holds only the torch networks: no detectron2, no other masklab_d2 import, so that the
detectron2 adapter can wrap them and they can be tested on their own. It is one module of about
750 lines on purpose: both families of the paper (hourglass and ResNet-N), their shared blocks
and the variant tables that name them are read side by side with the reference, whose layout it
follows.

Sources (summarised in the project's reference notes ``reference/deep_marc.md``, section 1, and
checked against the TensorFlow code itself):

* ``official/projects/deepmac_maskrcnn/modeling/heads/hourglass_network.py``: ConvBlock,
  ResBlock, the recursive encoder-decoder stage, ``hourglass_depth`` and hourglass_10/20/32/52/100.
* ``official/projects/deepmac_maskrcnn/modeling/heads/instance_heads.py`` (``DeepMaskHead``): the
  deconv + BN + ReLU + 1x1 predictor and its VarianceScaling(2, fan_out, untruncated) init.
* ``research/object_detection/meta_architectures/deepmac_meta_arch.py`` (``ResNetMaskNetwork``)
  and ``research/object_detection/models/keras_models/resnet_v1.py`` (``block_basic``,
  ``stack_basic``): the ResNet-N baselines.

Conventions: tensors are NCHW, ``R`` is the number of RoIs, ``nc`` is ``num_filters``. Batch-norm
momenta are given in PyTorch's convention (``running = (1 - m) * running + m * batch``), which is
``1 - keras_momentum``.
"""

from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HOURGLASS_VARIANTS",
    "RESNET_VARIANTS",
    "MASK_NETWORK_NAMES",
    "HourglassSpec",
    "ResNetSpec",
    "SingleValueSafeBatchNorm2d",
    "SingleValueSafeSyncBatchNorm",
    "get_norm",
    "ConvBlock",
    "ResBlock",
    "HourglassStage",
    "HourglassNetwork",
    "hourglass_depth",
    "hourglass_config",
    "PreActBasicBlock",
    "ResNetMaskNetwork",
    "resnet_config",
    "build_mask_network",
    "DeepMaskPredictor",
]

# The hourglass's batch norm in the reference is Keras BN with momentum 0.1 and eps 1e-5, i.e. the
# moving averages keep only 10% of their old value per step: PyTorch momentum = 1 - 0.1 = 0.9.
HOURGLASS_BN_MOMENTUM = 0.9
HOURGLASS_BN_EPS = 1e-5
# The ResNet-N baselines use keras resnet_v1.block_basic, i.e. Keras BN defaults: momentum 0.99
# (PyTorch 0.01) and an explicit eps of 1.001e-5.
RESNET_BN_MOMENTUM = 0.01
RESNET_BN_EPS = 1.001e-5
# The BN after the deconv takes the config's norm_activation: 0.997 / 1e-4 in the ResNet-FPN
# configs (PyTorch momentum 0.003); the SpineNet configs use 0.99 / 1e-3 (PyTorch 0.01, 1e-3).
PREDICTOR_BN_MOMENTUM = 0.003
PREDICTOR_BN_EPS = 1e-4
# GroupNorm is not in the reference; 32 groups is the usual detectron2 "GN" setting.
GN_MAX_GROUPS = 32

_NORM_NAMES = ("BN", "SyncBN", "GN", "", "none")


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------
def _single_value_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Normalises a one-value-per-channel batch with its own biased statistics (Keras's result).

    The centred input is 0, so the output is the BN bias; the running statistics are untouched.
    """
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    var = centred.pow(2).mean(dim=(0, 2, 3), keepdim=True)
    out = centred * torch.rsqrt(var + bn.eps)
    if bn.affine:
        out = out * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    return out


def _is_single_value_batch(bn: nn.Module, x: torch.Tensor) -> bool:
    return bn.training and x.numel() > 0 and x.numel() == x.shape[1]


class SingleValueSafeBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that tolerates one value per channel in training mode.

    HG-52 downsamples a 32x32 crop five times to 1x1, so a training batch with a single RoI gives
    the innermost BN layers exactly one value per channel. ``nn.BatchNorm2d`` raises on that
    ("Expected more than 1 value per channel when training") because the unbiased variance for the
    running statistics is undefined. Here such a batch is normalised with its own (biased) batch
    statistics, as Keras does (the centred input is 0, so the output is the BN bias), and the
    running statistics are left untouched. Every other input, including an empty batch (R = 0),
    goes through ``nn.BatchNorm2d`` unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_single_value_batch(self, x):
            return _single_value_batch_norm(self, x)
        return super().forward(x)


class SingleValueSafeSyncBatchNorm(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with :class:`SingleValueSafeBatchNorm2d`'s one-value rule.

    Outside a multi-process group (one GPU, the CPU, evaluation scripts) SyncBatchNorm falls back
    to plain batch norm and raises on a single RoI at HG-52's 1x1 stages; it gets the same
    Keras-style treatment there. Across processes the statistics are gathered from every rank,
    so a single local value is no problem and SyncBatchNorm runs unchanged.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not distributed and _is_single_value_batch(self, x):
            return _single_value_batch_norm(self, x)
        return super().forward(x)


def _canonical_norm(norm: Optional[str]) -> str:
    """Maps None / "" / "none" to "" and validates the name."""
    if norm is None:
        return ""
    if not isinstance(norm, str) or norm not in _NORM_NAMES:
        raise ValueError(f"Unknown norm {norm!r}; valid norms: {list(_NORM_NAMES)} (or None)")
    return "" if norm == "none" else norm


def _uses_conv_bias(norm: Optional[str]) -> bool:
    """Convolutions followed by a norm layer need no bias (the norm's shift replaces it)."""
    return _canonical_norm(norm) == ""


def _group_norm_groups(channels: int) -> int:
    """The largest divisor of ``channels`` that is at most GN_MAX_GROUPS (32 for all widths here).

    Falling back to fewer groups, rather than raising, keeps reduced-width variants (e.g. nc=24,
    giving 48/72/96 channels) usable with GN.
    """
    for groups in range(min(GN_MAX_GROUPS, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def get_norm(
    norm: Optional[str],
    channels: int,
    bn_momentum: float = HOURGLASS_BN_MOMENTUM,
    bn_eps: float = HOURGLASS_BN_EPS,
) -> nn.Module:
    """Builds the normalisation layer for ``channels`` feature maps.

    Args:
        norm: "BN" (SingleValueSafeBatchNorm2d), "SyncBN" (SingleValueSafeSyncBatchNorm), "GN"
            (GroupNorm with 32 groups, or the largest divisor of ``channels`` below 32), or
            ""/"none"/None for no normalisation (nn.Identity; the preceding convolution then
            gets a bias).
        channels: number of channels C of the [R, C, H, W] input.
        bn_momentum: PyTorch-convention BN momentum (= 1 - Keras momentum). The default 0.9 is the
            hourglass's Keras momentum 0.1.
        bn_eps: BN epsilon (also used by GN).

    Returns:
        nn.Module mapping [R, C, H, W] -> [R, C, H, W].

    Raises:
        ValueError: for an unknown norm name.
    """
    norm = _canonical_norm(norm)
    if norm == "BN":
        return SingleValueSafeBatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)
    if norm == "SyncBN":
        return SingleValueSafeSyncBatchNorm(channels, eps=bn_eps, momentum=bn_momentum)
    if norm == "GN":
        return nn.GroupNorm(_group_norm_groups(channels), channels, eps=bn_eps)
    return nn.Identity()


def _init_keras_default(module: nn.Module) -> None:
    """Keras's default init for every Conv2d in ``module``: glorot_uniform kernel, zero bias.

    The reference hourglass and ResNet-N layers are ``tf.keras.layers.Conv2D`` without a
    ``kernel_initializer``, i.e. glorot_uniform (limit sqrt(6 / (fan_in + fan_out)) with
    fan = k*k*channels), which is exactly ``nn.init.xavier_uniform_`` on a [out, in, k, k] weight.
    Norm layers keep PyTorch's defaults (gamma 1, beta 0), which are also Keras's.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# Hourglass building blocks
# ------------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """Zero-pad k//2, k x k conv (no bias), norm, ReLU: the reference's ``ConvolutionalBlock``.

    ``nn.Conv2d(padding=k//2)`` is the same as the reference's explicit symmetric
    ``ZeroPadding2D(k//2)`` followed by a 'valid' conv (also for stride 2, where TF's 'same'
    padding would pad asymmetrically).

    Args:
        in_channels: C_in.
        out_channels: C_out.
        kernel_size: odd k (1, 3 or 7 in the reference).
        stride: 1, or 2 to halve the resolution (ceil(H / 2)).
        norm: see ``get_norm``; with no norm the conv has a bias.
        relu: apply the final ReLU (False for the residual shortcut, the reference's
            ``SkipConvolution``).
        bn_momentum: PyTorch-convention BN momentum.
        bn_eps: BN epsilon.

    Shape:
        [R, C_in, H, W] -> [R, C_out, ceil(H / stride), ceil(W / stride)]
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        norm: Optional[str] = "BN",
        relu: bool = True,
        bn_momentum: float = HOURGLASS_BN_MOMENTUM,
        bn_eps: float = HOURGLASS_BN_EPS,
    ):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"ConvBlock needs an odd kernel size, got {kernel_size}")
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            bias=_uses_conv_bias(norm),
        )
        self.norm = get_norm(norm, out_channels, bn_momentum, bn_eps)
        self.activation = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(x)))


class ResBlock(nn.Module):
    """Residual block: ReLU(norm(conv3x3(ConvBlock3x3(x))) + shortcut(x)).

    The shortcut is a 1x1 conv with the block's stride plus norm (no ReLU) when the stride is > 1
    or the channel count changes, identity otherwise, as in the reference's ``ResidualBlock``.

    Args:
        in_channels: C_in.
        out_channels: C_out.
        stride: stride of the first 3x3 conv and of the 1x1 shortcut.
        norm: see ``get_norm``.
        skip_conv: force the conv shortcut on (True) or leave the automatic rule (None). The
            hourglass input block sets True, as the reference does; False with a stride or
            channel change is rejected because the identity cannot be added.
        bn_momentum: PyTorch-convention BN momentum.
        bn_eps: BN epsilon.

    Shape:
        [R, C_in, H, W] -> [R, C_out, ceil(H / stride), ceil(W / stride)]
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm: Optional[str] = "BN",
        skip_conv: Optional[bool] = None,
        bn_momentum: float = HOURGLASS_BN_MOMENTUM,
        bn_eps: float = HOURGLASS_BN_EPS,
    ):
        super().__init__()
        needs_conv = stride > 1 or in_channels != out_channels
        if skip_conv is False and needs_conv:
            raise ValueError(
                f"ResBlock({in_channels} -> {out_channels}, stride {stride}) needs a conv shortcut"
            )
        self.conv_block = ConvBlock(
            in_channels, out_channels, 3, stride, norm, bn_momentum=bn_momentum, bn_eps=bn_eps
        )
        self.conv = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=_uses_conv_bias(norm))
        self.norm = get_norm(norm, out_channels, bn_momentum, bn_eps)
        if needs_conv or skip_conv:
            self.shortcut = ConvBlock(
                in_channels,
                out_channels,
                1,
                stride,
                norm,
                relu=False,
                bn_momentum=bn_momentum,
                bn_eps=bn_eps,
            )
        else:
            self.shortcut = nn.Identity()
        self.activation = nn.ReLU(inplace=True)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.norm(self.conv(self.conv_block(x)))
        return self.activation(residual + self.shortcut(x))


def _res_blocks(
    in_channels: int, out_channels: int, num_blocks: int, stride: int = 1, **kwargs
) -> nn.Sequential:
    """``num_blocks`` ResBlocks at ``out_channels``; only the first has ``stride``."""
    blocks = [ResBlock(in_channels, out_channels, stride, **kwargs)]
    blocks += [ResBlock(out_channels, out_channels, 1, **kwargs) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class HourglassStage(nn.Module):
    """One recursive encoder-decoder stage (the reference's ``EncoderDecoderBlock``).

    With ``channel_dims = [c0, c1, ...]`` and ``blocks_per_stage = [b0, b1, ...]``:

    * ``skip_branch``: b0 x ResBlock(c0), at full resolution;
    * ``down_path``: ResBlock(c1, stride 2), then (b0 - 1) x ResBlock(c1);
    * ``inner``: the stage for ``channel_dims[1:]``, or, when only [c0, c1] are left,
      b1 x ResBlock(c1);
    * ``up_path``: (b0 - 1) x ResBlock(c1), then ResBlock(c0);
    * output: nearest-neighbour upsampling of ``up_path`` to the skip branch's size, added to it.

    The reference upsamples by exactly 2 (``UpSampling2D(2)``), which only matches the skip
    branch when the input size is even. Interpolating to the skip branch's exact size is the same
    thing for even sizes, and for an odd size H (down-sampled to ceil(H / 2)) it is the same as
    upsampling by 2 and dropping the last row/column: output pixel j reads low-res pixel
    floor(j / 2), i.e. the low-res pixel whose stride-2 conv was centred on j or j - 1. So 14x14 or
    28x28 crops work, and 32x32 is bit-identical to the reference.

    Where the reference's up path has b0 = 1 and c1 != c0 it would add an identity shortcut of the
    wrong width (a shape error in TF; no table entry does this); here that block gets a conv
    shortcut, the same rule as everywhere else.

    Args:
        channel_dims: [c0, c1, ...], at least two entries; the input has c0 channels.
        blocks_per_stage: [b0, b1, ...], same length, all >= 1.
        norm, bn_momentum, bn_eps: see ``ResBlock``.

    Shape:
        [R, c0, H, W] -> [R, c0, H, W]
    """

    def __init__(
        self,
        channel_dims: Sequence[int],
        blocks_per_stage: Sequence[int],
        norm: Optional[str] = "BN",
        bn_momentum: float = HOURGLASS_BN_MOMENTUM,
        bn_eps: float = HOURGLASS_BN_EPS,
    ):
        super().__init__()
        _check_hourglass_config(channel_dims, blocks_per_stage)
        c0, c1 = channel_dims[0], channel_dims[1]
        b0 = blocks_per_stage[0]
        kw = dict(norm=norm, bn_momentum=bn_momentum, bn_eps=bn_eps)

        self.skip_branch = _res_blocks(c0, c0, b0, **kw)
        self.down_path = _res_blocks(c0, c1, b0, stride=2, **kw)
        if len(channel_dims) > 2:
            self.inner = HourglassStage(channel_dims[1:], blocks_per_stage[1:], **kw)
        else:
            self.inner = _res_blocks(c1, c1, blocks_per_stage[1], **kw)
        up_blocks = [ResBlock(c1, c1, 1, **kw) for _ in range(b0 - 1)]
        self.up_path = nn.Sequential(*up_blocks, ResBlock(c1, c0, 1, **kw))
        self.out_channels = c0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.skip_branch(x)
        low_res = self.up_path(self.inner(self.down_path(x)))
        upsampled = F.interpolate(low_res, size=skip.shape[-2:], mode="nearest")
        return skip + upsampled


def _check_hourglass_config(channel_dims: Sequence[int], blocks_per_stage: Sequence[int]) -> None:
    if len(channel_dims) != len(blocks_per_stage):
        raise ValueError(
            f"channel_dims {list(channel_dims)} and blocks_per_stage {list(blocks_per_stage)} "
            "must have the same length"
        )
    if len(channel_dims) < 2:
        raise ValueError(f"an hourglass needs at least 2 channel dims, got {list(channel_dims)}")
    if min(blocks_per_stage) < 1 or min(channel_dims) < 1:
        raise ValueError(
            f"channel_dims {list(channel_dims)} and blocks_per_stage {list(blocks_per_stage)} "
            "must be positive"
        )


def hourglass_depth(channel_dims: Sequence[int], blocks_per_stage: Sequence[int]) -> int:
    """Number of conv layers on the hourglass's main path (the N of HG-N).

    Reference rule (``hourglass_depth`` in hourglass_network.py): 3 for the input (the 3x3
    ConvBlock plus the 2 convs of the input ResBlock), 2 per ResBlock on the down path, the
    innermost blocks and the up path, and 1 for the output ConvBlock. Skip-branch blocks and 1x1
    residual shortcuts are not counted. Each of the len(dims) - 1 stages contributes
    2 * (b0 + b0) convs (down and up paths have b0 blocks each), the innermost b_last blocks
    2 * b_last.

    Args:
        channel_dims: [c0, c1, ...] (only validated; widths do not change the depth).
        blocks_per_stage: [b0, b1, ...].

    Returns:
        int: e.g. 52 for ([128, 128, 192, 192, 192, 256], [2, 2, 2, 2, 2, 4]).
    """
    _check_hourglass_config(channel_dims, blocks_per_stage)
    stages = 4 * sum(blocks_per_stage[:-1])
    innermost = 2 * blocks_per_stage[-1]
    return 3 + stages + innermost + 1


class HourglassSpec(NamedTuple):
    """An hourglass variant: channel widths in units of nc (num_filters) and blocks per stage."""

    channel_multipliers: Tuple[int, ...]
    blocks_per_stage: Tuple[int, ...]

    def channel_dims(self, num_filters: int = 64) -> Tuple[int, ...]:
        """Absolute widths, e.g. (128, 128, 192) for nc=64 or (64, 64, 96) for nc=32."""
        return tuple(m * num_filters for m in self.channel_multipliers)


# The reference's hourglass_N(nc) definitions; with nc = 64 these give the notes' table:
#   HG-10: 128,128 / 1,1; HG-20: 128,128,192 / 1,2,2; HG-32 (ODAPI only): 128,128,192,192 / 2,2,2,2;
#   HG-52: 128,128,192,192,192,256 / 2,2,2,2,2,4; HG-100: same widths / 4,4,4,4,4,8.
HOURGLASS_VARIANTS: Dict[str, HourglassSpec] = {
    "hourglass10": HourglassSpec((2, 2), (1, 1)),
    "hourglass20": HourglassSpec((2, 2, 3), (1, 2, 2)),
    "hourglass32": HourglassSpec((2, 2, 3, 3), (2, 2, 2, 2)),
    "hourglass52": HourglassSpec((2, 2, 3, 3, 3, 4), (2, 2, 2, 2, 2, 4)),
    "hourglass100": HourglassSpec((2, 2, 3, 3, 3, 4), (4, 4, 4, 4, 4, 8)),
}


def hourglass_config(name: str, num_filters: int = 64) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(channel_dims, blocks_per_stage) of a named hourglass variant at width ``num_filters``."""
    if name not in HOURGLASS_VARIANTS:
        raise ValueError(
            f"Unknown hourglass variant {name!r}; valid names: {sorted(HOURGLASS_VARIANTS)}"
        )
    spec = HOURGLASS_VARIANTS[name]
    return spec.channel_dims(num_filters), tuple(spec.blocks_per_stage)


class HourglassNetwork(nn.Module):
    """Single hourglass mask network of Deep-MARC (``initial_downsample=False``).

    input_conv: ConvBlock(3x3, nc); input_res: ResBlock(c0 = 2nc) with a conv shortcut; the
    recursive ``HourglassStage`` over ``channel_dims``; output_conv: ConvBlock(3x3, c0). With the
    reference's single hourglass the "last output" is this output. The reference's other input
    mode (``initial_downsample=True``: 7x7 stride-2 conv and a stride-2 ResBlock, for backbones)
    is not used by Deep-MARC and not implemented.

    Conv kernels use the Keras default glorot_uniform (the reference sets no initialiser), biases
    (only present without a norm) are zero.

    Args:
        in_channels: C of the RoI features (256 for FPN).
        num_filters: nc, the width of the input conv (64 in Deep-MARC).
        channel_dims: [c0, c1, ...] stage widths; with ``blocks_per_stage``, None for HG-52 at
            ``num_filters`` (the Deep-MARC head). Both or neither must be given.
        blocks_per_stage: [b0, b1, ...] residual blocks per stage.
        norm: "BN", "SyncBN", "GN" or ""/"none" (see ``get_norm``).
        bn_momentum: PyTorch-convention BN momentum; 0.9 is the reference's Keras 0.1.
        bn_eps: BN epsilon (1e-5 in the reference).

    Shape:
        [R, in_channels, H, W] -> [R, c0, H, W], e.g. [R, 256, 32, 32] -> [R, 128, 32, 32].
    """

    def __init__(
        self,
        in_channels: int,
        num_filters: int = 64,
        channel_dims: Optional[Sequence[int]] = None,
        blocks_per_stage: Optional[Sequence[int]] = None,
        norm: Optional[str] = "BN",
        bn_momentum: float = HOURGLASS_BN_MOMENTUM,
        bn_eps: float = HOURGLASS_BN_EPS,
    ):
        super().__init__()
        if (channel_dims is None) != (blocks_per_stage is None):
            raise ValueError("give both channel_dims and blocks_per_stage, or neither (HG-52)")
        if channel_dims is None:
            channel_dims, blocks_per_stage = hourglass_config("hourglass52", num_filters)
        channel_dims, blocks_per_stage = tuple(channel_dims), tuple(blocks_per_stage)
        _check_hourglass_config(channel_dims, blocks_per_stage)
        kw = dict(norm=norm, bn_momentum=bn_momentum, bn_eps=bn_eps)
        c0 = channel_dims[0]

        self.input_conv = ConvBlock(in_channels, num_filters, 3, **kw)
        self.input_res = ResBlock(num_filters, c0, skip_conv=True, **kw)
        self.hourglass = HourglassStage(channel_dims, blocks_per_stage, **kw)
        self.output_conv = ConvBlock(c0, c0, 3, **kw)

        self.channel_dims = channel_dims
        self.blocks_per_stage = blocks_per_stage
        self.depth = hourglass_depth(channel_dims, blocks_per_stage)
        self.out_channels = c0
        _init_keras_default(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[R, in_channels, H, W] -> [R, c0, H, W]; any H, W >= 1 and R >= 0."""
        x = self.input_res(self.input_conv(x))
        return self.output_conv(self.hourglass(x))


# ------------------------------------------------------------------------------------------------
# ResNet-N baselines
# ------------------------------------------------------------------------------------------------
class PreActBasicBlock(nn.Module):
    """Keras ``resnet_v1.block_basic`` with stride 1, as used by the ResNet-N mask networks.

    pre = ReLU(norm(x)); shortcut = 1x1 conv (with bias, as Keras's default) of ``pre`` for the
    first block of a stack, else ``x`` itself; y = ReLU(norm(conv3x3(pre))); y =
    ReLU(norm(conv3x3(y))); output = shortcut + y, with no ReLU after the addition.

    Args:
        in_channels: C_in.
        out_channels: C_out (must equal C_in without ``conv_shortcut``).
        conv_shortcut: use the 1x1 conv shortcut on the pre-activation.
        norm, bn_momentum, bn_eps: see ``get_norm``; ResNet defaults are Keras's 0.99 / 1.001e-5.

    Shape:
        [R, C_in, H, W] -> [R, C_out, H, W]
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        conv_shortcut: bool,
        norm: Optional[str] = "BN",
        bn_momentum: float = RESNET_BN_MOMENTUM,
        bn_eps: float = RESNET_BN_EPS,
    ):
        super().__init__()
        if not conv_shortcut and in_channels != out_channels:
            raise ValueError(
                f"an identity shortcut needs in_channels == out_channels, got "
                f"{in_channels} -> {out_channels}"
            )
        bias = _uses_conv_bias(norm)
        self.preact_norm = get_norm(norm, in_channels, bn_momentum, bn_eps)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if conv_shortcut else None
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.norm1 = get_norm(norm, out_channels, bn_momentum, bn_eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.norm2 = get_norm(norm, out_channels, bn_momentum, bn_eps)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in-place: without a norm, ``pre`` would otherwise alias ``x``, the identity shortcut.
        pre = F.relu(self.preact_norm(x))
        shortcut = self.shortcut(pre) if self.shortcut is not None else x
        y = F.relu(self.norm1(self.conv1(pre)))
        y = F.relu(self.norm2(self.conv2(y)))
        return shortcut + y


class ResNetSpec(NamedTuple):
    """A ResNet-N variant: stack widths in units of nc and basic blocks per stack."""

    channel_multipliers: Tuple[int, ...]
    blocks_per_stack: Tuple[int, ...]

    def channel_dims(self, num_filters: int = 64) -> Tuple[int, ...]:
        return tuple(m * num_filters for m in self.channel_multipliers)


# ODAPI's ResNetMaskNetwork: N = 2 x (number of basic blocks) = number of 3x3 convs. ResNet-20's
# extra 3nc stack is there "such that the channels are roughly similar to the hourglass20".
RESNET_VARIANTS: Dict[str, ResNetSpec] = {
    "resnet4": ResNetSpec((2,), (2,)),
    "resnet8": ResNetSpec((2,), (4,)),
    "resnet12": ResNetSpec((2,), (6,)),
    "resnet16": ResNetSpec((2,), (8,)),
    "resnet20": ResNetSpec((2, 3), (8, 2)),
}


def resnet_config(name: str, num_filters: int = 64) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(channel_dims, blocks_per_stack) of a named ResNet-N variant at width ``num_filters``."""
    if name not in RESNET_VARIANTS:
        raise ValueError(f"Unknown resnet variant {name!r}; valid names: {sorted(RESNET_VARIANTS)}")
    spec = RESNET_VARIANTS[name]
    return spec.channel_dims(num_filters), tuple(spec.blocks_per_stack)


class ResNetMaskNetwork(nn.Module):
    """ResNet-N mask network (ODAPI's ``ResNetMaskNetwork``), the paper's shallow baselines.

    A 1x1 conv (with bias, no norm or activation) to nc, then ``resnet_v1.stack_basic`` stacks
    with every stride 1, so the resolution never changes: ResNet-4/8/12/16 have 2/4/6/8 basic
    blocks at 2nc; ResNet-20 has 8 blocks at 2nc then 2 at 3nc. The first block of each stack
    has the 1x1 conv shortcut. Conv kernels use the Keras default glorot_uniform, biases zero.

    Keras's ``stack_basic`` builds ``max(blocks, 2)`` blocks; every variant here has >= 2, so
    ``blocks`` is the count.

    Args:
        in_channels: C of the RoI features.
        num_filters: nc.
        depth: N in {4, 8, 12, 16, 20}.
        norm: see ``get_norm``.
        bn_momentum: PyTorch-convention BN momentum (0.01 = Keras default 0.99 of the reference).
        bn_eps: BN epsilon (Keras resnet's 1.001e-5).

    Shape:
        [R, in_channels, H, W] -> [R, out_channels, H, W], out_channels = 2nc (3nc for N = 20).
    """

    def __init__(
        self,
        in_channels: int,
        num_filters: int = 64,
        depth: int = 20,
        norm: Optional[str] = "BN",
        bn_momentum: float = RESNET_BN_MOMENTUM,
        bn_eps: float = RESNET_BN_EPS,
    ):
        super().__init__()
        channel_dims, blocks_per_stack = resnet_config(f"resnet{depth}", num_filters)
        kw = dict(norm=norm, bn_momentum=bn_momentum, bn_eps=bn_eps)
        self.input_conv = nn.Conv2d(in_channels, num_filters, 1)
        blocks = []
        channels = num_filters
        for width, num_blocks in zip(channel_dims, blocks_per_stack):
            blocks.append(PreActBasicBlock(channels, width, conv_shortcut=True, **kw))
            blocks += [
                PreActBasicBlock(width, width, conv_shortcut=False, **kw)
                for _ in range(num_blocks - 1)
            ]
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.depth = depth
        self.out_channels = channels
        _init_keras_default(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[R, in_channels, H, W] -> [R, out_channels, H, W]."""
        return self.blocks(self.input_conv(x))


# ------------------------------------------------------------------------------------------------
# Factory and predictor
# ------------------------------------------------------------------------------------------------
MASK_NETWORK_NAMES: Tuple[str, ...] = tuple(HOURGLASS_VARIANTS) + tuple(RESNET_VARIANTS)


def build_mask_network(
    name: str,
    in_channels: int,
    num_filters: int = 64,
    norm: Optional[str] = "BN",
    bn_momentum: Optional[float] = None,
    bn_eps: Optional[float] = None,
) -> nn.Module:
    """Builds a named mask network; the result exposes ``out_channels``.

    Args:
        name: one of MASK_NETWORK_NAMES: hourglass10/20/32/52/100, resnet4/8/12/16/20.
        in_channels: C of the RoI features.
        num_filters: nc.
        norm: see ``get_norm``.
        bn_momentum: PyTorch-convention BN momentum; None uses the reference's value for that
            family (0.9 for hourglasses, 0.01 for ResNets).
        bn_eps: BN epsilon; None uses the reference's value (1e-5 / 1.001e-5).

    Returns:
        nn.Module mapping [R, in_channels, H, W] -> [R, out_channels, H, W].

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or norm.
    """
    if name in HOURGLASS_VARIANTS:
        channel_dims, blocks_per_stage = hourglass_config(name, num_filters)
        return HourglassNetwork(
            in_channels,
            num_filters,
            channel_dims,
            blocks_per_stage,
            norm=norm,
            bn_momentum=HOURGLASS_BN_MOMENTUM if bn_momentum is None else bn_momentum,
            bn_eps=HOURGLASS_BN_EPS if bn_eps is None else bn_eps,
        )
    if name in RESNET_VARIANTS:
        return ResNetMaskNetwork(
            in_channels,
            num_filters,
            depth=int(name[len("resnet") :]),
            norm=norm,
            bn_momentum=RESNET_BN_MOMENTUM if bn_momentum is None else bn_momentum,
            bn_eps=RESNET_BN_EPS if bn_eps is None else bn_eps,
        )
    raise ValueError(f"Unknown mask network {name!r}; valid names: {list(MASK_NETWORK_NAMES)}")


class DeepMaskPredictor(nn.Module):
    """Upsampling predictor after the mask network (the tail of the reference's ``DeepMaskHead``).

    ConvTranspose2d 2x2 / stride 2 to ``num_filters`` channels (with bias), norm, ReLU, then a 1x1
    conv (with bias) to ``num_classes`` logits (1 when class-agnostic, as in Deep-MARC). Both convs
    use the reference's VarianceScaling(scale=2, mode="fan_out", distribution="untruncated_normal")
    which is exactly ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``: std =
    sqrt(2 / fan_out), not truncated (the reference asks for the untruncated variant). Keras and
    PyTorch also agree on fan_out for the transposed conv: in_channels * 2 * 2. Biases are zero.

    Args:
        in_channels: C of the network output (2nc = 128 for Deep-MARC).
        num_classes: K, number of mask logit channels.
        norm: see ``get_norm``; "" drops the BN (the deconv keeps its bias either way).
        num_filters: deconv width (the reference's mask_head.num_filters, 64).
        bn_momentum: PyTorch-convention momentum; 0.003 is the ResNet-FPN configs' Keras 0.997
            (SpineNet configs: 0.99, i.e. 0.01 here).
        bn_eps: 1e-4 in the ResNet-FPN configs (SpineNet: 1e-3).

    Shape:
        [R, in_channels, H, W] -> [R, num_classes, 2H, 2W], e.g. [R, 128, 32, 32] -> [R, 1, 64, 64].
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        norm: Optional[str] = "BN",
        num_filters: int = 64,
        bn_momentum: float = PREDICTOR_BN_MOMENTUM,
        bn_eps: float = PREDICTOR_BN_EPS,
    ):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, num_filters, 2, stride=2)
        self.deconv_norm = get_norm(norm, num_filters, bn_momentum, bn_eps)
        self.predictor = nn.Conv2d(num_filters, num_classes, 1)
        for layer in (self.deconv, self.predictor):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        self.num_classes = num_classes
        self.out_channels = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[R, in_channels, H, W] -> [R, num_classes, 2H, 2W] mask logits."""
        return self.predictor(F.relu(self.deconv_norm(self.deconv(x))))
