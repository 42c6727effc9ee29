"""The evaluation curve of one training run (its metrics.json) as a CSV (docs/sweeps.md)::

    python3 -m masklab_d2.tools.curve_csv output/shapes-partial/mask_rcnn_R_18_FPN_gtcrop \
        projects/shapes-partial-heads/detector_curve.csv
"""

import argparse
import csv
from typing import List, Optional, Sequence

from masklab_d2.tools.sweeps.report import primary_metrics
from masklab_d2.tools.sweeps.state import evaluation_records, read_metrics, run_config

_ORDER = ("bbox/AP", "segm/AP", "boundary/AP")


def curve_rows(output_dir: str) -> List[dict]:
    """{"iteration", metric: value} per evaluation of the run in ``output_dir``: the headline AP
    of each task and class group ("segm/AP", "segm/unseen/AP", ...) on its first test set."""
    datasets = (run_config(output_dir).get("DATASETS") or {}).get("TEST") or ()
    records = evaluation_records(primary_metrics(read_metrics(output_dir), datasets))
    tasks = ("bbox/", "segm/", "boundary/")
    return [
        {
            k: v
            for k, v in r.items()
            if k == "iteration" or k.endswith("/AP") and k.startswith(tasks)
        }
        for r in records
        if "iteration" in r
    ]


def write_curve(output_dir: str, path: str) -> List[dict]:
    rows = curve_rows(output_dir)
    if not rows:
        raise SystemExit(f"{output_dir}: no evaluation in its metrics.json")
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "iteration"))
    keys.sort(key=lambda k: (k not in _ORDER, _ORDER.index(k) if k in _ORDER else 0, k))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iteration"] + keys)
        for row in rows:
            values = [row.get(k) for k in keys]
            writer.writerow([row["iteration"]] + ["" if v is None else f"{v:.3f}" for v in values])
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", help="a training run's OUTPUT_DIR (with metrics.json)")
    parser.add_argument("csv", help="the CSV to write")
    args = parser.parse_args(argv)
    rows = write_curve(args.output_dir, args.csv)
    print(f"{args.csv}: {len(rows)} evaluations")


if __name__ == "__main__":
    main()
