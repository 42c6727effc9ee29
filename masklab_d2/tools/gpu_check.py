"""One-command check of the CUDA path on a GPU machine; writes every table to one folder.

    python3 -m masklab_d2.tools.gpu_check [--out gpu_check] [--rebuild] [--skip-profile]

Steps, each in a subprocess with its own time limit (about 10 minutes in all on one GPU):

1. build: if ``masklab_d2._C`` is missing or was built without CUDA (or ``--rebuild``), build it in
   place for this GPU's architecture (``TORCH_CUDA_ARCH_LIST=<major.minor>``,
   ``python3 setup.py build_ext --inplace``), so the check does not wait for the portable
   multi-architecture build.
2. tests: ``pytest`` on the op tests, CUDA ones included (``tests/test_ops_cuda.py``: CPU and
   CUDA equal for both ops in float64 with gradients, fp16/bf16 forward and backward within one
   ulp of float64, non-finite values and empty maps, channels-last and sliced inputs, no host
   sync, the deterministic-algorithms alert, device-side asserts, opcheck on CUDA, a
   K * C * S * S > 2^31 crop). Table: ``tests.md`` (and ``tests.xml``, JUnit).
3. benchmark: ``masklab_d2.tools.benchmark_ops --devices cuda`` on FPN and shapes maps against
   torchvision's CUDA roi_align and the other baselines. Table: ``benchmark_cuda.md``.
4. profile: ``masklab_d2.tools.profile_heads`` on the COCO configs on the GPU at 800x1216 (needs
   detectron2; skipped with the reason otherwise). Table: ``profile_heads_cuda.md``.

``summary.md`` lists each step's status, time and output file, followed by the tables. The exit
status is 0 when every step that ran passed, 1 when one failed, 2 when there is no CUDA device.
"""

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import time
from typing import List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OP_TESTS = [
    "tests/test_ops_cuda.py",
    "tests/test_ops.py",
    "tests/test_ops_border.py",
    "tests/test_ops_backends.py",
]
COCO_CONFIGS = [
    "configs/coco/mask_rcnn_R_50_FPN_1x.yaml",
    "configs/coco/masklab_R_50_FPN_1x.yaml",
    "configs/coco/masklab_R_101_C4_os8.yaml",
    "configs/coco/masklab_R_101_C4_os8_deformable.yaml",
    "configs/coco/deep_marc_R_50_FPN_hg52_1x.yaml",
    "configs/coco/blendmask_R_50_FPN_1x.yaml",
]


