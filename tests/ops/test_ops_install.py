"""Install metadata and build configuration of the compiled ops: the CUDA toolkit choice, the
default architecture list, the import-time architecture check, and install_requires against what
the package imports."""

import ast
import importlib.util
import os
import sys

import pytest
from helpers import REPO  # noqa: E402


@pytest.fixture(scope="module")
def setup_module():
    """setup.py's helpers (importing it does not run setup(): that happens only as __main__)."""
    spec = importlib.util.spec_from_file_location("masklab_setup", os.path.join(REPO, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_toolkits(monkeypatch, module, versions, torch_cuda):
    """Pretend /usr/local holds toolkits {path: (major, minor)} and torch was built with CUDA
    ``torch_cuda``."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(module, "TORCH_CUDA", torch_cuda)
    monkeypatch.setattr(module, "_candidate_cuda_homes", lambda: ([], list(versions)))
    monkeypatch.setattr(module, "_toolkit_version", lambda home: versions[home])
    monkeypatch.setattr(module, "_has_cuda_runtime", lambda home: True)


def test_toolkit_is_chosen_by_version_matching_torch(setup_module, monkeypatch, capsys):
    toolkits = {
        "/usr/local/cuda-9.2": (9, 2),
        "/usr/local/cuda-12.4": (12, 4),
        "/usr/local/cuda-12.8": (12, 8),
        "/usr/local/cuda-13.0": (13, 0),
    }
    # String order would pick cuda-9.2 first; the version that matches torch wins.
    _fake_toolkits(monkeypatch, setup_module, toolkits, "12.8")
    assert setup_module.find_cuda_home() == "/usr/local/cuda-12.8"
    _fake_toolkits(monkeypatch, setup_module, toolkits, "12.5")
    assert setup_module.find_cuda_home() == "/usr/local/cuda-12.4"  # same major, closest minor
    _fake_toolkits(monkeypatch, setup_module, toolkits, "13.0")
    assert setup_module.find_cuda_home() == "/usr/local/cuda-13.0"
    # No toolkit of torch's major version: none is used, and the build says why.
    _fake_toolkits(monkeypatch, setup_module, {"/usr/local/cuda-9.2": (9, 2)}, "13.0")
    assert setup_module.find_cuda_home() is None
    message = capsys.readouterr().err
    assert "torch was built with CUDA 13.0" in message and "cuda-9.2 (CUDA 9.2)" in message


def test_force_cuda_without_a_toolkit_fails_clearly(setup_module, monkeypatch):
    """FORCE_CUDA=1 with nothing to build the CUDA kernels with: a message, not a TypeError
    from the architecture list's nvcc lookup."""
    monkeypatch.delenv("MASKLAB_CPU_ONLY", raising=False)
    monkeypatch.setenv("FORCE_CUDA", "1")
    monkeypatch.setattr(setup_module, "TORCH_CUDA", "13.0")
    with pytest.raises(SystemExit, match="no CUDA toolkit matching torch's CUDA 13.0"):
        setup_module.get_extensions(None)
    monkeypatch.setattr(setup_module, "TORCH_CUDA", None)
    with pytest.raises(SystemExit, match="CPU-only"):
        setup_module.get_extensions("/usr/local/cuda")


def test_default_arch_list_covers_torch_arches_with_ptx(setup_module, monkeypatch):
    monkeypatch.setattr(
        setup_module.torch._C,
        "_cuda_getArchFlags",
        lambda: "sm_70 sm_75 sm_80 sm_86 sm_90 sm_100 sm_120",
    )
    nvcc_13 = {(7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1)}
    monkeypatch.setattr(setup_module, "_nvcc_arches", lambda home: nvcc_13)
    # sm_70 is not in nvcc 13; the newest gets PTX.
    assert setup_module.default_cuda_arch_list("/cuda") == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"


def test_import_time_arch_check():
    from masklab_d2.layers._ops import check_cuda_arches, cuda_arch_covered

    built = "7.5;8.0;8.6;9.0;10.0;12.0+PTX"
    for capability in [(7, 5), (8, 0), (8, 9), (9, 0), (10, 3), (12, 0), (12, 1), (13, 0)]:
        assert cuda_arch_covered(capability, built), capability
    for capability in [(7, 0), (6, 1), (11, 0)]:
        assert not cuda_arch_covered(capability, built), capability
    assert not cuda_arch_covered((9, 0), "8.0;8.6")  # no PTX: no newer major
    assert cuda_arch_covered((9, 0), "8.0+PTX")
    assert not cuda_arch_covered((9, 1), "9.0a")  # arch-specific builds run on that arch only
    check_cuda_arches([("H100", (9, 0))], built)
    check_cuda_arches([("V100", (7, 0))], None)  # built without CUDA: nothing to check
    with pytest.raises(ImportError, match=r'(?s)V100 \(compute capability 7.0\).*ARCH_LIST="7.0"'):
        check_cuda_arches([("H100", (9, 0)), ("V100", (7, 0))], "9.0")


def _top_level_imports(path):
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_install_requires_covers_what_the_package_imports(setup_module, monkeypatch):
    """Every third-party module masklab_d2 imports is declared (detectron2 is not on PyPI and
    the README installs it from git; submitit is the 'sweep' extra)."""
    captured = {}
    monkeypatch.setattr(setup_module, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setattr(setup_module, "get_extensions", lambda cuda_home: [])
    monkeypatch.setenv("MASKLAB_CPU_ONLY", "1")
    setup_module.main()
    declared = {
        r.split(">")[0].split("=")[0].split("[")[0].strip().lower()
        for r in captured["install_requires"] + sum(captured["extras_require"].values(), [])
    }
    assert "torch>=2.4" in captured["install_requires"]
    distribution = {
        "cv2": "opencv-python-headless",
        "PIL": "pillow",
        "yaml": "pyyaml",
        "faster_coco_eval": "faster-coco-eval",
    }
    imported = set()
    for root, _, files in os.walk(os.path.join(REPO, "masklab_d2")):
        for name in files:
            if name.endswith(".py"):
                imported |= _top_level_imports(os.path.join(root, name))
    third_party = {
        m
        for m in imported
        if m not in sys.stdlib_module_names and m not in ("masklab_d2", "detectron2")
    }
    missing = {m for m in third_party if distribution.get(m, m).lower() not in declared}
    assert not missing, f"imported but not in install_requires: {sorted(missing)}"
