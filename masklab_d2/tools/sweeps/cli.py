"""The sweep command: plans what to launch, launches it, follows it, writes the report."""

import argparse
import os
import re
import shlex
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import masklab_d2.tools.sweeps as sweeps_package
from masklab_d2.tools.sweeps import slurm
from masklab_d2.tools.sweeps.commands import train_command
from masklab_d2.tools.sweeps.fingerprint import fingerprints_of
from masklab_d2.tools.sweeps.launch import _STOPPING, LocalLauncher, RunTask, make_task
from masklab_d2.tools.sweeps.progress import Progress
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
    STATUS_FILE,
    has_checkpoint,
    record_failure,
    run_state,
    stale_reason,
)


def plan(
    runs: List[Run],
    retry_failed: bool = True,
    fingerprints: Optional[Dict[str, Dict[str, str]]] = None,
    rerun_stale: bool = False,
    forget_queued: bool = False,
) -> Tuple[List[Run], Dict[str, str]]:
    """Which runs to launch now, and the state of each run at the start.

    Done runs and runs alive elsewhere are left alone; failed ones are retried only with
    ``retry_failed``; interrupted ones are relaunched (with --resume, decided at start); stale
    ones (another config or code, see :func:`~masklab_d2.tools.sweeps.state.stale_reason`) only
    with ``rerun_stale``, from scratch.
    """
    fingerprints = fingerprints or {}
    states = {
        run.name: run_state(run.output_dir, None, fingerprints.get(run.name), not forget_queued)
        for run in runs
    }
    launch = [
        run
        for run in runs
        if states[run.name] in (PENDING, INTERRUPTED)
        or (retry_failed and states[run.name] == FAILED)
        or (rerun_stale and states[run.name] == STALE)
    ]
    return launch, states


def set_aside(run: Run) -> str:
    """Moves a stale run's folder out of the way (never deleted: it holds results)."""
    aside = f"{run.output_dir}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(run.output_dir, aside)
    return aside


def run_sweep(
    spec: SweepSpec,
    runs: List[Run],
    launcher_kind: str,
    retry_failed: bool = True,
    poll_s: Optional[float] = None,
    stream=None,
    rerun_stale: bool = False,
    forget_queued: bool = False,
) -> Dict[str, int]:
    """Launches the runs that need it and follows them to the end.

    Args:
        spec: the sweep.
        runs: the runs to consider (done ones are skipped).
        launcher_kind: "local", "slurm" or "submitit-local".
        retry_failed: relaunch failed runs.
        rerun_stale: relaunch stale runs from scratch (their folders are set aside).
        forget_queued: treat runs marked queued on Slurm as not queued (their jobs are gone).
        poll_s: longest wait between two looks at the runs (default 1 s, Slurm 15 s).
        stream: where progress lines go (stdout).

    Returns:
        The final counts of run states.
    """
    stream = stream or sys.stdout
    fingerprints = fingerprints_of(runs)
    to_launch, initial = plan(runs, retry_failed, fingerprints, rerun_stale, forget_queued)
    for run in runs:
        if initial[run.name] == STALE:
            reason = stale_reason(run.output_dir, fingerprints[run.name])
            if rerun_stale:
                print(
                    f"[sweep] {run.name}: stale ({reason}); moved to {set_aside(run)}", file=stream
                )
            else:
                print(f"[sweep] {run.name}: stale ({reason}); --rerun-stale reruns it", file=stream)
    print(
        f"[sweep] {spec.name}: {len(runs)} runs in {spec.output_root}; "
        f"launching {len(to_launch)} with the {launcher_kind} launcher "
        f"(skipping {sum(s == DONE for s in initial.values())} done, "
        f"{sum(s in (RUNNING, QUEUED) for s in initial.values())} running or queued elsewhere"
        + ("" if retry_failed else f", {sum(s == FAILED for s in initial.values())} failed")
        + ("" if rerun_stale else f", {sum(s == STALE for s in initial.values())} stale")
        + ")",
        file=stream,
        flush=True,
    )
    progress = Progress(spec, runs, spec.parallel, stream, fingerprints)
    progress.launch_time = time.time()
    progress.scheduled = {run.name for run in to_launch}
    progress.refresh()
    progress.report([])
    if not to_launch:
        return progress.counts()
    launcher = make_launcher(spec, launcher_kind)
    # Poll often after a change, less while nothing happens (Slurm: up to every 15 s).
    max_poll_s = poll_s if poll_s is not None else (15.0 if launcher_kind == "slurm" else 1.0)
    poll_s = min(0.5, max_poll_s)
    queue_ = [make_task(spec, run) for run in to_launch]
    handles: List[Tuple[RunTask, Any]] = []
    try:
        while queue_ or handles:
            limit = launcher.max_in_flight
            if queue_ and (limit is None or len(handles) < limit):
                batch = queue_ if limit is None else queue_[: limit - len(handles)]
                queue_ = queue_[len(batch) :]
                handles += list(zip(batch, launcher.submit(batch)))
            for task, handle in list(handles):
                if handle.done():
                    handles.remove((task, handle))
                    _collect(task, handle)
            changes = progress.refresh()
            if changes:
                progress.report(changes)
            poll_s = min(0.5, max_poll_s) if changes else min(max_poll_s, poll_s * 1.5)
            if queue_ or handles:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        # One stop per run: a second Ctrl-C must not cut the wait for their checkpoints short.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_IGN)
        print(
            "[sweep] interrupted: stopping the runs (they save checkpoints; rerun to resume)",
            file=stream,
        )
        launcher.stop()
        launcher.close()
        progress.report(progress.refresh())
        raise
    finally:
        launcher.close()
    changes = progress.refresh()
    if changes:
        progress.report(changes)
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
    stream=None,
    rerun_stale: bool = False,
    forget_queued: bool = False,
) -> None:
    stream = stream or sys.stdout
    cells = {run.cell.name for run in runs}
    # "cells x seeds" only when it is true: a cell with its own seeds breaks the product.
    if all(run.cell.seeds in (None, tuple(spec.seeds)) for run in runs):
        size = f"{len(cells)} cells x {len(spec.seeds)} seeds = {len(runs)} runs"
    else:
        size = f"{len(cells)} cells, {len(runs)} runs (some cells with their own seeds)"
    print(
        f"# {spec.name}: {size} in {spec.output_root} "
        f"({spec.launcher} launcher, parallel {spec.parallel})",
        file=stream,
    )
    fingerprints = fingerprints_of(runs)
    to_launch, states = plan(runs, retry_failed, fingerprints, rerun_stale, forget_queued)
    launching = {run.name for run in to_launch}
    for run in runs:
        state = states[run.name]
        action = "run" if run.name in launching else "skip"
        print(f"[{state}, {action}] {run.name}", file=stream)
        if state == STALE:
            print(f"    stale: {stale_reason(run.output_dir, fingerprints[run.name])}", file=stream)
        if run.name in launching:
            resume = state != STALE and has_checkpoint(run.output_dir)
            command = train_command(spec, run, resume=resume)
            print(f"    {shlex.join(command)}", file=stream)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m masklab_d2.tools.sweep",
        description=sweeps_package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_file", help="the sweep YAML")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and commands, run nothing"
    )
    parser.add_argument(
        "--report", action="store_true", help="only write results.csv / results.md / plots"
    )
    parser.add_argument(
        "--report-dir",
        metavar="DIR",
        help="write the report (results.csv, results.md, plots) here instead of the output root, "
        "e.g. the project folder that publishes it",
    )
    parser.add_argument("--launcher", choices=LAUNCHERS, help="overrides the file's launcher")
    parser.add_argument(
        "--parallel", type=int, help="runs at a time (overrides the file's 'parallel')"
    )
    parser.add_argument("--output-root", help="overrides the file's output_root")
    parser.add_argument(
        "--filter", metavar="REGEX", help="only the runs whose name matches (re.search)"
    )
    parser.add_argument("--no-retry-failed", action="store_true", help="leave failed runs failed")
    parser.add_argument(
        "--rerun-stale",
        action="store_true",
        help="rerun from scratch the runs whose recorded config hash or training code differ from "
        "the sweep's now (their folders are moved to <run>.stale-<time>)",
    )
    parser.add_argument(
        "--forget-queued",
        action="store_true",
        help="relaunch runs marked as queued on Slurm when Slurm cannot tell (their jobs are gone)",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="do not write the report at the end"
    )
    return parser


