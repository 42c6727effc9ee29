import importlib.util
import os

import pytest
import torch

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
DETECTRON2_REASON = (
    "detectron2 is not installed: install it as the README's 'Install' section says; "
    "every test that needs it is skipped"
)

# The suite runs on 2 CPU cores; more threads than cores only adds contention.
torch.set_num_threads(min(torch.get_num_threads(), max(1, os.cpu_count() or 1)))


def pytest_configure(config):
    config.addinivalue_line("markers", "detectron2: needs detectron2 (skipped where it is absent)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped where there is none)")
    config.addinivalue_line("markers", "slow: trains a model for a while (still part of the suite)")


def pytest_collection_modifyitems(config, items):
    skip_d2 = pytest.mark.skip(reason=DETECTRON2_REASON)
    skip_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "detectron2" in item.keywords and not HAS_DETECTRON2:
            item.add_marker(skip_d2)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
