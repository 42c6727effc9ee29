"""What a run folder says about its run (docs/sweeps.md), and the one owner of its status file
(``sweep_run.json``): every write is here, through :func:`write_status`."""

import json
import os
import re
import shlex
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional

import yaml

from masklab_d2.utils.stop_signals import EXIT_INTERRUPTED

if TYPE_CHECKING:  # the annotation only: this module stays below the others
    from masklab_d2.tools.sweeps.commands import RunTask

# Run states.
DONE, RUNNING, FAILED, INTERRUPTED, PENDING = "done", "running", "failed", "interrupted", "pending"
QUEUED = "queued"  # submitted to Slurm and not finished there (or Slurm cannot tell)
STALE = "stale"  # ran another config or code than the sweep's now
STATES = (DONE, RUNNING, QUEUED, FAILED, INTERRUPTED, STALE, PENDING)

STATUS_FILE = "sweep_run.json"
RUN_LOG_FILE = "sweep_run.log"
SWEEP_STATUS_FILE = "sweep_status.json"
LOG_TAIL_LINES = 50
# A running run refreshes its status file this often; one silent for STALE_AFTER_S is dead.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_S
# An evaluation record: "segm/AP", or "<dataset>/segm/AP" when DATASETS.TEST has several.
EVAL_KEY = re.compile(r"(^|/)(segm|bbox)/AP$")
# Slurm job states in which the job still owns its run (submitit's names).
_SLURM_ALIVE = ("PENDING", "REQUEUED", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "READY")


def write_json_atomic(path: str, content: Dict[str, Any]) -> None:
    """Readers (another sweep, a report) never see a half-written file."""
    temporary = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(temporary, "w") as f:
        json.dump(content, f, indent=1, default=str)
    os.replace(temporary, path)


def _load(path: str, parse) -> Dict[str, Any]:
    """A JSON or YAML file's content; {} when missing or unreadable (e.g. half written)."""
    try:
        with open(path) as f:
            return parse(f) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return {}


def read_status(output_dir: str) -> Dict[str, Any]:
    return _load(os.path.join(output_dir, STATUS_FILE), json.load)


def write_status(output_dir: str, status: Dict[str, Any]) -> None:
    write_json_atomic(os.path.join(output_dir, STATUS_FILE), status)


def read_metrics(output_dir: str) -> List[Dict[str, Any]]:
    """A run's metrics.json (one JSON object a line), one record per iteration (a training line
    and an evaluation line merged). A resumed run appends to the file and logs again the iterations
    after its checkpoint: those replace the first segment's records from that iteration on."""
    by_iteration: Dict[Any, Dict[str, Any]] = {}
    last = None
    try:
        with open(os.path.join(output_dir, "metrics.json")) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                iteration = record.get("iteration")
                if isinstance(iteration, int) and isinstance(last, int) and iteration < last:
                    # A new segment: what the old one logged from here on was never kept.
                    by_iteration = {k: v for k, v in by_iteration.items() if k < iteration}
                by_iteration.setdefault(iteration, {}).update(record)
                last = iteration if isinstance(iteration, int) else last
    except OSError:
        pass
    return list(by_iteration.values())


