"""Slurm (and local submitit) jobs: the ``slurm:`` settings as submitit parameters (docs/sweeps.md),
the job that trains one run in its own process(es), and the launcher that submits them."""

import contextlib
import dataclasses
import glob
import logging
import math
import os
import re
import runpy
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from masklab_d2.tools.sweeps.commands import RunTask
from masklab_d2.tools.sweeps.launch import thread_env
from masklab_d2.tools.sweeps.spec import REPO_ROOT, SweepError, SweepSpec
from masklab_d2.tools.sweeps.state import (
    INTERRUPTED,
    Heartbeat,
    finish_status,
    has_checkpoint,
    mark_queued,
    start_status,
)
from masklab_d2.utils import stop_signals
from masklab_d2.utils.stop_signals import EXIT_INTERRUPTED

logger = logging.getLogger(__name__)

# Shorter names for submitit parameters; its other Slurm parameters (partition, account, ...) may
# drop their "slurm_" prefix, and its generic ones are taken as they are.
_FRIENDLY = {
    "time": "timeout_min",
    "gpus": "gpus_per_node",
    "cpus": "cpus_per_task",
    "mem": "mem_gb",
    "additional": "slurm_additional_parameters",
}
_GENERIC_SUBMITIT_KEYS = ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "name")


def slurm_parameters(spec: SweepSpec) -> Dict[str, Any]:
    """The sweep's ``slurm:`` settings as submitit AutoExecutor parameters, one task per GPU
    (submitit sets up each task's distributed environment)."""
    params: Dict[str, Any] = {
        "name": spec.name,
        "timeout_min": 720,
        "gpus_per_node": spec.num_gpus,
        "nodes": 1,
        "tasks_per_node": max(1, spec.num_gpus),
    }
    for key, value in spec.slurm.items():
        if key == "snapshot":  # the sweep's own setting (SubmititLauncher)
            continue
        if key in _FRIENDLY:
            target = _FRIENDLY[key]
        elif key in _GENERIC_SUBMITIT_KEYS or key.startswith("slurm_"):
            target = key
        elif submitit is not None and key in submitit.SlurmExecutor._valid_parameters():
            target = f"slurm_{key}"
        else:
            raise SweepError(
                f"{spec.path}: unknown slurm setting {key!r}; use {sorted(_FRIENDLY)}, "
                f"{list(_GENERIC_SUBMITIT_KEYS)} or a submitit slurm_* parameter"
            )
        if target == "timeout_min":
            value = _minutes(value)
        elif target == "mem_gb" and isinstance(value, str):
            value = int(re.sub(r"[gG][bB]?$", "", value))
        params[target] = value
    if params["gpus_per_node"] != spec.num_gpus:
        raise SweepError(
            f"{spec.path}: slurm gpus ({params['gpus_per_node']}) must equal num_gpus "
            f"({spec.num_gpus}): each run gets one task per GPU"
        )
    return params


def _minutes(value: Any) -> int:
    """Slurm time: minutes, "HH:MM:SS", "MM:SS" or "D-HH:MM:SS" -> minutes."""
    if isinstance(value, (int, float)):
        return int(math.ceil(value))
    days, _, clock = str(value).rpartition("-")
    *_, hours, minutes, seconds = [0, 0] + [int(x) for x in clock.split(":")]
    return int((int(days or 0) * 24 + hours) * 60 + minutes + math.ceil(seconds / 60))


def _init_distributed(local_world_size: int) -> None:
    """The process group of a multi-task job, from the environment submitit exported, set up as
    detectron2's launch sets up its ranks."""
    import torch
    import torch.distributed as dist
    from detectron2.utils import comm

    has_gpu = torch.cuda.is_available()
    dist.init_process_group(backend="NCCL" if has_gpu else "GLOO", init_method="env://")
    comm.create_local_process_group(local_world_size)
    if has_gpu:
        torch.cuda.set_device(comm.get_local_rank())
    comm.synchronize()


def run_in_job(task: RunTask) -> Dict[str, Any]:
    """Runs the training of ``task`` in this (submitit job) process and records the outcome; a
    graceful stop ends it with a checkpoint, then submitit's own handler of the signal takes over
    (for preemption / timeout: ``checkpoint()``, requeue, exit) and the requeued job resumes."""
    job = submitit.JobEnvironment()
    # MASTER_ADDR, MASTER_PORT (from the job id), RANK, WORLD_SIZE for env:// (one task per GPU).
    distributed = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    os.environ.update(task.env)
    main_task = job.global_rank == 0
    resume = has_checkpoint(task.output_dir)
    status = start_status(task, resume, str(job.job_id)) if main_task else {}
    # train_net.py (or a script with its main(args) and build_argument_parser()), not as __main__.
    script = runpy.run_path(task.train_script, run_name="masklab_sweep_train_script")
    args = script["build_argument_parser"]().parse_args(task.args(resume))
    # Records stop signals; submitit's handlers stay as the previous ones, called below.
    stop_signals.install_signal_handlers()
    returncode = 0
    heartbeat = Heartbeat(task.output_dir, status) if main_task else None
    try:
        if distributed.world_size > 1:
            _init_distributed(distributed.local_world_size)
        script["main"](args)
        if distributed.world_size > 1:
            from detectron2.utils import comm

            comm.synchronize()  # no task tears the group down while another still needs it
    except stop_signals.StopTraining as stop:
        returncode = EXIT_INTERRUPTED
        stop_signals.destroy_process_group()  # before submitit's handler may exit the task
        if main_task:
            heartbeat.stop()
            finish_status(task, status, returncode)
        # submitit's handler of that signal: for its preemption / timeout signal, checkpoint(),
        # requeue and exit; for SIGTERM a log line. (Python's SIGINT handler would only raise.)
        handler = stop_signals.previous_handler(stop.signum)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(stop.signum, None)
        return {"state": INTERRUPTED}
    except Exception:
        returncode = 1
        raise
    finally:
        if returncode == 0:
            # Left to the interpreter's exit, a gloo group aborts the process once in a few runs.
            stop_signals.destroy_process_group()
        if main_task and returncode != EXIT_INTERRUPTED:
            heartbeat.stop()
            finish_status(task, status, returncode)
    return status


