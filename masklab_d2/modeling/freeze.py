"""Head-only training: freeze a trained detector and train only its mask branch."""

from detectron2.layers import FrozenBatchNorm2d
from torch import nn


def mask_branch_modules(model: nn.Module):
    """The modules that stay trainable: the ROI heads' mask head and mask pooler."""
    roi_heads = model.roi_heads
    if not getattr(roi_heads, "mask_on", False):
        raise ValueError("MODEL.FREEZE_DETECTOR needs MODEL.MASK_ON: there is no mask branch")
    modules = [roi_heads.mask_head]
    if getattr(roi_heads, "mask_pooler", None) is not None:
        modules.append(roi_heads.mask_pooler)
    return modules


def freeze_detector(model: nn.Module) -> nn.Module:
    """Freezes backbone, proposal generator and box branch of a GeneralizedRCNN in place.

    Their parameters stop requiring gradients and their BatchNorm layers become
    FrozenBatchNorm2d, so neither weights nor running statistics move while the mask branch
    trains (a BatchNorm in train mode would keep updating its statistics).

    Returns:
        The model.
    """
    trainable = mask_branch_modules(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in trainable:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
    model.backbone = FrozenBatchNorm2d.convert_frozen_batchnorm(model.backbone)
    if getattr(model, "proposal_generator", None) is not None:
        model.proposal_generator = FrozenBatchNorm2d.convert_frozen_batchnorm(
            model.proposal_generator
        )
    roi_heads = model.roi_heads
    for name in ("box_pooler", "box_head", "box_predictor"):
        if getattr(roi_heads, name, None) is not None:
            setattr(
                roi_heads,
                name,
                FrozenBatchNorm2d.convert_frozen_batchnorm(getattr(roi_heads, name)),
            )
    return model
