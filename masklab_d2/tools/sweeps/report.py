"""A sweep's report (``--report``): results.csv, results.md, paired.csv and plots, described in
docs/sweeps.md."""

import csv
import datetime
import math
import os
import re
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure  # files only: no pyplot, no display
from tabulate import tabulate

from masklab_d2.tools.sweeps.fingerprint import fingerprints_of
from masklab_d2.tools.sweeps.spec import Run, SweepSpec, cell_name, column_name
from masklab_d2.tools.sweeps.state import (
    DONE,
    evaluation_records,
    read_metrics,
    read_status,
    run_config,
    run_state,
)
from masklab_d2.tools.sweeps.stats import compare_cells, write_comparisons

MASK, BOUNDARY = "segm/", "boundary/"


def _header(key: str) -> str:
    """A metric's column header: "segm/AP50" -> "mask AP50", "segm/seen/AP" -> "seen AP",
    "boundary/seen/AP" -> "seen boundary AP", "bbox/AP" -> "box AP"."""
    kind, *group, metric = key.split("/")
    name = {"bbox": "box", "segm": "mask", "boundary": "boundary"}[kind]
    if not group:
        return f"{name} {metric}"
    return f"{group[0]} {metric}" if kind == "segm" else f"{group[0]} {name} {metric}"


_MASK_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # all classes, then by class group
_MASK_METRICS += ("seen/AP", "seen/AP50", "unseen/AP", "unseen/AP50", "voc/AP", "nonvoc/AP")
# results.csv's metrics.json keys, in column order: box AP, then each mask metric followed by its
# Boundary AP twin.
CSV_METRICS = ("bbox/AP", "bbox/AP50", "bbox/AP75") + tuple(
    kind + metric for metric in _MASK_METRICS for kind in (MASK, BOUNDARY)
)
TABLE_METRICS = ("bbox/AP", "segm/AP", "segm/AP50", "segm/AP75", "segm/seen/AP", "segm/unseen/AP")
# Not a metric of metrics.json: training seconds per iteration, from the log (see summarize).
SECONDS_PER_ITERATION = "s/iter"
HEADERS = dict({key: _header(key) for key in CSV_METRICS}, **{SECONDS_PER_ITERATION: "s / iter"})
_MISSING = "—"
_NOT_REPORTED = "n/a"
_TRAINING_TIME = re.compile(r"Total training time: (?:(\d+) days?, )?(\d+):(\d+):(\d+)")


def primary_metrics(
    records: Sequence[Dict[str, Any]], datasets: Sequence[str] = ()
) -> List[Dict[str, Any]]:
    """The records with one test set's metrics under plain keys ("segm/AP"): with several test
    sets detectron2 prefixes them ("coco_val/segm/AP"); the first of ``datasets`` is shown."""
    prefixes = [k.split("/")[0] for r in records for k in r if re.match(r"[^/]+/(segm|bbox)/", k)]
    if not prefixes or any(k.startswith(("segm/", "bbox/")) for r in records for k in r):
        return list(records)
    primary = next((d for d in datasets if d in prefixes), prefixes[0]) + "/"
    return [{k.removeprefix(primary): v for k, v in r.items()} for r in records]


def training_time_s(output_dir: str) -> Optional[float]:
    """detectron2's "Total training time" from the run's log.txt, summed over the segments of a
    resumed run (each logs its own; log.txt is appended to)."""
    try:
        with open(os.path.join(output_dir, "log.txt"), errors="replace") as f:
            matches = _TRAINING_TIME.findall(f.read())
    except OSError:
        return None
    if not matches:
        return None
    return sum(
        ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)
        for days, hours, minutes, seconds in matches
    )


