"""What ``masklab_d2.tools.gpu_check`` does without a GPU: the step plan and its time limits, the
forced rebuild, the summary rewritten after every step, time limits that kill whole process
groups, exit statuses, and the no-GPU exit. Fast; the steps themselves need a GPU."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO  # noqa: E402

from masklab_d2.tools import gpu_check
from masklab_d2.tools.gpu_check import Context, Outcome, Step

no_gpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="gpu_check would run for real")


def _python_step(name, code, limit=30):
    """A step that runs ``code`` in a fresh Python as gpu_check runs its commands."""

    def run(ctx, timeout):
        log = os.path.join(ctx.out, f"{name}.log")
        status = gpu_check._status(
            gpu_check.run_commands([([sys.executable, "-c", code], log, None)], timeout)[0],
            timeout,
        )
        return Outcome(status, gpu_check._tail(log), f"{name}.log")

    return Step(name, limit, (1, 2), run)


def test_the_plan_fits_a_10_minute_command():
    limits = [step.limit for step in gpu_check.PLAN]
    assert sum(limits) <= gpu_check.BUDGET_S <= 570  # 9.5 minutes
    for step in gpu_check.PLAN:
        low, high = step.expected
        assert 0 < low <= high < step.limit, step.name
    names = [step.name for step in gpu_check.PLAN]
    assert names == ["build", "tests", "compile", "train", "heads", "benchmark"]


def test_the_docstring_states_each_steps_limit_and_expected_time():
    for step in gpu_check.PLAN:
        low, high = step.expected
        assert f"* {step.name} ({step.limit} s / {low}-{high} s)" in gpu_check.__doc__, step.name
    total = sum(step.limit for step in gpu_check.PLAN)
    assert f"limits add up to {total} s" in gpu_check.__doc__
    low = sum(step.expected[0] for step in gpu_check.PLAN)
    high = sum(step.expected[1] for step in gpu_check.PLAN)
    assert f"In all {low}-{high} s" in gpu_check.__doc__
    assert f"({gpu_check.BUDGET_S} s after the start)" in gpu_check.__doc__


def test_the_build_is_forced_for_the_visible_gpus_architecture(monkeypatch):
    monkeypatch.setenv("MASKLAB_CPU_ONLY", "1")  # a leftover setting must not win
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.5;8.0")
    argv, env = gpu_check.build_command("9.0")
    assert argv[1:5] == ["setup.py", "build_ext", "--inplace", "--force"]
    # A build folder of its own (emptied before the build), ignored by git and outside --out.
    assert argv[5:] == ["--build-temp", gpu_check.BUILD_TEMP]
    ignored = open(os.path.join(REPO, ".gitignore")).read().split()
    assert "build/" in ignored and "output/" in ignored
    assert gpu_check.BUILD_TEMP.startswith(os.path.join(REPO, "build", ""))
    assert gpu_check.TRAIN_DIR.startswith(os.path.join(REPO, "output", ""))
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["FORCE_CUDA"] == "1"
    assert "MASKLAB_CPU_ONLY" not in env
    # setup.py, in that environment, fails where it finds no toolkit instead of building the
    # CPU kernels alone.
    spec = importlib.util.spec_from_file_location("masklab_setup", os.path.join(REPO, "setup.py"))
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    for key in ("MASKLAB_CPU_ONLY", "TORCH_CUDA_ARCH_LIST", "FORCE_CUDA"):
        monkeypatch.delenv(key, raising=False)
        if key in env:
            monkeypatch.setenv(key, env[key])
    monkeypatch.setattr(setup_py, "TORCH_CUDA", "13.0")
    monkeypatch.setattr(setup_py, "_write_build_info", lambda arch_list: None)
    with pytest.raises(SystemExit, match="FORCE_CUDA=1, but no CUDA toolkit"):
        setup_py.get_extensions(None)


def test_the_build_check_rejects_stale_and_cpu_only_extensions():
    good = {"cuda": True, "arch": "9.0", "file": "_C.so", "mtime": 100.0, "sum": 8.0}
    assert gpu_check.check_build(good, "9.0", started=100.5) == ""
    assert "no CUDA kernels" in gpu_check.check_build({**good, "cuda": False}, "9.0", 100)
    assert "not '9.0'" in gpu_check.check_build({**good, "arch": "7.5;8.0+PTX"}, "9.0", 100)
    assert "predates the build" in gpu_check.check_build(good, "9.0", started=200)
    assert "not 8" in gpu_check.check_build({**good, "sum": 0.0}, "9.0", 100)


def test_the_summary_is_rewritten_before_and_after_each_step(tmp_path):
    summary = str(tmp_path / "summary.md")
    read = f"text = open({summary!r}).read()\n"
    plan = [
        _python_step("first", "print('first ran')"),
        # The summary already has the first step's result and this step marked running.
        _python_step(
            "second",
            read + "assert '| first | 30 | 1-2 | passed |' in text, text\n"
            "assert '| second | 30 | 1-2 | running |' in text, text\n"
            "assert '| third | 30 | 1-2 | pending |' in text, text\n",
        ),
        _python_step("third", "raise SystemExit(3)"),
    ]
    code, text = gpu_check.run_plan(plan, Context(str(tmp_path), "9.0", 2), ["header line"])
    assert code == gpu_check.EXIT_FAILED
    assert open(summary).read() == text
    assert "| first | 30 | 1-2 | passed |" in text and "| second | 30 | 1-2 | passed |" in text
    assert "| third | 30 | 1-2 | FAILED: exit status 3 |" in text
    assert text.startswith("# gpu_check: exit status 1 (a step failed)\n\nheader line\n")
    assert "## first: passed" in text and "first ran" in text  # each step's details follow


def test_a_step_over_its_limit_is_killed_with_its_whole_process_group(tmp_path):
    """A child that ignores SIGTERM (as detectron2's loader workers do) dies with its step."""
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    plan = [_python_step("slow", code, limit=3), _python_step("after", "pass")]
    start = time.monotonic()
    exit_status, text = gpu_check.run_plan(plan, Context(str(tmp_path), "9.0", 2), [])
    assert time.monotonic() - start < 30
    assert exit_status == gpu_check.EXIT_FAILED
    assert "| slow | 3 | 1-2 | FAILED: timed out after 3 s |" in text
    assert "| after | 30 | 1-2 | passed |" in text  # the next step still runs
    pid = int(pid_file.read_text())
    for _ in range(50):  # reaped by init a moment after the kill
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_steps_that_do_not_fit_the_budget_are_skipped(tmp_path):
    plan = [_python_step("sleepy", "import time; time.sleep(1.5)"), _python_step("late", "pass")]
    ctx = Context(str(tmp_path), "9.0", 2)
    code, text = gpu_check.run_plan(plan, ctx, [], budget=gpu_check.MIN_STEP_S + 1)
    assert code == gpu_check.EXIT_INCOMPLETE
    assert "| late | 30 | 1-2 | skipped: out of time" in text
    code, text = gpu_check.run_plan(plan, ctx, [], skip=["sleepy"])
    assert code == gpu_check.EXIT_INCOMPLETE and "| sleepy | 30 | 1-2 | skipped: --skip |" in text


def test_a_failed_build_skips_every_other_step(tmp_path):
    plan = [_python_step("build", "raise SystemExit(1)"), _python_step("tests", "pass")]
    code, text = gpu_check.run_plan(plan, Context(str(tmp_path), "9.0", 2), [])
    assert code == gpu_check.EXIT_NO_BUILD
    assert "| tests | 30 | 1-2 | skipped: no usable CUDA build |" in text


def test_a_stop_signal_kills_the_step_and_keeps_the_summary(tmp_path):
    code = f"import os, signal, time; os.kill({os.getpid()}, signal.SIGTERM); time.sleep(60)"
    plan = [_python_step("first", "pass"), _python_step("cut", code), _python_step("never", "")]
    exit_status, text = gpu_check.run_plan(plan, Context(str(tmp_path), "9.0", 2), [])
    assert exit_status == 128 + signal.SIGTERM
    assert (
        "| first | 30 | 1-2 | passed |" in text and "| cut | 30 | 1-2 | KILLED by SIGTERM" in text
    )
    assert "| never | 30 | 1-2 | pending |" in text
    assert signal.getsignal(signal.SIGTERM) is not gpu_check._raise_stopped  # restored


def test_exit_statuses():
    def records(*statuses):
        names = ["build", "tests", "train"]
        return [gpu_check.Record(Step(n, 1, (0, 1), None), s) for n, s in zip(names, statuses)]

    assert gpu_check.exit_code(records("passed", "passed", "passed")) == gpu_check.EXIT_OK
    assert gpu_check.exit_code(records("passed", "FAILED: x", "passed")) == gpu_check.EXIT_FAILED
    assert gpu_check.exit_code(records("FAILED: x", "skipped: y", "skipped: y")) == 3
    incomplete = records("passed", "passed", "skipped: detectron2 is not installed")
    assert gpu_check.exit_code(incomplete) == gpu_check.EXIT_INCOMPLETE
    assert len(set(gpu_check.EXIT_MEANING)) == 5


@no_gpu_only
def test_without_a_gpu_it_says_so_at_once_with_its_own_status(tmp_path):
    out = tmp_path / "gc"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "masklab_d2.tools.gpu_check", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == gpu_check.EXIT_NO_GPU == 2
    assert "no CUDA device is visible" in result.stderr
    assert time.monotonic() - start < 60  # torch's import; nothing is built or run
    assert os.listdir(out) == ["summary.md"]
    assert "no CUDA device is visible" in (out / "summary.md").read_text()


def test_plan_prints_every_command_without_a_gpu(capsys):
    assert gpu_check.main(["--plan"]) == gpu_check.EXIT_OK
    text = capsys.readouterr().out
    assert "build_ext --inplace --force" in text and "FORCE_CUDA=1" in text
    for step in gpu_check.PLAN:
        assert f"{step.name}: limit {step.limit} s" in text
    assert text.count("train_net.py") == 1 + len(gpu_check.HEAD_CONFIGS)


def test_the_training_commands_name_existing_configs_and_the_main_job():
    for _, config in gpu_check.HEAD_CONFIGS + [(None, gpu_check.MAIN_CONFIG)]:
        assert os.path.exists(os.path.join(REPO, config)), config
    readme = open(os.path.join(REPO, "README.md")).read()
    assert f"--config-file {gpu_check.MAIN_CONFIG}" in readme
    assert gpu_check.HEAD_ITERS < gpu_check.TRAIN_ITERS


@pytest.mark.detectron2
def test_the_training_overrides_merge_into_their_configs():
    """Every KEY VALUE a training step passes is a key of its config (a typo would fail only on
    the GPU machine)."""
    from masklab_d2.config import load_config

    commands = [gpu_check.train_command(16)] + [
        gpu_check.head_command(name, config, 16) for name, config in gpu_check.HEAD_CONFIGS
    ]
    for argv in commands:
        config, opts = (
            argv[argv.index("--config-file") + 1],
            argv[argv.index("--config-file") + 2 :],
        )
        opts[opts.index("MODEL.DEVICE") + 1] = "cpu"  # no GPU here
        cfg = load_config(os.path.join(REPO, config), opts)
        assert cfg.MODEL.DEVICE == "cpu" and cfg.SEED == 0
        assert cfg.TEST.EVAL_PERIOD == 0 and cfg.OUTPUT_DIR.startswith(gpu_check.TRAIN_DIR)
        if "MODEL.FREEZE_DETECTOR" in opts:  # on the main job's detector
            assert cfg.MODEL.WEIGHTS == os.path.join(
                gpu_check.TRAIN_DIR, "train", "model_final.pth"
            )
            assert cfg.MODEL.FREEZE_DETECTOR and cfg.SOLVER.MAX_ITER == gpu_check.HEAD_ITERS
            assert cfg.DATASETS.TEST == () and not cfg.TEST.PRECISE_BN.ENABLED
        else:
            assert cfg.SOLVER.MAX_ITER == gpu_check.TRAIN_ITERS
            assert cfg.DATASETS.TEST == ("shapes_tiny_val",) and cfg.TEST.PRECISE_BN.ENABLED


def _metrics(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"iteration": 3, "tot')


def test_training_report_checks_iterations_losses_and_ap(tmp_path):
    path = tmp_path / "metrics.json"
    train = [
        {"iteration": 19, "total_loss": 3.0, "loss_mask": 0.7, "time": 0.05, "data_time": 0.01},
        {"iteration": 39, "total_loss": 2.0, "loss_mask": 0.6, "time": 0.07, "data_time": 0.01},
    ]
    evaluation = {"iteration": 39, "bbox/AP": 1.5, "segm/AP": 1.25}
    _metrics(path, train + [evaluation])  # ends in a line cut by a kill: ignored
    problem, cells = gpu_check.training_report(str(path), 40, "total_loss", evaluated=True)
    assert problem == "" and cells == "40 | 0.060 | 0.010 | 3.000 -> 2.000 | 1.5 | 1.2"
    assert (
        "stopped at iteration 40 of 60"
        in gpu_check.training_report(str(path), 60, "total_loss", True)[0]
    )
    _metrics(path, train)
    assert (
        "no finite box and mask AP"
        in gpu_check.training_report(str(path), 40, "total_loss", True)[0]
    )
    assert gpu_check.training_report(str(path), 40, "loss_mask", evaluated=False)[0] == ""
    _metrics(path, train[::-1] + [evaluation])
    assert "did not fall" in gpu_check.training_report(str(path), 40, "total_loss", True)[0]
    _metrics(path, [train[0], {**train[1], "loss_mask": float("nan")}])
    assert gpu_check.training_report(str(path), 40, "loss_mask", False)[0] == "a non-finite loss"
    assert (
        "no loss_mask logged"
        in gpu_check.training_report(str(tmp_path / "none"), 1, "loss_mask", False)[0]
    )


def test_junit_table_and_counts(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_ops_cuda" name="test_a" time="0.5"/>'
        '<testcase classname="tests.test_ops_cuda" name="test_b" time="1.0">'
        '<failure message="boom"/></testcase>'
        '<testcase classname="tests.test_ops" name="test_c" time="0"><skipped message="no GPU"/>'
        "</testcase></testsuite></testsuites>"
    )
    table = gpu_check.junit_table(str(xml)).splitlines()
    assert table[2] == "| test_ops_cuda::test_b | FAILED | 1.00 |"  # failures first
    assert "| test_ops_cuda::test_a | passed | 0.50 |" in table
    assert "| test_ops::test_c | skipped: no GPU | 0.00 |" in table
    assert gpu_check.junit_table(str(tmp_path / "none.xml")) == "(no JUnit file)\n"


def test_a_test_step_where_every_test_skips_fails(tmp_path, monkeypatch):
    """The CUDA tests skipped (no GPU seen by pytest) prove nothing: the step fails."""
    skipping = tmp_path / "test_skipping.py"
    skipping.write_text(
        "import pytest\n\n@pytest.mark.cuda\n@pytest.mark.skip('no GPU')\ndef test_x():\n    pass\n"
    )
    monkeypatch.setattr(gpu_check, "CUDA_TESTS", (str(skipping),))
    outcome = gpu_check.pytest_step("tests", "not inductor")(Context(str(tmp_path), "9.0", 2), 120)
    assert outcome.status == "FAILED: no test ran"
    assert outcome.details.startswith("0 passed, 0 failed, 1 skipped")
    assert (tmp_path / "tests.md").exists()


@no_gpu_only
def test_the_cuda_tests_collect_and_skip_cleanly_without_a_gpu():
    """Without a GPU every test of tests/ops/test_ops_cuda.py skips (none errors at import or
    collection), and both of gpu_check's selections of them (``-k``) are non-empty."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", gpu_check.CUDA_TESTS[0], "-v", "-p", "no:cacheprovider"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    verdicts = r"^tests/ops/test_ops_cuda.py::(.*) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
    outcomes = re.findall(verdicts, result.stdout, re.MULTILINE)
    assert outcomes and {outcome for _, outcome in outcomes} == {"SKIPPED"}, result.stdout
    # -k matches a substring of the test's name (no class, marker or module says "inductor").
    compiled = [name for name, _ in outcomes if gpu_check.COMPILE_SELECTION in name]
    assert len(compiled) == 2 and len(outcomes) - len(compiled) > 50
