"""Sweeps: expansion, naming, resume / retry logic, launchers, the report; end to end on shapes.

The unit tests use fake run folders and a fake train script (no detectron2); the end-to-end
tests (marked detectron2) train real tiny shapes models through the local launcher and through
submitit's LocalExecutor.
"""

import csv
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from helpers import REPO  # noqa: E402
from PIL import Image

from masklab_d2.tools.sweeps import cli as sweep_tool
from masklab_d2.tools.sweeps import launch, state
from masklab_d2.tools.sweeps.cli import plan
from masklab_d2.tools.sweeps.commands import train_command
from masklab_d2.tools.sweeps.fingerprint import run_fingerprint, training_code_digest
from masklab_d2.tools.sweeps.report import training_time_s, write_report
from masklab_d2.tools.sweeps.slurm import slurm_parameters
from masklab_d2.tools.sweeps.spec import (
    Run,
    SweepError,
    SweepSpec,
    expand_runs,
    load_sweep,
    safe_name,
)
from masklab_d2.tools.sweeps.state import (
    DONE,
    FAILED,
    INTERRUPTED,
    PENDING,
    QUEUED,
    RUNNING,
    STALE,
    STATUS_FILE,
    read_metrics,
    run_state,
)

TINY_SWEEP = os.path.join(REPO, "tests", "tools", "tiny_sweep.yaml")
MASK_RCNN = "configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml"
MASKLAB = "configs/shapes-partial/masklab_R_18_FPN_gtcrop.yaml"


def write_sweep(tmp_path, text, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


GRID = f"""
    base_config: {MASK_RCNN}
    output_root: OUTPUT_ROOT
    axes:
      head:
        mask_rcnn: {{config: {MASK_RCNN}}}
        masklab: {{config: {MASKLAB}, opts: {{MODEL.MASKLAB.CROP_SIZE: 14}}}}
      MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE: [64, 128]
    cells:
      - {{head: masklab, MODEL.MASKLAB.NUM_DIRECTIONS: 4}}
      - {{name: no refine!, head: masklab, opts: {{MODEL.MASKLAB.HYPERCOLUMN_FEATURES: []}}}}
      - {{head: mask_rcnn, MODEL.ROI_MASK_HEAD.TRAIN_ON_GT_BOXES: True, seeds: [1, 2, 3]}}
    seeds: [0, 1]
    opts: {{SOLVER.MAX_ITER: 10, DATASETS.TEST: ["shapes_tiny_val"]}}
"""


# ------------------------------------------------------------------------ expansion and names


def test_expansion_grid_groups_cells_and_seeds(tmp_path):
    spec = load_sweep(write_sweep(tmp_path, GRID.replace("OUTPUT_ROOT", str(tmp_path / "out"))))
    runs = expand_runs(spec)
    assert len(runs) == (2 * 2 + 2) * 2 + 3
    names = [run.name for run in runs]
    # Seed by seed across the cells: every cell once before any cell twice.
    assert names[:3] == [
        "head=mask_rcnn__ROI_HEADS.BATCH_SIZE_PER_IMAGE=64__seed=0",
        "head=mask_rcnn__ROI_HEADS.BATCH_SIZE_PER_IMAGE=128__seed=0",
        "head=masklab__ROI_HEADS.BATCH_SIZE_PER_IMAGE=64__seed=0",
    ]
    gt_crops = "head=mask_rcnn__ROI_MASK_HEAD.TRAIN_ON_GT_BOXES=True"
    assert [run.seed for run in runs[:7]] == [0] * 6 + [1] and names[6] == gt_crops + "__seed=1"
    assert names[7] == "head=mask_rcnn__ROI_HEADS.BATCH_SIZE_PER_IMAGE=64__seed=1"
    assert [n for n in names if n.startswith(gt_crops)] == [
        f"{gt_crops}__seed={seed}" for seed in (1, 2, 3)
    ]  # its own seeds
    assert names[-1] == gt_crops + "__seed=3"
    assert "head=masklab__MASKLAB.NUM_DIRECTIONS=4__seed=1" in names
    assert "no-refine__seed=0" in names  # an explicit name, made safe
    assert len(set(names)) == len(names)

    by_name = {run.name: run for run in runs}
    run = by_name["head=masklab__ROI_HEADS.BATCH_SIZE_PER_IMAGE=128__seed=1"]
    assert run.cell.config_file == os.path.join(REPO, MASKLAB)  # the group switched the file
    assert run.output_dir == str(tmp_path / "out" / run.name)
    command = train_command(spec, run)
    assert command[:4] == [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        run.cell.config_file,
    ]
    tail = command[4:]
    assert tail[:4] == ["OUTPUT_DIR", run.output_dir, "SEED", "1"]
    # Common opts first, then the axes in axis order (the group's own opts with it).
    assert tail[4:] == [
        "SOLVER.MAX_ITER", "10", "DATASETS.TEST", "['shapes_tiny_val']",
        "MODEL.MASKLAB.CROP_SIZE", "14", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "128",
    ]  # fmt: skip
    no_refine = by_name["no-refine__seed=0"]
    assert no_refine.cell.overrides[-2:] == ("MODEL.MASKLAB.HYPERCOLUMN_FEATURES", "[]")
    assert dict(no_refine.cell.values) == {
        "head": "masklab",
        "MASKLAB.HYPERCOLUMN_FEATURES": "none",
    }
    assert "--resume" in train_command(spec, run, resume=True)


def test_names_are_stable_safe_and_unique(tmp_path):
    text = """
        base_config: {config}
        axes:
          MODEL.PIXEL_MEAN: [[103.5, 116.3, 123.7], [0, 0, 0]]
          OUTPUT_TAG: ["a/b", "a b", "a:b"]
          MODEL.WEIGHTS: ["{long}"]
        seeds: 1
    """.format(config=MASK_RCNN, long="x" * 300)
    path = write_sweep(tmp_path, text)
    first = [run.name for run in expand_runs(load_sweep(path))]
    second = [run.name for run in expand_runs(load_sweep(path))]
    assert first == second
    assert len(set(first)) == len(first) == 6
    for name in first:
        assert safe_name(name) == name and "/" not in name and " " not in name
        assert len(name) < 160
    assert first[0].startswith("PIXEL_MEAN=103.5-116.3-123.7__OUTPUT_TAG=a-b")
    # "a/b", "a b" and "a:b" all read "a-b": a hash of what each cell runs tells them apart.
    assert all("~" in name for name in first)


def test_a_sweep_of_explicit_cells_only_has_no_base_cell(tmp_path):
    text = f"""
        base_config: {MASK_RCNN}
        cells:
          - {{name: a, SOLVER.BASE_LR: 0.1, seeds: [0, 1]}}
          - {{name: b, config: {MASKLAB}}}
    """
    names = [run.name for run in expand_runs(load_sweep(write_sweep(tmp_path, text)))]
    assert names == ["a__seed=0", "b__seed=0", "a__seed=1"]


def test_default_output_root_and_seed_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_sweep(
        write_sweep(tmp_path, f"base_config: {MASK_RCNN}\nseeds: 3\n", name="mine.yaml")
    )
    assert spec.output_root == str(tmp_path / "output" / "sweeps" / "mine")
    assert [run.name for run in expand_runs(spec)] == [
        "base__seed=0",
        "base__seed=1",
        "base__seed=2",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("axes: {head: {a: {config: nope.yaml}}}", "not found"),
        ("axes: {head: {a: {}}}\ncells: [{head: b}]", "no group 'b'"),
        ("opts: {OUTPUT_DIR: /tmp/x}", "set by the sweep"),
        (
            "axes: {h: {a: {config: %s}}}\ncells: [{h: a, config: %s}]" % (MASK_RCNN, MASK_RCNN),
            "set the config",
        ),
        ("launcher: pbs", "launcher"),
        ("sedes: [0]", "unknown keys"),
        ("opts: [A, 1, B]", "alternate"),
        ("axes: {X: []}", "non-empty"),
        ("cells: [{MODEL.MASK_ON: True, seeds: [1, 1]}]", "repeated seeds"),
        ("table: [AP]", "metric keys"),
    ],
)
def test_invalid_sweeps_are_rejected(tmp_path, text, message):
    path = write_sweep(tmp_path, f"base_config: {MASK_RCNN}\n{text}\n")
    with pytest.raises(SweepError, match=message):
        expand_runs(load_sweep(path))


