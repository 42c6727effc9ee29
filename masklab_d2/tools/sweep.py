"""Config sweeps: a grid of train_net.py runs, launched locally or on Slurm, resumable.

    python -m masklab_d2.tools.sweep projects/shapes-partial-heads/sweep.yaml --dry-run
    python -m masklab_d2.tools.sweep projects/shapes-partial-heads/sweep.yaml [--parallel 2]
    python -m masklab_d2.tools.sweep projects/shapes-partial-heads/sweep.yaml --launcher slurm
    python -m masklab_d2.tools.sweep projects/shapes-partial-heads/sweep.yaml --report
    (also: --output-root DIR, --filter REGEX on run names, --no-retry-failed, --no-report)

A sweep file (YAML) describes the runs::

    base_config: configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml  # relative to the sweep
                                                    # file, else to the repository, else the cwd
    output_root: output/sweeps/shapes-partial-heads # relative to the cwd (as OUTPUT_DIR is)
    axes:                                           # the grid: the product of all axes
      head:                                         # named groups: label -> config and/or keys
        mask_rcnn: {config: configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml}
        masklab: {config: configs/shapes-partial/masklab_R_18_FPN_gtcrop.yaml}
      MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE: [64, 128]   # a config key and its values
    cells:                                          # extra cells beside the grid (optional)
      - {head: masklab, MODEL.MASKLAB.NUM_DIRECTIONS: 4}
      - {name: masklab_no_refine, head: masklab, opts: {MODEL.MASKLAB.HYPERCOLUMN_FEATURES: []}}
    seeds: [0, 1]                                   # or a count: 2 (= [0, 1]); default [0]
    opts: {SOLVER.MAX_ITER: 4500}                   # common overrides (mapping or flat list)
    num_gpus: 1                                     # per run (train_net.py --num-gpus)
    launcher: local                                 # local | slurm | submitit-local
    parallel: 1                                     # runs at a time
    env: {}                                         # extra environment of every run
    slurm: {partition: learnfair, time: 240, cpus: 10, mem: 64}   # submitit parameters

A group is a mapping with an optional ``config`` (replacing the base config: a head needs several
keys, so a cell can switch whole config files), optional ``opts`` and any other ``KEY: value``
overrides. An explicit cell maps axis names to labels (named groups) or config keys to values,
and may set ``name``, ``config`` and ``opts``. Every run is ``python train_net.py --config-file C
[--num-gpus n] [--resume] OUTPUT_DIR <output_root>/<run name> SEED <seed> <overrides>`` where the
overrides are the common opts, then the axes' in axis order, then the explicit cell's.

A run's name is built from its axis values, e.g. ``head=masklab__MASKLAB.NUM_DIRECTIONS=4__seed=0``
(a leading ``MODEL.`` is dropped from keys; characters other than ``A-Za-z0-9._+=~-`` become
``-``; a name over 120 characters, or two that would read alike, get ``~`` and a hash of what
they run), so it is stable across reruns and safe as a folder name.

Rerunning a sweep continues it: a run with ``model_final.pth`` and its final evaluation is
skipped, one with a checkpoint but unfinished (interrupted, preempted, timed out) reruns with
``--resume``, one that failed (``sweep_run.json`` in its folder holds the return code and the last
50 lines of its log ``sweep_run.log``) is retried unless ``--no-retry-failed``. A run whose
status file shows a live heartbeat (another sweep process or a Slurm job running it), or whose
Slurm job still waits in the queue (``squeue``), is left alone, so rerunning the sweep to follow
a Slurm sweep submits nothing twice. A failing run never stops the others. While it runs, a line per change gives the done /
running / failed / pending counts and an ETA; ``<output_root>/sweep_status.json`` holds the same.
``--report`` (and the end of every sweep) writes results.csv, results.md and plots, see
:mod:`masklab_d2.tools.sweep_report`.

Launchers: ``local`` runs ``parallel`` runs at a time as subprocesses, each with
OMP_NUM_THREADS = max(1, cores // parallel) (and its own GPUs when there are enough);
``slurm`` submits a Slurm job array through submitit (``slurm_array_parallelism`` = parallel),
``submitit-local`` goes through the same submitit code path on this machine (for tests). Jobs
are submitit Checkpointables: on a Slurm timeout the training gets SIGTERM (train_net.py then saves
a checkpoint) and the job is requeued, resuming from it.
"""

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

# Run states.
DONE, RUNNING, FAILED, INTERRUPTED, PENDING = "done", "running", "failed", "interrupted", "pending"
QUEUED = "queued"  # submitted to Slurm, not started yet
STATES = (DONE, RUNNING, QUEUED, FAILED, INTERRUPTED, PENDING)

STATUS_FILE = "sweep_run.json"
RUN_LOG_FILE = "sweep_run.log"
SWEEP_STATUS_FILE = "sweep_status.json"
LOG_TAIL_LINES = 50
# A running run refreshes its status file this often; one silent for STALE_AFTER_S is dead.
HEARTBEAT_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_S

