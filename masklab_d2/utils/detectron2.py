"""A clear ImportError when a detectron2 part of masklab_d2 is used without detectron2, or its
PointRend head without detectron2's PointRend project."""

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


POINT_REND_HINT = (
    "detectron2.projects.point_rend is not importable. detectron2 installed from its repository "
    "includes it, editable or not:\n"
    "    pip install --no-build-isolation 'git+https://github.com/facebookresearch/detectron2.git'\n"
    "    (or, in a clone of it: pip install --no-build-isolation -e .)\n"
    "A detectron2 built or copied without its projects/ folder lacks it (see this project's "
    "README, section 'Heads', PointRend)."
)


def point_rend_available() -> bool:
    """Whether ``detectron2.projects.point_rend`` imports (False without detectron2, too)."""
    try:
        import detectron2.projects.point_rend  # noqa: F401
    except ImportError:
        return False
    return True


def require_point_rend(what: str) -> None:
    """Raises ImportError naming ``what`` and how to install PointRend, if it is missing."""
    if not point_rend_available():
        raise ImportError(f"{what} needs detectron2's PointRend project. {POINT_REND_HINT}")