def test_slurm_parameters():
    spec = SweepSpec(
        path="s.yaml", name="s", base_config="c", output_root="/o", axes={}, cells=[], seeds=[0], opts=[],
        num_gpus=8, parallel=4,
        slurm={"partition": "gpu", "time": "1-02:30:00", "cpus": 10, "mem": "64G", "exclusive": True,
               "array_parallelism": 16},
    )  # fmt: skip
    params = slurm_parameters(spec)
    assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 8
    assert params["tasks_per_node"] == 8  # one task per GPU
    assert (
        params["timeout_min"] == 26 * 60 + 30
        and params["mem_gb"] == 64
        and params["cpus_per_task"] == 10
    )
    # The array's throttle is its own setting, not the local `parallel`.
    assert params["slurm_array_parallelism"] == 16 and params["slurm_exclusive"] is True
    del spec.slurm["array_parallelism"]
    assert "slurm_array_parallelism" not in slurm_parameters(spec)  # submitit's default
    spec.slurm = {"gpus": 4}
    with pytest.raises(SweepError, match="must equal num_gpus"):
        slurm_parameters(spec)
    spec.slurm = {"bogus": 1}
    with pytest.raises(SweepError, match="bogus"):
        slurm_parameters(spec)


# ----------------------------------------------------------------- run states with fake folders


def fake_finished(
    output_dir, max_iter=4, final=True, aps=(10.0, 20.0), seen=None, boundary=None, run=None
):
    """A run folder as train_net.py leaves it (final evaluation at MAX_ITER when final); with
    ``run``, its status file records the run's fingerprint, as the sweep does. ``boundary``:
    the final Boundary AP, seen and unseen (a run from before Boundary AP has none)."""
    os.makedirs(output_dir, exist_ok=True)
    if run is not None:
        write_status(output_dir, state=DONE, fingerprint=run_fingerprint(run))
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(f"SOLVER:\n  MAX_ITER: {max_iter}\nDATASETS:\n  TEST: [shapes_tiny_val]\n")
    records = [
        {"iteration": 0, "total_loss": 3.0},
        {"iteration": 1, "segm/AP": aps[0], "bbox/AP": aps[0] + 1},
    ]
    if final:
        last = {
            "iteration": max_iter,
            "segm/AP": aps[1],
            "bbox/AP": aps[1] + 1,
            "segm/AP50": aps[1] + 5,
        }
        last["segm/AP75"] = aps[1] - 5
        if seen is not None:
            last["segm/seen/AP"], last["segm/unseen/AP"] = seen
        if boundary is not None:
            last["boundary/AP"], last["boundary/seen/AP"], last["boundary/unseen/AP"] = boundary
            records[1]["boundary/AP"] = aps[0] - 1  # the periodic evaluation's too
        records.append(last)
    with open(os.path.join(output_dir, "metrics.json"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.write('{"iteration": 5, "segm/A')  # a line cut short by a kill is ignored
    open(os.path.join(output_dir, "model_final.pth"), "w").close()
    open(os.path.join(output_dir, "last_checkpoint"), "w").write("model_final.pth")


def write_status(output_dir, **status):
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, STATUS_FILE), "w") as f:
        json.dump(status, f)


def test_run_states_from_folders(tmp_path):
    done, no_final_eval, interrupted, failed, alive, stale, fresh = (
        str(tmp_path / n) for n in "abcdefg"
    )
    fake_finished(done)
    fake_finished(no_final_eval, final=False)  # killed while evaluating: weights but no numbers
    os.makedirs(interrupted)
    open(os.path.join(interrupted, "last_checkpoint"), "w").write("model_0000009.pth")
    write_status(failed, state=FAILED, returncode=1)
    write_status(alive, state=RUNNING, heartbeat=time.time())
    write_status(stale, state=RUNNING, heartbeat=time.time() - 3600)
    open(os.path.join(stale, "last_checkpoint"), "w").write("model_0000009.pth")
    assert run_state(done) == DONE
    assert run_state(no_final_eval) == INTERRUPTED
    assert run_state(interrupted) == INTERRUPTED
    assert run_state(failed) == FAILED
    assert run_state(alive) == RUNNING
    assert run_state(stale) == INTERRUPTED
    assert run_state(fresh) == PENDING