LAUNCHERS = ("local", "slurm", "submitit-local")
_CELL_RESERVED_KEYS = ("name", "config", "opts")
_SPEC_KEYS = (
    "name",
    "base_config",
    "output_root",
    "axes",
    "cells",
    "seeds",
    "opts",
    "num_gpus",
    "launcher",
    "parallel",
    "env",
    "slurm",
    "train_script",
    "python",
)
_MAX_NAME_LENGTH = 120
_EVAL_KEY = re.compile(r"^(segm|bbox)/AP$")
# Friendly names of the `slurm:` settings -> submitit AutoExecutor parameters.
_SLURM_ALIASES = {
    "partition": "slurm_partition",
    "time": "timeout_min",
    "gpus": "gpus_per_node",
    "cpus": "cpus_per_task",
    "mem": "mem_gb",
    "account": "slurm_account",
    "qos": "slurm_qos",
    "constraint": "slurm_constraint",
    "comment": "slurm_comment",
    "exclude": "slurm_exclude",
    "setup": "slurm_setup",
    "additional": "slurm_additional_parameters",
}
_GENERIC_SUBMITIT_KEYS = ("timeout_min", "gpus_per_node", "cpus_per_task", "mem_gb", "name")
_REPO_ROOT = Path(__file__).resolve().parents[2]


class SweepError(ValueError):
    """An invalid sweep file."""


# --------------------------------------------------------------------------------------- spec


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the sweep (all its seeds share it).

    Attributes:
        name: filesystem-safe name built from ``values``.
        values: (column, label) pairs: the axis values that define the cell, for names and tables.
        config_file: absolute path of its config file.
        overrides: flat [KEY, VALUE, ...] config overrides, strings as on a command line.
    """

    name: str
    values: Tuple[Tuple[str, str], ...]
    config_file: str
    overrides: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run: a cell and a seed, in its own output folder."""

    cell: Cell
    seed: int
    output_dir: str

    @property
    def name(self) -> str:
        return f"{self.cell.name}__seed={self.seed}"


@dataclasses.dataclass
class SweepSpec:
    """A parsed sweep file (see the module docstring for the format)."""

    path: str
    name: str
    base_config: str
    output_root: str
    axes: Dict[str, Any]
    cells: List[Dict[str, Any]]
    seeds: List[int]
    opts: List[Tuple[str, Any]]
    num_gpus: int = 1
    launcher: str = "local"
    parallel: int = 1
    env: Dict[str, str] = dataclasses.field(default_factory=dict)
    slurm: Dict[str, Any] = dataclasses.field(default_factory=dict)
    train_script: str = ""
    python: str = sys.executable

    @property
    def directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))


def resolve_path(path: str, sweep_dir: str, must_exist: bool = True) -> str:
    """A path named in a sweep file: absolute, or relative to the sweep file, the repo or cwd."""
    path = os.path.expanduser(str(path))
    if os.path.isabs(path):
        candidates = [path]
    else:
        candidates = [
            os.path.join(sweep_dir, path),
            os.path.join(_REPO_ROOT, path),
            os.path.abspath(path),
        ]
    candidates = list(dict.fromkeys(os.path.normpath(c) for c in candidates))
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    if must_exist:
        raise SweepError(f"{path!r} not found; looked at {candidates}")
    return os.path.abspath(candidates[-1])


def _pairs(opts: Any, where: str) -> List[Tuple[str, Any]]:
    """Overrides given as a mapping or a flat [KEY, VALUE, ...] list -> [(KEY, VALUE)]."""
    if opts is None:
        return []
    if isinstance(opts, dict):
        return [(str(k), v) for k, v in opts.items()]
    if isinstance(opts, (list, tuple)):
        if len(opts) % 2:
            raise SweepError(f"{where}: a list of overrides must alternate KEY, VALUE; got {opts}")
        return [(str(opts[i]), opts[i + 1]) for i in range(0, len(opts), 2)]
    raise SweepError(
        f"{where}: overrides must be a mapping or a [KEY, VALUE, ...] list, got {opts!r}"
    )


