"""One command that proves the CUDA path on a GPU machine within a 10-minute command limit.

    python3 -m masklab_d2.tools.gpu_check [--out gpu_check] [--skip STEP ...] [--plan]

Each step runs in its own process group under its own time limit (docs/ops.md says how); the
limits add up to 550 s and no step runs past ``--budget`` (570 s after the start). ``--plan``
prints every command without running anything. ``summary.md`` in ``--out`` is rewritten before
and after every step. Steps, as "name (limit / expected time)"; the expected times are estimates
for one H200 with 16 CPU cores (nothing here has run on a GPU yet). In all 225-400 s.

* build (140 s / 60-100 s): a forced in-place build for this GPU's compute capability
  (``FORCE_CUDA=1``, fresh build folder); a fresh interpreter must then load a ``_C`` with CUDA
  kernels, built for that architecture after the step began, that runs on the GPU.
* tests (100 s / 40-70 s): the CUDA tests of ``tests/ops`` (docs/ops.md) but the inductor ones.
  Tables ``tests.md`` and ``tests.xml`` (JUnit).
* compile (90 s / 30-60 s): the inductor ones: ``torch.compile`` forward and backward of both ops
  on CUDA equal eager. ``compile.md``.
* train (120 s / 60-100 s): the README's main job for 300 iterations on the GPU, then its one
  evaluation; the loss must fall and box and mask AP be finite. Needs detectron2.
* heads (60 s / 25-45 s): the 4-conv, MaskLab, BlendMask and Deep-MARC (HG-52) heads trained
  head-only on that detector for 20 iterations each, the four at once.
* benchmark (40 s / 10-25 s): ``benchmark_ops --devices cuda`` on the FPN maps of an 800x1216
  image against torchvision's CUDA roi_align. ``benchmark_cuda.md``.

Exit status: 0 every step passed; 1 a step failed or ran over its limit; 2 no CUDA device is
visible (said at once, nothing run); 3 the build gave no usable CUDA kernels (nothing else run);
4 nothing failed but a step was skipped (``--skip``, detectron2 missing, out of budget);
128 + N stopped by signal N (SIGINT, SIGTERM), the cut step marked in ``summary.md``.
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD_TEMP = os.path.join(REPO, "build", "gpu_check")
TRAIN_DIR = os.path.join(REPO, "output", "gpu_check")
BUDGET_S = 570  # 9.5 minutes: the rest of a 10-minute command limit is start-up and margin
MIN_STEP_S = 10  # a step with less time than this left is skipped, not started
EXIT_OK, EXIT_FAILED, EXIT_NO_GPU, EXIT_NO_BUILD, EXIT_INCOMPLETE = 0, 1, 2, 3, 4
EXIT_MEANING = {
    EXIT_OK: "every step passed",
    EXIT_FAILED: "a step failed",
    EXIT_NO_GPU: "no CUDA device",
    EXIT_NO_BUILD: "no usable CUDA build, nothing else ran",
    EXIT_INCOMPLETE: "nothing failed, but a step was skipped",
}

# Every CUDA-marked test of these files runs (-m cuda): the op tests and the non-finite ones.
CUDA_TESTS = ("tests/ops/test_ops_cuda.py", "tests/ops/test_ops_nonfinite.py")
TESTS_SELECTION, COMPILE_SELECTION = "not inductor", "inductor"
MAIN_CONFIG = "configs/shapes/mask_rcnn_R_18_FPN.yaml"  # the README's main job
TRAIN_ITERS, HEAD_ITERS = 300, 20
DETECTOR = os.path.join(TRAIN_DIR, "train", "model_final.pth")  # the heads' frozen detector
NO_DETECTRON2 = "skipped: detectron2 is not installed"
HEAD_CONFIGS = [
    ("4-conv", "configs/shapes/mask_rcnn_R_18_FPN.yaml"),
    ("MaskLab", "configs/shapes/masklab_R_18_FPN.yaml"),
    ("BlendMask", "configs/shapes/blendmask_R_18_FPN.yaml"),
    ("Deep-MARC", "configs/shapes/deep_marc_R_18_FPN_hourglass52.yaml"),
]


class Context(NamedTuple):
    out: str  # absolute
    arch: str  # e.g. "9.0" on an H200
    cpus: int


class Outcome(NamedTuple):
    status: str  # "passed", "FAILED: ..." or "skipped: ..."
    details: str = ""  # Markdown for the summary: a table, or the tail of a log
    output: str = ""  # the step's main file, relative to --out


class Step(NamedTuple):
    name: str
    limit: int  # seconds
    expected: Tuple[int, int]  # seconds on an H200 with 16 cores (an estimate)
    run: Callable[[Context, float], Outcome]  # (context, time limit) -> outcome


@dataclasses.dataclass
class Record:
    """A step's state in the summary."""

    step: Step
    status: str = "pending"
    seconds: float = 0.0
    details: str = ""
    output: str = ""


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived (raised in the main thread, where the step waits); not an
    Exception, so that no step's error handling swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, _frame):
    raise Stopped(signum)