def test_plan_skips_done_resumes_interrupted_and_retries_failed(tmp_path, capsys):
    text = f"""
        base_config: {MASK_RCNN}
        output_root: {tmp_path / "out"}
        axes: {{SOLVER.BASE_LR: [0.1, 0.2, 0.3, 0.4]}}
    """
    spec = load_sweep(write_sweep(tmp_path, text))
    runs = expand_runs(spec)
    fake_finished(runs[0].output_dir, run=runs[0])
    write_status(runs[1].output_dir, state=INTERRUPTED, fingerprint=run_fingerprint(runs[1]))
    open(os.path.join(runs[1].output_dir, "last_checkpoint"), "w").write("model_0000001.pth")
    write_status(
        runs[2].output_dir, state=FAILED, returncode=1, fingerprint=run_fingerprint(runs[2])
    )
    launch, states = plan(runs, retry_failed=True)
    assert [states[r.name] for r in runs] == [DONE, INTERRUPTED, FAILED, PENDING]
    assert launch == runs[1:]
    assert plan(runs, retry_failed=False)[0] == [runs[1], runs[3]]

    sweep_tool.print_dry_run(spec, runs, retry_failed=True)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == f"[done, skip] {runs[0].name}"
    assert lines[2] == f"[interrupted, run] {runs[1].name}" and "--resume" in lines[3]
    assert lines[4] == f"[failed, run] {runs[2].name}" and "--resume" not in lines[5]


def test_dry_run_header_counts_cells_with_their_own_seeds_truthfully(tmp_path, capsys):
    text = f"""
        base_config: {MASK_RCNN}
        output_root: {tmp_path / "out"}
        axes: {{SOLVER.BASE_LR: [0.1, 0.2]}}
        cells: [{{name: third, SOLVER.BASE_LR: 0.3, seeds: [0, 1, 2]}}]
        seeds: [0, 1]
    """
    spec = load_sweep(write_sweep(tmp_path, text))
    runs = expand_runs(spec)
    assert len(runs) == 7
    sweep_tool.print_dry_run(spec, runs, retry_failed=True)
    header = capsys.readouterr().out.splitlines()[0]
    assert "3 cells, 7 runs (some cells with their own seeds)" in header
    assert "x 2 seeds" not in header

    spec = load_sweep(write_sweep(tmp_path, text.replace("seeds: [0, 1, 2]", "seeds: [0, 1]")))
    sweep_tool.print_dry_run(spec, expand_runs(spec), retry_failed=True)
    assert "3 cells x 2 seeds = 6 runs" in capsys.readouterr().out.splitlines()[0]


# --------------------------------------------------------------- launching with a fake trainer

FAKE_TRAIN = r"""
import argparse, json, os, sys


def build_argument_parser():
    parser = argparse.ArgumentParser()
    for flag in ("--config-file", "--num-gpus", "--dist-url"):
        parser.add_argument(flag)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    return parser


def main(args):
    kv = dict(zip(args.opts[::2], args.opts[1::2]))
    out = kv["OUTPUT_DIR"]
    os.makedirs(out, exist_ok=True)
    argv = sys.argv[1:] if __name__ == "__main__" else ["--resume"] * args.resume + args.opts
    with open(os.path.join(out, "calls.txt"), "a") as f:
        f.write(json.dumps({"argv": argv, "omp": os.environ.get("OMP_NUM_THREADS"),
                            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),
                            "code": getattr(sys.modules.get("masklab_d2"), "__file__", None)})
                + "\n")
    for i in range(80):
        print("log line", i)
    if kv.get("FAKE.FAIL") == "1":
        print("RuntimeError: this run fails on purpose")
        sys.exit(3)
    lr = float(kv.get("SOLVER.BASE_LR", 0.1))
    seed = int(kv["SEED"])
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write("SOLVER:\n  MAX_ITER: 4\nDATASETS:\n  TEST: [shapes_tiny_val]\n")
    with open(os.path.join(out, "metrics.json"), "w") as f:
        for it, ap in ((1, lr * 50), (4, lr * 100 + seed)):
            f.write(json.dumps({"iteration": it, "segm/AP": ap, "bbox/AP": ap + 1,
                                "segm/seen/AP": ap + 2, "segm/unseen/AP": ap - 2}) + "\n")
    with open(os.path.join(out, "log.txt"), "w") as f:
        f.write("[d2.engine.hooks]: Total training time: 0:01:05 (0:00:01 on hooks)\n")
    open(os.path.join(out, "model_final.pth"), "w").close()


if __name__ == "__main__":
    main(build_argument_parser().parse_args())
"""


def fake_sweep(tmp_path, launcher="local", parallel=2, extra=""):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    text = f"""
        base_config: {MASK_RCNN}
        output_root: {tmp_path / "out"}
        train_script: {script}
        axes: {{SOLVER.BASE_LR: [0.1, 0.2]}}
        cells: [{{name: bad, FAKE.FAIL: 1}}]
        seeds: [0, 1]
        launcher: {launcher}
        parallel: {parallel}
    """
    return write_sweep(tmp_path, text.rstrip() + "\n" + textwrap.indent(extra, " " * 8) + "\n")


def calls(output_dir):
    path = os.path.join(output_dir, "calls.txt")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path)]


