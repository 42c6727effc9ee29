"""Paired comparisons against a baseline cell, and the one rule every verdict follows
(docs/sweeps.md, "Comparisons"): the mean paired difference over seeds, its 95% t interval,
better / worse when the interval excludes 0, else a tie; one pair: no interval."""

import csv
import math
import statistics
from typing import Any, Dict, List, Sequence, Tuple

from tabulate import tabulate

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
    """{"n", "mean", "low", "high", "verdict"} of paired differences (cell - baseline), one per
    pair; ``low`` / ``high`` None with one pair."""
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


def compare_cells(
    cells: Sequence[Dict[str, Any]],
    axis_columns: Sequence[str],
    baseline: Dict[str, str],
    metrics: Sequence[str],
) -> List[Dict[str, Any]]:
    """Paired comparisons of every cell with its baseline, by seed.

    Args:
        cells: :func:`~masklab_d2.tools.sweeps.report.summarize`'s cells.
        axis_columns: the table columns that are axes of the grid.
        baseline: {axis column: label} of the baseline.
        metrics: the metrics.json keys to compare (those a pair lacks are skipped).

    Returns:
        One dict per (cell, metric): cell, baseline, metric and :func:`paired_difference`'s fields.
    """
    by_values = {tuple(sorted(c["values"].items())): c for c in cells}
    comparisons = []
    for cell in cells:
        # Its baseline: the baseline's values on the named axes, its own on the other axes (an
        # explicit cell's extra keys are not carried over); a baseline cell has none.
        wanted = {k: v for k, v in cell["values"].items() if k in axis_columns}
        wanted.update(baseline)
        reference = by_values.get(tuple(sorted(wanted.items())))
        if reference is None or wanted == cell["values"]:
            continue
        for metric in metrics:
            pairs = _pairs_by_seed(cell["rows"], reference["rows"], metric)
            if pairs:
                names = {"cell": cell["cell"], "baseline": reference["cell"], "metric": metric}
                comparisons.append({**names, **paired_difference([a - b for a, b in pairs])})
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


PAIRED_PREAMBLE = (
    "Per metric, the mean over pairs of (cell - baseline), a pair being runs of the same seed "
    "(and of the same value of the sweep's pair_over axes, e.g. the detector), its 95% t "
    "interval and the verdict: better / worse when the interval excludes 0, else a tie "
    "(masklab_d2/tools/sweeps/stats.py)."
)


def comparisons_table(comparisons: Sequence[Dict[str, Any]], headers: Dict[str, str]) -> str:
    """The comparisons as a Markdown table (a sentence when there are none); ``headers``: {metric
    key: column header}."""
    if not comparisons:
        return "No cell has a finished run paired with a finished baseline run yet."
    table = [
        [
            row["cell"],
            row["baseline"],
            headers.get(row["metric"], row["metric"]),
            row["n"],
            f"{row['mean']:+.2f}",
            f"[{row['low']:+.2f}, {row['high']:+.2f}]" if row["low"] is not None else "",
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
    """Writes the comparisons to ``csv_path`` (paired.csv, full precision) and appends their table
    to ``markdown_path`` (results.md) as a "Paired against the baseline" section."""
    fields = ["cell", "baseline", "metric", "n", "mean", "low", "high", "verdict"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in comparisons:
            writer.writerow({k: "" if row[k] is None else row[k] for k in fields})
    with open(markdown_path, "a") as f:
        f.write(f"\n## Paired against the baseline\n\n{PAIRED_PREAMBLE}\n\n")
        f.write(comparisons_table(comparisons, headers) + "\n")
