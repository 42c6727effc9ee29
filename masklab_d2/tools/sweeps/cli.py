"""The sweep command: plans what to launch, launches it, follows its progress (a line per change,
counts, an ETA, sweep_status.json), writes the report."""

import argparse
import datetime
import math
import os
import re
import shlex
import signal
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import masklab_d2.tools.sweeps as sweeps_package
from masklab_d2.tools.sweeps import slurm
from masklab_d2.tools.sweeps.commands import RunTask, make_task, train_command
from masklab_d2.tools.sweeps.fingerprint import fingerprints_of
from masklab_d2.tools.sweeps.launch import _STOPPING, LocalLauncher
from masklab_d2.tools.sweeps.report import write_report
from masklab_d2.tools.sweeps.spec import (
    LAUNCHERS,
    Run,
    SweepError,
    SweepSpec,
    expand_runs,
    load_sweep,
)
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
    has_checkpoint,
    read_status,
    record_failure,
    run_state,
    stale_reason,
    write_json_atomic,
)


def plan(
    runs: List[Run],
    retry_failed: bool = True,
    fingerprints: Optional[Dict[str, Dict[str, str]]] = None,
    rerun_stale: bool = False,
    forget_queued: bool = False,
) -> Tuple[List[Run], Dict[str, str]]:
    """Which runs to launch now (pending, interrupted: with --resume decided at start; failed
    with ``retry_failed``; stale with ``rerun_stale``), and the state of each run at the start."""
    fingerprints = fingerprints or {}
    states = {
        run.name: run_state(run.output_dir, None, fingerprints.get(run.name), not forget_queued)
        for run in runs
    }
    relaunch = {PENDING: True, INTERRUPTED: True, FAILED: retry_failed, STALE: rerun_stale}
    return [run for run in runs if relaunch.get(states[run.name], False)], states


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Follows a sweep's ``runs`` (also those not launched now): a line per change, counts, an
    ETA (``spec.parallel`` at a time), sweep_status.json. ``scheduled``: the runs this process
    launches from now; ``fingerprints``: {run name: fingerprint} (another config is stale)."""

    def __init__(
        self,
        spec: SweepSpec,
        runs: List[Run],
        fingerprints: Dict[str, Dict[str, str]],
        scheduled: Iterable[str],
    ):
        self.spec = spec
        self.fingerprints = fingerprints
        self.runs = runs
        self.states: Dict[str, str] = {}
        self.started: Dict[str, float] = {}
        self.durations: List[float] = []
        self.scheduled = set(scheduled)
        self.launch_time = time.time()

    def _state(self, run: Run, now: float) -> str:
        status = read_status(run.output_dir)
        # A run launched by this process counts from its status file (complete with the duration
        # when execute_run finalises it); until it starts, what its folder shows is history.
        if run.name in self.scheduled:
            if float(status.get("started", 0)) < self.launch_time:
                return PENDING
            state = status.get("state")
            alive = now - float(status.get("heartbeat", 0)) < STALE_AFTER_S
            if state in STATES and (state != RUNNING or alive):
                return state
        return run_state(run.output_dir, now, self.fingerprints.get(run.name))

    def update(self, always: bool = False) -> bool:
        """Re-reads every run folder; prints what changed, the counts and the ETA, and writes
        sweep_status.json, when something did (or ``always``). Returns whether something did."""
        now = time.time()
        changes = []
        for run in self.runs:
            state = self._state(run, now)
            previous = self.states.get(run.name)
            if state == previous:
                continue
            self.states[run.name] = state
            status = read_status(run.output_dir)
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
        if changes or always:
            stamp = datetime.datetime.now().strftime("%H:%M:%S")
            counts = self.counts()
            total = (
                f"done {counts[DONE]}, running {counts[RUNNING]}, failed {counts[FAILED]}, "
                f"pending {counts[PENDING]}"
                + (f", stale {counts[STALE]}" if counts[STALE] else "")
                + f" of {len(self.runs)} | ETA {format_seconds(self.eta_seconds())}"
            )
            for line in changes + [total]:
                print(f"[sweep {stamp}] {line}", flush=True)
            self.write_status()
        return bool(changes)

    def counts(self) -> Dict[str, int]:
        counts = dict.fromkeys((DONE, RUNNING, FAILED, STALE, PENDING), 0)
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
        return remaining / min(self.spec.parallel, counts[PENDING] + counts[RUNNING])

    def write_status(self) -> None:
        os.makedirs(self.spec.output_root, exist_ok=True)
        runs = []
        for run in self.runs:
            status = read_status(run.output_dir)
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


def run_sweep(
    spec: SweepSpec,
    runs: List[Run],
    launcher_kind: str,
    retry_failed: bool = True,
    rerun_stale: bool = False,
    forget_queued: bool = False,
) -> Dict[str, int]:
    """Launches the runs that need it (:func:`plan`) with the ``launcher_kind`` launcher and
    follows them to the end, printing its progress; returns the final counts of run states.
    Stale runs relaunched with ``rerun_stale`` have their folders set aside first."""
    fingerprints = fingerprints_of(runs)
    to_launch, initial = plan(runs, retry_failed, fingerprints, rerun_stale, forget_queued)
    for run in runs:
        if initial[run.name] == STALE:
            reason = stale_reason(run.output_dir, fingerprints[run.name])
            if rerun_stale:  # out of the way, never deleted: it holds results
                aside = f"{run.output_dir}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
                os.rename(run.output_dir, aside)
                print(f"[sweep] {run.name}: stale ({reason}); moved to {aside}")
            else:
                print(f"[sweep] {run.name}: stale ({reason}); --rerun-stale reruns it")
    print(
        f"[sweep] {spec.name}: {len(runs)} runs in {spec.output_root}; "
        f"launching {len(to_launch)} with the {launcher_kind} launcher "
        f"(skipping {sum(s == DONE for s in initial.values())} done, "
        f"{sum(s in (RUNNING, QUEUED) for s in initial.values())} running or queued elsewhere"
        + ("" if retry_failed else f", {sum(s == FAILED for s in initial.values())} failed")
        + ("" if rerun_stale else f", {sum(s == STALE for s in initial.values())} stale")
        + ")",
        flush=True,
    )
    progress = Progress(spec, runs, fingerprints, {run.name for run in to_launch})
    progress.update(always=True)
    if not to_launch:
        return progress.counts()
    if launcher_kind == "local":
        launcher = LocalLauncher(spec.parallel, spec.num_gpus)
    else:
        launcher = slurm.SubmititLauncher(spec, local=launcher_kind == "submitit-local")
    # Poll often after a change, less while nothing happens (Slurm: up to every 15 s).
    max_poll_s = 15.0 if launcher_kind == "slurm" else 1.0
    poll_s = min(0.5, max_poll_s)
    queue_ = [make_task(spec, run, fingerprints[run.name]) for run in to_launch]
    handles: List[Tuple[RunTask, Any]] = []
    try:
        while queue_ or handles:
            limit = launcher.max_in_flight
            free = len(queue_) if limit is None else limit - len(handles)
            batch, queue_ = queue_[:free], queue_[free:]
            if batch:
                handles += list(zip(batch, launcher.submit(batch)))
            for task, handle in list(handles):
                if handle.done():
                    handles.remove((task, handle))
                    _collect(task, handle)
            changed = progress.update()
            poll_s = min(0.5, max_poll_s) if changed else min(max_poll_s, poll_s * 1.5)
            if queue_ or handles:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        # One stop per run: a second Ctrl-C must not cut the wait for their checkpoints short.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        print("[sweep] interrupted: stopping the runs (they save checkpoints; rerun to resume)")
        launcher.stop()
        launcher.close()
        progress.update(always=True)
        raise
    finally:
        launcher.close()
    progress.update()
    return progress.counts()


def _collect(task: RunTask, handle: Any) -> None:
    """A finished handle; a job that died outside execute_run is recorded as failed here."""
    try:
        handle.result()
    except Exception as error:  # noqa: BLE001  (one broken job must not stop the sweep)
        record_failure(task.output_dir, task.name, error)


def print_dry_run(
    spec: SweepSpec,
    runs: List[Run],
    retry_failed: bool,
    rerun_stale: bool = False,
    forget_queued: bool = False,
) -> None:
    """Prints each run's state, whether it would run, and its command."""
    cells = {run.cell.name for run in runs}
    # "cells x seeds" only when it is true: a cell with its own seeds breaks the product.
    if all(run.cell.seeds in (None, tuple(spec.seeds)) for run in runs):
        size = f"{len(cells)} cells x {len(spec.seeds)} seeds = {len(runs)} runs"
    else:
        size = f"{len(cells)} cells, {len(runs)} runs (some cells with their own seeds)"
    print(
        f"# {spec.name}: {size} in {spec.output_root} "
        f"({spec.launcher} launcher, parallel {spec.parallel})"
    )
    fingerprints = fingerprints_of(runs)
    to_launch, states = plan(runs, retry_failed, fingerprints, rerun_stale, forget_queued)
    launching = {run.name for run in to_launch}
    for run in runs:
        state = states[run.name]
        print(f"[{state}, {'run' if run.name in launching else 'skip'}] {run.name}")
        if state == STALE:
            print(f"    stale: {stale_reason(run.output_dir, fingerprints[run.name])}")
        if run.name in launching:
            resume = state != STALE and has_checkpoint(run.output_dir)
            print(f"    {shlex.join(train_command(spec, run, resume=resume))}")


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m masklab_d2.tools.sweep",
        description=sweeps_package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("sweep_file", help="the sweep YAML")
    add("--dry-run", action="store_true", help="print the runs and commands, run nothing")
    add("--report", action="store_true", help="only write results.csv / results.md / plots")
    add(
        "--report-dir",
        metavar="DIR",
        help="write the report (results.csv, results.md, plots) here instead of the output root, "
        "e.g. the project folder that publishes it",
    )
    add("--launcher", choices=LAUNCHERS, help="overrides the file's launcher")
    add("--parallel", type=int, help="runs at a time (overrides the file's 'parallel')")
    add("--output-root", help="overrides the file's output_root")
    add("--filter", metavar="REGEX", help="only the runs whose name matches (re.search)")
    add("--no-retry-failed", action="store_true", help="leave failed runs failed")
    add(
        "--rerun-stale",
        action="store_true",
        help="rerun from scratch the runs whose recorded config hash or training code differ from "
        "the sweep's now (their folders are moved to <run>.stale-<time>)",
    )
    add(
        "--forget-queued",
        action="store_true",
        help="relaunch runs marked as queued on Slurm when Slurm cannot tell (their jobs are gone)",
    )
    add("--no-report", action="store_true", help="do not write the report at the end")
    return parser