def test_local_sweep_records_failures_resumes_and_retries(tmp_path, capsys):
    path = fake_sweep(tmp_path)
    spec = load_sweep(path)
    runs = {run.name: run for run in expand_runs(spec)}
    good, interrupted, bad = (
        runs["SOLVER.BASE_LR=0.1__seed=0"],
        runs["SOLVER.BASE_LR=0.2__seed=1"],
        runs["bad__seed=0"],
    )
    fake_finished(good.output_dir, run=good)  # finished before: skipped
    write_status(interrupted.output_dir, state=RUNNING, fingerprint=run_fingerprint(interrupted))
    open(os.path.join(interrupted.output_dir, "last_checkpoint"), "w").write("model_0000001.pth")

    assert sweep_tool.main([path, "--no-report"]) == 1  # some runs failed
    out = capsys.readouterr().out
    assert calls(good.output_dir) == []
    assert "--resume" in calls(interrupted.output_dir)[0]["argv"]
    assert "--resume" not in calls(runs["SOLVER.BASE_LR=0.2__seed=0"].output_dir)[0]["argv"]
    # parallel 2 on this machine's cores
    assert calls(interrupted.output_dir)[0]["omp"] == str(max(1, launch.available_cores() // 2))
    status = json.load(open(os.path.join(bad.output_dir, STATUS_FILE)))
    assert status["state"] == FAILED and status["returncode"] == 3
    assert (
        len(status["log_tail"]) == 50
        and status["log_tail"][-1] == "RuntimeError: this run fails on purpose"
    )
    assert run_state(bad.output_dir) == FAILED
    assert all(
        run_state(r.output_dir) == DONE for r in runs.values() if not r.name.startswith("bad")
    )
    assert "done 4, running 0, failed 2, pending 0 of 6" in out
    assert "bad__seed=1: failed (return code 3)" in out
    summary = json.load(open(os.path.join(spec.output_root, "sweep_status.json")))
    assert summary["counts"] == {"done": 4, "running": 0, "failed": 2, "stale": 0, "pending": 0}

    # Rerun: finished runs stay untouched, failures are retried (and fail again) ...
    assert sweep_tool.main([path, "--no-report"]) == 1
    assert len(calls(interrupted.output_dir)) == 1 and len(calls(bad.output_dir)) == 2
    assert json.load(open(os.path.join(bad.output_dir, STATUS_FILE)))["attempt"] == 2
    # ... unless told not to.
    assert sweep_tool.main([path, "--no-retry-failed", "--no-report"]) == 1
    assert len(calls(bad.output_dir)) == 2
    assert "launching 0" in capsys.readouterr().out


STOP_TARGET = """
import os, signal, sys, time
marker = sys.argv[1]
if os.fork() == 0:  # a child in the run's process group, as a DataLoader worker is
    signal.signal(signal.SIGTERM, lambda *a: (open(marker, "w").close(), os._exit(0)))
    open(marker + ".child_ready", "w").close()
    time.sleep(60)
    os._exit(0)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))
open(marker + ".ready", "w").close()
time.sleep(60)
"""


def test_stop_signals_the_run_not_its_workers(tmp_path):
    """A DataLoader worker killed by the sweep's SIGTERM crashes the run before its checkpoint:
    the stop goes to the run's main process only, which stops its own workers."""
    marker = str(tmp_path / "child_got_sigterm")
    script = tmp_path / "target.py"
    script.write_text(STOP_TARGET)
    process = subprocess.Popen([sys.executable, str(script), marker], start_new_session=True)
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not all(
            os.path.exists(marker + suffix) for suffix in (".ready", ".child_ready")
        ):
            time.sleep(0.05)
        launch._ACTIVE["target"] = process
        launch.stop_active_runs(timeout=30)
        assert process.returncode == 75
        time.sleep(0.2)
        assert not os.path.exists(marker)
    finally:
        launch._ACTIVE.pop("target", None)
        launch._STOPPING.clear()
        try:
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass
        process.wait()


def test_report_mean_std_missing_cells_and_plots(tmp_path):
    path = fake_sweep(tmp_path)
    spec = load_sweep(path)
    runs = {run.name: run for run in expand_runs(spec)}
    for name, kwargs in [
        (
            "SOLVER.BASE_LR=0.1__seed=0",
            dict(aps=(5.0, 30.0), seen=(40.0, 10.0), boundary=(20.0, 25.0, 6.0)),
        ),
        (
            "SOLVER.BASE_LR=0.1__seed=1",
            dict(aps=(7.0, 34.0), seen=(44.0, 12.0), boundary=(24.0, 29.0, 8.0)),
        ),
        ("SOLVER.BASE_LR=0.2__seed=0", dict(aps=(1.0, 20.0))),  # evaluated before Boundary AP
        ("SOLVER.BASE_LR=0.2__seed=1", dict(final=False)),  # interrupted
    ]:
        fake_finished(runs[name].output_dir, run=runs[name], **kwargs)
    for name, log in [
        ("SOLVER.BASE_LR=0.1__seed=0", "Total training time: 0:00:08 (0:00:00 on hooks)\n"),
        ("SOLVER.BASE_LR=0.1__seed=1", "Total training time: 0:00:12 (0:00:00 on hooks)\n"),
    ]:
        with open(os.path.join(runs[name].output_dir, "log.txt"), "w") as f:
            f.write(log)
    bad = runs["bad__seed=0"]
    write_status(bad.output_dir, state=FAILED, returncode=1, fingerprint=run_fingerprint(bad))

    paths = write_report(spec, list(runs.values()))
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["run"] for r in rows] == list(runs)
    first = rows[0]
    assert first["state"] == DONE and first["SOLVER.BASE_LR"] == "0.1" and first["iteration"] == "4"
    assert float(first["segm/AP"]) == 30.0 and float(first["segm/seen/AP"]) == 40.0
    assert float(first["boundary/AP"]) == 20.0 and float(first["boundary/unseen/AP"]) == 6.0
    assert list(first).index("boundary/AP") == list(first).index("segm/AP") + 1  # beside it
    by_run = {r["run"]: r for r in rows}
    assert by_run["SOLVER.BASE_LR=0.2__seed=0"]["boundary/AP"] == ""  # before Boundary AP
    interrupted = by_run["SOLVER.BASE_LR=0.2__seed=1"]
    assert interrupted["state"] == INTERRUPTED and float(interrupted["segm/AP"]) == 10.0  # latest
    assert by_run["bad__seed=0"]["state"] == FAILED and by_run["bad__seed=0"]["segm/AP"] == ""

    table = open(paths["markdown"]).read()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    # Boundary AP beside every mask AP column, "n/a" for the runs evaluated before it.
    assert header == ["cell", "SOLVER.BASE_LR", "FAKE.FAIL", "runs done", "box AP", "mask AP",
                      "boundary AP", "mask AP50", "mask AP75", "seen AP", "seen boundary AP",
                      "unseen AP", "unseen boundary AP", "s / iter"]  # fmt: skip
    cells = {
        c.strip("| ").split("|")[0].strip(): [x.strip() for x in c.strip("|").split("|")]
        for c in lines[2:]
    }
    assert cells["SOLVER.BASE_LR=0.1"][3:9] == [
        "2/2",
        "33.0 ± 2.8",
        "32.0 ± 2.8",
        "22.0 ± 2.8",
        "37.0 ± 2.8",
        "27.0 ± 2.8",
    ]
    assert cells["SOLVER.BASE_LR=0.1"][9:] == [
        "42.0 ± 2.8",
        "27.0 ± 2.8",
        "11.0 ± 1.4",
        "7.0 ± 1.4",
        "2.500 ± 0.707",
    ]
    assert cells["SOLVER.BASE_LR=0.2"][3:7] == ["1/2 (1 interrupted)", "21.0", "20.0", "n/a"]
    assert cells["SOLVER.BASE_LR=0.2"][9:] == ["n/a"] * 5  # finished, not reported
    assert cells["bad"][3] == "0/2 (1 failed, 1 pending)" and cells["bad"][5:7] == ["—", "—"]
    assert "No finished run yet (—): bad" in table
    assert "n/a: not reported by the cell's finished runs" in table

    for name in ("ap_bars", "seen_unseen_mask_ap", "mask_ap_vs_iteration"):
        with Image.open(paths[name]) as image:
            assert image.size[0] > 300 and image.size[1] > 200

    # --report-dir publishes the report elsewhere (a project folder).
    assert sweep_tool.main([path, "--report", "--report-dir", str(tmp_path / "published")]) == 0
    published = sorted(os.listdir(tmp_path / "published"))
    assert published == sorted(os.path.basename(p) for p in paths.values())

    # The sweep's `table` picks the columns; a mask AP column brings its Boundary AP twin,
    # unless the table names Boundary AP columns itself.
    def table_header(table):
        spec = load_sweep(fake_sweep(tmp_path, extra=f"table: {table}"))
        table = open(write_report(spec, expand_runs(spec))["markdown"]).read()
        return [c.strip() for c in table.split("\n|", 1)[1].split("\n")[0].strip("|").split("|")]

    assert table_header("[segm/AP75, segm/unseen/AP]")[-5:] == [
        "runs done",
        "mask AP75",
        "unseen AP",
        "unseen boundary AP",
        "s / iter",
    ]
    assert table_header("[segm/AP, boundary/seen/AP]")[-4:] == [
        "runs done",
        "mask AP",
        "seen boundary AP",
        "s / iter",
    ]

    # Runs evaluated once (at the end) draw no curve, and without unseen AP (full supervision) no
    # seen-vs-unseen bars: those plots are not written, and the report's earlier ones are removed.
    for run in runs.values():
        metrics = os.path.join(run.output_dir, "metrics.json")
        if not os.path.exists(metrics):
            continue
        records = [json.loads(line) for line in open(metrics) if line.strip().endswith("}")]
        with open(metrics, "w") as f:
            for record in records:
                record.pop("segm/unseen/AP", None)
                if run.name == "SOLVER.BASE_LR=0.1__seed=1":  # as if evaluated before it
                    for key in [k for k in record if k.startswith("boundary/")]:
                        del record[key]
            f.write("".join(json.dumps(r) + "\n" for r in records if r["iteration"] != 1))
    paths = write_report(spec, list(runs.values()))
    assert "ap_bars" in paths
    # One of the two finished seeds has Boundary AP: its value, and how many runs it is from.
    row = next(line for line in open(paths["markdown"]) if line.startswith("| SOLVER.BASE_LR=0.1"))
    assert [c.strip() for c in row.strip().strip("|").split("|")][5:7] == [
        "32.0 ± 2.8",
        "20.0 (n=1)",
    ]
    for name in ("mask_ap_vs_iteration", "seen_unseen_mask_ap"):
        assert name not in paths
        assert not os.path.exists(os.path.join(spec.output_root, f"{name}.png"))


# ------------------------------------------------------------------- end to end (detectron2)


def check_real_report(output_root, good_runs):
    paths = dict(
        csv=os.path.join(output_root, "results.csv"),
        md=os.path.join(output_root, "results.md"),
        png=os.path.join(output_root, "mask_ap_vs_iteration.png"),
    )
    rows = {row["run"]: row for row in csv.DictReader(open(paths["csv"]))}
    for name in good_runs:
        row = rows[name]
        assert row["state"] == DONE and row["iteration"] == "4", row
        assert row["segm/AP"] != "" and row["segm/unseen/AP"] != "" and row["bbox/AP"] != ""
        if importlib.util.find_spec("faster_coco_eval"):  # the evaluator's Boundary AP
            assert row["boundary/AP"] != "" and row["boundary/unseen/AP"] != ""
        assert float(row["train_time_s"]) >= 0
    assert "mask AP" in open(paths["md"]).read()
    with Image.open(paths["png"]) as image:
        assert image.size[0] > 300
    # The curve comes from the periodic evaluation (iteration 1) and the final one (4).
    metrics = [
        json.loads(line) for line in open(os.path.join(output_root, good_runs[0], "metrics.json"))
    ]
    assert [r["iteration"] for r in metrics if "segm/AP" in r] == [1, 4]


@pytest.mark.detectron2
@pytest.mark.slow
def test_tiny_sweep_end_to_end_local(tmp_path, capsys):
    root = str(tmp_path / "local")
    assert sweep_tool.main([TINY_SWEEP, "--output-root", root]) == 1  # the broken cell fails
    out = capsys.readouterr().out
    good = [
        "ROI_HEADS.BATCH_SIZE_PER_IMAGE=32__seed=0",
        "ROI_HEADS.BATCH_SIZE_PER_IMAGE=64__seed=0",
    ]
    for name in good:
        assert run_state(os.path.join(root, name)) == DONE
    status = json.load(open(os.path.join(root, "broken__seed=0", STATUS_FILE)))
    assert status["state"] == FAILED and status["returncode"] != 0
    assert "NO_SUCH_OPTIMIZER" in status["log_tail"][-1]
    assert "done 2, running 0, failed 1, pending 0 of 3" in out
    check_real_report(root, good)
    assert "0/1 (1 failed)" in open(os.path.join(root, "results.md")).read()


LAZY_SHAPES = os.path.join(REPO, "configs", "lazy", "shapes", "mask_rcnn_R_18_FPN.py")


@pytest.mark.detectron2
@pytest.mark.slow
def test_a_lazy_config_sweep_runs_finishes_and_goes_stale_on_a_changed_option(tmp_path, capsys):
    """A LazyConfig cell: key=value overrides (train.output_dir, train.seed first), done once its
    final evaluation is logged, its fingerprint the merged LazyConfig's."""
    text = f"""
        name: lazy
        base_config: {LAZY_SHAPES}
        output_root: {tmp_path / "out"}
        axes: {{model.roi_heads.batch_size_per_image: [32]}}
        opts:
          train.max_iter: 2
          train.device: cpu
          train.precise_bn.enabled: False
          dataloader.train.dataset.names: shapes_tiny_train
          dataloader.test.dataset.names: shapes_tiny_val
          dataloader.train.mapper.augmentations.0.short_edge_length: [128]
          dataloader.train.mapper.augmentations.0.max_size: 128
          dataloader.test.mapper.augmentations.0.short_edge_length: 128
          dataloader.test.mapper.augmentations.0.max_size: 128
          dataloader.train.total_batch_size: 2
          dataloader.train.num_workers: 0
          dataloader.test.num_workers: 0
          model.roi_heads.box_predictor.test_topk_per_image: 5
    """
    path = write_sweep(tmp_path, text)
    spec = load_sweep(path)
    (run,) = expand_runs(spec)
    command = train_command(spec, run)
    assert f"train.output_dir='{run.output_dir}'" in command and "train.seed=0" in command
    assert "model.roi_heads.batch_size_per_image=32" in command and "OUTPUT_DIR" not in command

    assert sweep_tool.main([path, "--no-report"]) == 0, capsys.readouterr().out[-3000:]
    assert run_state(run.output_dir, fingerprint=run_fingerprint(run)) == DONE
    assert any("segm/AP" in record for record in read_metrics(run.output_dir))
    capsys.readouterr()

    changed = write_sweep(tmp_path, text.replace("train.max_iter: 2", "train.max_iter: 3"))
    (changed_run,) = expand_runs(load_sweep(changed))
    assert run_fingerprint(changed_run)["config"] != run_fingerprint(run)["config"]
    sweep_tool.main([changed, "--dry-run"])
    assert "config changed" in capsys.readouterr().out


@pytest.mark.detectron2
@pytest.mark.slow
def test_tiny_sweep_end_to_end_submitit_local(tmp_path, capsys):
    pytest.importorskip("submitit")
    root = str(tmp_path / "submitit")
    argv = [
        TINY_SWEEP,
        "--output-root",
        root,
        "--launcher",
        "submitit-local",
        "--filter",
        "BATCH_SIZE",
    ]
    assert sweep_tool.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("as job") == 2 and "done 2, running 0, failed 0, pending 0 of 2" in out
    good = [
        "ROI_HEADS.BATCH_SIZE_PER_IMAGE=32__seed=0",
        "ROI_HEADS.BATCH_SIZE_PER_IMAGE=64__seed=0",
    ]
    for name in good:
        status = json.load(open(os.path.join(root, name, STATUS_FILE)))
        assert status["state"] == DONE and status["returncode"] == 0
        assert status["pid"] != os.getpid()  # ran inside a submitit job
    assert os.path.isdir(os.path.join(root, "submitit"))
    check_real_report(root, good)
    # Finished: a rerun launches nothing.
    assert sweep_tool.main(argv + ["--no-report"]) == 0
    assert "launching 0" in capsys.readouterr().out


# ------------------------------------------------------------------- Slurm bookkeeping


def test_queued_slurm_jobs_are_not_submitted_twice(tmp_path, monkeypatch):
    queued, gone, started = (str(tmp_path / n) for n in ("queued", "gone", "started"))
    for folder, job in ((queued, "77_1"), (gone, "77_2")):
        state.mark_queued(folder, job)
    submitted = time.time()
    write_status(started, state=RUNNING, started=submitted + 1, heartbeat=submitted + 1, attempt=1)
    state.mark_queued(started, "77_3", submitted)  # the job already runs: its status stays
    slurm = {"77_1": "PENDING", "77_2": "CANCELLED", "77_3": "RUNNING"}
    monkeypatch.setattr(state, "slurm_job_state", lambda job_id, folder: slurm[job_id])
    assert run_state(queued) == QUEUED
    assert run_state(gone) == PENDING  # left the queue without starting: launch it again
    assert run_state(started) == RUNNING
    assert json.load(open(os.path.join(started, STATUS_FILE)))["attempt"] == 1


@pytest.mark.parametrize(
    "returncode, finished, expected",
    [
        (0, True, DONE),
        (75, False, INTERRUPTED),
        (-15, False, INTERRUPTED),
        (1, False, FAILED),
        (0, False, FAILED),
    ],
)
def test_an_attempt_is_recorded_by_how_it_ended(tmp_path, returncode, finished, expected):
    """train_net.py's graceful-stop status (75) and a death by a signal are resumable, not
    failures; a clean exit without the final evaluation is a failure."""
    output = str(tmp_path / "r")
    task = launch.RunTask("r", output, "python", "t.py", [], ["OUTPUT_DIR", output])
    status = state.start_status(task, resume=False)
    if finished:
        fake_finished(output)
    state.finish_status(task, status, returncode)
    assert state.read_status(output)["state"] == expected


def test_a_job_dying_outside_the_run_is_recorded_as_failed(tmp_path):
    class DeadJob:
        def result(self):
            raise RuntimeError("job 12 was killed: out of memory\nslurmstepd: error")

    task = launch.RunTask("r", str(tmp_path / "r"), "python", "t.py", [], ["OUTPUT_DIR", "x"])
    state.mark_queued(task.output_dir, "12")
    sweep_tool._collect(task, DeadJob())
    status = json.load(open(os.path.join(task.output_dir, STATUS_FILE)))
    assert status["state"] == FAILED and "out of memory" in status["error"]
    assert status["log_tail"][-1] == "slurmstepd: error"
    assert run_state(task.output_dir) == FAILED


@pytest.mark.parametrize("snapshot", [False, True])
def test_slurm_launcher_path_through_a_local_executor(tmp_path, monkeypatch, capsys, snapshot):
    """The slurm launcher's code (job array batch, queued marks, polling, code snapshot) with
    submitit's LocalExecutor standing in for Slurm."""
    submitit = pytest.importorskip("submitit")
    if snapshot and shutil.which("rsync") is None:
        pytest.skip("RsyncSnapshot needs rsync")
    created = {}

    class LocalAutoExecutor:
        def __init__(self, folder, cluster=None):
            assert cluster == "slurm"
            self.executor = submitit.LocalExecutor(folder=folder)

        def update_parameters(self, **params):
            created["params"] = params
            self.executor.update_parameters(timeout_min=params["timeout_min"])

        def batch(self):
            created["batch"] = True
            return self.executor.batch()

        def submit(self, *args, **kwargs):
            return self.executor.submit(*args, **kwargs)

    monkeypatch.setattr(submitit, "AutoExecutor", LocalAutoExecutor)
    monkeypatch.setattr(state, "slurm_job_state", lambda job_id, folder: "COMPLETED")
    path = fake_sweep(
        tmp_path,
        launcher="slurm",
        parallel=3,
        extra=f"slurm: {{array_parallelism: 3, snapshot: {str(snapshot).lower()}}}",
    )
    assert sweep_tool.main([path, "--no-report", "--filter", "LR=0.1"]) == 0
    out = capsys.readouterr().out
    assert out.count("as job") == 2 and "done 2, running 0, failed 0, pending 0 of 2" in out
    assert created["batch"] and created["params"]["slurm_array_parallelism"] == 3
    spec = load_sweep(path)
    for run in [r for r in expand_runs(spec) if "LR=0.1" in r.name]:
        status = json.load(open(os.path.join(run.output_dir, STATUS_FILE)))
        assert status["state"] == DONE and status["job_id"] and status["pid"] != os.getpid()
        assert status["fingerprint"] == run_fingerprint(run)
        # Trained in the job's own process (the fake script's main), not in a child of it.
        call = calls(run.output_dir)[0]
        assert call["argv"][0] == "OUTPUT_DIR"
        # With the snapshot, the job ran masklab_d2 from the copy taken at submission.
        code_root = os.path.join(spec.output_root, "code")
        assert call["code"].startswith(code_root) == snapshot, call["code"]


# ------------------------------------------------------------- sweeps that never lie


def test_a_changed_option_makes_finished_runs_stale_until_rerun(tmp_path, capsys):
    path = fake_sweep(tmp_path, parallel=1)
    only = ["--filter", r"LR=0\.1__seed=0", "--no-report"]
    assert sweep_tool.main([path] + only) == 0
    run = next(r for r in expand_runs(load_sweep(path)) if r.name == "SOLVER.BASE_LR=0.1__seed=0")
    assert run_state(run.output_dir, fingerprint=run_fingerprint(run)) == DONE
    # The same sweep with another common option (e.g. a longer schedule): the old result is
    # not the new cell's, whatever its folder name.
    path = fake_sweep(tmp_path, parallel=1, extra="opts: {SOLVER.MAX_ITER: 4500}")
    capsys.readouterr()
    assert sweep_tool.main([path] + only) == 0
    out = capsys.readouterr().out
    assert f"{run.name}: stale (config changed" in out and "launching 0" in out
    assert len(calls(run.output_dir)) == 1
    # Rerun on request, from scratch; the old folder is kept aside.
    assert sweep_tool.main([path, "--rerun-stale"] + only) == 0
    assert len(calls(run.output_dir)) == 1 and "--resume" not in calls(run.output_dir)[0]["argv"]
    (aside,) = [p for p in os.listdir(tmp_path / "out") if ".stale-" in p]
    assert aside.startswith(run.name) and len(calls(tmp_path / "out" / aside)) == 1
    assert run_state(run.output_dir, fingerprint=run_fingerprint(load_run(path, run.name))) == DONE


def load_run(path, name):
    return next(r for r in expand_runs(load_sweep(path)) if r.name == name)


def test_a_retrained_starting_checkpoint_makes_finished_runs_stale(tmp_path, capsys):
    # Head-only suites start every run from one detector file: a detector retrained at the same
    # path (another machine, another seed) must not let old heads pass as heads on the new one.
    detector = tmp_path / "detector" / "model_final.pth"
    detector.parent.mkdir()
    detector.write_bytes(b"detector v1")
    path = fake_sweep(tmp_path, parallel=1, extra=f"opts: {{MODEL.WEIGHTS: {detector}}}")
    only = ["--filter", r"LR=0\.1__seed=0", "--no-report"]
    assert sweep_tool.main([path] + only) == 0
    run = load_run(path, "SOLVER.BASE_LR=0.1__seed=0")
    assert run_state(run.output_dir, fingerprint=run_fingerprint(run)) == DONE

    detector.write_bytes(b"detector v2")  # retrained in place
    capsys.readouterr()
    assert sweep_tool.main([path] + only) == 0
    out = capsys.readouterr().out
    assert f"{run.name}: stale (initial weights changed" in out and "launching 0" in out
    assert len(calls(run.output_dir)) == 1

    # Contents decide, not the file's time: the same bytes written again are the same start.
    detector.write_bytes(b"detector v1")
    os.utime(detector, ns=(1, 1))
    assert run_state(run.output_dir, fingerprint=run_fingerprint(run)) == DONE
    # A status recorded before weights digests is judged by its config and code alone.
    recorded = dict(run_fingerprint(run))
    del recorded["weights"]
    write_status(run.output_dir, state=DONE, fingerprint=recorded)
    detector.write_bytes(b"detector v3")
    assert run_state(run.output_dir, fingerprint=run_fingerprint(run)) == DONE


def test_changed_training_code_makes_runs_stale_and_a_mere_commit_does_not(tmp_path):
    path = fake_sweep(tmp_path)
    run = load_run(path, "SOLVER.BASE_LR=0.1__seed=0")
    fake_finished(run.output_dir, run=run)
    fingerprint = run_fingerprint(run)
    assert run_state(run.output_dir, fingerprint=fingerprint) == DONE
    assert run_state(run.output_dir, fingerprint=dict(fingerprint, commit="0" * 40)) == DONE
    moved = dict(fingerprint, code="0" * 16)
    assert run_state(run.output_dir, fingerprint=moved) == STALE
    assert "code changed" in state.stale_reason(run.output_dir, moved)
    # A status recorded before code digests is compared by its commit.
    old = {"config": fingerprint["config"], "commit": fingerprint["commit"]}
    write_status(run.output_dir, state=DONE, fingerprint=old)
    assert run_state(run.output_dir, fingerprint=fingerprint) == DONE
    assert run_state(run.output_dir, fingerprint=dict(fingerprint, commit="0" * 40)) == STALE
    fake_finished(load_run(path, "SOLVER.BASE_LR=0.2__seed=0").output_dir)  # no fingerprint
    other = load_run(path, "SOLVER.BASE_LR=0.2__seed=0")
    assert run_state(other.output_dir, fingerprint=run_fingerprint(other)) == STALE


def test_the_code_digest_follows_the_training_code_only(tmp_path):
    """A sweep spans sittings with commits between them: docs, tests and the tools that drive
    runs must not make finished runs stale; the code a run executes (committed or not) must."""

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    def write(path, text):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)

    def digest():
        training_code_digest.cache_clear()
        return training_code_digest(str(tmp_path))

    git("init", "-q")
    git("config", "user.email", "t@t")
    git("config", "user.name", "t")
    for path in ("masklab_d2/modeling/head.py", "masklab_d2/tools/sweep.py", "csrc/op.cpp"):
        write(path, "v1\n")
    write("README.md", "v1\n")
    write("train_net.py", "v1\n")
    git("add", ".")
    git("commit", "-qm", "v1")
    first = digest()
    for path in ("README.md", "masklab_d2/tools/sweep.py", "tests/test_x.py"):
        write(path, "v2\n")
        git("add", ".")
        git("commit", "-qm", path)
        assert digest() == first, path
    for path in ("masklab_d2/modeling/head.py", "csrc/op.cpp", "train_net.py"):
        write(path, "changed\n")  # uncommitted: counts
        changed = digest()
        assert changed != first, path
        git("commit", "-qam", path)
        assert digest() == changed, path  # committing the same change: the same code
        first = changed
    training_code_digest.cache_clear()