def evaluation_records(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records that hold an evaluation (a "[<dataset>/]segm/AP" or "bbox/AP" key)."""
    return [r for r in records if any(EVAL_KEY.search(k) for k in r)]


def run_config(output_dir: str) -> Dict[str, Any]:
    """The config train_net.py wrote into the run folder (empty when absent)."""
    return _load(os.path.join(output_dir, "config.yaml"), yaml.safe_load)


def is_finished(output_dir: str) -> bool:
    """model_final.pth exists and so does the final evaluation (when the config evaluates);
    detectron2 writes the weights first, so a run killed while evaluating is resumed to evaluate."""
    if not os.path.exists(os.path.join(output_dir, "model_final.pth")):
        return False
    config = run_config(output_dir)
    if "train" in config:  # a LazyConfig's config.yaml: train, model, dataloader, ...
        test_sets = (config.get("dataloader") or {}).get("test")
        max_iter = (config.get("train") or {}).get("max_iter")
    else:
        test_sets = (config.get("DATASETS") or {}).get("TEST")
        max_iter = (config.get("SOLVER") or {}).get("MAX_ITER")
    if config and not test_sets:
        return True  # nothing to evaluate on
    evaluations = evaluation_records(read_metrics(output_dir))
    if not evaluations:
        return False
    # The final evaluation is logged at iteration MAX_ITER (periodic ones at k * period - 1).
    return max_iter is None or evaluations[-1].get("iteration", -1) >= max_iter - 1


def has_checkpoint(output_dir: str) -> bool:
    """Something for ``--resume`` to load."""
    files = ("last_checkpoint", "model_final.pth")
    return any(os.path.exists(os.path.join(output_dir, f)) for f in files)


def stale_reason(output_dir: str, fingerprint: Optional[Dict[str, str]]) -> Optional[str]:
    """Why the run in ``output_dir`` does not belong to ``fingerprint`` (what the sweep would run
    now, :func:`~masklab_d2.tools.sweeps.fingerprint.run_fingerprint`), or None when it does;
    None skips the check."""
    if fingerprint is None:
        return None
    recorded = read_status(output_dir).get("fingerprint")
    if not recorded:
        return "no fingerprint recorded (run before fingerprints, or not by the sweep)"
    if recorded.get("config") != fingerprint.get("config"):
        return f"config changed ({recorded.get('config')} -> {fingerprint.get('config')})"
    # A status recorded before weights digests has none: only its config and code are compared.
    ran, now = recorded.get("weights"), fingerprint.get("weights")
    if "weights" in recorded and ran != now and "unknown" not in (ran, now):
        return f"initial weights changed (MODEL.WEIGHTS file {ran or 'none'} -> {now or 'none'})"
    # The training code's digest decides; a run recorded before digests falls back to the commit.
    key = "code" if "code" in recorded and "code" in fingerprint else "commit"
    ran, now = recorded.get(key), fingerprint.get(key)
    if ran != now and "unknown" not in (ran, now):
        return f"code changed ({key} {ran} -> {now})"
    return None


def slurm_job_state(job_id: str, folder: Optional[str]) -> str:
    """The Slurm state of a job as submitit reports it (sacct, cached and rate-limited by
    submitit); "UNKNOWN" when Slurm cannot be asked or does not know it."""
    try:
        import submitit

        return submitit.SlurmJob(folder=folder or ".", job_id=str(job_id)).state
    except Exception:  # noqa: BLE001  (no submitit, no Slurm: nobody can tell)
        return "UNKNOWN"


def run_state(
    output_dir: str,
    now: Optional[float] = None,
    fingerprint: Optional[Dict[str, str]] = None,
    check_queue: bool = True,
) -> str:
    """One of :data:`STATES`, from the run folder (and Slurm for a queued run): QUEUED while its
    Slurm job is queued or running or Slurm cannot tell (it must not be submitted twice), unless
    not ``check_queue`` (``--forget-queued``); STALE when not of ``fingerprint``."""
    status = read_status(output_dir)
    now = time.time() if now is None else now
    if status.get("state") == RUNNING and now - float(status.get("heartbeat", 0)) < STALE_AFTER_S:
        return RUNNING
    finished = is_finished(output_dir)
    if not finished and check_queue and status.get("state") == QUEUED and status.get("job_id"):
        job_state = slurm_job_state(status["job_id"], status.get("submitit_folder"))
        if job_state.split(" ")[0] in _SLURM_ALIVE or job_state == "UNKNOWN":
            return QUEUED
    if finished:
        state = DONE
    elif status.get("state") == FAILED:
        state = FAILED
    elif has_checkpoint(output_dir):
        state = INTERRUPTED
    else:
        return PENDING
    return STALE if stale_reason(output_dir, fingerprint) else state


def log_tail(path: str) -> List[str]:
    """The last lines of a (possibly large) log file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-LOG_TAIL_LINES:]


