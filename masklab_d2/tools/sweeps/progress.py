"""Progress of a running sweep: a line per change, counts, an ETA, sweep_status.json."""

import datetime
import math
import os
import sys
import time
from typing import Dict, List, Optional

from masklab_d2.tools.sweeps.spec import Run, SweepSpec
from masklab_d2.tools.sweeps.state import (
    DONE,
    FAILED,
    INTERRUPTED,
    PENDING,
    QUEUED,
    RUNNING,
    STALE,
    STALE_AFTER_S,
    STATES,
    STATUS_FILE,
    SWEEP_STATUS_FILE,
    read_json,
    run_state,
    write_json_atomic,
)


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Counts of run states, an ETA from finished runs' durations, sweep_status.json."""

    def __init__(
        self,
        spec: SweepSpec,
        runs: List[Run],
        parallel: int,
        stream=None,
        fingerprints: Optional[Dict[str, Dict[str, str]]] = None,
    ):
        """
        Args:
            spec: the sweep.
            runs: all its runs (also those not launched now).
            parallel: runs at a time, for the ETA.
            stream: where progress lines go (stdout).
            fingerprints: {run name: fingerprint} (runs of another config count as stale).
        """
        self.spec = spec
        self.fingerprints = fingerprints or {}
        self.runs = runs
        self.parallel = max(1, parallel)
        self.stream = stream or sys.stdout
        self.states: Dict[str, str] = {}
        self.started: Dict[str, float] = {}
        self.durations: List[float] = []
        # Runs launched by this sweep process, and when: until such a run starts, the state
        # its folder shows (an old failure, a checkpoint) is history; it counts as pending.
        self.scheduled: set = set()
        self.launch_time = 0.0

    def _state(self, run: Run, now: float) -> str:
        if run.name not in self.scheduled:
            return run_state(run.output_dir, now, self.fingerprints.get(run.name))
        # A run launched by this process counts from its status file, which execute_run
        # finalises after the training exits: the folder alone would say "done" a moment
        # before the duration is known. Until it starts, what the folder shows (an old
        # failure, a checkpoint) is history: it is pending (queued).
        status = read_json(os.path.join(run.output_dir, STATUS_FILE)) or {}
        if float(status.get("started", 0)) < self.launch_time:
            return PENDING
        state = status.get("state")
        if state == RUNNING:
            return (
                RUNNING
                if now - float(status.get("heartbeat", 0)) < STALE_AFTER_S
                else run_state(run.output_dir, now, self.fingerprints.get(run.name))
            )
        return (
            state
            if state in STATES
            else run_state(run.output_dir, now, self.fingerprints.get(run.name))
        )

    def refresh(self) -> List[str]:
        """Re-reads every run folder; returns lines describing what changed."""
        now = time.time()
        changes = []
        for run in self.runs:
            state = self._state(run, now)
            previous = self.states.get(run.name)
            if state == previous:
                continue
            self.states[run.name] = state
            status = read_json(os.path.join(run.output_dir, STATUS_FILE)) or {}
            if state == RUNNING:
                self.started[run.name] = float(status.get("started", now))
            if previous is None:
                continue
            if state in (DONE, FAILED, INTERRUPTED):
                duration = status.get("duration_s")
                if state == DONE and duration:
                    self.durations.append(float(duration))
                detail = f" (return code {status.get('returncode')})" if state == FAILED else ""
                changes.append(f"{run.name}: {state}{detail} after {format_seconds(duration)}")
            else:
                changes.append(f"{run.name}: {state}")
        return changes

    def counts(self) -> Dict[str, int]:
        counts = {state: 0 for state in (DONE, RUNNING, FAILED, STALE, PENDING)}
        for state in self.states.values():
            counts[PENDING if state in (INTERRUPTED, QUEUED) else state] += 1
        return counts

    def eta_seconds(self) -> Optional[float]:
        counts = self.counts()
        if counts[PENDING] + counts[RUNNING] == 0:
            return 0.0
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        now = time.time()
        remaining = counts[PENDING] * mean + sum(
            max(0.0, mean - (now - self.started.get(name, now)))
            for name, state in self.states.items()
            if state == RUNNING
        )
        return remaining / min(self.parallel, counts[PENDING] + counts[RUNNING])

    def line(self) -> str:
        c = self.counts()
        return (
            f"done {c[DONE]}, running {c[RUNNING]}, failed {c[FAILED]}, pending {c[PENDING]}"
            + (f", stale {c[STALE]}" if c[STALE] else "")
            + f" of {len(self.runs)} | ETA {format_seconds(self.eta_seconds())}"
        )

    def report(self, changes: List[str]) -> None:
        stamp = datetime.datetime.now().strftime("%H:%M:%S")
        for change in changes:
            print(f"[sweep {stamp}] {change}", file=self.stream)
        print(f"[sweep {stamp}] {self.line()}", file=self.stream, flush=True)
        self.write_status()

    def write_status(self) -> None:
        os.makedirs(self.spec.output_root, exist_ok=True)
        runs = []
        for run in self.runs:
            status = read_json(os.path.join(run.output_dir, STATUS_FILE)) or {}
            runs.append(
                {
                    "name": run.name,
                    "cell": run.cell.name,
                    "seed": run.seed,
                    "state": self.states.get(run.name, PENDING),
                    "output_dir": run.output_dir,
                    "returncode": status.get("returncode"),
                    "duration_s": status.get("duration_s"),
                }
            )
        write_json_atomic(
            os.path.join(self.spec.output_root, SWEEP_STATUS_FILE),
            {
                "sweep": self.spec.path,
                "name": self.spec.name,
                "output_root": self.spec.output_root,
                "updated": datetime.datetime.now().isoformat(timespec="seconds"),
                "counts": self.counts(),
                "eta_seconds": self.eta_seconds(),
                "runs": runs,
            },
        )