def test_runs_evaluated_on_several_test_sets_finish_and_report_the_first(tmp_path):
    path = fake_sweep(tmp_path)
    run = load_run(path, "SOLVER.BASE_LR=0.1__seed=0")
    os.makedirs(run.output_dir)
    with open(os.path.join(run.output_dir, "config.yaml"), "w") as f:
        f.write("SOLVER:\n  MAX_ITER: 4\nDATASETS:\n  TEST: [b_val, a_val]\n")
    with open(os.path.join(run.output_dir, "metrics.json"), "w") as f:
        for it in (1, 4):
            record = {"iteration": it, "a_val/segm/AP": 10.0 * it, "b_val/segm/AP": 1.0 * it}
            record.update({"a_val/bbox/AP": 11.0 * it, "b_val/bbox/AP": 2.0 * it})
            f.write(json.dumps(record) + "\n")
    open(os.path.join(run.output_dir, "model_final.pth"), "w").close()
    write_status(run.output_dir, state=DONE, fingerprint=run_fingerprint(run))
    assert run_state(run.output_dir) == DONE
    paths = write_report(load_sweep(path), [run])
    (row,) = csv.DictReader(open(paths["csv"]))
    assert row["state"] == DONE and float(row["segm/AP"]) == 4.0 and float(row["bbox/AP"]) == 8.0