def mark_queued(
    output_dir: str, job_id: str, submitted: Optional[float] = None, folder: Optional[str] = None
) -> None:
    """Records a submitted Slurm job (its id and submitit ``folder``) in the run's status file,
    so that a rerun of the sweep while it waits in the queue does not submit the run again; a run
    started since ``submitted`` (now by default) owns the status file and keeps it."""
    submitted = time.time() if submitted is None else submitted
    os.makedirs(output_dir, exist_ok=True)
    status = read_status(output_dir)
    if float(status.get("started", 0)) >= submitted:
        return
    status.update(state=QUEUED, job_id=job_id, submitted=submitted, submitit_folder=folder)
    write_status(output_dir, status)


def start_status(task: "RunTask", resume: bool, job_id: Optional[str] = None) -> Dict[str, Any]:
    """Writes the "running" status of an attempt of ``task`` (with the fingerprint it runs) and
    returns it."""
    os.makedirs(task.output_dir, exist_ok=True)
    previous = read_status(task.output_dir)
    started = time.time()
    status = {
        "name": task.name,
        "state": RUNNING,
        "command": shlex.join(task.command(resume)),
        "resumed": resume,
        "attempt": int(previous.get("attempt", 0)) + 1,
        "started": started,
        "heartbeat": started,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": job_id,
        "fingerprint": task.fingerprint,
        "previous_duration_s": float(previous.get("total_duration_s", 0.0)),
    }
    write_status(task.output_dir, status)
    return status


def finish_status(
    task: "RunTask", status: Dict[str, Any], returncode: int, stopped: bool = False
) -> Dict[str, Any]:
    """Records how an attempt of ``task`` ended: DONE (exit 0 with the final evaluation),
    INTERRUPTED (a graceful stop, exit 75, a signal, or ``stopped`` by the sweep: resumable) or
    FAILED, with its log's tail (sweep_run.log, else detectron2's log.txt for a submitit job)."""
    ended = time.time()
    if returncode == 0 and is_finished(task.output_dir):
        state = DONE
    elif returncode == EXIT_INTERRUPTED or returncode < 0 or stopped:
        state = INTERRUPTED
    else:
        state = FAILED
    log = os.path.join(task.output_dir, RUN_LOG_FILE)
    log = log if os.path.exists(log) else os.path.join(task.output_dir, "log.txt")
    status.update(
        state=state,
        returncode=returncode,
        ended=ended,
        duration_s=ended - status["started"],
        total_duration_s=status.pop("previous_duration_s", 0.0) + ended - status["started"],
        heartbeat=ended,
        log_tail=log_tail(log),
    )
    if returncode == 0 and state == FAILED:
        status["error"] = "exited 0 without model_final.pth and a final evaluation"
    write_status(task.output_dir, status)
    return status


class Heartbeat:
    """Refreshes the status file's heartbeat from a thread while the run trains, so that a rerun
    of the sweep (and its progress) sees the run alive."""

    def __init__(self, output_dir: str, status: Dict[str, Any]):
        self.output_dir = output_dir
        self.status = status
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sweep-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(HEARTBEAT_S):
            write_status(self.output_dir, dict(self.status, heartbeat=time.time()))

    def stop(self) -> None:
        """Stops it before the final status is written (which it must not overwrite)."""
        self.done.set()
        self.thread.join()


def record_failure(output_dir: str, name: str, error: BaseException) -> None:
    """A job that died outside its attempt's own bookkeeping (never started, or killed before
    it could record its end) is recorded as failed; a finished record is left alone."""
    status = read_status(output_dir) or {"name": name}
    if status.get("state") not in (None, QUEUED, RUNNING):
        return
    os.makedirs(output_dir, exist_ok=True)
    now = time.time()
    if status.get("state") != RUNNING:
        status["started"] = now  # it never started: it failed now, in this sweep
    status.update(
        state=FAILED,
        returncode=None,
        error=f"{type(error).__name__}: {error}",
        ended=now,
        heartbeat=now,
        log_tail=str(error).splitlines()[-LOG_TAIL_LINES:],
    )
    write_status(output_dir, status)