def load_sweep(path: str, output_root: Optional[str] = None) -> SweepSpec:
    """Reads and checks a sweep file.

    Args:
        path: the YAML file.
        output_root: replaces the file's ``output_root``.

    Returns:
        The :class:`SweepSpec`, paths made absolute.
    """
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_SPEC_KEYS))
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown}; valid keys: {list(_SPEC_KEYS)}")
    sweep_dir = os.path.dirname(os.path.abspath(path))
    name = str(raw.get("name") or Path(path).stem)
    if "base_config" not in raw:
        raise SweepError(f"{path}: 'base_config' is required")
    axes = raw.get("axes") or {}
    if not isinstance(axes, dict):
        raise SweepError(f"{path}: 'axes' must map axis names to value lists or named groups")
    for axis, values in axes.items():
        if isinstance(values, dict):
            if not values:
                raise SweepError(f"{path}: axis {axis!r} has no groups")
            for label, group in values.items():
                _parse_group(group, f"{path}: axes.{axis}.{label}", sweep_dir)
        elif not isinstance(values, list) or not values:
            raise SweepError(
                f"{path}: axis {axis!r} must be a non-empty list or a mapping of groups"
            )
    cells = raw.get("cells") or []
    if not isinstance(cells, list) or not all(isinstance(c, dict) for c in cells):
        raise SweepError(f"{path}: 'cells' must be a list of mappings")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"{path}: 'seeds' must be a non-empty list of integers or a count")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: repeated seeds {seeds}")
    launcher = raw.get("launcher", "local")
    if launcher not in LAUNCHERS:
        raise SweepError(f"{path}: launcher must be one of {LAUNCHERS}, got {launcher!r}")
    parallel = int(raw.get("parallel", 1))
    num_gpus = int(raw.get("num_gpus", 1))
    if parallel < 1 or num_gpus < 0:
        raise SweepError(f"{path}: need parallel >= 1 and num_gpus >= 0")
    slurm = raw.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise SweepError(f"{path}: 'slurm' must be a mapping")
    env = {str(k): str(v) for k, v in (raw.get("env") or {}).items()}
    default_script = _REPO_ROOT / "train_net.py"
    script = raw.get("train_script") or (
        str(default_script) if default_script.exists() else "train_net.py"
    )
    root = output_root or raw.get("output_root") or os.path.join("output", "sweeps", name)
    return SweepSpec(
        path=os.path.abspath(path),
        name=name,
        base_config=resolve_path(raw["base_config"], sweep_dir),
        output_root=os.path.abspath(os.path.expanduser(str(root))),
        axes=axes,
        cells=cells,
        seeds=seeds,
        opts=_pairs(raw.get("opts"), f"{path}: opts"),
        num_gpus=num_gpus,
        launcher=launcher,
        parallel=parallel,
        env=env,
        slurm=slurm,
        train_script=resolve_path(script, sweep_dir),
        python=str(raw.get("python") or sys.executable),
    )


def _parse_group(
    group: Any, where: str, sweep_dir: str
) -> Tuple[Optional[str], List[Tuple[str, Any]]]:
    """A named group -> (config file or None, overrides)."""
    if group is None:
        return None, []
    if not isinstance(group, dict):
        raise SweepError(f"{where}: a group is a mapping of 'config', 'opts' and/or KEY: value")
    config = resolve_path(group["config"], sweep_dir) if group.get("config") else None
    overrides = _pairs(group.get("opts"), where)
    overrides += [(k, v) for k, v in group.items() if k not in ("config", "opts")]
    return config, overrides


# ------------------------------------------------------------------------------- names, values