def test_a_resumed_run_counts_each_iteration_once_and_all_its_training_time(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    first = [{"iteration": 0, "total_loss": 2.0}, {"iteration": 10, "total_loss": 1.0}]
    first += [{"iteration": 19, "total_loss": 0.9}, {"iteration": 19, "segm/AP": 5.0}]
    first += [{"iteration": 29, "segm/AP": 6.0}, {"iteration": 39, "total_loss": 0.5}]
    # Stopped after iteration 39, last saved at 19 (say): the resumed segment logs 20.. again.
    second = [
        {"iteration": 29, "total_loss": 0.7, "segm/AP": 6.5},
        {"iteration": 40, "segm/AP": 8.0},
    ]
    with open(run_dir / "metrics.json", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in first + second))
    records = read_metrics(str(run_dir))
    assert [r["iteration"] for r in records] == [0, 10, 19, 29, 40]
    assert records[2] == {"iteration": 19, "total_loss": 0.9, "segm/AP": 5.0}  # one iteration
    assert records[3] == {"iteration": 29, "total_loss": 0.7, "segm/AP": 6.5}  # the resumed one
    assert records[1] == {"iteration": 10, "total_loss": 1.0}
    (run_dir / "log.txt").write_text(
        "[hooks]: Total training time: 0:01:05 (0:00:01 on hooks)\n"
        "[hooks]: Total training time: 1 day, 0:00:10 (0:00:01 on hooks)\n"
    )
    assert training_time_s(str(run_dir)) == 65 + 86400 + 10


