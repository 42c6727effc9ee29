import atexit
import importlib.util
import os
import re
import shutil
import tempfile

import pytest
import torch

# Generated test data (the shapes splits) goes to a fresh folder per session unless the caller
# names one; set before masklab_d2.data registers the datasets with their paths.
if "MASKLAB_SHAPES_DIR" not in os.environ:
    os.environ["MASKLAB_SHAPES_DIR"] = tempfile.mkdtemp(prefix="masklab_shapes_")
    atexit.register(shutil.rmtree, os.environ["MASKLAB_SHAPES_DIR"], ignore_errors=True)

HAS_DETECTRON2 = importlib.util.find_spec("detectron2") is not None
DETECTRON2_REASON = (
    "detectron2 is not installed: install it as the README's 'Install' section says; "
    "every test that needs it is skipped"
)


def pytest_configure(config):
    config.addinivalue_line("markers", "detectron2: needs detectron2 (skipped where it is absent)")
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped where there is none)")
    config.addinivalue_line(
        "markers",
        "slow: trains a model for a while; -m 'not slow' leaves them out of a quick local run "
        "(.ci/run runs everything)",
    )


# A test module that needs detectron2 says so once, with the marker: ``pytestmark =
# pytest.mark.detectron2`` (alone or in a list) before its detectron2 imports. Where detectron2
# is absent the module is then skipped as a whole, with the reason, before it is imported; a
# single test says ``@pytest.mark.detectron2`` and imports detectron2 inside.
_MODULE_MARK = re.compile(r"^pytestmark\s*=.*?pytest\.mark\.detectron2\b", re.M | re.S)


class _ModuleNeedingDetectron2(pytest.Module):
    def collect(self):
        pytest.skip(f"{self.path.name}: {DETECTRON2_REASON}", allow_module_level=True)


def pytest_pycollect_makemodule(module_path, parent):
    if HAS_DETECTRON2:
        return None
    head = module_path.read_text().split("\ndef ", 1)[0].split("\nclass ", 1)[0]
    if _MODULE_MARK.search(head):
        return _ModuleNeedingDetectron2.from_parent(parent, path=module_path)
    return None


def pytest_collection_modifyitems(config, items):
    skip_d2 = pytest.mark.skip(reason=DETECTRON2_REASON)
    skip_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "detectron2" in item.keywords and not HAS_DETECTRON2:
            item.add_marker(skip_d2)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
