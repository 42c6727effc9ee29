"""Per-module learning-rate factors for the optimiser."""

from typing import Callable

from torch import nn


def module_lr_factors(model: nn.Module) -> Callable[[str], float]:
    """Parameter name -> learning-rate factor, from ``lr_factor`` attributes of modules.

    A module with an ``lr_factor`` attribute (e.g. the deformable pooler's offset network)
    scales the learning rate of every parameter under it; nested factors multiply. For
    detectron2's ``get_default_optimizer_params(..., lr_factor_func=...)``.
    """
    factors = {
        name: float(module.lr_factor)
        for name, module in model.named_modules()
        if getattr(module, "lr_factor", None) is not None
    }

    def lr_factor(parameter_name: str) -> float:
        factor = 1.0
        for module_name, module_factor in factors.items():
            if module_name == "" or parameter_name.startswith(module_name + "."):
                factor *= module_factor
        return factor

    return lr_factor