def test_multi_gpu_runs_get_a_free_port_each(tmp_path):
    path = write_sweep(tmp_path, f"base_config: {MASK_RCNN}\nnum_gpus: 2\n")
    spec = load_sweep(path)
    command = train_command(spec, expand_runs(spec)[0])
    assert command[command.index("--num-gpus") + 1] == "2"
    assert command[command.index("--dist-url") + 1] == "auto"


def test_local_runs_never_share_a_gpu(monkeypatch, caplog):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    launcher = launch.LocalLauncher(parallel=2, num_gpus=1)
    slots = [launcher.slots.get() for _ in range(launcher.parallel)]
    launcher.close()
    assert launcher.parallel == 1 and slots == [{"CUDA_VISIBLE_DEVICES": "0"}]
    assert "running 1 at a time" in caplog.text
    assert launch.gpu_slots(2, 2, ["0", "1", "2", "3", "4"]) == [
        {"CUDA_VISIBLE_DEVICES": "0,1"},
        {"CUDA_VISIBLE_DEVICES": "2,3"},
    ]
    with pytest.raises(SweepError, match="need 2 GPUs each"):
        launch.gpu_slots(1, 2, ["0"])
    assert launch.gpu_slots(2, 0, ["0"])[0]["CUDA_VISIBLE_DEVICES"] == ""  # CPU runs


