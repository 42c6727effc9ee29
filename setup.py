#!/usr/bin/env python
"""Builds masklab_d2 and its compiled ops, masklab_d2._C (Linux; GCC or Clang with OpenMP).

    python3 -m pip install --no-build-isolation -e .

``--no-build-isolation`` is required: the extension is compiled against the torch installed in
this Python (an isolated build would fetch another torch, or none, and the binary would not load).

The extension is a CppExtension, or a CUDAExtension when torch has CUDA and a CUDA toolkit is found
(or FORCE_CUDA=1). MASKLAB_CPU_ONLY=1 skips the CUDA sources. The toolkit is the one whose version
matches ``torch.version.cuda`` (CUDA_HOME / CUDA_PATH, the ``nvcc`` on PATH, also behind a wrapper
script, and /usr/local/cuda*). With no GPU visible, the CUDA code is built for TORCH_CUDA_ARCH_LIST,
by default every architecture torch itself was built for that this nvcc supports, with PTX for the
newest so that newer GPUs can JIT-compile it (see ``default_cuda_arch_list``).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError as error:  # an isolated build, or torch missing
    sys.exit(
        "masklab_d2 builds against the installed torch: install torch>=2.4 first, then run\n"
        "    python3 -m pip install --no-build-isolation -e .\n"
        f"({error})"
    )

TORCH_CUDA = torch.version.cuda  # e.g. "13.0"; None for a CPU-only torch


def _has_cuda_runtime(cuda_home):
    return cuda_home is not None and any(
        glob.glob(os.path.join(cuda_home, pattern, "libcudart.so*"))
        for pattern in ("lib64", "lib", "targets/*/lib")
    )


def _version_tuple(text):
    match = re.search(r"(\d+)\.(\d+)", text or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


def _toolkit_version(cuda_home):
    """(major, minor) of the toolkit's nvcc, or None if it has none that runs."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _candidate_cuda_homes():
    """Toolkit roots in order of preference: explicit variables, the nvcc on PATH (following a
    wrapper such as /usr/local/bin/nvcc doing `exec /usr/local/cuda-13.0/bin/nvcc "$@"`, where
    torch's guess, the wrapper's parent, has no libcudart), then /usr/local/cuda*."""
    explicit = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
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
    candidates += ["/usr/local/cuda"] + glob.glob("/usr/local/cuda-*")
    seen, unique = set(), []
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if real not in seen and os.path.isdir(real):
            seen.add(real)
            unique.append(candidate)
    return explicit, unique


def find_cuda_home():
    """The CUDA toolkit matching torch.version.cuda, or None with the reason printed.

    torch refuses to build with a toolkit of another major version, and a minor mismatch can
    miss symbols, so among the toolkits found this prefers the same (major, minor), then the same
    major with the closest minor (by version, not by directory name: cuda-9.2 < cuda-12.4).
    An explicit CUDA_HOME / CUDA_PATH is used as given, with a warning if it does not match.
    """
    explicit, candidates = _candidate_cuda_homes()
    wanted = _version_tuple(TORCH_CUDA)
    if explicit:
        version = _toolkit_version(explicit[0])
        if wanted and version and version[0] != wanted[0]:
            print(
                f"masklab_d2: CUDA_HOME={explicit[0]} is CUDA {version[0]}.{version[1]} but torch "
                f"was built with CUDA {TORCH_CUDA}; torch will refuse this toolkit. Point "
                f"CUDA_HOME at a CUDA {wanted[0]}.x toolkit or set MASKLAB_CPU_ONLY=1.",
                file=sys.stderr,
            )
        return explicit[0]
    if wanted is None:
        return None  # CPU-only torch: nothing to match
    found = []
    for candidate in candidates:
        version = _toolkit_version(candidate)
        if version and _has_cuda_runtime(candidate):
            found.append((version, candidate))
    same_major = [(v, c) for v, c in found if v[0] == wanted[0]]
    if same_major:
        same_major.sort(key=lambda vc: (abs(vc[0][1] - wanted[1]), -vc[0][1]))
        return same_major[0][1]
    if found:
        listed = ", ".join(f"{c} (CUDA {v[0]}.{v[1]})" for v, c in sorted(found))
        print(
            f"masklab_d2: torch was built with CUDA {TORCH_CUDA} but the toolkits found are "
            f"{listed}; building the CPU kernels only. Install a CUDA {wanted[0]}.x toolkit (or "
            "set CUDA_HOME to one) for the CUDA kernels.",
            file=sys.stderr,
        )
    return None


HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")
BUILD_INFO = os.path.join(HERE, "masklab_d2", "_build_info.py")


