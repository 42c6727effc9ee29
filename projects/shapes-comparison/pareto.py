"""Mask AP against cost for the heads of partial.yaml: the Pareto front, with error bars.

    python3 projects/shapes-comparison/pareto.py

Reads the committed ``partial/results.csv`` (finished runs with masks for the seen classes only,
pooled over detectors and seeds: mean ± sample std) and ``cost.md`` (``profile_heads``'s table of
the same heads), and writes ``pareto.png``: mask AP on all classes and on the unseen classes
against GFLOPs per 10 detections, the heads no other head beats on both axes joined.
"""

import csv
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# The sweep's head label -> the "config" cell of its row in cost.md.
COST_ROWS = {
    "mask_rcnn": "shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml",
    "masklab": "shapes-partial/masklab_R_18_FPN_gtcrop.yaml",
    "mask_rcnn_hypercolumn": "shapes-partial/mask_rcnn_hypercolumn_R_18_FPN_gtcrop.yaml",
    "deep_marc_hg52": "shapes-partial/deep_marc_R_18_FPN_hourglass52_gtcrop.yaml "
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION=32 MODEL.DEEP_MARC.NUM_FILTERS=64",
    "blendmask": "shapes-partial/blendmask_R_18_FPN_gtcrop.yaml",
    "point_rend": "shapes-partial/point_rend_R_18_FPN_gtcrop.yaml",
}
METRICS = {"segm/AP": "mask AP, all classes", "segm/nonvoc/AP": "mask AP, unseen classes"}


def gflops_at_10(path: str) -> dict:
    """{config cell: GFLOPs @10} from profile_heads's Markdown table."""
    lines = [line for line in open(path) if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip().strip("|").split("|")]
    column = header.index("GFLOPs @10")
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines[2:]]
    return {row[0]: float(row[column]) for row in cells}


def ap_by_head(path: str) -> dict:
    """{head: {metric: [values]}} of the finished runs with masks for the seen classes."""
    values = {}
    for row in csv.DictReader(open(path)):
        if row["state"] != "done" or row.get("masks") != "seen":
            continue
        for metric in METRICS:
            if row.get(metric):
                values.setdefault(row["head"], {}).setdefault(metric, []).append(float(row[metric]))
    return values


def pareto_front(points):
    """The (cost, ap, head) points no other point beats: cheaper or equal and better AP."""
    front, best = [], -math.inf
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


def main():
    costs = gflops_at_10(os.path.join(HERE, "cost.md"))
    aps = ap_by_head(os.path.join(HERE, "partial", "results.csv"))
    figure, axes = plt.subplots(1, len(METRICS), figsize=(6 * len(METRICS), 4.5))
    for ax, (metric, title) in zip(axes, METRICS.items()):
        points = []
        for head, config in COST_ROWS.items():
            samples = aps.get(head, {}).get(metric, [])
            if not samples or config not in costs:
                continue
            mean = statistics.fmean(samples)
            std = statistics.stdev(samples) if len(samples) > 1 else 0.0
            ax.errorbar(costs[config], mean, yerr=std, fmt="o", capsize=4, label=head)
            ax.annotate(f"{head} (n={len(samples)})", (costs[config], mean), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")  # fmt: skip
            points.append((costs[config], mean, head))
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("GFLOPs per 10 detections (cost.md)")
        ax.set_ylabel(f"{title} (shapes_test, mean ± std)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle("Heads with masks for the seen classes only: quality against cost")
    figure.tight_layout()
    figure.savefig(os.path.join(HERE, "pareto.png"), dpi=120)
    print(os.path.join(HERE, "pareto.png"))


if __name__ == "__main__":
    main()