def collect(runs: Sequence[Run], fingerprints: Dict[str, Dict[str, str]]) -> List[Dict[str, Any]]:
    """Per run: name, cell, seed, state, axis values, iteration, times, final metrics, curve; runs
    not of their ``fingerprints`` are "stale" (and stay out of the means)."""
    rows = []
    for run in runs:
        datasets = (run_config(run.output_dir).get("DATASETS") or {}).get("TEST") or ()
        records = primary_metrics(read_metrics(run.output_dir), datasets)
        # The final evaluation: the last record with mask AP, else with box AP.
        final = next((r for k in ("segm/AP", "bbox/AP") for r in reversed(records) if k in r), {})
        status = read_status(run.output_dir)
        evaluations = evaluation_records(records)
        rows.append(
            {
                "run": run.name,
                "cell": run.cell.name,
                "seed": run.seed,
                "state": run_state(run.output_dir, None, fingerprints.get(run.name), False),
                "values": dict(run.cell.values),
                "iteration": final.get("iteration"),
                "train_time_s": training_time_s(run.output_dir),
                "wall_time_s": status.get("total_duration_s"),
                "metrics": {k: v for k, v in final.items() if "/" in k and _finite(v)},
                "curve": _curve(evaluations, "segm/AP"),
                "boundary_curve": _curve(evaluations, "boundary/AP"),
            }
        )
    return rows


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _curve(records: Sequence[Dict[str, Any]], key: str) -> List[Tuple[int, float]]:
    return [
        (int(r["iteration"]), float(r[key]))
        for r in records
        if key in r and "iteration" in r and _finite(r[key])
    ]


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    if len(values) > 1:
        return statistics.mean(values), statistics.stdev(values)
    return values[0], 0.0


def pool_replicates(
    rows: Sequence[Dict[str, Any]], columns: Sequence[str], pair_over: Sequence[str]
) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Rows and table columns with the ``pair_over`` axes (a sweep's replicate axes) folded into
    the seed: a row's cell loses their values (and its name their ``column=value`` parts), its
    "seed" becomes (their values..., seed), the pairing key of :mod:`.stats`."""
    if not pair_over:
        return list(rows), list(columns)
    pooled = []
    for row in rows:
        replicate = tuple(row["values"].get(c, "") for c in pair_over)
        dropped = {f"{c}={v}" for c, v in zip(pair_over, replicate)}
        cell = "__".join(p for p in row["cell"].split("__") if p not in dropped)
        values = {k: v for k, v in row["values"].items() if k not in pair_over}
        pooled.append({**row, "cell": cell, "values": values, "seed": (*replicate, row["seed"])})
    return pooled, [c for c in columns if c not in pair_over]


def summarize(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per cell (in sweep order): its values, seeds, states and {metric: (mean, std, n)} over
    the finished runs."""
    cells: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        cell = cells.setdefault(
            row["cell"], {"cell": row["cell"], "values": row["values"], "rows": [], "states": {}}
        )
        cell["rows"].append(row)
        cell["states"][row["state"]] = cell["states"].get(row["state"], 0) + 1
    for cell in cells.values():
        finished = [r for r in cell["rows"] if r["state"] == DONE]
        cell["done"], cell["seeds"] = len(finished), len(cell["rows"])
        # Every metric of the finished runs, so that a sweep's `table` may name any of them.
        samples = {
            key: [r["metrics"][key] for r in finished if key in r["metrics"]]
            for key in dict.fromkeys(k for r in finished for k in r["metrics"])
        }
        samples[SECONDS_PER_ITERATION] = [
            r["train_time_s"] / r["iteration"]
            for r in finished
            if r["train_time_s"] and r["iteration"]
        ]
        cell["stats"] = {key: (*_mean_std(v), len(v)) for key, v in samples.items() if v}
    return list(cells.values())


def write_csv(path: str, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> None:
    reported = {k for r in rows for k in r["metrics"]}
    # A Boundary AP column wherever its mask twin has one, blank for runs that predate it.
    metric_keys = [
        k
        for k in CSV_METRICS
        if k in reported or (k.startswith(BOUNDARY) and MASK + k[len(BOUNDARY) :] in reported)
    ]
    header = ["run", "cell", "seed", "state", *columns, "iteration", "train_time_s", "wall_time_s"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header + metric_keys)
        for row in rows:
            writer.writerow(
                [row["run"], row["cell"], row["seed"], row["state"]]
                + [row["values"].get(c, "") for c in columns]
                + [
                    _blank(row["iteration"]),
                    _blank(row["train_time_s"]),
                    _blank(row["wall_time_s"], 1),
                ]
                + [_blank(row["metrics"].get(k), 3) for k in metric_keys]
            )


def _blank(value: Any, digits: Optional[int] = None) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}f}" if digits is not None else str(value)


