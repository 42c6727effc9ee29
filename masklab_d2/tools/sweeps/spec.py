"""Sweep files: the schema, parsing, run names and the expansion of the grid into runs.

The format is described in :mod:`masklab_d2.tools.sweep`. Nothing here touches a run folder,
knows train_net.py's command line (:mod:`.commands`) or Slurm (:mod:`.slurm`).
"""

import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

LAUNCHERS = ("local", "slurm", "submitit-local")
_CELL_RESERVED_KEYS = ("name", "config", "opts", "seeds")
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
    "table",
    "baseline",
)
_MAX_NAME_LENGTH = 120
REPO_ROOT = Path(__file__).resolve().parents[3]


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
        seeds: an explicit cell's own seeds; None: the sweep's.
    """

    name: str
    values: Tuple[Tuple[str, str], ...]
    config_file: str
    overrides: Tuple[str, ...]
    seeds: Optional[Tuple[int, ...]] = None


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
    table: List[str] = dataclasses.field(default_factory=list)
    baseline: Dict[str, str] = dataclasses.field(default_factory=dict)

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
            os.path.join(REPO_ROOT, path),
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
    seeds = parse_seeds(raw.get("seeds", [0]), path)
    # Checked once here; the cells keep the parsed list (a count becomes its seeds).
    cells = [
        (
            dict(cell, seeds=parse_seeds(cell["seeds"], f"{path}: cells[{index}]"))
            if "seeds" in cell
            else cell
        )
        for index, cell in enumerate(cells)
    ]
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
    default_script = REPO_ROOT / "train_net.py"
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
        table=_table_metrics(raw.get("table"), path),
        baseline=_baseline(raw.get("baseline"), axes, path),
    )


def _baseline(baseline: Any, axes: Dict[str, Any], where: str) -> Dict[str, str]:
    """``baseline``: {axis: label or value} of the cell the others are compared with, as the
    table's {column: label}; {} = no comparison (see :mod:`masklab_d2.tools.sweeps.stats`)."""
    if not baseline:
        return {}
    if not isinstance(baseline, dict):
        raise SweepError(f"{where}: 'baseline' must map axes to labels, e.g. {{head: mask_rcnn}}")
    for axis, label in baseline.items():
        if axis not in axes:
            raise SweepError(f"{where}: baseline axis {axis!r} is not an axis ({list(axes)})")
        if label not in axes[axis]:
            raise SweepError(f"{where}: baseline {axis}: {label!r} is not among {list(axes[axis])}")
    return {column_name(axis): format_label(label) for axis, label in baseline.items()}


def _table_metrics(table: Any, where: str) -> List[str]:
    """``table``: the metrics.json keys of results.md's columns (e.g. "segm/AP75"); [] = default."""
    if table is None:
        return []
    if not isinstance(table, list) or not all(isinstance(k, str) and "/" in k for k in table):
        raise SweepError(f"{where}: 'table' must be a list of metric keys such as segm/AP75")
    return list(table)


def parse_seeds(seeds: Any, where: str) -> List[int]:
    """``seeds``: a list of distinct integers, or a count n (= [0, ..., n-1])."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"{where}: 'seeds' must be a non-empty list of integers or a count")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: repeated seeds {seeds}")
    return seeds


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


def cell_name(values: Sequence[Tuple[str, str]]) -> str:
    if not values:
        return "base"
    name = "__".join(safe_name(f"{k}={v}") for k, v in values)
    if len(name) > _MAX_NAME_LENGTH:
        # Long names stay readable at the front and unique through the hash of the whole.
        name = f"{name[:_MAX_NAME_LENGTH - 9]}~{_short_hash(name)}"
    return name


# ---------------------------------------------------------------------------------- expansion


def expand_cells(spec: SweepSpec) -> List[Cell]:
    """The grid (product of the axes, first axis slowest) followed by the explicit cells; a
    sweep without axes has the base config as its one grid cell only when it lists no cells.

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
    # No axes: the grid is the base config alone, unless explicit cells say what to run.
    grid = itertools.product(*choices) if axis_names or not spec.cells else []
    for entries in grid:
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
        cell = _make_cell(spec, entries, config, explicit.get("name"), where)
        if "seeds" in explicit:
            cell = dataclasses.replace(cell, seeds=tuple(explicit["seeds"]))
        cells.append(cell)
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
    name = safe_name(str(name)) if name else cell_name(values)
    return Cell(name, tuple(values), config_file, flat)


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
    """Every (cell, seed) run, in launch order: a cell's seeds in order, seed by seed across
    the cells (each cell's first seed, then each cell's second, ...), so a sweep stopped part
    way has every cell measured once before any is measured twice."""
    cells = expand_cells(spec)
    seeds_of = [list(cell.seeds) if cell.seeds is not None else list(spec.seeds) for cell in cells]
    rounds = max(len(seeds) for seeds in seeds_of) if cells else 0
    return [
        Run(cell, seeds[index], os.path.join(spec.output_root, f"{cell.name}__seed={seeds[index]}"))
        for index in range(rounds)
        for cell, seeds in zip(cells, seeds_of)
        if index < len(seeds)
    ]
