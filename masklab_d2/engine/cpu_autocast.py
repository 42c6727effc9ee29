"""Mixed precision on the CPU: the training forward under bfloat16 autocast.

detectron2's ``AMPTrainer`` (``SOLVER.AMP.ENABLED``, ``train.amp.enabled``) runs float16 autocast
and needs CUDA. On a CPU the same switch here runs the training forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``, with the weights in channels-last layout: on
CPUs with bfloat16 matrix units (AMX, AVX512-BF16) a shapes training step then takes about half
the time (channels-last alone: 0.9x, bfloat16 alone: 0.67x); the losses, the backward's
accumulation and the optimizer stay in float32 (the weights never leave float32), and bfloat16's
float32 exponent range needs no loss scaling. Evaluation forwards (the model in eval mode) stay in
float32, as detectron2's AMP leaves them. On a CPU without native bfloat16 the emulation is slower
than float32: the switch is ignored there, with a warning.

Off by default; its speed and its AP effect on the shapes detector are measured in
``projects/training-profile/README.md``.
"""

import logging

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from torch import nn

logger = logging.getLogger("masklab_d2")

__all__ = ["autocast_training_forward", "build_step_trainer", "cpu_has_bfloat16"]


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16 or AMX)."""
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def autocast_training_forward(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> None:
    """Makes ``model``'s forward run under CPU autocast to ``dtype`` while it is in training mode.

    Forward hooks, not a wrapper module: the state dict, the checkpoints and the module names that
    freezing and hooks look up are unchanged; a deep copy keeps the behaviour.
    """
    model._autocast_contexts = []  # the open contexts, innermost last

    def enter(module, args):
        if module.training:
            context = torch.autocast("cpu", dtype=dtype)
            context.__enter__()
            module._autocast_contexts.append(context)

    def leave(module, args, output):
        if module._autocast_contexts:
            module._autocast_contexts.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)  # an error in forward leaves it too


def build_step_trainer(model: nn.Module, data_loader, optimizer, amp: bool) -> SimpleTrainer:
    """detectron2's step trainer for ``model``: ``AMPTrainer`` (float16 autocast) when ``amp`` on a
    GPU; on a CPU with ``amp``, ``SimpleTrainer`` with the training forward in bfloat16
    (:func:`autocast_training_forward`, on the model inside a DDP wrapper); else ``SimpleTrainer``.
    """
    if not amp:
        return SimpleTrainer(model, data_loader, optimizer)
    if next(model.parameters()).device.type != "cpu":
        return AMPTrainer(model, data_loader, optimizer)
    if cpu_has_bfloat16():
        logger.info(
            "Mixed precision on the CPU: the training forward runs in bfloat16, the weights in "
            "channels-last layout"
        )
        module = getattr(model, "module", model)
        # In place (the optimizer keeps its parameters); oneDNN's bfloat16 convolutions are
        # fastest on channels-last maps, which channels-last weights make throughout.
        module.to(memory_format=torch.channels_last)
        autocast_training_forward(module)
    else:
        logger.warning(
            "Mixed precision ignored: this CPU has no native bfloat16 (AVX512-BF16 or AMX), on "
            "which it would be slower than float32; training in float32"
        )
    return SimpleTrainer(model, data_loader, optimizer)
