"""MaskLabCheckpointer: detectron2's DetectionCheckpointer that can initialise one checkpoint
block into several places of the model.

MaskLab's C4 model has two res5 stages: the backbone's (under the semantic / direction branch)
and a duplicate that classifies boxes (:class:`~masklab_d2.modeling.box_heads.Res5BoxHead`). The
paper initialises both from ImageNet (its Table 6, "BC"). detectron2's name-matching heuristics
for Caffe2 / pycls checkpoints match the checkpoint's ``res5.*`` keys to both
``backbone.res5.*`` and ``roi_heads.box_head.res5.*`` and stop with "Cannot match one
checkpoint key to multiple keys". Renaming the duplicate would only make it start from random
weights silently.

Here a module says where its weights come from in a pretrained checkpoint by a class attribute
``pretrained_sources``: ``{child name: checkpoint prefix}``. Before the heuristics run, every
checkpoint key under that prefix is copied to the module's full name (``roi_heads.box_head.res5.*``
for ``res5.*``); the heuristics then match the longer, exact name for the duplicate and the short
one for the backbone, and both copies start from the checkpoint. Checkpoints that already hold
the model's own names (anything detectron2 or this project wrote) are loaded unchanged.
"""

from typing import Dict, List

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import convert_c2_detectron_names
from torch import nn

__all__ = ["MaskLabCheckpointer", "add_pretrained_aliases"]


def add_pretrained_aliases(model: nn.Module, checkpoint_state: Dict[str, object]) -> List[str]:
    """Copies pretrained-checkpoint keys to the modules that declare them as their source.

    Args:
        model: the model being loaded (unwrapped).
        checkpoint_state: checkpoint keys (detectron2 names, after any Caffe2 renaming) to
            values; updated in place.

    Returns:
        "target <- prefix" for each declared source that received keys.
    """
    aliased = []
    for module_name, module in model.named_modules():
        for child, prefix in getattr(module, "pretrained_sources", {}).items():
            target = f"{module_name}.{child}" if module_name else child
            added = 0
            for key in [k for k in checkpoint_state if k.startswith(prefix + ".")]:
                alias = target + key[len(prefix) :]
                if alias not in checkpoint_state:
                    checkpoint_state[alias] = checkpoint_state[key]
                    added += 1
            if added:
                aliased.append(f"{target} <- {prefix}")
    return aliased


class MaskLabCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that honours modules' ``pretrained_sources`` (module docstring)."""

    def _load_model(self, checkpoint):
        if checkpoint.get("matching_heuristics", False):
            state = checkpoint["model"]
            self._convert_ndarray_to_tensor(state)
            if checkpoint.get("__author__") == "Caffe2":
                # Rename first (detectron2 would do it inside its matching), so the aliases
                # are added under detectron2's names.
                state, _ = convert_c2_detectron_names(state)
                checkpoint["__author__"] = "Caffe2 (renamed by masklab_d2)"
            aliased = add_pretrained_aliases(self.model, state)
            if aliased:
                self.logger.info(
                    "Initialising duplicated blocks from the checkpoint: " + ", ".join(aliased)
                )
            checkpoint["model"] = state
        return super()._load_model(checkpoint)