def format_override(value: Any) -> str:
    """A YAML value as detectron2's merge_from_list reads it (it literal_evals strings)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)):
        return repr([_plain(v) for v in value])
    raise SweepError(f"cannot pass {value!r} ({type(value).__name__}) as a config override")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    raise SweepError(f"cannot pass {value!r} ({type(value).__name__}) as a config override")


def format_label(value: Any) -> str:
    """A value as it reads in a run name or a table: compact and human."""
    if isinstance(value, (list, tuple)):
        return "-".join(format_label(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def column_name(key: str) -> str:
    """An axis or key as a column / name part: config keys lose their leading ``MODEL.``."""
    return key[len("MODEL.") :] if key.startswith("MODEL.") else key


def safe_name(text: str) -> str:
    """Folder-safe text: runs of characters other than ``A-Za-z0-9._+=~-`` become ``-``."""
    text = re.sub(r"[^A-Za-z0-9._+=~-]+", "-", text).strip("-")
    return text.lstrip(".") or "x"


def _short_hash(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _cell_name(values: Sequence[Tuple[str, str]]) -> str:
    if not values:
        return "base"
    name = "__".join(safe_name(f"{k}={v}") for k, v in values)
    if len(name) > _MAX_NAME_LENGTH:
        # Long names stay readable at the front and unique through the hash of the whole.
        name = f"{name[:_MAX_NAME_LENGTH - 9]}~{_short_hash(name)}"
    return name


# ---------------------------------------------------------------------------------- expansion


def expand_cells(spec: SweepSpec) -> List[Cell]:
    """The grid (product of the axes, first axis slowest) followed by the explicit cells.

    An explicit cell equal to a grid cell is dropped; different cells whose names read alike
    get a hash suffix (see :func:`_deduplicate`).

    Raises:
        SweepError: on an unknown group label, two groups that both set a config file, or
            overrides of OUTPUT_DIR / SEED.
    """
    cells: List[Cell] = []
    axis_names = list(spec.axes)
    # A named-group axis ranges over its labels, a key axis over its values.
    choices = [[(axis, value) for value in spec.axes[axis]] for axis in axis_names]
    for entries in itertools.product(*choices):
        cells.append(_make_cell(spec, list(entries), config=None, name=None))
    for index, explicit in enumerate(spec.cells):
        where = f"{spec.path}: cells[{index}]"
        entries = [(k, explicit[k]) for k in axis_names if k in explicit]
        entries += [
            (k, v)
            for k, v in explicit.items()
            if k not in axis_names and k not in _CELL_RESERVED_KEYS
        ]
        config = (
            resolve_path(explicit["config"], spec.directory) if explicit.get("config") else None
        )
        if config:
            entries.append(("config", Path(config).stem))
        # The cell's own opts name it too (unless it has a name), so different cells differ.
        entries += _pairs(explicit.get("opts"), where)
        cells.append(_make_cell(spec, entries, config, explicit.get("name"), where))
    return _deduplicate(cells)


def _make_cell(
    spec: SweepSpec,
    entries: List[Tuple[str, Any]],
    config: Optional[str],
    name: Optional[str],
    where: Optional[str] = None,
) -> Cell:
    """A cell from [(axis, group label) or (KEY, value) or ("config", _)] in name order.

    ``config`` is the explicit cell's own config file (its "config" entry stands for it).
    """
    where = where or spec.path
    config_file = spec.base_config
    group_config_from = None
    overrides: List[Tuple[str, Any]] = list(spec.opts)
    values = []
    for key, value in entries:
        groups = spec.axes.get(key)
        if key == "config":
            group_config = config
            overrides_here: List[Tuple[str, Any]] = []
        elif isinstance(groups, dict):
            if value not in groups:
                raise SweepError(f"{where}: {key!r} has no group {value!r}; groups: {list(groups)}")
            group_config, overrides_here = _parse_group(groups[value], where, spec.directory)
        else:
            group_config, overrides_here = None, [(key, value)]
        if group_config:
            if group_config_from is not None:
                raise SweepError(
                    f"{where}: both {group_config_from!r} and {key!r} set the config file"
                )
            group_config_from, config_file = key, group_config
        overrides += overrides_here
        values.append((column_name(key), format_label(value)))
    for key, _ in overrides:
        if key in ("OUTPUT_DIR", "SEED"):
            raise SweepError(f"{where}: {key} is set by the sweep (output_root, seeds)")
    flat = tuple(x for key, value in overrides for x in (key, format_override(value)))
    cell_name = safe_name(str(name)) if name else _cell_name(values)
    return Cell(cell_name, tuple(values), config_file, flat)


def _deduplicate(cells: List[Cell]) -> List[Cell]:
    """Drops exact repeats (an explicit cell equal to a grid cell); disambiguates name clashes."""
    unique: List[Cell] = []
    for cell in cells:
        if cell not in unique:
            unique.append(cell)
    by_name: Dict[str, List[int]] = {}
    for index, cell in enumerate(unique):
        by_name.setdefault(cell.name, []).append(index)
    for name, indices in by_name.items():
        if len(indices) > 1:
            # Two different cells whose values read alike after sanitising: the hash of what
            # each runs keeps the names stable and apart.
            for index in indices:
                cell = unique[index]
                suffix = _short_hash(cell.config_file, cell.overrides, cell.values)
                unique[index] = dataclasses.replace(cell, name=f"{name}~{suffix}")
    return unique


def expand_runs(spec: SweepSpec) -> List[Run]:
    """Every (cell, seed) run, cells outer, seeds inner."""
    return [
        Run(cell, seed, os.path.join(spec.output_root, f"{cell.name}__seed={seed}"))
        for cell in expand_cells(spec)
        for seed in spec.seeds
    ]


def train_command(spec: SweepSpec, run: Run, resume: bool = False) -> List[str]:
    """The train_net.py command of a run."""
    command = [spec.python, spec.train_script, "--config-file", run.cell.config_file]
    if spec.num_gpus > 1:
        command += ["--num-gpus", str(spec.num_gpus)]
    if resume:
        command.append("--resume")
    return (
        command + ["OUTPUT_DIR", run.output_dir, "SEED", str(run.seed)] + list(run.cell.overrides)
    )


# ------------------------------------------------------------------------------------- states


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """A JSON file's content, or None when missing or unreadable (e.g. half written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: str, content: Dict[str, Any]) -> None:
    """Readers (another sweep, a report) never see a half-written file."""
    temporary = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
    with open(temporary, "w") as f:
        json.dump(content, f, indent=1, default=str)
    os.replace(temporary, path)


def read_metrics(output_dir: str) -> List[Dict[str, Any]]:
    """The records of a run's metrics.json (detectron2's JSONWriter: one JSON object a line)."""
    records = []
    try:
        with open(os.path.join(output_dir, "metrics.json")) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a kill
    except OSError:
        pass
    return records


