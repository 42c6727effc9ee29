"""README tables generated from a sweep's committed results.csv, so that they cannot drift.

A README marks where a table goes; the block between the markers is the tool's::

    <!-- sweep-table: results.csv sweep.yaml -->
    (generated)
    <!-- /sweep-table -->

(paths relative to the README). The block is the report's table for the CSV's runs, computed from
the CSV alone (no run folders: a committed result is reproducible anywhere), and, when the sweep
file has a ``baseline``, its paired comparisons (:mod:`masklab_d2.tools.sweeps.stats`)::

    python3 -m masklab_d2.tools.sweeps.tables projects/*/README.md           # rewrite the blocks
    python3 -m masklab_d2.tools.sweeps.tables --check projects/*/README.md   # 1 when one differs

The means come from the CSV's values (3 decimals), as a reader recomputing them would.
"""

import argparse
import csv
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from masklab_d2.tools.sweeps.report import HEADERS, markdown_table, summarize, table_keys
from masklab_d2.tools.sweeps.spec import column_name, load_sweep
from masklab_d2.tools.sweeps.stats import PAIRED_PREAMBLE, compare_cells, comparisons_table

BLOCK = re.compile(
    r"(?P<open><!-- sweep-table: (?P<csv>\S+) (?P<sweep>\S+) -->\n)(?P<body>.*?)"
    r"(?P<close><!-- /sweep-table -->)",
    flags=re.S,
)
_FIXED = ("run", "cell", "seed", "state", "iteration", "train_time_s", "wall_time_s")


def rows_from_csv(path: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """results.csv's runs as the report's rows (see report.collect; no curves), and its axis
    columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if header[:4] != list(_FIXED[:4]) or "iteration" not in header:
            raise ValueError(f"{path}: not a sweep report's results.csv (header {header[:6]})")
        columns = header[4 : header.index("iteration")]
        rows = []
        for record in reader:
            rows.append(
                {
                    "run": record["run"],
                    "cell": record["cell"],
                    "seed": int(record["seed"]),
                    "state": record["state"],
                    "values": {c: record[c] for c in columns if record[c] != ""},
                    "iteration": _number(record["iteration"], int),
                    "train_time_s": _number(record["train_time_s"], float),
                    "wall_time_s": _number(record["wall_time_s"], float),
                    "metrics": {
                        k: float(v) for k, v in record.items() if "/" in k and v not in ("", None)
                    },
                    "curve": [],
                    "boundary_curve": [],
                }
            )
    return rows, columns


def _number(text: Optional[str], kind):
    return kind(float(text)) if text not in ("", None) else None


def render(csv_path: str, sweep_path: str) -> str:
    """The block's text: the results table and, with a ``baseline``, the paired comparisons."""
    spec = load_sweep(sweep_path)
    rows, columns = rows_from_csv(csv_path)
    cells = summarize(rows)
    text = markdown_table(spec, cells, columns) + "\n"
    if spec.baseline:
        axis_columns = [column_name(axis) for axis in spec.axes]
        metrics = table_keys(spec.table)[0]
        comparisons = compare_cells(cells, axis_columns, spec.baseline, metrics)
        text += f"\n{PAIRED_PREAMBLE}\n\n{comparisons_table(comparisons, HEADERS)}\n"
    return text


def update(readme: str, check: bool = False) -> bool:
    """Rewrites (or, with ``check``, compares) the README's blocks; True when all were current."""
    with open(readme) as f:
        text = f.read()
    folder = os.path.dirname(os.path.abspath(readme))

    def fill(match: "re.Match") -> str:
        body = render(
            os.path.join(folder, match.group("csv")), os.path.join(folder, match.group("sweep"))
        )
        return match.group("open") + body + match.group("close")

    new = BLOCK.sub(fill, text)
    if new != text and not check:
        with open(readme, "w") as f:
            f.write(new)
    return new == text


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("readmes", nargs="+", help="Markdown files with sweep-table blocks")
    parser.add_argument("--check", action="store_true", help="change nothing; 1 if one differs")
    args = parser.parse_args(argv)
    stale = [path for path in args.readmes if not update(path, check=args.check)]
    for path in stale:
        print(f"{path}: sweep tables {'differ from' if args.check else 'rewritten from'} the CSVs")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
