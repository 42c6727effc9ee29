"""Deep-MARC mask heads for detectron2: hourglass and deep ResNet mask networks.

Deep-MARC (Birodkar et al., "The surprising impact of mask-head architecture on novel class
segmentation", ICCV 2021) replaces Mask R-CNN's 4-conv mask head with a deep network and trains
the mask branch on crops of ground-truth boxes only; together these generalise far better to
classes that had no mask labels. Per RoI:

    pooled crop [C, R, R] (RoIAlign, R = ROI_MASK_HEAD.POOLER_RESOLUTION, 32 in the paper)
    -> mask network (MODEL.DEEP_MARC.NETWORK, width nc = MODEL.DEEP_MARC.NUM_FILTERS)
    -> DeepMaskPredictor: ConvTranspose 2x2 / 2 (nc filters) + norm + ReLU -> 1x1 conv
    -> [K, 2R, 2R] mask logits (K = 1 with ROI_MASK_HEAD.CLS_AGNOSTIC_MASK, as in Deep-MARC)

Both heads are thin adapters over :mod:`masklab_d2.layers.hourglass`, which holds the networks,
their initialisation and their normalisation. The loss and inference are detectron2's
(:class:`~detectron2.modeling.roi_heads.BaseMaskRCNNHead`): per-instance mean sigmoid BCE against
the ground-truth masks cropped to the training boxes (``proposal_boxes``; the ground-truth boxes
when ``MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES``), and ``pred_masks`` in inference. Crop-to-ground-
truth and partial mask supervision are done by :class:`~masklab_d2.modeling.PartialROIHeads`.
"""

from typing import Dict, Mapping, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, BaseMaskRCNNHead

from masklab_d2.layers.hourglass import (
    HOURGLASS_VARIANTS,
    RESNET_VARIANTS,
    DeepMaskPredictor,
    build_mask_network,
)

from .contract import MaskHeadContract

__all__ = ["DeepMaskHead", "HourglassMaskHead", "ResNetMaskHead"]