def select_runs(spec: SweepSpec, pattern: Optional[str]) -> List[Run]:
    runs = expand_runs(spec)
    if pattern:
        runs = [run for run in runs if re.search(pattern, run.name)]
        if not runs:
            raise SweepError(f"--filter {pattern!r} matches none of the runs")
    return runs


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
    launcher = args.launcher or spec.launcher
    runs = select_runs(spec, args.filter)
    if args.dry_run:
        print_dry_run(
            spec, runs, not args.no_retry_failed, None, args.rerun_stale, args.forget_queued
        )
        return 0
    if args.report:
        for path in write_report(spec, runs, args.report_dir).values():
            print(f"[sweep] wrote {path}")
        return 0
    if threading.current_thread() is threading.main_thread():
        # A scheduler's SIGTERM stops the runs as Ctrl-C does (they save checkpoints).
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    _STOPPING.clear()
    try:
        counts = run_sweep(
            spec,
            runs,
            launcher,
            retry_failed=not args.no_retry_failed,
            rerun_stale=args.rerun_stale,
            forget_queued=args.forget_queued,
        )
    except KeyboardInterrupt:
        print(
            f"[sweep] stopped; rerun `python -m masklab_d2.tools.sweep {args.sweep_file}` to resume"
        )
        return 130
    if not args.no_report:
        for path in write_report(spec, runs, args.report_dir).values():
            print(f"[sweep] wrote {path}")
    if counts[FAILED]:
        failed = [run for run in runs if run_state(run.output_dir, check_queue=False) == FAILED]
        for run in failed:
            print(f"[sweep] FAILED {run.name}: see {os.path.join(run.output_dir, STATUS_FILE)}")
    return 1 if counts[FAILED] else 0


def make_launcher(spec: SweepSpec, kind: str):
    """The launcher ``kind`` names: local processes, or submitit jobs (Slurm or local)."""
    if kind == "local":
        return LocalLauncher(spec.parallel, spec.num_gpus)
    if kind in ("slurm", "submitit-local"):
        return slurm.SubmititLauncher(spec, local=kind == "submitit-local")
    raise SweepError(f"unknown launcher {kind!r}; choose from {LAUNCHERS}")
