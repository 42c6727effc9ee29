#!/usr/bin/env python
"""Builds masklab_d2 and its compiled ops, masklab_d2._C.

    pip install --no-build-isolation -e .

The extension is a CppExtension, or a CUDAExtension when torch has CUDA and nvcc is found (or
FORCE_CUDA=1). MASKLAB_CPU_ONLY=1 skips the CUDA sources. With no GPU visible, the CUDA code is built
for TORCH_CUDA_ARCH_LIST, defaulting to Hopper ("9.0", the H100/H200 machines this is benchmarked on).
"""

import glob
import os
import re
import shutil

from setuptools import find_packages, setup


def _has_cuda_runtime(cuda_home):
    return cuda_home is not None and any(
        glob.glob(os.path.join(cuda_home, pattern, "libcudart.so*"))
        for pattern in ("lib64", "lib", "targets/*/lib")
    )


def _real_cuda_home():
    """The CUDA toolkit root, found the way torch does but robust to an `nvcc` wrapper script.

    torch takes CUDA_HOME as the parent of the `nvcc` on PATH; when that is a wrapper script
    (e.g. /usr/local/bin/nvcc doing `exec /usr/local/cuda-13.0/bin/nvcc "$@"`), the guess has no
    libcudart and linking fails. Follow the wrapper to the real toolkit instead.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                candidates += re.findall(r"(/\S+?)/bin/nvcc\b", head.decode("utf-8", "ignore"))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")) and _has_cuda_runtime(candidate):
            return candidate
    return None


# Must be settled before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
_cuda_home = _real_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def _with_cuda():
    if os.environ.get("MASKLAB_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and _has_cuda_runtime(CUDA_HOME)


def get_extensions():
    sources = [
        os.path.relpath(p, HERE)
        for p in glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True)
    ]
    extra_compile_args = {"cxx": ["-O3", "-fopenmp"]}
    extra_link_args = ["-fopenmp"]
    define_macros = []
    extension = CppExtension
    if _with_cuda():
        extension = CUDAExtension
        sources += [
            os.path.relpath(p, HERE)
            for p in glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True)
        ]
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3"]
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # torch's builder cannot query a GPU here and would fail with an empty arch list.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    return [
        extension(
            "masklab_d2._C",
            sorted(sources),
            include_dirs=[CSRC],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    name="masklab_d2",
    version="0.1.0",
    description="MaskLab, Mask R-CNN, BlendMask and Deep-MARC mask heads for detectron2",
    packages=find_packages(exclude=("tests", "configs", "projects")),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "fvcore",
        "pycocotools>=2.0.2",
        "matplotlib",
        "tabulate",
        "PyYAML",
    ],
    extras_require={"sweep": ["submitit"], "test": ["pytest"]},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