class DeepMaskHead(MaskHeadContract, BaseMaskRCNNHead):
    """Pooled RoI features -> named mask network -> DeepMaskPredictor -> 2x-size mask logits.

    NOTE: this interface is experimental. Use the registered subclasses
    :class:`HourglassMaskHead` and :class:`ResNetMaskHead`; this base is not registered.

    Attributes:
        network (nn.Module): the mask network, [R, C, H, W] -> [R, C_net, H, W].
        predictor (DeepMaskPredictor): [R, C_net, H, W] -> [R, K, 2H, 2W].
    """

    # Mask networks this head accepts (a mapping from name to spec); set by the subclasses.
    valid_networks: Mapping[str, object] = {}

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        network: str,
        num_classes: int,
        num_filters: int = 64,
        norm: str = "BN",
        bn_momentum: Optional[float] = None,
        **kwargs,
    ):
        """
        Args:
            input_shape: shape of the pooled RoI features, ShapeSpec(channels=C, height=R,
                width=R).
            network: mask-network name, one of ``valid_networks``.
            num_classes: K, the number of mask logit channels (1 for class-agnostic masks).
            num_filters: nc, the base width of the network and the width of the deconv.
            norm: "BN", "SyncBN", "GN" or "" (no normalisation) for the network and the deconv.
            bn_momentum: PyTorch-convention BN momentum of the mask network; None keeps the
                reference's (0.9 for hourglasses, i.e. Keras 0.1; 0.01 for ResNet-N).
            kwargs: ``loss_weight`` and ``vis_period`` of :class:`BaseMaskRCNNHead`.

        Raises:
            ValueError: for a network of the other family or an unknown name (the message lists
                the valid ones), or an input that is not pooled RoI features.
        """
        super().__init__(**kwargs)
        if not isinstance(input_shape, ShapeSpec) or not input_shape.channels:
            raise ValueError(
                f"{type(self).__name__} works on pooled RoI features: input_shape must be their "
                f"ShapeSpec (set MODEL.ROI_MASK_HEAD.POOLER_TYPE, e.g. 'ROIAlignV2'; lazy: a "
                f"roi_heads.mask_pooler); got {input_shape!r}"
            )
        self.check_network(network)
        self.network = build_mask_network(
            network, input_shape.channels, num_filters, norm=norm, bn_momentum=bn_momentum
        )
        self.predictor = DeepMaskPredictor(
            self.network.out_channels, num_classes, norm=norm, num_filters=num_filters
        )
        self.network_name = network
        self.num_classes = num_classes

    @classmethod
    def check_network(cls, network: str) -> None:
        """Raises ValueError unless ``network`` is one of ``cls.valid_networks``."""
        if network not in cls.valid_networks:
            raise ValueError(
                f"{cls.__name__} takes network (MODEL.DEEP_MARC.NETWORK) in "
                f"{list(cls.valid_networks)}, "
                f"got {network!r} (hourglass* networks go with HourglassMaskHead, resnet* with "
                "ResNetMaskHead)"
            )

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        mask_cfg = cfg.MODEL.ROI_MASK_HEAD
        # fmt: off
        ret["input_shape"] = input_shape
        ret["network"]     = cfg.MODEL.DEEP_MARC.NETWORK
        ret["num_filters"] = cfg.MODEL.DEEP_MARC.NUM_FILTERS
        ret["norm"]        = cfg.MODEL.DEEP_MARC.NORM
        ret["bn_momentum"] = cfg.MODEL.DEEP_MARC.BN_MOMENTUM
        ret["num_classes"] = 1 if mask_cfg.CLS_AGNOSTIC_MASK else cfg.MODEL.ROI_HEADS.NUM_CLASSES
        # fmt: on
        cls.check_network(ret["network"])  # fail before any layer is built
        return ret

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits of the pooled RoI features.

        Args:
            x: [R, C, H, W] pooled features (R >= 0 RoIs of all images, H = W = R_pool).

        Returns:
            [R, K, 2H, 2W] mask logits, e.g. [R, 1, 64, 64] for 32x32 class-agnostic crops.
        """
        if x.shape[0] == 0:
            # No RoI (under partial supervision, a batch without a masked instance): skip the
            # layers, because PreciseBN (fvcore's update_bn_stats) divides by the batch size of
            # every BN call. The zero term keeps each parameter in the graph, as DDP needs.
            unused = sum(p.sum() for p in self.parameters()) * 0.0
            return x.new_zeros(0, self.num_classes, 2 * x.shape[2], 2 * x.shape[3]) + unused
        return self.predictor(self.network(x))

    @property
    def class_agnostic(self) -> bool:
        return self.num_classes == 1

    def extra_repr(self) -> str:
        return f"network={self.network_name}, num_classes={self.num_classes}"


@ROI_MASK_HEAD_REGISTRY.register()
class HourglassMaskHead(DeepMaskHead):
    """Deep-MARC's hourglass mask head (MODEL.DEEP_MARC.NETWORK: hourglass10/20/32/52/100).

    HG-52 at nc = 64 on 32x32 crops of 256-channel FPN features is the paper's head:
    [R, 256, 32, 32] -> [R, 128, 32, 32] -> [R, K, 64, 64]. See :class:`DeepMaskHead`.
    """

    valid_networks: Dict[str, object] = dict(HOURGLASS_VARIANTS)


@ROI_MASK_HEAD_REGISTRY.register()
class ResNetMaskHead(DeepMaskHead):
    """The paper's ResNet-N mask-head baselines (MODEL.DEEP_MARC.NETWORK: resnet4/8/12/16/20).

    Stride-1 ResNets, so [R, C, H, W] -> [R, 2nc (3nc for ResNet-20), H, W] -> [R, K, 2H, 2W].
    See :class:`DeepMaskHead`.
    """

    valid_networks: Dict[str, object] = dict(RESNET_VARIANTS)
