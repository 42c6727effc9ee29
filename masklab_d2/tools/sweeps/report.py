"""Tables and plots of a sweep's results (``python -m masklab_d2.tools.sweep FILE --report``).

Writes into the sweep's output root:

* ``results.csv``: one row per run (cell x seed): its state, axis values, the iteration and
  training time (summed over the segments of a resumed run) of its final evaluation and the
  metrics of that evaluation (the last record of its metrics.json with "segm/AP", else
  "bbox/AP"; with several test sets, those of the first of DATASETS.TEST). Unfinished and stale
  runs show their latest evaluation, if any, with their state.
* ``results.md``: one row per cell, mean ± std (sample std) over its finished seeds of the
  sweep's ``table`` metrics (default: box AP, mask AP, mask AP50 / AP75 and, when the evaluator
  reports them, seen / unseen mask AP) and of the training seconds per iteration; the number of
  runs done; the sum of the runs' wall times. Cells without a finished run show "—" and their
  runs' states; a metric that a cell's finished runs did not report shows "n/a", and one that
  only some of them reported gives its number of runs, "(n=1)".
* ``ap_bars.png``: box, mask and Boundary AP per cell, grouped bars, with std error bars where a
  cell has more than one finished seed;
  ``seen_unseen_mask_ap.png``: the same for seen vs unseen mask and Boundary AP (partially
  supervised sweeps only: a sweep without unseen AP gets no such plot);
  ``mask_ap_vs_iteration.png``: mask AP (solid) and Boundary AP (dashed) of the periodic
  evaluations, mean over seeds per cell; only cells evaluated at two iterations or more are
  drawn, and with none there is no file (a plot left by an earlier report is removed: a single
  final evaluation is no curve).

Boundary AP (``boundary/...``, the evaluator's) goes beside mask AP wherever mask AP appears:
each mask AP key (``segm/AP``, ``segm/<group>/AP``) of the table brings its Boundary AP twin
unless the sweep's ``table`` names Boundary AP keys itself, and the CSV has the twin of every mask
metric. Runs evaluated before the evaluator had Boundary AP show "n/a" (blank in the CSV).
"""

import csv
import datetime
import math
import os
import re
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
from tabulate import tabulate  # noqa: E402

from masklab_d2.tools.sweeps.fingerprint import fingerprints_of  # noqa: E402
from masklab_d2.tools.sweeps.spec import Run, SweepSpec, cell_name, column_name  # noqa: E402
from masklab_d2.tools.sweeps.state import (  # noqa: E402
    DONE,
    STATUS_FILE,
    evaluation_records,
    read_json,
    read_metrics,
    run_config,
    run_state,
)
from masklab_d2.tools.sweeps.stats import compare_cells, write_comparisons  # noqa: E402

MASK, BOUNDARY = "segm/", "boundary/"


def boundary_twin(key: str) -> Optional[str]:
    """The Boundary AP key of a mask AP key ("segm/seen/AP" -> "boundary/seen/AP"), else None."""
    return BOUNDARY + key[len(MASK) :] if key.startswith(MASK) else None


def _boundary_header(header: str) -> str:
    # "mask AP50" -> "boundary AP50", "seen AP" -> "seen boundary AP".
    if header.startswith("mask "):
        return "boundary " + header[len("mask ") :]
    group, metric = header.rsplit(" ", 1)
    return f"{group} boundary {metric}"


_MASK_METRICS = (
    ("segm/AP", "mask AP"),
    ("segm/AP50", "mask AP50"),
    ("segm/AP75", "mask AP75"),
    ("segm/APs", "mask APs"),
    ("segm/APm", "mask APm"),
    ("segm/APl", "mask APl"),
    ("segm/seen/AP", "seen AP"),
    ("segm/seen/AP50", "seen AP50"),
    ("segm/unseen/AP", "unseen AP"),
    ("segm/unseen/AP50", "unseen AP50"),
    ("segm/voc/AP", "voc AP"),
    ("segm/nonvoc/AP", "nonvoc AP"),
)
# (metrics.json key, table header), in column order: box AP, then each mask metric followed by
# its Boundary AP twin.
CSV_METRICS = (
    ("bbox/AP", "box AP"),
    ("bbox/AP50", "box AP50"),
    ("bbox/AP75", "box AP75"),
) + tuple(
    pair
    for key, header in _MASK_METRICS
    for pair in ((key, header), (boundary_twin(key), _boundary_header(header)))
)
TABLE_METRICS = ("bbox/AP", "segm/AP", "segm/AP50", "segm/AP75", "segm/seen/AP", "segm/unseen/AP")
# Not a metric of metrics.json: training seconds per iteration, from the log (see summarize).
SECONDS_PER_ITERATION = "s/iter"
HEADERS = dict(CSV_METRICS, **{SECONDS_PER_ITERATION: "s / iter"})
_MISSING = "—"
_NOT_REPORTED = "n/a"
_TRAINING_TIME = re.compile(r"Total training time: (?:(\d+) days?, )?(\d+):(\d+):(\d+)")


