"""Executing runs: locally as subprocesses, or as submitit jobs (Slurm, or submitit's local twin).

Local runs are ``train_net.py`` subprocesses, each in its own session (a Ctrl-C reaches the sweep
only, which then sends each run's main process one SIGTERM) and on its own GPUs. Submitit jobs
run the training in the job's own process (:class:`SubmititCell`), so that submitit's mechanisms
apply to it directly: one task per GPU with its distributed environment, requeue on preemption
or time limit through ``checkpoint()``, job objects to follow (and re-attach to) the jobs, and on
Slurm a code snapshot (``RsyncSnapshot``) so queued jobs run the code they were submitted with.
"""

import concurrent.futures
import dataclasses
import datetime
import logging
import os
import queue
import shlex
import signal
import subprocess
import threading
import time
from typing import Any, Dict, List, Optional

from masklab_d2.tools.sweeps.commands import run_overrides, train_args
from masklab_d2.tools.sweeps.fingerprint import run_fingerprint
from masklab_d2.tools.sweeps.spec import Run, SweepError, SweepSpec
from masklab_d2.tools.sweeps.state import (
    HEARTBEAT_S,
    INTERRUPTED,
    RUN_LOG_FILE,
    beat,
    finish_attempt,
    has_checkpoint,
    start_attempt,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunTask:
    """What a worker (thread, submitit job) needs to execute one run; picklable.

    ``--resume`` is decided when the run starts, from the files then on disk, so a requeued or
    retried job resumes from whatever its predecessor saved.
    """

    name: str
    output_dir: str
    python: str
    train_script: str
    config_args: List[str]  # --config-file C [--num-gpus n --dist-url auto]
    overrides: List[str]  # OUTPUT_DIR ... SEED ... KEY VALUE ...
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    fingerprint: Dict[str, str] = dataclasses.field(default_factory=dict)

    def args(self, resume: bool) -> List[str]:
        """train_net.py's arguments."""
        return self.config_args + (["--resume"] if resume else []) + self.overrides

    def command(self, resume: bool) -> List[str]:
        return [self.python, self.train_script] + self.args(resume)


def make_task(spec: SweepSpec, run: Run, env: Optional[Dict[str, str]] = None) -> RunTask:
    overrides = run_overrides(run)
    config_args = train_args(spec, run)[: -len(overrides)]
    return RunTask(
        run.name,
        run.output_dir,
        spec.python,
        spec.train_script,
        config_args,
        overrides,
        {**spec.env, **(env or {})},
        run_fingerprint(run),
    )


# --------------------------------------------------------------------------- the status file


def start_status(task: RunTask, resume: bool, job_id: Optional[str] = None) -> Dict[str, Any]:
    """The "running" status of an attempt of ``task`` (:func:`state.start_attempt`)."""
    return start_attempt(
        task.output_dir,
        task.name,
        shlex.join(task.command(resume)),
        resume,
        task.fingerprint,
        job_id,
    )


def finish_status(
    task: RunTask, status: Dict[str, Any], returncode: int, stopped: bool = False
) -> Dict[str, Any]:
    """How an attempt of ``task`` ended (:func:`state.finish_attempt`)."""
    return finish_attempt(
        task.output_dir, status, returncode, _log_file(task.output_dir), stopped=stopped
    )


def _log_file(output_dir: str) -> str:
    """The subprocess's output (local runs), else detectron2's log (runs inside a job, whose
    output is submitit's job log)."""
    path = os.path.join(output_dir, RUN_LOG_FILE)
    return path if os.path.exists(path) else os.path.join(output_dir, "log.txt")


# ------------------------------------------------------------------------------ local launcher

# Processes started by execute_run in this process (to stop them on Ctrl-C).
_ACTIVE: Dict[str, subprocess.Popen] = {}
_ACTIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def execute_run(task: RunTask, extra_env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Runs one train_net.py subprocess to completion; records the outcome in its status file.

    Never raises for a failing training: the return code and the log tail go into
    ``<output_dir>/sweep_run.json`` (state "done", "failed" or "interrupted").

    Args:
        task: the run.
        extra_env: environment on top of os.environ and ``task.env`` (threads, GPUs).

    Returns:
        The final status dict.
    """
    resume = has_checkpoint(task.output_dir)
    status = start_status(task, resume)
    env = {**os.environ, **task.env, **(extra_env or {})}
    process = None
    with open(os.path.join(task.output_dir, RUN_LOG_FILE), "a") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"\n===== sweep: attempt {status['attempt']} at {stamp}: {status['command']}\n")
        log.flush()
        try:
            # Its own session: the terminal's Ctrl-C reaches the sweep only, which stops each
            # run once, through its process group (the ranks of a multi-GPU run included).
            process = subprocess.Popen(
                task.command(resume),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as error:
            log.write(f"could not start: {error}\n")
        if process is not None:
            with _ACTIVE_LOCK:
                _ACTIVE[task.name] = process
            try:
                while True:
                    try:
                        process.wait(timeout=HEARTBEAT_S)
                        break
                    except subprocess.TimeoutExpired:
                        beat(task.output_dir, status)
            finally:
                with _ACTIVE_LOCK:
                    _ACTIVE.pop(task.name, None)
    returncode = process.returncode if process is not None else 1
    return finish_status(task, status, returncode, stopped=_STOPPING.is_set())


def stop_active_runs(timeout: float = 300.0) -> None:
    """One SIGTERM to every running training's main process (train_net.py then saves a
    checkpoint after the current iteration and exits); waits, then kills what is left, process
    groups included."""
    _STOPPING.set()
    with _ACTIVE_LOCK:
        processes = list(_ACTIVE.values())
    for process in processes:
        # The main process only, not its group: train_net.py stops its workers and forwards the
        # signal to its ranks itself, and a train script of the user's own whose DataLoader
        # workers do not ignore it (engine.spare_loader_workers) would lose them to torch's
        # worker handler mid-step. (send_signal skips a process that has already exited.)
        process.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def visible_gpus() -> List[str]:
    """GPU ids this process may use (CUDA_VISIBLE_DEVICES, else all that torch sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [x.strip() for x in visible.split(",") if x.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def gpu_slots(parallel: int, num_gpus: int, gpus: List[str]) -> List[Dict[str, str]]:
    """The environment of each local slot: its own ``num_gpus`` GPUs.

    Runs never share a GPU: with fewer GPUs than ``parallel * num_gpus`` there are fewer slots
    (said loudly). ``num_gpus`` 0 means CPU runs; without any visible GPU the runs themselves
    decide (train_net.py refuses a CUDA config unless MASKLAB_ALLOW_CPU=1).
    """
    if num_gpus == 0:  # CPU runs, asked for: no GPU, and train_net.py may use the CPU
        return [{"CUDA_VISIBLE_DEVICES": "", "MASKLAB_ALLOW_CPU": "1"}] * parallel
    if not gpus:
        return [{} for _ in range(parallel)]
    fit = len(gpus) // num_gpus
    if fit == 0:
        raise SweepError(f"runs need {num_gpus} GPUs each; only {len(gpus)} visible: {gpus}")
    if fit < parallel:
        logger.warning(
            f"parallel {parallel} x num_gpus {num_gpus} needs {parallel * num_gpus} GPUs; "
            f"{len(gpus)} visible ({','.join(gpus)}): running {fit} at a time instead"
        )
    return [
        {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * num_gpus : (i + 1) * num_gpus])}
        for i in range(min(parallel, fit))
    ]


class LocalLauncher:
    """Runs tasks as subprocesses of this process, ``parallel`` at a time, each on its own GPUs
    (:func:`gpu_slots`) and with OMP_NUM_THREADS = max(1, cores // parallel)."""

    kind = "local"

    def __init__(self, parallel: int, num_gpus: int = 1):
        slots = gpu_slots(parallel, num_gpus, visible_gpus())
        self.parallel = len(slots)
        threads = str(max(1, available_cores() // self.parallel))
        self.base_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        self.slots: "queue.Queue[Dict[str, str]]" = queue.Queue()
        for slot in slots:
            self.slots.put(slot)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.parallel, thread_name_prefix="sweep"
        )
        self.max_in_flight = None  # the pool queues them itself

    def _execute(self, task: RunTask) -> Dict[str, Any]:
        if _STOPPING.is_set():
            return {"state": INTERRUPTED}
        slot = self.slots.get()
        try:
            return execute_run(task, {**self.base_env, **slot})
        finally:
            self.slots.put(slot)

    def submit(self, tasks: List[RunTask]) -> List[Any]:
        return [self.pool.submit(self._execute, task) for task in tasks]

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        stop_active_runs()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
