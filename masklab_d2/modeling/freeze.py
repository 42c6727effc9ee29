"""Head-only training: freeze a trained detector and train only its mask branch."""

import copy
import logging

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

logger = logging.getLogger(__name__)


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


def load_detector_weights(checkpointer: DetectionCheckpointer, path: str) -> None:
    """Loads a trained model's weights into ``checkpointer.model``, except its mask branch.

    The mask branch keeps its own initialisation even when the checkpoint holds a mask head of
    the same architecture: a head-only run trains its head from scratch, as every other head in
    a comparison does, rather than fine-tuning the one the detector was trained with. Restoring
    the initial state after a full load (instead of dropping keys before it) works for every
    checkpoint format detectron2 reads, renamed Caffe2 / pickle keys included.

    Args:
        checkpointer: the trainer's checkpointer (its model is the unwrapped model).
        path: MODEL.WEIGHTS.
    """
    branch = mask_branch_modules(checkpointer.model)
    initial_states = [copy.deepcopy(module.state_dict()) for module in branch]
    checkpointer.load(path, checkpointables=[])
    for module, state in zip(branch, initial_states):
        module.load_state_dict(state)
    logger.info(f"Loaded the detector from {path}; the mask branch starts from its initialisation")