def evaluation_records(records: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records that hold an evaluation (a "segm/AP" or "bbox/AP" key)."""
    return [r for r in records if any(_EVAL_KEY.match(k) for k in r)]


def _run_config(output_dir: str) -> Dict[str, Any]:
    """The config train_net.py wrote into the run folder (empty when absent)."""
    try:
        with open(os.path.join(output_dir, "config.yaml")) as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}


def is_finished(output_dir: str) -> bool:
    """model_final.pth exists and so does the final evaluation (when the config evaluates).

    detectron2 writes model_final.pth before the final evaluation, so a run killed while
    evaluating has the weights but not the numbers; ``--resume`` then only evaluates.
    """
    if not os.path.exists(os.path.join(output_dir, "model_final.pth")):
        return False
    config = _run_config(output_dir)
    if config and not (config.get("DATASETS") or {}).get("TEST"):
        return True  # nothing to evaluate on
    evaluations = evaluation_records(read_metrics(output_dir))
    if not evaluations:
        return False
    max_iter = (config.get("SOLVER") or {}).get("MAX_ITER")
    # The final evaluation is logged at iteration MAX_ITER (periodic ones at k * period - 1).
    return max_iter is None or evaluations[-1].get("iteration", -1) >= max_iter - 1


def has_checkpoint(output_dir: str) -> bool:
    """Something for ``--resume`` to load."""
    return any(
        os.path.exists(os.path.join(output_dir, f)) for f in ("last_checkpoint", "model_final.pth")
    )


_SQUEUE_CACHE: Dict[str, Any] = {"time": 0.0, "jobs": set()}


def slurm_queue(max_age_s: float = 10.0) -> set:
    """Ids of this user's Slurm jobs in the queue (array tasks as "<job>_<task>"); empty where
    there is no Slurm. Cached for ``max_age_s``: progress polls ask often."""
    if time.time() - _SQUEUE_CACHE["time"] > max_age_s:
        jobs: set = set()
        try:
            user = os.environ.get("USER") or ""
            output = subprocess.run(
                ["squeue", "-h", "-r", "-o", "%i"] + (["-u", user] if user else []),
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
            jobs = {line.strip() for line in output.splitlines() if line.strip()}
        except (OSError, subprocess.SubprocessError):
            pass
        _SQUEUE_CACHE.update(time=time.time(), jobs=jobs)
    return _SQUEUE_CACHE["jobs"]


def run_state(output_dir: str, now: Optional[float] = None) -> str:
    """One of DONE, RUNNING, QUEUED, FAILED, INTERRUPTED, PENDING, from the run folder alone.

    RUNNING: its status file has a fresh heartbeat; QUEUED: a Slurm job submitted for it is
    still in the queue. Both mean that someone else is on it.
    """
    if is_finished(output_dir):
        return DONE
    status = read_json(os.path.join(output_dir, STATUS_FILE)) or {}
    now = time.time() if now is None else now
    if status.get("state") == RUNNING and now - float(status.get("heartbeat", 0)) < STALE_AFTER_S:
        return RUNNING
    if status.get("state") == QUEUED and str(status.get("job_id")) in slurm_queue():
        return QUEUED
    if status.get("state") == FAILED:
        return FAILED
    if has_checkpoint(output_dir):
        return INTERRUPTED
    return PENDING


def _log_tail(path: str, lines: int = LOG_TAIL_LINES) -> List[str]:
    """The last lines of a (possibly large) log file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 256 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


# ------------------------------------------------------------------------------ executing runs


@dataclasses.dataclass
class RunTask:
    """What a worker (thread, submitit job) needs to execute one run; picklable.

    ``--resume`` is decided when the run starts, from the files then on disk, so a requeued or
    retried job resumes from whatever its predecessor saved.
    """

    name: str
    output_dir: str
    command_head: List[str]  # python train_net.py --config-file C [--num-gpus n]
    command_tail: List[str]  # OUTPUT_DIR ... SEED ... overrides
    env: Dict[str, str] = dataclasses.field(default_factory=dict)

    def command(self, resume: bool) -> List[str]:
        return self.command_head + (["--resume"] if resume else []) + self.command_tail


def make_task(spec: SweepSpec, run: Run, env: Optional[Dict[str, str]] = None) -> RunTask:
    full = train_command(spec, run)
    split = full.index("OUTPUT_DIR")
    return RunTask(
        run.name, run.output_dir, full[:split], full[split:], {**spec.env, **(env or {})}
    )


# Processes started by execute_run in this process (to stop them on Ctrl-C or a Slurm timeout).
_ACTIVE: Dict[str, subprocess.Popen] = {}
_ACTIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()


def execute_run(
    task: RunTask, extra_env: Optional[Dict[str, str]] = None, job_id: Optional[str] = None
) -> Dict[str, Any]:
    """Runs one train_net.py to completion and records the outcome in its status file.

    Never raises for a failing training: the return code and the log tail go into
    ``<output_dir>/sweep_run.json`` (state "done", "failed" or "interrupted").

    Args:
        task: the run.
        extra_env: environment on top of os.environ and ``task.env`` (threads, GPUs).
        job_id: the submitit job running it, if any (recorded).

    Returns:
        The final status dict.
    """
    os.makedirs(task.output_dir, exist_ok=True)
    status_path = os.path.join(task.output_dir, STATUS_FILE)
    log_path = os.path.join(task.output_dir, RUN_LOG_FILE)
    previous = read_json(status_path) or {}
    resume = has_checkpoint(task.output_dir)
    command = task.command(resume)
    env = {**os.environ, **task.env, **(extra_env or {})}
    started = time.time()
    status = {
        "name": task.name,
        "state": RUNNING,
        "command": shlex.join(command),
        "resumed": resume,
        "attempt": int(previous.get("attempt", 0)) + 1,
        "started": started,
        "heartbeat": started,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job_id": job_id,
        "previous_duration_s": float(previous.get("total_duration_s", 0.0)),
    }
    _write_json_atomic(status_path, status)
    with open(log_path, "a") as log:
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        log.write(f"\n===== sweep: attempt {status['attempt']} at {stamp}: {status['command']}\n")
        log.flush()
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        except OSError as error:
            log.write(f"could not start: {error}\n")
            process = None
        if process is not None:
            with _ACTIVE_LOCK:
                _ACTIVE[task.name] = process
            try:
                while True:
                    try:
                        process.wait(timeout=HEARTBEAT_S)
                        break
                    except subprocess.TimeoutExpired:
                        status["heartbeat"] = time.time()
                        _write_json_atomic(status_path, status)
            finally:
                with _ACTIVE_LOCK:
                    _ACTIVE.pop(task.name, None)
    returncode = process.returncode if process is not None else -1
    ended = time.time()
    if returncode == 0 and is_finished(task.output_dir):
        state = DONE
    elif _STOPPING.is_set():
        state = INTERRUPTED  # stopped by the sweep (Ctrl-C, timeout): resumable, not broken
    else:
        state = FAILED
    status.update(
        state=state,
        returncode=returncode,
        ended=ended,
        duration_s=ended - started,
        total_duration_s=status.pop("previous_duration_s") + ended - started,
        heartbeat=ended,
        log_tail=_log_tail(log_path),
    )
    if returncode == 0 and state == FAILED:
        status["error"] = "exited 0 without model_final.pth and a final evaluation"
    _write_json_atomic(status_path, status)
    return status


def stop_active_runs(timeout: float = 60.0) -> None:
    """SIGTERM to every running training (train_net.py then saves a checkpoint) and wait."""
    _STOPPING.set()
    with _ACTIVE_LOCK:
        processes = list(_ACTIVE.values())
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.time() + timeout
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()


try:
    import submitit

    class SubmititRun(submitit.helpers.Checkpointable):
        """A submitit job executing one run; requeued (and then resumed) on a Slurm timeout."""

        def __init__(self, task: RunTask):
            self.task = task

        def __call__(self) -> Dict[str, Any]:
            return execute_run(self.task, job_id=str(submitit.JobEnvironment().job_id))

        def checkpoint(self, *args, **kwargs):
            # The job is about to be killed: let train_net.py save a checkpoint, then requeue;
            # the requeued job finds it and runs with --resume.
            stop_active_runs(timeout=60.0)
            return submitit.helpers.DelayedSubmission(SubmititRun(self.task))

except ImportError:  # submitit is needed only by the slurm / submitit-local launchers
    submitit = None
    SubmititRun = None


# ---------------------------------------------------------------------------------- launchers


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _visible_gpus() -> List[str]:
    """GPU ids this process may use (CUDA_VISIBLE_DEVICES, else all that torch sees)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [x for x in visible.split(",") if x.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


class LocalLauncher:
    """Runs tasks as subprocesses of this process, ``parallel`` at a time.

    Each run gets OMP_NUM_THREADS = max(1, cores // parallel) so parallel runs on a CPU do not
    oversubscribe it, and, when there are enough GPUs, its own ``num_gpus`` of them.
    """

    kind = "local"

    def __init__(self, parallel: int, num_gpus: int = 1):
        self.parallel = parallel
        threads = str(max(1, available_cores() // parallel))
        self.base_env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        gpus = _visible_gpus() if parallel > 1 and num_gpus > 0 else []
        self.slots: "queue.Queue[Dict[str, str]]" = queue.Queue()
        if len(gpus) >= parallel * num_gpus:
            for slot in range(parallel):
                devices = ",".join(gpus[slot * num_gpus : (slot + 1) * num_gpus])
                self.slots.put({"CUDA_VISIBLE_DEVICES": devices})
        else:
            for _ in range(parallel):
                self.slots.put({})
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=parallel, thread_name_prefix="sweep"
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


def slurm_parameters(spec: SweepSpec) -> Dict[str, Any]:
    """The sweep's ``slurm:`` settings as submitit AutoExecutor parameters."""
    params: Dict[str, Any] = {
        "name": spec.name,
        "timeout_min": 720,
        "gpus_per_node": spec.num_gpus,
        "nodes": 1,
        "tasks_per_node": 1,
        "slurm_array_parallelism": spec.parallel,
    }
    for key, value in spec.slurm.items():
        target = _SLURM_ALIASES.get(key)
        if target is None and key in _GENERIC_SUBMITIT_KEYS:
            target = key
        if target is None and key.startswith("slurm_"):
            target = key
        if target is None and submitit is not None:
            if key in submitit.SlurmExecutor._valid_parameters():
                target = f"slurm_{key}"
        if target is None:
            raise SweepError(
                f"{spec.path}: unknown slurm setting {key!r}; use {sorted(_SLURM_ALIASES)}, "
                f"{list(_GENERIC_SUBMITIT_KEYS)} or a submitit slurm_* parameter"
            )
        if target == "timeout_min":
            value = _minutes(value)
        elif target == "mem_gb" and isinstance(value, str):
            value = int(re.sub(r"[gG][bB]?$", "", value))
        params[target] = value
    return params


def _minutes(value: Any) -> int:
    """Slurm time: minutes, "HH:MM:SS", "MM:SS" or "D-HH:MM:SS" -> minutes."""
    if isinstance(value, (int, float)):
        return int(math.ceil(value))
    days, _, clock = str(value).rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return int((int(days or 0) * 24 + hours) * 60 + minutes + math.ceil(seconds / 60))


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
        if local:
            self.executor = submitit.LocalExecutor(folder=folder)
            self.executor.update_parameters(
                timeout_min=params["timeout_min"], gpus_per_node=params["gpus_per_node"]
            )
            # Local jobs all start at once: throttle them here instead of through Slurm.
            self.max_in_flight = spec.parallel
            threads = str(max(1, available_cores() // spec.parallel))
            self.env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        else:
            self.executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
            self.executor.update_parameters(**params)
            self.max_in_flight = None  # slurm_array_parallelism throttles the array
            self.env = {}

    def submit(self, tasks: List[RunTask]) -> List[Any]:
        runs = [SubmititRun(dataclasses.replace(t, env={**self.env, **t.env})) for t in tasks]
        submitted = time.time()
        if len(runs) > 1 and self.kind == "slurm":
            with self.executor.batch():
                jobs = [self.executor.submit(run) for run in runs]
        else:
            jobs = [self.executor.submit(run) for run in runs]
        for task, job in zip(tasks, jobs):
            print(f"[sweep] submitted {task.name} as job {job.job_id}", flush=True)
            if self.kind == "slurm":
                mark_queued(task.output_dir, str(job.job_id), submitted)
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


def mark_queued(output_dir: str, job_id: str, submitted: Optional[float] = None) -> None:
    """Records a submitted Slurm job in the run's status file, so that a rerun of the sweep
    while it waits in the queue does not submit the run again.

    Args:
        output_dir: the run folder.
        job_id: the Slurm job (array task) id.
        submitted: when it was submitted (now by default); a run started since then owns the
            status file and keeps it.
    """
    submitted = time.time() if submitted is None else submitted
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, STATUS_FILE)
    status = read_json(path) or {}
    if float(status.get("started", 0)) >= submitted:
        return
    status.update(state=QUEUED, job_id=job_id, submitted=submitted)
    _write_json_atomic(path, status)


def make_launcher(spec: SweepSpec, kind: str):
    if kind == "local":
        return LocalLauncher(spec.parallel, spec.num_gpus)
    if kind in ("slurm", "submitit-local"):
        return SubmititLauncher(spec, local=kind == "submitit-local")
    raise SweepError(f"unknown launcher {kind!r}; choose from {LAUNCHERS}")


# ----------------------------------------------------------------------------------- progress


def _format_seconds(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(round(seconds))))


class Progress:
    """Counts of run states, an ETA from finished runs' durations, sweep_status.json."""

    def __init__(self, spec: SweepSpec, runs: List[Run], parallel: int, stream=None):
        """
        Args:
            spec: the sweep.
            runs: all its runs (also those not launched now).
            parallel: runs at a time, for the ETA.
            stream: where progress lines go (stdout).
        """
        self.spec = spec
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
            return run_state(run.output_dir, now)
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
                else run_state(run.output_dir, now)
            )
        return state if state in STATES else run_state(run.output_dir, now)

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
                changes.append(f"{run.name}: {state}{detail} after {_format_seconds(duration)}")
            else:
                changes.append(f"{run.name}: {state}")
        return changes

    def counts(self) -> Dict[str, int]:
        counts = {state: 0 for state in (DONE, RUNNING, FAILED, PENDING)}
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
            f"done {c[DONE]}, running {c[RUNNING]}, failed {c[FAILED]}, pending {c[PENDING]} "
            f"of {len(self.runs)} | ETA {_format_seconds(self.eta_seconds())}"
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
        _write_json_atomic(
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


# --------------------------------------------------------------------------------------- main


def plan(runs: List[Run], retry_failed: bool = True) -> Tuple[List[Run], Dict[str, str]]:
    """Which runs to launch now, and the state of each run at the start.

    Done runs and runs alive elsewhere are left alone; failed ones are retried only with
    ``retry_failed``; interrupted ones are relaunched (with --resume, decided at start).
    """
    states = {run.name: run_state(run.output_dir) for run in runs}
    launch = [
        run
        for run in runs
        if states[run.name] in (PENDING, INTERRUPTED)
        or (retry_failed and states[run.name] == FAILED)
    ]
    return launch, states


def run_sweep(
    spec: SweepSpec,
    runs: List[Run],
    launcher_kind: str,
    retry_failed: bool = True,
    poll_s: Optional[float] = None,
    stream=None,
) -> Dict[str, int]:
    """Launches the runs that need it and follows them to the end.

    Args:
        spec: the sweep.
        runs: the runs to consider (done ones are skipped).
        launcher_kind: "local", "slurm" or "submitit-local".
        retry_failed: relaunch failed runs.
        poll_s: longest wait between two looks at the runs (default 1 s, Slurm 15 s).
        stream: where progress lines go (stdout).

    Returns:
        The final counts of run states.
    """
    stream = stream or sys.stdout
    to_launch, initial = plan(runs, retry_failed)
    print(
        f"[sweep] {spec.name}: {len(runs)} runs in {spec.output_root}; "
        f"launching {len(to_launch)} with the {launcher_kind} launcher "
        f"(skipping {sum(s == DONE for s in initial.values())} done, "
        f"{sum(s in (RUNNING, QUEUED) for s in initial.values())} running or queued elsewhere"
        + ("" if retry_failed else f", {sum(s == FAILED for s in initial.values())} failed")
        + ")",
        file=stream,
        flush=True,
    )
    progress = Progress(spec, runs, spec.parallel, stream)
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
        status_path = os.path.join(task.output_dir, STATUS_FILE)
        status = read_json(status_path) or {"name": task.name}
        if status.get("state") in (None, QUEUED, RUNNING):
            os.makedirs(task.output_dir, exist_ok=True)
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
            _write_json_atomic(status_path, status)


def print_dry_run(spec: SweepSpec, runs: List[Run], retry_failed: bool, stream=None) -> None:
    stream = stream or sys.stdout
    cells = {run.cell.name for run in runs}
    print(
        f"# {spec.name}: {len(cells)} cells x {len(spec.seeds)} seeds = {len(runs)} runs "
        f"in {spec.output_root} ({spec.launcher} launcher, parallel {spec.parallel})",
        file=stream,
    )
    to_launch, states = plan(runs, retry_failed)
    launching = {run.name for run in to_launch}
    for run in runs:
        state = states[run.name]
        action = "run" if run.name in launching else "skip"
        print(f"[{state}, {action}] {run.name}", file=stream)
        if run.name in launching:
            command = train_command(spec, run, resume=has_checkpoint(run.output_dir))
            print(f"    {shlex.join(command)}", file=stream)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m masklab_d2.tools.sweep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sweep_file", help="the sweep YAML")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the runs and commands, run nothing"
    )
    parser.add_argument(
        "--report", action="store_true", help="only write results.csv / results.md / plots"
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
        print_dry_run(spec, runs, not args.no_retry_failed)
        return 0
    if args.report:
        from masklab_d2.tools.sweep_report import write_report

        for path in write_report(spec, runs).values():
            print(f"[sweep] wrote {path}")
        return 0
    if threading.current_thread() is threading.main_thread():
        # A scheduler's SIGTERM stops the runs as Ctrl-C does (they save checkpoints).
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    _STOPPING.clear()
    try:
        counts = run_sweep(spec, runs, launcher, retry_failed=not args.no_retry_failed)
    except KeyboardInterrupt:
        print(
            f"[sweep] stopped; rerun `python -m masklab_d2.tools.sweep {args.sweep_file}` to resume"
        )
        return 130
    if not args.no_report:
        from masklab_d2.tools.sweep_report import write_report

        for path in write_report(spec, runs).values():
            print(f"[sweep] wrote {path}")
    if counts[FAILED]:
        failed = [run for run in runs if run_state(run.output_dir) == FAILED]
        for run in failed:
            print(f"[sweep] FAILED {run.name}: see {os.path.join(run.output_dir, STATUS_FILE)}")
    return 1 if counts[FAILED] else 0


if __name__ == "__main__":
    # Run the importable module, not __main__: submitit pickles SubmititRun by reference.
    from masklab_d2.tools import sweep as _sweep

    try:
        sys.exit(_sweep.main())
    except _sweep.SweepError as error:
        sys.exit(f"sweep: {error}")
