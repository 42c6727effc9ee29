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
import glob
import importlib.util
import logging
import os
import queue
import shlex
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from masklab_d2.tools.sweeps.fingerprint import run_fingerprint
from masklab_d2.tools.sweeps.spec import (
    LAUNCHERS,
    REPO_ROOT,
    Run,
    SweepError,
    SweepSpec,
    run_overrides,
    slurm_parameters,
    train_args,
)
from masklab_d2.tools.sweeps.state import (
    HEARTBEAT_S,
    INTERRUPTED,
    RUN_LOG_FILE,
    has_checkpoint,
    Heartbeat,
    beat,
    finish_attempt,
    mark_queued,
    start_attempt,
)
from masklab_d2.utils import stop_signals
from masklab_d2.utils.stop_signals import EXIT_INTERRUPTED

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


# ---------------------------------------------------------------------------- submitit jobs


def load_train_script(path: str):
    """train_net.py (or a script with its ``main(args)`` and ``build_argument_parser()``) as a
    module, without running its command line."""
    module_spec = importlib.util.spec_from_file_location("masklab_sweep_train_script", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


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
    """Runs the training of ``task`` in this (submitit job) process and records the outcome.

    A graceful stop (masklab_d2.engine.graceful_stop) ends it at an iteration boundary with a
    checkpoint; if the stop came from submitit's preemption / timeout signal, submitit's own
    handler then takes over (the cell's ``checkpoint()``, requeue, exit), now that the
    checkpoint is safely written. The requeued job resumes from it.
    """
    import submitit

    job = submitit.JobEnvironment()
    # MASTER_ADDR, MASTER_PORT (from the job id), RANK, WORLD_SIZE for env:// (one task per GPU).
    distributed = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    os.environ.update(task.env)
    main_task = job.global_rank == 0
    resume = has_checkpoint(task.output_dir)
    status = start_status(task, resume, str(job.job_id)) if main_task else {}
    script = load_train_script(task.train_script)
    args = script.build_argument_parser().parse_args(task.args(resume))
    # Records stop signals; submitit's handlers stay as the previous ones, called below.
    stop_signals.install_signal_handlers()
    returncode = 0
    heartbeat = Heartbeat(task.output_dir, status) if main_task else None
    try:
        if distributed.world_size > 1:
            _init_distributed(distributed.local_world_size)
        script.main(args)
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
            # Called by submitit's handler once the graceful stop saved (see run_in_job); the
            # requeued job finds the checkpoint and runs with --resume.
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
        self.folder = os.path.join(spec.output_root, "submitit", "%j")
        params = slurm_parameters(spec)
        self.kind = "submitit-local" if local else "slurm"
        self.jobs: List[Any] = []
        self.snapshot: Optional[str] = None
        if local:
            self.executor = submitit.LocalExecutor(folder=self.folder)
            self.executor.update_parameters(
                timeout_min=params["timeout_min"],
                gpus_per_node=params["gpus_per_node"],
                tasks_per_node=params["tasks_per_node"],
            )
            # Local jobs all start at once: throttle them here instead of through Slurm.
            self.max_in_flight = spec.parallel
            threads = str(max(1, available_cores() // spec.parallel))
            self.env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        else:
            self.executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm")
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

    def _jobs_of(self, cells: List[Any]) -> List[Any]:
        if self.kind != "slurm":
            return [self.executor.submit(cell) for cell in cells]
        with self.executor.batch():
            jobs = [self.executor.submit(cell) for cell in cells]
        return jobs

    def submit(self, tasks: List[RunTask]) -> List[Any]:
        tasks = [dataclasses.replace(t, env={**self.env, **t.env}) for t in tasks]
        submitted = time.time()
        if self.snapshot:
            # Queued jobs run the code as it is now, from a copy: the repository's tracked files
            # and the compiled extension (not tracked).
            extensions = [
                os.path.relpath(p, REPO_ROOT) for p in glob.glob(str(REPO_ROOT / "masklab_d2/*.so"))
            ]
            tasks = [_in_snapshot(t, self.snapshot) for t in tasks]
            with submitit.helpers.RsyncSnapshot(
                snapshot_dir=Path(self.snapshot), root_dir=REPO_ROOT, include=extensions
            ):
                jobs = self._jobs_of([SubmititCell(t) for t in tasks])
        else:
            jobs = self._jobs_of([SubmititCell(t) for t in tasks])
        for task, job in zip(tasks, jobs):
            print(f"[sweep] submitted {task.name} as job {job.job_id}", flush=True)
            if self.kind == "slurm":
                mark_queued(task.output_dir, str(job.job_id), submitted, str(job.paths.folder))
        self.jobs += jobs
        return jobs

    def stop(self) -> None:
        # Slurm jobs outlive the sweep process on purpose (rerun the sweep to follow them);
        # local jobs would be orphans, so they go (submitit signals them: they checkpoint).
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


def make_launcher(spec: SweepSpec, kind: str):
    if kind == "local":
        return LocalLauncher(spec.parallel, spec.num_gpus)
    if kind in ("slurm", "submitit-local"):
        return SubmititLauncher(spec, local=kind == "submitit-local")
    raise SweepError(f"unknown launcher {kind!r}; choose from {LAUNCHERS}")