def _runs_cell(cell: Dict[str, Any]) -> str:
    others = ", ".join(f"{n} {s}" for s, n in sorted(cell["states"].items()) if s != DONE)
    return f"{cell['done']}/{cell['seeds']}" + (f" ({others})" if others else "")


def table_keys(table: Sequence[str] = ()) -> Tuple[List[str], Dict[str, str]]:
    """results.md's metric keys for a ``table`` (default: TABLE_METRICS), each mask AP key with its
    Boundary AP twin unless the table names some itself; and {twin added: its mask AP key}."""
    keys = list(table or TABLE_METRICS)
    if any(k.startswith(BOUNDARY) for k in keys):
        return keys, {}
    wanted, twins = [], {}
    for key in keys:
        wanted.append(key)
        twin = BOUNDARY + key[len(MASK) :]  # "segm/seen/AP" -> "boundary/seen/AP"
        if key.startswith(MASK) and key.endswith("/AP") and twin not in keys:
            wanted.append(twin)
            twins[twin] = key
    return wanted, twins


def _cell_text(cell: Dict[str, Any], key: str) -> str:
    if key not in cell["stats"]:
        # Finished runs that did not report it (e.g. evaluated before Boundary AP) vs none yet.
        return _NOT_REPORTED if cell["done"] else _MISSING
    mean, std, n = cell["stats"][key]
    digits = 3 if key == SECONDS_PER_ITERATION else 1
    text = f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
    return text + (f" (n={n})" if n < cell["done"] else "")