def _raise_keyboard_interrupt(signum, frame):
    # The sweep process only supervises: unwinding it anywhere is safe, and run_sweep then
    # stops each run once, gracefully.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns 0 when every run is done, 1 when some failed."""
    args = build_argument_parser().parse_args(argv)
    spec = load_sweep(args.sweep_file, args.output_root)
    if args.parallel is not None:
        if args.parallel < 1:
            raise SweepError("--parallel must be >= 1")
        spec.parallel = args.parallel
    runs = expand_runs(spec)
    if args.filter:
        runs = [run for run in runs if re.search(args.filter, run.name)]
        if not runs:
            raise SweepError(f"--filter {args.filter!r} matches none of the runs")
    # retry_failed, rerun_stale, forget_queued: as print_dry_run and run_sweep take them
    options = (not args.no_retry_failed, args.rerun_stale, args.forget_queued)
    if args.dry_run:
        print_dry_run(spec, runs, *options)
        return 0
    failed = 0
    if not args.report:
        if threading.current_thread() is threading.main_thread():
            # A scheduler's SIGTERM stops the runs as Ctrl-C does (they save checkpoints).
            signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        _STOPPING.clear()
        try:
            failed = run_sweep(spec, runs, args.launcher or spec.launcher, *options)[FAILED]
        except KeyboardInterrupt:
            print(
                f"[sweep] stopped; rerun `python -m masklab_d2.tools.sweep {args.sweep_file}` "
                "to resume"
            )
            return 130
    if args.report or not args.no_report:
        for path in write_report(spec, runs, args.report_dir).values():
            print(f"[sweep] wrote {path}")
    if not failed:
        return 0
    for run in runs:
        if run_state(run.output_dir, check_queue=False) == FAILED:
            print(f"[sweep] FAILED {run.name}: see {os.path.join(run.output_dir, STATUS_FILE)}")
    return 1
