"""A clear ImportError when a detectron2 part of masklab_d2 is used without detectron2."""

import importlib.util

INSTALL_HINT = (
    "detectron2 is not installed. It is not on PyPI: install it from its repository, e.g.\n"
    "    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "(see https://detectron2.readthedocs.io/en/latest/tutorials/install.html and this project's "
    "README, section 'Install')."
)


def require_detectron2(what: str) -> None:
    """Raises ImportError naming ``what`` and how to install detectron2, if it is missing."""
    if importlib.util.find_spec("detectron2") is None:
        raise ImportError(f"{what} needs detectron2. {INSTALL_HINT}")