Command = Tuple[List[str], str, Optional[Dict[str, str]]]  # argv, log path, environment
# A process group of its own (killed whole), no input, output and errors into one log.
DETACHED = dict(
    cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
)


def run_commands(commands: Sequence[Command], timeout: float) -> List[Optional[int]]:
    """Runs the commands at once, each in a process group of its own, output straight to its
    log (so an outside kill keeps what was written).

    Returns:
        Each command's exit status, or None for one still running at ``timeout`` (killed).
    """
    processes, logs = [], []
    deadline = time.monotonic() + timeout
    try:
        for argv, log_path, env in commands:
            logs.append(open(log_path, "w"))
            print("$", shlex.join(argv), file=logs[-1], flush=True)
            processes.append(subprocess.Popen(argv, env=env, stdout=logs[-1], **DETACHED))
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(timeout=max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes
    finally:
        # Also after a normal exit: nothing a step left behind may compete with the next step.
        # SIGKILL, not SIGTERM: detectron2's training loader workers ignore SIGTERM by design.
        for process in processes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for log in logs:
            log.close()


def _status(code: Optional[int], timeout: float) -> str:
    if code is None:
        return f"FAILED: timed out after {timeout:.0f} s"
    return "passed" if code == 0 else f"FAILED: exit status {code}"


def run_one(argv: List[str], log: str, timeout: float, env=None) -> str:
    """One command (as :func:`run_commands`); its status for the summary."""
    return _status(run_commands([(argv, log, env)], timeout)[0], timeout)


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.read().strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "```\n" + "\n".join(text) + "\n```\n"


def build_command(arch: str) -> Tuple[List[str], Dict[str, str]]:
    """A forced in-place build for one architecture, in a build folder of its own: without
    ``--force`` setuptools keeps an in-place ``.so`` newer than its sources (a leftover CPU-only
    build); with ``FORCE_CUDA=1`` setup.py fails where it finds no toolkit instead of quietly
    building the CPU kernels alone."""
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, FORCE_CUDA="1")
    env.pop("MASKLAB_CPU_ONLY", None)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    argv = [sys.executable, "setup.py", "build_ext", "--inplace", "--force"]
    return argv + ["--build-temp", BUILD_TEMP], env


# Run in a fresh interpreter after the build: what was built, and one crop on the GPU.
PROBE = """
import json, os, torch
from masklab_d2 import _C
from masklab_d2._build_info import CUDA_ARCH_LIST
from masklab_d2.layers import crop_and_resize
ones = torch.ones(1, 2, 4, 4, device="cuda")
out = crop_and_resize(ones, torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], device="cuda"), 1.0, 2)
print(json.dumps({"cuda": _C.compiled_with_cuda(), "arch": CUDA_ARCH_LIST, "file": _C.__file__,
                  "mtime": os.path.getmtime(_C.__file__), "sum": out.sum().item()}))
"""


def check_build(probe: dict, arch: str, started: float) -> str:
    """What is wrong with the extension the probe loaded, or "" when it is the one just built."""
    if not probe.get("cuda"):
        return "masklab_d2._C has no CUDA kernels"
    if probe.get("arch") != arch:
        return f"_build_info says TORCH_CUDA_ARCH_LIST={probe.get('arch')!r}, not {arch!r}"
    if probe.get("mtime", 0) < started - 1:
        return f"{probe.get('file')} predates the build: a stale extension was loaded"
    if probe.get("sum") != 8.0:
        return f"a 2x2 crop of a 2-channel map of ones sums to {probe.get('sum')} on the GPU, not 8"
    return ""


