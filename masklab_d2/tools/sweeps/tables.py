"""README tables generated from committed CSVs, so that they cannot drift.

The block between a README's ``<!-- sweep-table: results.csv sweep.yaml -->`` and
``<!-- /sweep-table -->`` is filled from a sweep's results.csv alone; the block between
``<!-- csv-table: curve.csv [COLUMN ...] -->`` and ``<!-- /csv-table -->`` is a CSV's rows
(e.g. a detector's curve from :mod:`masklab_d2.tools.curve_csv`), its named columns in that order,
numbers to one decimal (docs/sweeps.md).
"""

import argparse
import csv
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from masklab_d2.tools.sweeps.report import (
    HEADERS,
    comparisons,
    markdown_table,
    pool_replicates,
    summarize,
)
from masklab_d2.tools.sweeps.spec import load_sweep
from masklab_d2.tools.sweeps.stats import PAIRED_PREAMBLE, comparisons_table

BLOCK = re.compile(
    r"(?P<open><!-- sweep-table: (?P<csv>\S+) (?P<sweep>\S+) -->\n)(?P<body>.*?)"
    r"(?P<close><!-- /sweep-table -->)",
    flags=re.S,
)


CSV_BLOCK = re.compile(
    r"(?P<open><!-- csv-table: (?P<csv>\S+)(?P<columns>(?: \S+)*) -->\n)(?P<body>.*?)"
    r"(?P<close><!-- /csv-table -->)",
    flags=re.S,
)


def render_csv(csv_path: str, columns: Sequence[str] = ()) -> str:
    """A CSV as a Markdown table: ``columns`` (default: all) in that order, with the report's
    headers ("mask AP" for segm/AP); numbers to one decimal, other text as it is."""
    with open(csv_path, newline="") as f:
        records = list(csv.DictReader(f))
    columns = list(columns) or list(records[0] if records else [])
    missing = [c for c in columns if records and c not in records[0]]
    if missing:
        raise ValueError(f"{csv_path} has no column {missing}")

    def cell(text: str) -> str:
        try:
            return f"{float(text):.1f}" if "." in text else text
        except ValueError:
            return text

    header = [HEADERS.get(c, c) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def rows_from_csv(path: str) -> Tuple[List[Dict[str, Any]], List[str]]:
    """results.csv's runs as the report's rows (see report.collect, without curves), and its axis
    columns."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if header[:4] != ["run", "cell", "seed", "state"] or "iteration" not in header:
            raise ValueError(f"{path}: not a sweep report's results.csv (header {header[:6]})")
        columns = header[4 : header.index("iteration")]
        rows = [
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
            }
            for record in reader
        ]
    return rows, columns


def _number(text: Optional[str], kind):
    return kind(float(text)) if text not in ("", None) else None


def render(csv_path: str, sweep_path: str) -> str:
    """The block's text: the results table and, with a ``baseline``, the paired comparisons."""
    spec = load_sweep(sweep_path)
    rows, columns = pool_replicates(*rows_from_csv(csv_path), spec.pair_over)
    cells = summarize(rows)
    text = markdown_table(spec, cells, columns) + "\n"
    if spec.baseline:
        table = comparisons_table(comparisons(spec, cells), HEADERS)
        text += f"\n{PAIRED_PREAMBLE}\n\n{table}\n"
    return text


def update(readme: str, check: bool = False) -> bool:
    """Rewrites (or, with ``check``, compares) the README's blocks; True when all were current."""
    with open(readme) as f:
        text = f.read()
    folder = os.path.dirname(os.path.abspath(readme))

    def fill(match: "re.Match") -> str:
        csv_path, sweep_path = (os.path.join(folder, match.group(g)) for g in ("csv", "sweep"))
        return match.group("open") + render(csv_path, sweep_path) + match.group("close")

    def fill_csv(match: "re.Match") -> str:
        csv_path = os.path.join(folder, match.group("csv"))
        return (
            match.group("open")
            + render_csv(csv_path, match.group("columns").split())
            + (match.group("close"))
        )

    new = CSV_BLOCK.sub(fill_csv, BLOCK.sub(fill, text))
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