def test_a_failing_slurm_query_leaves_queued_runs_alone(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    queued = str(tmp_path / "queued")
    state.mark_queued(queued, "4242_3", folder=str(tmp_path / "submitit"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))  # sacct / squeue fail
    assert run_state(queued) == QUEUED
    launch_now, _ = plan([expand_runs_at(tmp_path, queued)], retry_failed=True)
    assert launch_now == []
    assert run_state(queued, check_queue=False) == PENDING  # --forget-queued


def expand_runs_at(tmp_path, output_dir):
    spec = load_sweep(write_sweep(tmp_path, f"base_config: {MASK_RCNN}\n", name="q.yaml"))
    return Run(expand_runs(spec)[0].cell, 0, output_dir)


@pytest.mark.detectron2
@pytest.mark.slow
def test_submitit_job_requeued_after_a_timeout_signal_resumes_from_its_checkpoint(tmp_path):
    """A cell through submitit's LocalExecutor, training in the job's process; at iteration 1 it
    gets submitit's timeout signal (USR2, sent by the run itself so that the test does not
    depend on timing): it saves, submitit requeues the job, the new job resumes."""
    pytest.importorskip("submitit")
    root = tmp_path / "requeue"
    text = open(TINY_SWEEP).read().split("axes:")[0]  # name and base config
    text += textwrap.dedent(f"""
        output_root: {root}
        train_script: {os.path.join(REPO, "tests", "end_to_end", "stop_probe.py")}
        env: {{MASKLAB_STOP_PROBE: "usr2@1"}}
        launcher: submitit-local
        parallel: 1
        opts:
        """)
    opts = open(TINY_SWEEP).read().split("opts:\n")[1].split("launcher:")[0]
    text += opts.replace("SOLVER.MAX_ITER: 4", "SOLVER.MAX_ITER: 5")
    path = write_sweep(tmp_path, text, name="requeue.yaml")
    assert sweep_tool.main([path, "--no-report"]) == 0
    (run,) = expand_runs(load_sweep(path))
    status = json.load(open(os.path.join(run.output_dir, STATUS_FILE)))
    assert status["state"] == DONE and status["attempt"] == 2 and status["resumed"], status
    log = open(os.path.join(run.output_dir, "log.txt")).read()
    assert "SIGUSR2 received: stopping after iteration 1" in log
    assert "Starting training from iteration 2" in log
    job_logs = "".join(open(p).read() for p in glob.glob(str(root / "submitit" / "*" / "*_log.*")))
    assert "Requeued job" in job_logs