def step_build(ctx: Context, timeout: float) -> Outcome:
    shutil.rmtree(BUILD_TEMP, ignore_errors=True)  # no object of an earlier build is reused
    argv, env = build_command(ctx.arch)
    log = os.path.join(ctx.out, "build.log")
    started, began = time.time(), time.monotonic()
    status = run_one(argv, log, timeout, env)
    if status != "passed":
        return Outcome(status, _tail(log), "build.log")
    left = max(5.0, timeout - (time.monotonic() - began))
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=left
    )
    try:
        probe = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        tail = "\n".join(result.stderr.strip().splitlines()[-20:])
        return Outcome("FAILED: the new extension does not load", f"```\n{tail}\n```\n")
    problem = check_build(probe, ctx.arch, started)
    details = f"`{probe['file']}`, TORCH_CUDA_ARCH_LIST={probe['arch']}\n"
    return Outcome(f"FAILED: {problem}" if problem else "passed", details, "build.log")


def _junit_cases(xml_path: str) -> List[Tuple[str, str, float]]:
    """(test, "passed" / "FAILED" / "skipped: why", seconds) per test of a JUnit file."""
    import xml.etree.ElementTree as ElementTree

    if not os.path.exists(xml_path):
        return []
    cases = []
    for case in ElementTree.parse(xml_path).getroot().iter("testcase"):
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "FAILED"
            elif child.tag == "skipped" and status == "passed":
                status = "skipped: " + (child.get("message") or "")[:80]
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        cases.append((name, status, float(case.get("time", 0))))
    return cases


def junit_table(xml_path: str) -> str:
    """A Markdown table of a JUnit file: one row per test, failures first."""
    if not os.path.exists(xml_path):
        return "(no JUnit file)\n"
    lines = ["| test | status | s |", "|---|---|---|"]
    for name, status, seconds in sorted(_junit_cases(xml_path), key=lambda c: c[1] != "FAILED"):
        lines.append(f"| {name} | {status} | {seconds:.2f} |")
    return "\n".join(lines) + "\n"


def pytest_command(selection: str, xml_path: str) -> List[str]:
    return [sys.executable, "-m", "pytest", *CUDA_TESTS, "-m", "cuda", "-k", selection, "-q", "-rfEs",
            f"--junitxml={xml_path}", "-p", "no:cacheprovider"]  # fmt: skip


def pytest_step(name: str, selection: str) -> Callable[[Context, float], Outcome]:
    def run(ctx: Context, timeout: float) -> Outcome:
        xml, log = (os.path.join(ctx.out, f"{name}.{ext}") for ext in ("xml", "log"))
        if os.path.exists(xml):
            os.remove(xml)
        status = run_one(pytest_command(selection, xml), log, timeout)
        statuses = [case[1].split(":")[0] for case in _junit_cases(xml)]
        counts = {key: statuses.count(key) for key in ("passed", "FAILED", "skipped")}
        if status == "passed" and counts["passed"] == 0:
            status = "FAILED: no test ran"  # all skipped (no GPU seen by pytest) proves nothing
        table = junit_table(xml)
        with open(os.path.join(ctx.out, f"{name}.md"), "w") as f:
            f.write(table)
        head = "{passed} passed, {FAILED} failed, {skipped} skipped\n\n".format(**counts)
        tail = _tail(log) if status != "passed" else ""
        return Outcome(status, head + table + tail, name + ".md")

    return run


