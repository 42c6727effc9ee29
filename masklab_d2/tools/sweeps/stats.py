"""Paired comparisons against a baseline cell, and the one rule every verdict follows.

A sweep file's ``baseline`` names, per axis, the label (or value) that rows are compared with,
e.g. ``baseline: {head: mask_rcnn}``. A cell's baseline is the cell with the cell's own values on
the other axes and the baseline's on the named ones; an explicit cell's extra keys are not
carried over, so a ``{head: masklab, TRAIN_ON_GT_BOXES: False}`` cell is compared with the grid's
``head=mask_rcnn``. Its runs pair with the baseline's by seed (both finished): the sweep's runs
share their detector (``MODEL.WEIGHTS``), or differ in it along an axis, which then pairs like any
other axis. For each metric the differences d_i = cell - baseline over the n pairs give

    mean paired difference, 95% interval mean ± t(0.975, n - 1) * sd / sqrt(n)

and the verdict: **better** when the interval lies above 0, **worse** when below, else **tie**.
With one pair there is no interval (the verdict says so); a reader needs a second seed.
"""

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .state import DONE

# Two-sided 95% quantiles of Student's t, t(0.975, df) for df = 1 .. 30; beyond, the normal's.
_T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
BETTER, WORSE, TIE, NO_INTERVAL = "better", "worse", "tie", "n = 1: no interval"


def t_quantile_975(df: int) -> float:
    """t(0.975, df): the half-width factor of a 95% interval of a mean of df + 1 values."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df = {df}")
    return _T_975[df - 1] if df <= len(_T_975) else 1.960


def paired_difference(differences: Sequence[float]) -> Dict[str, Any]:
    """Mean, 95% t interval and verdict of paired differences (cell - baseline).

    Args:
        differences: one value per pair.

    Returns:
        {"n", "mean", "low", "high", "verdict"}; ``low`` / ``high`` None with one pair.
    """
    n = len(differences)
    if n == 0:
        raise ValueError("no pairs to compare")
    mean = statistics.fmean(differences)
    if n == 1:
        return {"n": 1, "mean": mean, "low": None, "high": None, "verdict": NO_INTERVAL}
    half = t_quantile_975(n - 1) * statistics.stdev(differences) / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = BETTER if low > 0 else WORSE if high < 0 else TIE
    return {"n": n, "mean": mean, "low": low, "high": high, "verdict": verdict}


def baseline_of(
    values: Dict[str, str], axis_columns: Sequence[str], baseline: Dict[str, str]
) -> Optional[Dict[str, str]]:
    """The values of a cell's baseline, or None when the cell is a baseline itself."""
    wanted = {k: v for k, v in values.items() if k in axis_columns}
    wanted.update(baseline)
    return None if wanted == values else wanted


def compare_cells(
    cells: Sequence[Dict[str, Any]],
    axis_columns: Sequence[str],
    baseline: Dict[str, str],
    metrics: Sequence[str],
) -> List[Dict[str, Any]]:
    """Paired comparisons of every cell with its baseline (see the module docstring).

    Args:
        cells: :func:`~masklab_d2.tools.sweeps.report.summarize`'s cells (values, rows).
        axis_columns: the table columns that are axes of the grid.
        baseline: {axis column: label} of the baseline.
        metrics: the metrics.json keys to compare (those a pair lacks are skipped).

    Returns:
        One dict per (cell, metric) with pairs: cell, baseline, metric and
        :func:`paired_difference`'s fields, in cell then metric order.
    """
    by_values = {tuple(sorted(c["values"].items())): c for c in cells}
    comparisons = []
    for cell in cells:
        wanted = baseline_of(cell["values"], axis_columns, baseline)
        reference = by_values.get(tuple(sorted(wanted.items()))) if wanted else None
        if reference is None:
            continue
        for metric in metrics:
            pairs = _pairs_by_seed(cell["rows"], reference["rows"], metric)
            if pairs:
                comparisons.append(
                    {
                        "cell": cell["cell"],
                        "baseline": reference["cell"],
                        "metric": metric,
                        **paired_difference([a - b for a, b in pairs]),
                    }
                )
    return comparisons


def _pairs_by_seed(
    rows: Sequence[Dict[str, Any]], reference: Sequence[Dict[str, Any]], metric: str
) -> List[Tuple[float, float]]:
    finished = {r["seed"]: r["metrics"][metric] for r in reference if _has(r, metric)}
    return [
        (r["metrics"][metric], finished[r["seed"]])
        for r in rows
        if _has(r, metric) and r["seed"] in finished
    ]


def _has(row: Dict[str, Any], metric: str) -> bool:
    return row["state"] == DONE and metric in row["metrics"]


def _interval(row: Dict[str, Any]) -> str:
    if row["low"] is None:
        return ""
    return f"[{row['low']:+.2f}, {row['high']:+.2f}]"


PAIRED_PREAMBLE = (
    "Per metric, the mean over seeds of (cell - baseline) for runs of the same seed, its 95% t "
    "interval and the verdict: better / worse when the interval excludes 0, else a tie "
    "(masklab_d2/tools/sweeps/stats.py)."
)


def comparisons_table(comparisons: Sequence[Dict[str, Any]], headers: Dict[str, str]) -> str:
    """The comparisons as a Markdown table (a sentence when there are none).

    Args:
        comparisons: :func:`compare_cells`'s rows.
        headers: {metric key: column header} ("mask AP", ...).
    """
    from tabulate import tabulate

    if not comparisons:
        return "No cell has a finished run paired with a finished baseline run yet."
    table = [
        [
            row["cell"],
            row["baseline"],
            headers.get(row["metric"], row["metric"]),
            row["n"],
            f"{row['mean']:+.2f}",
            _interval(row),
            row["verdict"],
        ]
        for row in comparisons
    ]
    return tabulate(
        table,
        headers=["cell", "vs", "metric", "n", "mean diff", "95% interval", "verdict"],
        tablefmt="pipe",
        disable_numparse=True,
    )


def write_comparisons(
    csv_path: str,
    markdown_path: str,
    comparisons: Sequence[Dict[str, Any]],
    headers: Dict[str, str],
) -> None:
    """Writes the comparisons to ``csv_path`` and appends their table to ``markdown_path``.

    Args:
        csv_path: paired.csv (one row per cell and metric, full precision).
        markdown_path: results.md, which gets a "Paired against the baseline" section.
        comparisons: :func:`compare_cells`'s rows.
        headers: {metric key: column header} for the Markdown table ("mask AP", ...).
    """
    import csv

    fields = ["cell", "baseline", "metric", "n", "mean", "low", "high", "verdict"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in comparisons:
            writer.writerow({k: "" if row[k] is None else row[k] for k in fields})
    with open(markdown_path, "a") as f:
        f.write(f"\n## Paired against the baseline\n\n{PAIRED_PREAMBLE}\n\n")
        f.write(comparisons_table(comparisons, headers) + "\n")
