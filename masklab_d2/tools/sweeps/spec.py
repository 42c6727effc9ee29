"""Sweep files (format: docs/sweeps.md): parsing, run names and the expansion into runs."""

import collections
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
_MAX_NAME_LENGTH = 120
REPO_ROOT = Path(__file__).resolve().parents[3]


class SweepError(ValueError):
    """An invalid sweep file."""


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
    """A parsed sweep file; its fields but ``path`` are the file's keys."""

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
    pair_over: List[str] = dataclasses.field(default_factory=list)

    @property
    def directory(self) -> str:
        return os.path.dirname(os.path.abspath(self.path))


def resolve_path(path: str, sweep_dir: str) -> str:
    """A path named in a sweep file: absolute, or relative to the sweep file, the repo or cwd."""
    path = os.path.expanduser(str(path))
    bases = [""] if os.path.isabs(path) else [sweep_dir, str(REPO_ROOT), os.getcwd()]
    candidates = list(dict.fromkeys(os.path.normpath(os.path.join(b, path)) for b in bases))
    for candidate in candidates:
        if os.path.exists(candidate):
            return os.path.abspath(candidate)
    raise SweepError(f"{path!r} not found; looked at {candidates}")


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
    """Reads and checks a sweep file; ``output_root`` replaces the file's. Paths made absolute."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep file is a mapping, got {type(raw).__name__}")
    keys = [field.name for field in dataclasses.fields(SweepSpec) if field.name != "path"]
    unknown = sorted(set(raw) - set(keys))
    if unknown:
        raise SweepError(f"{path}: unknown keys {unknown}; valid keys: {keys}")
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
    for index, cell in enumerate(cells):  # checked once; a count becomes its seeds
        if "seeds" in cell:
            cells[index] = dict(cell, seeds=parse_seeds(cell["seeds"], f"{path}: cells[{index}]"))
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
        pair_over=_pair_over(raw.get("pair_over"), axes, raw.get("baseline") or {}, path),
    )


def _pair_over(pair_over: Any, axes: Dict[str, Any], baseline: Any, where: str) -> List[str]:
    """``pair_over``: axes whose values replicate a cell as seeds do (e.g. the frozen detector),
    as table columns; the report pools their runs into one cell and pairs by (value, seed)."""
    pair_over = pair_over or []
    if not isinstance(pair_over, list):
        raise SweepError(f"{where}: 'pair_over' must be a list of axes, e.g. [detector]")
    for axis in pair_over:
        if axis not in axes:
            raise SweepError(f"{where}: pair_over axis {axis!r} is not an axis ({list(axes)})")
        if isinstance(baseline, dict) and axis in baseline:
            raise SweepError(f"{where}: axis {axis!r} cannot be both baseline and pair_over")
    return [column_name(axis) for axis in pair_over]


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


def format_override(value: Any) -> str:
    """A YAML value as detectron2's merge_from_list reads it (it literal_evals strings)."""
    value = _plain(value)
    return value if isinstance(value, str) else repr(value)


def _plain(value: Any) -> Any:
    """The value with tuples as lists; SweepError for what a command line cannot carry."""
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
    return key.removeprefix("MODEL.")


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


def expand_cells(spec: SweepSpec) -> List[Cell]:
    """The grid (product of the axes, first axis slowest) followed by the explicit cells
    (:func:`_deduplicate`d); without axes, the base config is the one grid cell unless there are
    explicit cells. SweepError on an unknown group label, two groups that both set a config file,
    or overrides of OUTPUT_DIR / SEED."""
    axis_names = list(spec.axes)
    # A named-group axis ranges over its labels, a key axis over its values.
    choices = [[(axis, value) for value in spec.axes[axis]] for axis in axis_names]
    # No axes: the grid is the base config alone, unless explicit cells say what to run.
    grid = itertools.product(*choices) if axis_names or not spec.cells else []
    cells = [_make_cell(spec, list(entries), None, None, spec.path) for entries in grid]
    for index, explicit in enumerate(spec.cells):
        where = f"{spec.path}: cells[{index}]"
        entries = [(k, explicit[k]) for k in axis_names if k in explicit]
        reserved = axis_names + list(_CELL_RESERVED_KEYS)
        entries += [(k, v) for k, v in explicit.items() if k not in reserved]
        config = explicit.get("config") and resolve_path(explicit["config"], spec.directory)
        if config:
            entries.append(("config", Path(config).stem))
        # The cell's own opts name it too (unless it has a name), so different cells differ.
        entries += _pairs(explicit.get("opts"), where)
        cell = _make_cell(spec, entries, config, explicit.get("name"), where)
        seeds = tuple(explicit["seeds"]) if "seeds" in explicit else None
        cells.append(dataclasses.replace(cell, seeds=seeds))
    return _deduplicate(cells)


def _make_cell(
    spec: SweepSpec,
    entries: List[Tuple[str, Any]],
    config: Optional[str],
    name: Optional[str],
    where: str,
) -> Cell:
    """A cell from [(axis, group label) or (KEY, value) or ("config", _)] in name order; the
    "config" entry stands for ``config``, an explicit cell's own config file."""
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
    """Drops exact repeats (an explicit cell equal to a grid cell); different cells whose names
    read alike after sanitising get the hash of what each runs, to keep them stable and apart."""
    unique = list(dict.fromkeys(cells))
    names = collections.Counter(cell.name for cell in unique)
    for index, cell in enumerate(unique):
        if names[cell.name] > 1:
            suffix = _short_hash(cell.config_file, cell.overrides, cell.values)
            unique[index] = dataclasses.replace(cell, name=f"{cell.name}~{suffix}")
    return unique


def expand_runs(spec: SweepSpec) -> List[Run]:
    """Every (cell, seed) run in launch order: seed by seed across the cells (each cell's first
    seed, then each cell's second, ...), so a sweep stopped part way measured every cell once."""
    per_cell = [
        [
            Run(cell, seed, os.path.join(spec.output_root, f"{cell.name}__seed={seed}"))
            for seed in cell.seeds or spec.seeds
        ]
        for cell in expand_cells(spec)
    ]
    return [run for runs in itertools.zip_longest(*per_cell) for run in runs if run is not None]
