"""Executing runs locally: ``train_net.py`` subprocesses, each in its own session (a Ctrl-C
reaches the sweep only, which then sends each run's main process one SIGTERM) and on its own
GPUs; each attempt recorded by :mod:`.state`."""

import contextlib
import datetime
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional

from masklab_d2.tools.sweeps.commands import RunTask
from masklab_d2.tools.sweeps.spec import SweepError
from masklab_d2.tools.sweeps.state import (
    INTERRUPTED,
    RUN_LOG_FILE,
    Heartbeat,
    finish_status,
    has_checkpoint,
    start_status,
)

logger = logging.getLogger(__name__)


# Processes started by execute_run in this process (to stop them on Ctrl-C).
_ACTIVE: Dict[str, subprocess.Popen] = {}
_ACTIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def execute_run(task: RunTask, extra_env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Runs one train_net.py subprocess to completion, ``extra_env`` (threads, GPUs) on top of
    os.environ and ``task.env``; returns its final status, recorded by :func:`finish_status`
    (never raises for a failing training)."""
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
            heartbeat = Heartbeat(task.output_dir, status)
            try:
                process.wait()
            finally:
                heartbeat.stop()
                with _ACTIVE_LOCK:
                    _ACTIVE.pop(task.name, None)
    returncode = process.returncode if process is not None else 1
    return finish_status(task, status, returncode, stopped=_STOPPING.is_set())


def stop_active_runs(timeout: float = 300.0) -> None:
    """One SIGTERM to every running training's main process (it saves a checkpoint and exits);
    waits, then kills what is left, process groups included."""
    _STOPPING.set()
    with _ACTIVE_LOCK:
        processes = list(_ACTIVE.values())
    for process in processes:
        # The main process only, not its group: train_net.py stops its workers and ranks itself
        # (docs/sweeps.md, "Stopping and resuming"). send_signal skips a process that has exited.
        process.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def thread_env(parallel: int) -> Dict[str, str]:
    """OMP / MKL threads of each of ``parallel`` runs at a time: their share of the cores."""
    threads = str(max(1, available_cores() // parallel))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


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
    """The environment of each local slot: its own ``num_gpus`` GPUs, never shared (fewer slots,
    said loudly, when there are too few); ``num_gpus`` 0: CPU runs; no visible GPU: the runs decide
    (train_net.py refuses a CUDA config unless MASKLAB_ALLOW_CPU=1)."""
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
    (:func:`gpu_slots`) and with its share of the cores (:func:`thread_env`)."""

    max_in_flight = None  # the pool queues them itself

    def __init__(self, parallel: int, num_gpus: int = 1):
        slots = gpu_slots(parallel, num_gpus, visible_gpus())
        self.parallel = len(slots)
        self.base_env = thread_env(self.parallel)
        self.slots: "queue.Queue[Dict[str, str]]" = queue.Queue()
        for slot in slots:
            self.slots.put(slot)
        self.pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="sweep")

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
