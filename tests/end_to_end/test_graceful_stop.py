"""Graceful stops (masklab_d2.engine.graceful_stop) through train_net.py and a 2-process run.

Every signal is sent from inside the run at a known iteration (tests/end_to_end/stop_probe.py,
tests/end_to_end/stop_probe_ddp.py), so nothing here depends on timing. A stopped run exits with status 75
and leaves a checkpoint of the iteration it stopped after; an error leaves last_checkpoint alone.
"""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.detectron2

from helpers import run_python  # noqa: E402
from test_train_net import CONFIG, REPO, TINY  # noqa: E402

EXIT_INTERRUPTED = 75  # the status itself is the contract with the sweep, so it is spelled out


def _probe(tmp_path, kind, iteration, *opts, name="run"):
    """train_net.py (through tests/stop_probe.py) with a probe of ``kind`` at ``iteration``, in a
    session (and process group) of its own."""
    output = tmp_path / name
    output.mkdir()
    command = [
        sys.executable,
        os.path.join(REPO, "tests", "end_to_end", "stop_probe.py"),
        "--config-file",
    ]
    command += [CONFIG] + TINY + ["SOLVER.CHECKPOINT_PERIOD", "1000", "TEST.EVAL_PERIOD", "0"]
    command += ["SOLVER.MAX_ITER", "30"] + list(opts) + ["OUTPUT_DIR", str(output)]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASKLAB_STOP_PROBE=f"{kind}@{iteration}",
        MASKLAB_STOP_PROBE_DIR=str(output),
    )
    result = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        env=env,
        cwd=REPO,
        start_new_session=True,
    )
    probe = output / "probe.txt"
    return output, result, probe.read_text() if probe.exists() else ""


def _checkpoint(output):
    import torch

    name = (output / "last_checkpoint").read_text().strip()
    return name, torch.load(output / name, map_location="cpu", weights_only=False)