def primary_metrics(
    records: Sequence[Dict[str, Any]], datasets: Sequence[str] = ()
) -> List[Dict[str, Any]]:
    """The records with one test set's metrics under plain keys ("segm/AP").

    detectron2 prefixes the keys with the dataset ("coco_val/segm/AP") when DATASETS.TEST holds
    several; the report shows the first of ``datasets`` (else the first prefix found).
    """
    prefixes = [k.split("/")[0] for r in records for k in r if re.match(r"[^/]+/(segm|bbox)/", k)]
    if not prefixes or any(k.startswith(("segm/", "bbox/")) for r in records for k in r):
        return list(records)
    primary = next((d for d in datasets if d in prefixes), prefixes[0])
    start = len(primary) + 1
    return [
        {(k[start:] if k.startswith(primary + "/") else k): v for k, v in r.items()}
        for r in records
    ]


def final_evaluation(records: Sequence[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The last record with mask AP ("segm/AP"), else with box AP; None without evaluations."""
    for key in ("segm/AP", "bbox/AP"):
        matching = [r for r in records if key in r]
        if matching:
            return matching[-1]
    return None


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
    total = 0
    for match in matches:
        days, hours, minutes, seconds = (int(x or 0) for x in match)
        total += ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    return total


def collect(
    runs: Sequence[Run], fingerprints: Optional[Dict[str, Dict[str, str]]] = None
) -> List[Dict[str, Any]]:
    """Per run: name, cell, seed, state, axis values, iteration, times, final metrics, curve.

    Args:
        runs: the runs.
        fingerprints: {run name: fingerprint}; runs of another config or code are "stale" and
            stay out of the means.
    """
    fingerprints = fingerprints or {}
    rows = []
    for run in runs:
        datasets = (run_config(run.output_dir).get("DATASETS") or {}).get("TEST") or ()
        records = primary_metrics(read_metrics(run.output_dir), datasets)
        final = final_evaluation(records) or {}
        status = read_json(os.path.join(run.output_dir, STATUS_FILE)) or {}
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


def _columns(runs: Sequence[Run]) -> List[str]:
    """Every axis / key column of the cells, in first-seen order."""
    columns: List[str] = []
    for run in runs:
        for column, _ in run.cell.values:
            if column not in columns:
                columns.append(column)
    return columns


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    if len(values) > 1:
        return statistics.mean(values), statistics.stdev(values)
    return values[0], 0.0


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
        cell["stats"] = {}
        # Every metric of the finished runs, so that a sweep's `table` may name any of them.
        for key in dict.fromkeys(k for r in finished for k in r["metrics"]):
            values = [r["metrics"][key] for r in finished if key in r["metrics"]]
            mean, std = _mean_std(values)
            cell["stats"][key] = (mean, std, len(values))
        per_iteration = [
            r["train_time_s"] / r["iteration"]
            for r in finished
            if r["train_time_s"] and r["iteration"]
        ]
        if per_iteration:
            mean, std = _mean_std(per_iteration)
            cell["stats"][SECONDS_PER_ITERATION] = (mean, std, len(per_iteration))
    return list(cells.values())


def write_csv(path: str, rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> None:
    reported = {k for r in rows for k in r["metrics"]}
    # A Boundary AP column wherever its mask twin has one, blank for runs that predate it.
    metric_keys = [
        k
        for k, _ in CSV_METRICS
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
    text = f"{cell['done']}/{cell['seeds']}"
    others = {s: n for s, n in cell["states"].items() if s != DONE}
    if others:
        text += " (" + ", ".join(f"{n} {s}" for s, n in sorted(others.items())) + ")"
    return text


def table_keys(table: Sequence[str] = ()) -> Tuple[List[str], Dict[str, str]]:
    """results.md's metric keys for a sweep's ``table`` (default: TABLE_METRICS), each mask AP
    key followed by its Boundary AP twin unless the table names Boundary AP keys itself.

    Returns:
        The keys, and {twin added: its mask AP key}.
    """
    keys = list(table or TABLE_METRICS)
    if any(k.startswith(BOUNDARY) for k in keys):
        return keys, {}
    wanted, twins = [], {}
    for key in keys:
        wanted.append(key)
        twin = boundary_twin(key)
        if twin is not None and key.endswith("/AP") and twin not in keys:
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
    """results.md's table: one row per cell, the sweep's ``table`` metrics (module docstring)."""
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
    table = []
    for cell in cells:
        line = ([cell["cell"]] if named else []) + [cell["values"].get(c, "") for c in columns]
        line.append(_runs_cell(cell))
        line.extend(_cell_text(cell, key) for key in present)
        table.append(line)
    headers = (
        (["cell"] if named else [])
        + list(columns)
        + ["runs done"]
        + [HEADERS.get(k, k) for k in present]
    )
    return tabulate(table, headers=headers, tablefmt="pipe", disable_numparse=True)


def write_markdown(
    path: str, spec: SweepSpec, cells: Sequence[Dict[str, Any]], columns: Sequence[str]
) -> None:
    table = markdown_table(spec, cells, columns)
    missing = [c["cell"] for c in cells if c["done"] == 0]
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with open(path, "w") as f:
        f.write(f"# Sweep {spec.name}\n\n")
        shown = os.path.relpath(spec.path) if spec.path.startswith(os.getcwd()) else spec.path
        f.write(
            f"`{shown}`, {len(cells)} cells, {sum(c['seeds'] for c in cells)} runs; "
            f"written {stamp}.\n\n"
        )
        wall = sum(r["wall_time_s"] or 0.0 for c in cells for r in c["rows"])
        f.write(
            "COCO AP (%), mean ± std (sample) over the finished seeds of each cell (one value: "
            f"one seed); training seconds per iteration. Runs' wall time in all: {wall / 3600:.2f} "
            "h.\n\n"
        )
        f.write(table + "\n")
        if missing:
            f.write(f"\nNo finished run yet ({_MISSING}): {', '.join(missing)}.\n")
        if _NOT_REPORTED in table:
            f.write(
                f"\n{_NOT_REPORTED}: not reported by the cell's finished runs (Boundary AP: runs "
                "evaluated before the evaluator had it).\n"
            )


def _label(cell: Dict[str, Any]) -> str:
    """A plot label: a named cell's name, else its values one per line."""
    values = cell["values"]
    if not values or cell["cell"] != cell_name(list(values.items())):
        return cell["cell"]
    return "\n".join(f"{k}={v}" for k, v in values.items())


def plot_bars(
    path: str,
    cells: Sequence[Dict[str, Any]],
    keys: Sequence[str],
    title: str,
    needs: Sequence[str] = (),
) -> bool:
    """Grouped bars (one group per cell, one bar per metric) with std error bars, "n/a" where a
    finished cell lacks a metric others have; nothing (False) when no cell has a metric of
    ``keys`` or one of ``needs``."""
    keys = [k for k in keys if any(k in c["stats"] for c in cells)]
    if not keys or not cells or any(all(k not in c["stats"] for c in cells) for k in needs):
        return False
    width = 0.8 / len(keys)
    figure, axes = plt.subplots(
        figsize=(max(6.0, 1.2 + 1.1 * len(cells) * max(1, len(keys) / 2)), 4.8)
    )
    positions = range(len(cells))
    for index, key in enumerate(keys):
        means = [c["stats"][key][0] if key in c["stats"] else math.nan for c in cells]
        offsets = [p - 0.4 + width * (index + 0.5) for p in positions]
        axes.bar(offsets, means, width, label=HEADERS.get(key, key))
        for x, cell in zip(offsets, cells):
            if cell["done"] and key not in cell["stats"]:
                axes.text(
                    x,
                    0.03,
                    _NOT_REPORTED,
                    transform=axes.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    rotation=90,
                    fontsize=7,
                    color="gray",
                )
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
            axes.text(
                position,
                0.03,
                "missing",
                transform=axes.get_xaxis_transform(),
                ha="center",
                va="bottom",
                rotation=90,
                fontsize=8,
                color="gray",
            )
    axes.set_xlim(-0.6, len(cells) - 0.4)
    axes.set_xticks(list(positions))
    axes.set_xticklabels([_label(c) for c in cells], fontsize=8, rotation=20, ha="right")
    axes.set_ylim(bottom=0, top=max(1.0, axes.get_ylim()[1]))  # AP >= 0; keep zeros visible
    axes.set_ylabel("AP (%)")
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


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


def plot_curves(path: str, cells: Sequence[Dict[str, Any]]) -> bool:
    """Mask AP (solid) and Boundary AP (dashed, in the cell's colour, where the runs report it)
    vs iteration per cell: mean over the seeds that evaluated at each iteration, a band of
    ± std where there are several."""
    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    drawn = boundary_drawn = False
    for cell in cells:
        mask = _mean_curve(cell["rows"], "curve")
        if mask is None:
            continue
        label = _label(cell).replace("\n", ", ")
        if cell["done"] != cell["seeds"]:
            label += f" [{_runs_cell(cell)} done]"
        colour = None
        for field, style in (("curve", "-"), ("boundary_curve", "--")):
            curve = mask if field == "curve" else _mean_curve(cell["rows"], field)
            if curve is None:
                continue
            iterations, stats, several = curve
            means = [m for m, _ in stats]
            (line,) = axes.plot(
                iterations,
                means,
                style,
                marker="o",
                markersize=3,
                color=colour,
                label=label if field == "curve" else None,
            )
            colour = line.get_color()
            if several:
                low = [m - s for m, s in stats]
                high = [m + s for m, s in stats]
                axes.fill_between(iterations, low, high, color=colour, alpha=0.2)
            boundary_drawn |= field == "boundary_curve"
        drawn = True
    if not drawn:
        plt.close(figure)
        return False
    axes.set_xlabel("iteration")
    if boundary_drawn:
        axes.set_ylabel("mask AP (solid), Boundary AP (dashed) (%)")
        axes.set_title("mask and Boundary AP during training (mean ± std over seeds)")
    else:
        axes.set_ylabel("mask AP (%)")
        axes.set_title("mask AP during training (mean ± std over seeds)")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(
    spec: SweepSpec, runs: Sequence[Run], output_dir: Optional[str] = None
) -> Dict[str, str]:
    """Writes the report files (module docstring) for ``runs`` of ``spec``.

    Args:
        spec: the sweep.
        runs: its runs (all, or a filtered subset).
        output_dir: where to write; the sweep's output root by default.

    Returns:
        {kind: path} of the files written.
    """
    output_dir = output_dir or spec.output_root
    os.makedirs(output_dir, exist_ok=True)
    rows = collect(runs, fingerprints_of(runs))
    columns = _columns(runs)
    cells = summarize(rows)
    paths = {
        "csv": os.path.join(output_dir, "results.csv"),
        "markdown": os.path.join(output_dir, "results.md"),
    }
    write_csv(paths["csv"], rows, columns)
    write_markdown(paths["markdown"], spec, cells, columns)
    if spec.baseline:
        paths["paired"] = os.path.join(output_dir, "paired.csv")
        axis_columns = [column_name(axis) for axis in spec.axes]
        metrics = table_keys(spec.table)[0]
        comparisons = compare_cells(cells, axis_columns, spec.baseline, metrics)
        write_comparisons(paths["paired"], paths["markdown"], comparisons, HEADERS)
    plots = {
        "ap_bars": lambda p: plot_bars(
            p, cells, ("bbox/AP", "segm/AP", "boundary/AP"), "box, mask and Boundary AP per cell"
        ),
        "seen_unseen_mask_ap": lambda p: plot_bars(
            p,
            cells,
            ("segm/seen/AP", "segm/unseen/AP", "boundary/seen/AP", "boundary/unseen/AP"),
            "mask and Boundary AP on seen vs unseen classes",
            needs=("segm/unseen/AP",),  # full supervision: every class is "seen", no comparison
        ),
        "mask_ap_vs_iteration": lambda p: plot_curves(p, cells),
    }
    for name, draw in plots.items():
        path = os.path.join(output_dir, f"{name}.png")
        if draw(path):
            paths[name] = path
        elif os.path.exists(path):  # left by an earlier report; it no longer describes the runs
            os.remove(path)
    return paths