def markdown_table(spec: SweepSpec, cells: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    """results.md's table: one row per cell, the sweep's ``table`` metrics."""
    wanted, twins = table_keys(spec.table)
    wanted.append(SECONDS_PER_ITERATION)
    # A Boundary AP twin shows wherever its mask AP does, "n/a" in runs that predate it.
    present = [
        k for k in wanted if any(k in c["stats"] or twins.get(k) in c["stats"] for c in cells)
    ]
    if not present:  # nothing finished yet: still show the headline columns
        groups = ("segm/seen", "segm/unseen", "boundary/seen", "boundary/unseen", "s/")
        present = [k for k in wanted if not k.startswith(groups)]
    # Cells named in the sweep file (or without values) are told apart by their name only.
    named = not columns or any(c["cell"] != cell_name(list(c["values"].items())) for c in cells)
    table = [
        ([cell["cell"]] if named else [])
        + [cell["values"].get(c, "") for c in columns]
        + [_runs_cell(cell)]
        + [_cell_text(cell, key) for key in present]
        for cell in cells
    ]
    headers = [HEADERS.get(k, k) for k in present]
    headers = (["cell"] if named else []) + list(columns) + ["runs done"] + headers
    return tabulate(table, headers=headers, tablefmt="pipe", disable_numparse=True)


def write_markdown(
    path: str, spec: SweepSpec, cells: Sequence[Dict[str, Any]], columns: Sequence[str]
) -> None:
    table = markdown_table(spec, cells, columns)
    missing = [c["cell"] for c in cells if c["done"] == 0]
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    shown = os.path.relpath(spec.path) if spec.path.startswith(os.getcwd()) else spec.path
    wall = sum(r["wall_time_s"] or 0.0 for c in cells for r in c["rows"])
    text = (
        f"# Sweep {spec.name}\n\n`{shown}`, {len(cells)} cells, "
        f"{sum(c['seeds'] for c in cells)} runs; written {stamp}.\n\n"
        "COCO AP (%), mean ± std (sample) over the finished seeds of each cell (one value: one "
        "seed); training seconds per iteration. Runs' wall time in all: "
        f"{wall / 3600:.2f} h.\n\n{table}\n"
    )
    if missing:
        text += f"\nNo finished run yet ({_MISSING}): {', '.join(missing)}.\n"
    if _NOT_REPORTED in table:
        text += f"\n{_NOT_REPORTED}: not reported by the cell's finished runs (Boundary AP: runs "
        text += "evaluated before the evaluator had it).\n"
    with open(path, "w") as f:
        f.write(text)


def _label(cell: Dict[str, Any]) -> str:
    """A plot label: a named cell's name, else its values one per line."""
    values = cell["values"]
    if not values or cell["cell"] != cell_name(list(values.items())):
        return cell["cell"]
    return "\n".join(f"{k}={v}" for k, v in values.items())


def plot_bars(
    cells: Sequence[Dict[str, Any]], keys: Sequence[str], title: str, needs: Sequence[str] = ()
) -> Optional[Figure]:
    """Grouped bars (one group per cell, one bar per metric) with std error bars, "n/a" where a
    finished cell lacks a metric others have; None when no cell has a metric of ``keys`` or one
    of ``needs``."""
    keys = [k for k in keys if any(k in c["stats"] for c in cells)]
    if not keys or not cells or any(all(k not in c["stats"] for c in cells) for k in needs):
        return None
    width = 0.8 / len(keys)
    figure = Figure(figsize=(max(6.0, 1.2 + 1.1 * len(cells) * max(1, len(keys) / 2)), 4.8))
    axes = figure.subplots()
    positions = range(len(cells))
    for index, key in enumerate(keys):
        means = [c["stats"][key][0] if key in c["stats"] else math.nan for c in cells]
        offsets = [p - 0.4 + width * (index + 0.5) for p in positions]
        axes.bar(offsets, means, width, label=HEADERS.get(key, key))
        for x, cell in zip(offsets, cells):
            if cell["done"] and key not in cell["stats"]:
                _note(axes, x, _NOT_REPORTED, fontsize=7)
        # Error bars only where there is a spread to show: one seed has none.
        spread = [
            (x, c["stats"][key][0], c["stats"][key][1])
            for x, c in zip(offsets, cells)
            if key in c["stats"] and c["stats"][key][2] > 1
        ]
        if spread:
            xs, ys, errors = zip(*spread)
            axes.errorbar(xs, ys, yerr=errors, fmt="none", ecolor="black", capsize=3, elinewidth=1)
    for position, cell in zip(positions, cells):
        if cell["done"] == 0:
            _note(axes, position, "missing", fontsize=8)
    axes.set_xlim(-0.6, len(cells) - 0.4)
    axes.set_xticks(list(positions))
    axes.set_xticklabels([_label(c) for c in cells], fontsize=8, rotation=20, ha="right")
    axes.set_ylim(bottom=0, top=max(1.0, axes.get_ylim()[1]))  # AP >= 0; keep zeros visible
    axes.set_ylabel("AP (%)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return figure


def _note(axes, x: float, text: str, fontsize: int) -> None:
    """Grey vertical text at the foot of the bars at ``x``."""
    style = {"ha": "center", "va": "bottom", "rotation": 90, "fontsize": fontsize, "color": "gray"}
    axes.text(x, 0.03, text, transform=axes.get_xaxis_transform(), **style)


def _mean_curve(rows: Sequence[Dict[str, Any]], field: str):
    """Iterations and (mean, std) over the runs that evaluated there; None under 2 points."""
    by_iteration: Dict[int, List[float]] = {}
    for row in rows:
        for iteration, value in row.get(field, ()):
            by_iteration.setdefault(iteration, []).append(value)
    if len(by_iteration) < 2:  # one evaluation point is no curve
        return None
    iterations = sorted(by_iteration)
    several = any(len(by_iteration[i]) > 1 for i in iterations)
    return iterations, [_mean_std(by_iteration[i]) for i in iterations], several


def plot_curves(cells: Sequence[Dict[str, Any]]) -> Optional[Figure]:
    """Mask AP (solid) and Boundary AP (dashed, same colour) vs iteration per cell: mean over the
    seeds evaluated there, ± std band where there are several."""
    figure = Figure(figsize=(7.5, 4.8))
    axes = figure.subplots()
    boundary_drawn = False
    for cell in cells:
        mask = _mean_curve(cell["rows"], "curve")
        if mask is None:
            continue
        label = _label(cell).replace("\n", ", ")
        if cell["done"] != cell["seeds"]:
            label += f" [{_runs_cell(cell)} done]"
        boundary = _mean_curve(cell["rows"], "boundary_curve")
        colour = None
        for curve, style, name in ((mask, "-", label), (boundary, "--", None)):
            if curve is None:
                continue
            xs, stats, several = curve
            means = [m for m, _ in stats]
            (line,) = axes.plot(xs, means, style, marker="o", ms=3, color=colour, label=name)
            colour = line.get_color()
            if several:
                low, high = [m - s for m, s in stats], [m + s for m, s in stats]
                axes.fill_between(xs, low, high, color=colour, alpha=0.2)
        boundary_drawn |= boundary is not None
    if not axes.lines:
        return None
    axes.set_xlabel("iteration")
    axes.set_ylabel(
        "mask AP (solid), Boundary AP (dashed) (%)" if boundary_drawn else "mask AP (%)"
    )
    what = "mask and Boundary AP" if boundary_drawn else "mask AP"
    axes.set_title(f"{what} during training (mean ± std over seeds)")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    return figure


def comparisons(spec: SweepSpec, cells: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The paired comparisons of :func:`summarize`'s cells with the sweep's ``baseline``."""
    axis_columns = [c for c in map(column_name, spec.axes) if c not in spec.pair_over]
    return compare_cells(cells, axis_columns, spec.baseline, table_keys(spec.table)[0])


def write_report(
    spec: SweepSpec, runs: Sequence[Run], output_dir: Optional[str] = None
) -> Dict[str, str]:
    """Writes the report files for ``runs`` of ``spec`` (all, or a filtered subset) into
    ``output_dir`` (the sweep's output root by default); returns {kind: path} of those written."""
    output_dir = output_dir or spec.output_root
    os.makedirs(output_dir, exist_ok=True)
    rows = collect(runs, fingerprints_of(runs))
    columns = list(dict.fromkeys(column for run in runs for column, _ in run.cell.values))
    pooled, pooled_columns = pool_replicates(rows, columns, spec.pair_over)
    cells = summarize(pooled)
    paths = {
        "csv": os.path.join(output_dir, "results.csv"),
        "markdown": os.path.join(output_dir, "results.md"),
    }
    write_csv(paths["csv"], rows, columns)
    write_markdown(paths["markdown"], spec, cells, pooled_columns)
    if spec.baseline:
        paths["paired"] = os.path.join(output_dir, "paired.csv")
        write_comparisons(paths["paired"], paths["markdown"], comparisons(spec, cells), HEADERS)
    groups = ("segm/seen/AP", "segm/unseen/AP", "boundary/seen/AP", "boundary/unseen/AP")
    figures = {
        "ap_bars": plot_bars(
            cells, ("bbox/AP", "segm/AP", "boundary/AP"), "box, mask and Boundary AP per cell"
        ),
        # Without unseen AP (full supervision: every class is "seen") there is no comparison.
        "seen_unseen_mask_ap": plot_bars(
            cells, groups, "mask and Boundary AP on seen vs unseen classes", ("segm/unseen/AP",)
        ),
        "mask_ap_vs_iteration": plot_curves(cells),
    }
    for name, figure in figures.items():
        path = os.path.join(output_dir, f"{name}.png")
        if figure is not None:
            figure.tight_layout()
            figure.savefig(path, dpi=120)
            paths[name] = path
        elif os.path.exists(path):  # left by an earlier report; it no longer describes the runs
            os.remove(path)
    return paths