def _assert_stopped_after(output, result, iteration):
    assert result.returncode == EXIT_INTERRUPTED, result.stdout[-3000:]
    name, checkpoint = _checkpoint(output)
    assert name == f"model_{iteration:07d}.pth"
    # Exactly resumable: the iteration, and an LR schedule that has stepped past it.
    assert checkpoint["iteration"] == iteration
    assert checkpoint["trainer"]["iteration"] == iteration
    assert checkpoint["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == iteration + 1
    assert "optimizer" in checkpoint["trainer"]["_trainer"] and "model" in checkpoint
    assert result.stdout.count(f"stopping after iteration {iteration}") == 1


def test_signal_during_an_import_completes_it_then_stops_and_resumes(tmp_path):
    output, result, probe = _probe(tmp_path, "import", 2)
    assert probe == "fired\nimported\n", result.stdout[-3000:]
    _assert_stopped_after(output, result, 2)

    opts = ["SOLVER.MAX_ITER", "5", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(output)]
    resumed = run_python(
        os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, "--resume", *TINY, *opts
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "Starting training from iteration 3" in resumed.stdout
    assert (output / "model_final.pth").exists()


def test_signal_during_evaluation_lets_it_finish_then_stops(tmp_path):
    output, result, probe = _probe(tmp_path, "eval", 2, "TEST.EVAL_PERIOD", "3")
    assert probe == "signalled during evaluation\nfired\n", result.stdout[-3000:]
    _assert_stopped_after(output, result, 2)
    from test_train_net import _metrics

    evaluations = [m for m in _metrics(output) if "segm/AP" in m]
    assert [m["iteration"] for m in evaluations] == [2]


def test_repeated_signals_during_the_save_are_ignored(tmp_path):
    output, result, probe = _probe(tmp_path, "double", 2)
    assert probe == "fired\nsignalled during save\n", result.stdout[-3000:]
    _assert_stopped_after(output, result, 2)


@pytest.mark.parametrize("kind", ["usr1", "usr2"])
def test_sigusr_stops_gracefully(tmp_path, kind):
    output, result, _ = _probe(tmp_path, kind, 1)
    assert f"SIG{kind.upper()} received" in result.stdout
    _assert_stopped_after(output, result, 1)


@pytest.mark.parametrize("kind", ["group", "group-eval"])
def test_sigterm_to_the_whole_process_group_spares_the_dataloader_workers(tmp_path, kind):
    # Slurm's scancel and `kill -TERM -<pgid>` signal every process of the run: a DataLoader worker
    # that died of it would crash the run (torch raises in the main process) before its stop.
    opts = ["DATALOADER.NUM_WORKERS", "1"]
    if kind == "group-eval":
        opts += ["TEST.EVAL_PERIOD", "3"]  # at iteration 2, whose test loader has a worker too
    output, result, probe = _probe(tmp_path, kind, 2, *opts)
    assert probe.startswith("fired") or "signalled during evaluation" in probe, result.stdout[
        -3000:
    ]
    _assert_stopped_after(output, result, 2)
    assert "DataLoader worker" not in result.stdout


def test_an_error_saves_nothing_and_keeps_last_checkpoint(tmp_path):
    output, result, _ = _probe(tmp_path, "nan", 4, "SOLVER.CHECKPOINT_PERIOD", "3")
    assert result.returncode not in (0, EXIT_INTERRUPTED), result.stdout[-3000:]
    assert "FloatingPointError" in result.stdout
    assert (output / "last_checkpoint").read_text().strip() == "model_0000002.pth"
    assert sorted(p.name for p in output.glob("model_*.pth")) == ["model_0000002.pth"]


def test_two_ranks_stop_together_on_a_signal_to_the_parent_and_resume_exactly(tmp_path):
    import torch

    script = os.path.join(REPO, "tests", "end_to_end", "stop_probe_ddp.py")

    def run(output, *args):
        return run_python(script, str(output), "12", *args)

    stopped = run(tmp_path / "stopped", "4")
    assert stopped.returncode == EXIT_INTERRUPTED, stopped.stdout[-3000:]
    # Both ranks ended after iteration 4, and the one checkpoint is of that iteration.
    assert [(tmp_path / "stopped" / f"rank{r}.txt").read_text() for r in (0, 1)] == ["4", "4"]
    assert (tmp_path / "stopped" / "last_checkpoint").read_text() == "model_0000004.pth"
    assert sorted(p.name for p in (tmp_path / "stopped").glob("*.pth")) == ["model_0000004.pth"]

    resumed = run(tmp_path / "stopped", "-1", "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    uninterrupted = run(tmp_path / "uninterrupted", "-1")
    assert uninterrupted.returncode == 0, uninterrupted.stdout[-3000:]
    a = torch.load(tmp_path / "stopped" / "model_final.pth", weights_only=False)
    b = torch.load(tmp_path / "uninterrupted" / "model_final.pth", weights_only=False)
    assert a["iteration"] == b["iteration"] == 11
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


_TEARDOWN_PROBE = """
import gc, signal, sys, weakref
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from masklab_d2.engine.graceful_stop import StopTraining, _stoppable_main

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
alive = []

def main():
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    model.cycle = model  # as a trainer and its hooks: freed only by a garbage collection
    model(torch.randn(2, 4)).sum().backward()
    alive.append(weakref.ref(model))
    if sys.argv[2] == "stopped":
        raise StopTraining(0, signal.SIGTERM)
    return "finished"

gc.disable()  # the exit's collection, not a lucky one on the way, must be the first
try:
    ended = _stoppable_main(main)
except SystemExit as exiting:
    ended = exiting.code
print(ended, dist.is_initialized(), alive[0]() is None)
"""


@pytest.mark.parametrize("ending, printed", [("finished", "finished"), ("stopped", "75")])
def test_a_rank_tears_its_process_group_down_before_it_exits(tmp_path, ending, printed):
    # Left to the interpreter's exit, gloo's group (held by DDP's reducer, which the trainer's
    # reference cycles keep alive) aborted a rank with SIGABRT in about one run in seven of the
    # two-rank test above, after training had finished.
    result = run_python("-c", _TEARDOWN_PROBE, str(tmp_path / "rendezvous"), ending, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    # The group is gone and the DDP model that held it was freed, before the interpreter's exit.
    assert result.stdout.strip().splitlines()[-1] == f"{printed} False True", result.stdout[-3000:]


class _WorkerSignalState:
    """A map-style dataset whose items are the worker's blocked signals and its threads, as seen
    there."""

    def __len__(self):
        return 2

    def __getitem__(self, index):
        import signal
        import threading

        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        threads = [t.name for t in threading.enumerate()]
        return {"image": index, "blocked": blocked, "threads": threads}


@pytest.mark.parametrize("grouped", [False, True])
def test_spare_loader_workers_makes_detectron2_loader_workers_ignore_stop_signals(grouped):
    from detectron2.data.build import build_batch_data_loader, worker_init_reset_seed
    from detectron2.data.samplers import InferenceSampler

    from masklab_d2.engine import STOP_SIGNALS, spare_loader_workers

    dataset = _WorkerSignalState()
    loader = build_batch_data_loader(
        dataset, InferenceSampler(len(dataset)), 2, aspect_ratio_grouping=grouped, num_workers=1
    )
    assert spare_loader_workers(loader) is loader
    torch_loader = loader.dataset if grouped else loader  # AspectRatioGroupedDataset wraps it
    init = torch_loader.worker_init_fn
    assert init.args == (worker_init_reset_seed,)  # detectron2's own seeding still runs
    spare_loader_workers(loader)
    assert torch_loader.worker_init_fn is init  # once: a second call adds no second wrapper
    if not grouped:  # the aspect-ratio grouping needs image sizes: iterate the plain loader only
        batch = next(iter(loader))
        # Blocked in the worker, and taken by its signal thread (only its parent's SIGTERM
        # ends it; tests/end_to_end/test_runs_end.py sends them).
        assert all(set(STOP_SIGNALS) <= item["blocked"] for item in batch), batch
        assert all("stop-signals" in item["threads"] for item in batch), batch

    no_workers = build_batch_data_loader(dataset, InferenceSampler(2), 2, num_workers=0)
    assert spare_loader_workers(no_workers).worker_init_fn is worker_init_reset_seed