try:
    import submitit

    class SubmititCell(submitit.helpers.Checkpointable):
        """A submitit job training one run in its own process(es); requeued on preemption or
        time limit, the requeued job resuming from the checkpoint of the graceful stop."""

        def __init__(self, task: RunTask):
            self.task = task

        def __call__(self) -> Dict[str, Any]:
            return run_in_job(self.task)

        def checkpoint(self, *args, **kwargs):
            # Called by submitit's handler once the graceful stop saved (see run_in_job).
            return submitit.helpers.DelayedSubmission(SubmititCell(self.task))

except ImportError:  # submitit is needed only by the slurm / submitit-local launchers
    submitit = None
    SubmititCell = None


class SubmititLauncher:
    """Submits runs as submitit jobs: a Slurm job array, or local jobs (``local=True``)."""

    def __init__(self, spec: SweepSpec, local: bool = False):
        if submitit is None:
            raise RuntimeError(
                "the slurm and submitit-local launchers need submitit: pip install submitit"
            )
        folder = os.path.join(spec.output_root, "submitit", "%j")
        params = slurm_parameters(spec)
        self.kind = "submitit-local" if local else "slurm"
        self.jobs: List[Any] = []
        self.snapshot: Optional[str] = None
        if local:
            self.executor = submitit.LocalExecutor(folder=folder)
            keys = ("timeout_min", "gpus_per_node", "tasks_per_node")
            self.executor.update_parameters(**{key: params[key] for key in keys})
            # Local jobs all start at once: throttle them here instead of through Slurm.
            self.max_in_flight = spec.parallel
            self.env = thread_env(spec.parallel)
        else:
            self.executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
            self.executor.update_parameters(**params)
            self.max_in_flight = None  # slurm_array_parallelism throttles the array
            self.env = {}
            snapshot = spec.slurm.get("snapshot")
            if snapshot is None:  # by default where it can be taken, else said
                snapshot = (REPO_ROOT / ".git").exists() and shutil.which("rsync") is not None
                if not snapshot:
                    logger.warning(
                        "No code snapshot (needs a git checkout and rsync): queued "
                        "jobs will run the checkout as it is when they start"
                    )
            elif snapshot and shutil.which("rsync") is None:
                raise SweepError("slurm: {snapshot: true} needs rsync (RsyncSnapshot)")
            if snapshot:
                self.snapshot = os.path.join(
                    spec.output_root, "code", time.strftime("%Y%m%d-%H%M%S")
                )

    def submit(self, tasks: List[RunTask]) -> List[Any]:
        tasks = [dataclasses.replace(t, env={**self.env, **t.env}) for t in tasks]
        submitted = time.time()
        snapshot = contextlib.nullcontext()
        if self.snapshot:
            # Queued jobs run the code as it is now, from a copy: the repository's tracked files
            # and the compiled extension (not tracked).
            extensions = [
                os.path.relpath(p, REPO_ROOT) for p in glob.glob(str(REPO_ROOT / "masklab_d2/*.so"))
            ]
            tasks = [_in_snapshot(t, self.snapshot) for t in tasks]
            snapshot = submitit.helpers.RsyncSnapshot(
                snapshot_dir=Path(self.snapshot), root_dir=REPO_ROOT, include=extensions
            )
        # A Slurm job array is submitted in one batch.
        batch = self.executor.batch() if self.kind == "slurm" else contextlib.nullcontext()
        with snapshot, batch:
            jobs = [self.executor.submit(SubmititCell(t)) for t in tasks]
        for task, job in zip(tasks, jobs):
            print(f"[sweep] submitted {task.name} as job {job.job_id}", flush=True)
            if self.kind == "slurm":
                mark_queued(task.output_dir, str(job.job_id), submitted, str(job.paths.folder))
        self.jobs += jobs
        return jobs

    def stop(self) -> None:
        # Slurm jobs outlive the sweep (rerun it to follow them); local ones would be orphans.
        if self.kind == "submitit-local":
            for job in self.jobs:
                if not job.done():
                    job.cancel(check=False)

    def close(self) -> None:
        pass


def _in_snapshot(task: RunTask, snapshot: str) -> RunTask:
    """The task with the training script of the code snapshot, where it lies in the repository."""
    script = Path(task.train_script).resolve()
    if REPO_ROOT not in script.parents:
        return task
    return dataclasses.replace(
        task, train_script=str(Path(snapshot) / script.relative_to(REPO_ROOT))
    )