def training_report(path: str, iterations: int, loss_key: str, evaluated: bool) -> Tuple[str, str]:
    """(problem or "", Markdown table cells) from a detectron2 ``metrics.json``.

    Checks that the last iteration was logged and every logged loss is finite; with
    ``evaluated`` also that ``loss_key`` fell from the first logged window to the last and that
    the evaluation gave finite box and mask AP (a few head-only iterations need not lower a loss).
    """
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut by a kill
                    pass
    train = [row for row in rows if loss_key in row]
    if not train:
        return f"no {loss_key} logged in {path}", ""
    done = max(row.get("iteration", -1) for row in train) + 1
    losses = [v for row in train for k, v in row.items() if k.startswith(("loss", "total_loss"))]
    first, last = train[0][loss_key], train[-1][loss_key]
    ap = {k: row[k] for row in rows for k in ("bbox/AP", "segm/AP") if k in row}

    def median(key):
        values = [row[key] for row in train if isinstance(row.get(key), (int, float))]
        return statistics.median(values) if values else math.nan

    ap_cells = [f"{ap[k]:.1f}" if k in ap else "-" for k in ("bbox/AP", "segm/AP")]
    times = [f"{median(key):.3f}" for key in ("time", "data_time")]
    row = " | ".join([str(done), *times, f"{first:.3f} -> {last:.3f}", *ap_cells])
    if done < iterations:
        return f"stopped at iteration {done} of {iterations}", row
    if not all(math.isfinite(v) for v in losses):
        return "a non-finite loss", row
    if evaluated and not last < first:
        return f"{loss_key} did not fall ({first:.3f} -> {last:.3f})", row
    if evaluated and not (len(ap) == 2 and all(math.isfinite(v) for v in ap.values())):
        return f"no finite box and mask AP after the evaluation ({ap})", row
    return "", row


TRAIN_TABLE = (
    "| run | iterations | s/iter (median) | data s/iter | loss, first -> last window | box AP "
    "| mask AP |\n|---|---|---|---|---|---|---|\n"
)