def _run(command: List[str], log_path: str, timeout: int, env=None) -> Tuple[str, float, str]:
    """Runs a command, logging its output; returns (status, seconds, tail of the output)."""
    start = time.time()
    try:
        result = subprocess.run(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        output, status = result.stdout, "passed" if result.returncode == 0 else "FAILED"
    except subprocess.TimeoutExpired as error:
        output = (
            (error.stdout or b"").decode()
            if isinstance(error.stdout, bytes)
            else (error.stdout or "")
        )
        status = f"FAILED (timed out after {timeout} s)"
    with open(log_path, "w") as f:
        f.write("$ " + " ".join(command) + "\n" + output)
    return status, time.time() - start, "\n".join(output.strip().splitlines()[-15:])


def _extension_state() -> str:
    """'cuda', 'cpu' (built without CUDA) or 'missing', asked in a fresh interpreter."""
    code = (
        "import torch\n"
        "try:\n"
        "    from masklab_d2 import _C\n"
        "except ImportError:\n"
        "    print('missing')\n"
        "else:\n"
        "    print('cuda' if _C.compiled_with_cuda() else 'cpu')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    return (result.stdout.strip().splitlines() or ["missing"])[-1]


def _junit_table(xml_path: str) -> str:
    """A Markdown table of a JUnit file: one row per test, failures first."""
    import xml.etree.ElementTree as ElementTree

    if not os.path.exists(xml_path):
        return "(no JUnit file)\n"
    rows = []
    for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "FAILED"
            elif child.tag == "skipped":
                status = "skipped: " + (child.get("message") or "")[:80]
        rows.append((status != "passed" and not status.startswith("skipped"), status, case))
    rows.sort(key=lambda r: not r[0])
    lines = ["| test | status | s |", "|---|---|---|"]
    for _, status, case in rows:
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        lines.append(f"| {name} | {status} | {float(case.get('time', 0)):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check", help="folder for the tables and logs")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the extension first")
    parser.add_argument("--skip-profile", action="store_true", help="skip profile_heads")
    parser.add_argument("--repeat", type=int, default=10, help="benchmark repeats")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}). Run this on a GPU "
            "machine.",
            file=sys.stderr,
        )
        return 2

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    capability = torch.cuda.get_device_capability()
    device = f"{torch.cuda.get_device_name()} (sm_{capability[0]}{capability[1]})"
    steps = []  # (name, status, seconds, file, tail)

    state = _extension_state()
    if args.rebuild or state != "cuda":
        env = dict(os.environ, TORCH_CUDA_ARCH_LIST=f"{capability[0]}.{capability[1]}")
        env.pop("MASKLAB_CPU_ONLY", None)
        status, seconds, tail = _run(
            [sys.executable, "setup.py", "build_ext", "--inplace"],
            os.path.join(out, "build.log"),
            timeout=420,
            env=env,
        )
        steps.append(("build (extension was: " + state + ")", status, seconds, "build.log", tail))
        if _extension_state() != "cuda":
            steps[-1] = steps[-1][:1] + ("FAILED: no CUDA kernels after the build",) + steps[-1][2:]
    else:
        steps.append(("build", "skipped: _C already has CUDA kernels", 0.0, "", ""))

    xml = os.path.join(out, "tests.xml")
    status, seconds, tail = _run(
        [sys.executable, "-m", "pytest", *OP_TESTS, "-q", "-rfEs", f"--junitxml={xml}",
         "-p", "no:cacheprovider"],
        os.path.join(out, "tests.log"),
        timeout=300,
    )  # fmt: skip
    with open(os.path.join(out, "tests.md"), "w") as f:
        f.write(_junit_table(xml))
    steps.append(("tests (CUDA and CPU op tests)", status, seconds, "tests.md", tail))

    status, seconds, tail = _run(
        [sys.executable, "-m", "masklab_d2.tools.benchmark_ops", "--devices", "cuda",
         "--maps", "fpn", "shapes", "--sizes", "7", "14", "41", "--repeat", str(args.repeat),
         "--markdown", os.path.join(out, "benchmark_cuda.md")],
        os.path.join(out, "benchmark.log"),
        timeout=240,
    )  # fmt: skip
    steps.append(("benchmark_ops on the GPU", status, seconds, "benchmark_cuda.md", tail))

    if args.skip_profile:
        steps.append(("profile_heads", "skipped: --skip-profile", 0.0, "", ""))
    elif importlib.util.find_spec("detectron2") is None:
        steps.append(("profile_heads", "skipped: detectron2 is not installed", 0.0, "", ""))
    else:
        configs = [c for c in COCO_CONFIGS if os.path.exists(os.path.join(REPO, c))]
        configs += sorted(
            os.path.relpath(p, REPO)
            for p in glob.glob(os.path.join(REPO, "configs", "coco", "*.yaml"))
            if os.path.relpath(p, REPO) not in configs and "Base" not in os.path.basename(p)
        )
        status, seconds, tail = _run(
            [sys.executable, "-m", "masklab_d2.tools.profile_heads", "--config-file", *configs,
             "--device", "cuda", "--image-size", "800", "1216", "--detections", "10", "50", "100",
             "--markdown", os.path.join(out, "profile_heads_cuda.md")],
            os.path.join(out, "profile_heads.log"),
            timeout=240,
        )  # fmt: skip
        steps.append(
            ("profile_heads, COCO configs", status, seconds, "profile_heads_cuda.md", tail)
        )

    lines = [
        f"# gpu_check on {device}",
        "",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        "| step | status | s | output |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {status} | {secs:.0f} | {path} |" for name, status, secs, path, _ in steps
    ]
    for name, status, _, path, tail in steps:
        lines += ["", f"## {name}: {status}", ""]
        table = os.path.join(out, path) if path else ""
        if table and path.endswith(".md") and os.path.exists(table):
            lines.append(open(table).read())
        elif tail:
            lines += ["```", tail, "```"]
    summary = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    return 1 if any(s.startswith("FAILED") for _, s, _, _, _ in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