def _with_cuda(cuda_home):
    if os.environ.get("MASKLAB_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if TORCH_CUDA is None:
            sys.exit("masklab_d2: FORCE_CUDA=1 needs a CUDA build of torch; this one is CPU-only.")
        if cuda_home is None:
            sys.exit(
                f"masklab_d2: FORCE_CUDA=1, but no CUDA toolkit matching torch's CUDA {TORCH_CUDA} "
                "was found: set CUDA_HOME to one, or unset FORCE_CUDA."
            )
        return True
    return TORCH_CUDA is not None and cuda_home is not None and _has_cuda_runtime(cuda_home)


def _nvcc_arches(cuda_home):
    """Compute capabilities this nvcc can compile for, e.g. {(7, 5), (8, 0), ...}."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--list-gpu-arch"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {(int(m[:-1]), int(m[-1])) for m in re.findall(r"compute_(\d+)\b", out)}


def default_cuda_arch_list(cuda_home):
    """Every architecture torch was built for that nvcc supports, PTX for the newest.

    torch 2.11+cu130 is built for sm_75, 80, 86, 90, 100 and 120, i.e. T4 through Blackwell
    (a binary for X.Y also runs on X.Z >= X.Y: sm_86 covers L4/L40's 8.9, sm_100 covers 10.3),
    so the extension runs wherever torch does; the PTX lets a newer GPU JIT-compile the kernels.
    nvcc 13 dropped sm_70 and older, hence the intersection.
    """
    torch_arches = set()
    for flag in torch._C._cuda_getArchFlags().split():
        match = re.fullmatch(r"sm_(\d+)(\d)", flag)
        if match:
            torch_arches.add((int(match.group(1)), int(match.group(2))))
    nvcc_arches = _nvcc_arches(cuda_home)
    arches = sorted(torch_arches & nvcc_arches if nvcc_arches else torch_arches)
    if not arches:
        arches = sorted(a for a in nvcc_arches if a >= (7, 5))[:1] or [(9, 0)]
    names = [f"{major}.{minor}" for major, minor in arches]
    return ";".join(names[:-1] + [names[-1] + "+PTX"])


def _write_build_info(arch_list):
    """masklab_d2/_build_info.py (not tracked): what _ops.py checks the GPUs against at import."""
    with open(BUILD_INFO, "w") as f:
        f.write(
            "# Written by setup.py at build time; not tracked.\n"
            f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n"
            f"CUDA_ARCH_LIST = {arch_list!r}  # None: built without the CUDA kernels\n"
        )


def get_extensions(cuda_home):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [
        os.path.relpath(p, HERE)
        for p in glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True)
    ]
    # ATen's parallel_for is inline in headers and runs serially without _OPENMP.
    openmp = [] if sys.platform == "darwin" else ["-fopenmp"]
    extra_compile_args = {"cxx": ["-O3"] + openmp}
    extra_link_args = list(openmp)
    define_macros = []
    extension = CppExtension
    arch_list = None
    if _with_cuda(cuda_home):
        extension = CUDAExtension
        sources += [
            os.path.relpath(p, HERE)
            for p in glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True)
        ]
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            # Without a visible GPU torch's builder has no arch to pick; with one it would build
            # for that GPU only, a binary that fails on any other. Build for the portable list.
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_cuda_arch_list(cuda_home)
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        print(f"masklab_d2: CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list}")
    _write_build_info(arch_list)
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


def main():
    cuda_home = None if os.environ.get("MASKLAB_CPU_ONLY", "0") == "1" else find_cuda_home()
    if cuda_home:
        # Before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import BuildExtension

    setup(
        name="masklab_d2",
        version="0.1.0",
        description="MaskLab, Mask R-CNN, BlendMask and Deep-MARC mask heads for detectron2",
        packages=find_packages(exclude=("tests", "configs", "projects")),
        python_requires=">=3.9",
        install_requires=[
            # torch.library.register_fake / register_autograd / opcheck
            "torch>=2.4",
            "torchvision",  # detectron2's, and the op benchmark's baseline
            "numpy",
            "opencv-python-headless",  # data/shapes.py, tools/visualize.py
            "Pillow",
            "PyYAML",
            "fvcore",
            "pycocotools>=2.0.2",
            "faster-coco-eval",  # evaluation/boundary.py: Boundary AP
            "matplotlib",
            "tabulate",
        ],
        extras_require={"sweep": ["submitit"], "test": ["pytest"]},
        ext_modules=get_extensions(cuda_home),
        cmdclass={"build_ext": BuildExtension},
    )


# pip and `python3 setup.py ...` run this file as __main__; tests import its helpers.
if __name__ == "__main__":
    main()