def train_command(cpus: int) -> List[str]:
    return [sys.executable, "train_net.py", "--config-file", MAIN_CONFIG, "MODEL.DEVICE", "cuda",
            "SOLVER.MAX_ITER", str(TRAIN_ITERS), "SOLVER.CHECKPOINT_PERIOD", "1000000",
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "('shapes_tiny_val',)",
            "DATALOADER.NUM_WORKERS", str(max(1, min(8, cpus // 2))), "SEED", "0",
            "OUTPUT_DIR", os.path.join(TRAIN_DIR, "train")]  # fmt: skip


def head_command(name: str, config: str, cpus: int) -> List[str]:
    return [sys.executable, "train_net.py", "--config-file", config, "MODEL.DEVICE", "cuda",
            "MODEL.FREEZE_DETECTOR", "True",
            "MODEL.WEIGHTS", DETECTOR,
            "SOLVER.MAX_ITER", str(HEAD_ITERS), "SOLVER.CHECKPOINT_PERIOD", "1000000",
            "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "TEST.PRECISE_BN.ENABLED", "False",
            "DATALOADER.NUM_WORKERS", str(max(1, min(3, cpus // 5))), "SEED", "0",
            "OUTPUT_DIR", os.path.join(TRAIN_DIR, name)]  # fmt: skip


def _keep_metrics(run: str, out: str, name: str) -> str:
    """Copies a run's metrics.json into --out (the tables' source); returns the copy's path."""
    source, copy = os.path.join(TRAIN_DIR, run, "metrics.json"), os.path.join(out, name)
    if os.path.exists(source):
        shutil.copyfile(source, copy)
    elif os.path.exists(copy):
        os.remove(copy)
    return copy


def step_train(ctx: Context, timeout: float) -> Outcome:
    if not importlib.util.find_spec("detectron2"):  # train_net.py runs in this same Python
        return Outcome(NO_DETECTRON2)
    shutil.rmtree(TRAIN_DIR, ignore_errors=True)  # metrics.json appends to an old one
    log = os.path.join(ctx.out, "train.log")
    status = run_one(train_command(ctx.cpus), log, timeout)
    metrics = _keep_metrics("train", ctx.out, "train_metrics.json")
    problem, cells = training_report(metrics, TRAIN_ITERS, "total_loss", evaluated=True)
    if status == "passed" and problem:
        status = f"FAILED: {problem}"
    details = TRAIN_TABLE + (f"| main job (total_loss) | {cells} |\n" if cells else "")
    with open(log, errors="replace") as f:  # detectron2's inference speed on the GPU
        details += "".join(f"\n{line.strip()}\n" for line in f if "Total inference" in line)
    return Outcome(status, details + ("\n" + _tail(log) if status != "passed" else ""), "train.log")


def step_heads(ctx: Context, timeout: float) -> Outcome:
    if not importlib.util.find_spec("detectron2"):
        return Outcome(NO_DETECTRON2)
    if not os.path.exists(DETECTOR):
        return Outcome("skipped: no detector to freeze (the train step saved no model_final.pth)")
    for name, _ in HEAD_CONFIGS:
        shutil.rmtree(os.path.join(TRAIN_DIR, name), ignore_errors=True)
    logs = [os.path.join(ctx.out, f"head_{name}.log") for name, _ in HEAD_CONFIGS]
    commands = [(head_command(*head, ctx.cpus), log, None) for head, log in zip(HEAD_CONFIGS, logs)]
    failures, details, tails = [], TRAIN_TABLE, ""
    for (name, _), code, log in zip(HEAD_CONFIGS, run_commands(commands, timeout), logs):
        metrics = _keep_metrics(name, ctx.out, f"head_{name}_metrics.json")
        problem, cells = training_report(metrics, HEAD_ITERS, "loss_mask", evaluated=False)
        details += f"| {name} head-only (loss_mask) | {cells or '-'} |\n"
        status = _status(code, timeout)
        if status != "passed" or problem:
            failures.append(f"{name}: {status if status != 'passed' else problem}")
            tails += f"\n{name}:\n{_tail(log, 12)}"
    status = "FAILED: " + "; ".join(failures) if failures else "passed"
    return Outcome(status, details + tails, "head_*.log")


def benchmark_command(out: str) -> List[str]:
    return [sys.executable, "-m", "masklab_d2.tools.benchmark_ops", "--devices", "cuda",
            "--maps", "fpn", "--sizes", "7", "14", "--layouts", "nchw", "channels_last",
            "--repeat", "10", "--markdown", os.path.join(out, "benchmark_cuda.md")]  # fmt: skip


def step_benchmark(ctx: Context, timeout: float) -> Outcome:
    log, table = (os.path.join(ctx.out, name) for name in ("benchmark.log", "benchmark_cuda.md"))
    if os.path.exists(table):
        os.remove(table)
    status = run_one(benchmark_command(ctx.out), log, timeout)
    if status == "passed" and not os.path.exists(table):
        status = "FAILED: no table written"
    if os.path.exists(table):
        with open(table) as f:
            return Outcome(status, f.read(), "benchmark_cuda.md")
    return Outcome(status, _tail(log), "benchmark.log")


PLAN = [
    Step("build", 140, (60, 100), step_build),
    Step("tests", 100, (40, 70), pytest_step("tests", TESTS_SELECTION)),
    Step("compile", 90, (30, 60), pytest_step("compile", COMPILE_SELECTION)),
    Step("train", 120, (60, 100), step_train),
    Step("heads", 60, (25, 45), step_heads),
    Step("benchmark", 40, (10, 25), step_benchmark),
]


def exit_code(records: Sequence[Record]) -> int:
    statuses = {record.step.name: record.status for record in records}
    if statuses.get("build", "").startswith("FAILED"):
        return EXIT_NO_BUILD
    if any(status.startswith("FAILED") for status in statuses.values()):
        return EXIT_FAILED
    if any(status != "passed" for status in statuses.values()):
        return EXIT_INCOMPLETE
    return EXIT_OK


def write_summary(out: str, title: str, header: Sequence[str], records: Sequence[Record]) -> str:
    """Writes ``summary.md`` atomically (a kill mid-write leaves the previous one whole)."""
    lines = [f"# {title}", "", *header, ""]
    if records:
        lines += ["| step | limit s | expected s (estimate) | status | s | output |", "|---|" * 6]
    for r in records:
        low, high = r.step.expected
        cells = [r.step.name, r.step.limit, f"{low}-{high}", r.status, f"{r.seconds:.0f}", r.output]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    for r in records:
        if r.details:
            lines += ["", f"## {r.step.name}: {r.status}", "", r.details.rstrip("\n")]
    text = "\n".join(lines) + "\n"
    descriptor, temporary = tempfile.mkstemp(dir=out, prefix=".summary.")
    with os.fdopen(descriptor, "w") as f:
        f.write(text)
    os.replace(temporary, os.path.join(out, "summary.md"))
    return text


def run_plan(plan: Sequence[Step], ctx: Context, header: Sequence[str], budget=BUDGET_S, skip=()):
    """Runs the steps in order, rewriting the summary before and after each; returns the exit
    status and the summary's text."""
    start = time.monotonic()
    records = [Record(step) for step in plan]
    # A stop signal becomes an exception in the waiting step, whose process groups are then
    # killed before the summary records the cut.
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for record in records:
            left = budget - (time.monotonic() - start)
            if record.step.name in skip:
                record.status = "skipped: --skip"
            elif any(r.step.name == "build" and r.status.startswith("FAILED") for r in records):
                record.status = "skipped: no usable CUDA build"
            elif left < MIN_STEP_S:
                record.status = f"skipped: out of time ({left:.0f} s of {budget:.0f} s left)"
            else:
                record.status = "running"
                write_summary(ctx.out, f"gpu_check: running {record.step.name}", header, records)
                began = time.monotonic()
                try:
                    outcome = record.step.run(ctx, min(record.step.limit, left))
                except Exception as error:  # a bug in a step's checks must not lose the summary
                    outcome = Outcome(f"FAILED: {type(error).__name__}: {error}")
                record.seconds = time.monotonic() - began
                record.status, record.details, record.output = outcome
            write_summary(ctx.out, "gpu_check: running", header, records)
        code = exit_code(records)
        title = f"gpu_check: exit status {code} ({EXIT_MEANING[code]})"
    except Stopped as stop:
        code = 128 + stop.signum
        for record in records:
            if record.status == "running":
                record.status = f"KILLED by {stop}"
        title = f"gpu_check: stopped by {stop}, exit status {code}"
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code, write_summary(ctx.out, title, header, records)


def format_plan(arch: str = "<this GPU's major.minor>", out: str = "gpu_check", cpus: int = 16):
    """The steps with their limits, expected times and commands (``--plan``)."""
    argv, env = build_command(arch)
    commands = {
        "build": f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} FORCE_CUDA=1 "
        + shlex.join(argv),
        "tests": shlex.join(pytest_command(TESTS_SELECTION, f"{out}/tests.xml")),
        "compile": shlex.join(pytest_command(COMPILE_SELECTION, f"{out}/compile.xml")),
        "train": shlex.join(train_command(cpus)),
        "heads": "\n  ".join(shlex.join(head_command(*head, cpus)) for head in HEAD_CONFIGS),
        "benchmark": shlex.join(benchmark_command(out)),
    }
    lines = [f"Step limits add up to {sum(s.limit for s in PLAN)} s (budget {BUDGET_S} s):"]
    for step in PLAN:
        low, high = step.expected
        lines.append(f"{step.name}: limit {step.limit} s, expected {low}-{high} s (estimate)")
        lines.append("  " + commands[step.name])
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_check", help="folder for summary.md, tables, logs")
    parser.add_argument("--skip", nargs="+", default=[], choices=[step.name for step in PLAN])
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps")
    parser.add_argument("--plan", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    if args.plan:
        print(format_plan())
        return EXIT_OK

    import torch

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if not torch.cuda.is_available():
        message = (
            "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Nothing was run: run this on a GPU "
            "machine."
        )
        print(message, file=sys.stderr)
        write_summary(out, f"gpu_check: exit status {EXIT_NO_GPU} (no CUDA device)", [message], [])
        return EXIT_NO_GPU
    major, minor = torch.cuda.get_device_capability()
    try:  # a GPU machine may get the working tree without its .git, or have no git
        describe = ["git", "describe", "--always", "--dirty"]
        commit = subprocess.run(describe, cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    header = [
        f"{torch.cuda.get_device_name()} (sm_{major}{minor}), {os.cpu_count()} CPU cores; torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}); commit {commit or '?'}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        f"Step limits add up to {sum(step.limit for step in PLAN)} s (budget "
        f"{args.budget:.0f} s); the expected times are estimates for an H200 with 16 cores.",
    ]
    ctx = Context(out, f"{major}.{minor}", os.cpu_count() or 1)
    code, summary = run_plan(PLAN, ctx, header, args.budget, args.skip)
    print(summary)
    return code


if __name__ == "__main__":
    sys.exit(main())
