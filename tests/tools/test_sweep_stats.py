"""Paired comparisons in the sweep report (masklab_d2/tools/sweeps/stats.py): the interval and
verdict by hand, the pairing by seed against the baseline cell, and the sweep file's key."""

import csv
import math

import pytest
from test_sweep import FAKE_TRAIN, MASK_RCNN, fake_finished, fake_sweep, write_sweep

from masklab_d2.tools.sweeps import stats
from masklab_d2.tools.sweeps.report import write_report
from masklab_d2.tools.sweeps.spec import SweepError, expand_runs, load_sweep
from masklab_d2.tools.sweeps.tables import render


def test_interval_and_verdict_by_hand():
    # d = (1.0, 1.2, 0.9): mean 31/30, sd 0.1528, t(0.975, 2) = 4.303.
    row = stats.paired_difference([1.0, 1.2, 0.9])
    half = 4.303 * statistics_sd([1.0, 1.2, 0.9]) / math.sqrt(3)
    assert row["n"] == 3 and row["mean"] == pytest.approx(31 / 30)
    assert (row["low"], row["high"]) == pytest.approx((31 / 30 - half, 31 / 30 + half))
    assert row["verdict"] == stats.BETTER
    assert stats.paired_difference([-1.0, -1.1])["verdict"] == stats.WORSE
    # Two pairs with the same +1.5 mean: consistent -> better; spread -> a tie.
    assert stats.paired_difference([1.4, 1.6])["verdict"] == stats.BETTER
    assert stats.paired_difference([1.0, 2.0])["verdict"] == stats.TIE
    single = stats.paired_difference([0.7])
    assert single["verdict"] == stats.NO_INTERVAL and single["low"] is None
    assert stats.t_quantile_975(1) == 12.706 and stats.t_quantile_975(100) == 1.96
    with pytest.raises(ValueError):
        stats.paired_difference([])


def statistics_sd(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_the_report_pairs_cells_with_the_baseline_by_seed(tmp_path):
    path = fake_sweep(tmp_path, extra="baseline: {SOLVER.BASE_LR: 0.1}\n")
    spec = load_sweep(path)
    assert spec.baseline == {"SOLVER.BASE_LR": "0.1"}
    runs = {run.name: run for run in expand_runs(spec)}
    finals = {  # (mask AP, seen, unseen)
        "SOLVER.BASE_LR=0.1__seed=0": (30.0, 40.0, 10.0),
        "SOLVER.BASE_LR=0.1__seed=1": (34.0, 44.0, 12.0),
        "SOLVER.BASE_LR=0.2__seed=0": (31.0, 41.0, 9.0),
        "SOLVER.BASE_LR=0.2__seed=1": (35.2, 45.0, 11.0),
    }
    for name, (ap, seen, unseen) in finals.items():
        fake_finished(runs[name].output_dir, run=runs[name], aps=(1.0, ap), seen=(seen, unseen))
    paths = write_report(spec, list(runs.values()))

    rows = {(r["cell"], r["metric"]): r for r in csv.DictReader(open(paths["paired"]))}
    mask = rows[("SOLVER.BASE_LR=0.2", "segm/AP")]
    # Paired by seed: +1.0 and +1.2 -> mean 1.1, sd 0.1414, half-width 12.706 * 0.1 = 1.2706.
    assert mask["baseline"] == "SOLVER.BASE_LR=0.1" and mask["n"] == "2"
    assert float(mask["mean"]) == pytest.approx(1.1)
    assert float(mask["low"]) == pytest.approx(1.1 - 1.2706, abs=1e-6)
    assert mask["verdict"] == stats.TIE
    assert rows[("SOLVER.BASE_LR=0.2", "segm/unseen/AP")]["verdict"] == stats.WORSE  # -1, -1
    # The baseline is not compared with itself; the failed cell has no pairs.
    assert not any(cell in ("SOLVER.BASE_LR=0.1", "bad") for cell, _ in rows)
    markdown = open(paths["markdown"]).read()
    assert "## Paired against the baseline" in markdown
    table = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()]
    expected = ["SOLVER.BASE_LR=0.2", "SOLVER.BASE_LR=0.1", "mask AP", "2", "+1.10"]
    assert expected + ["[-0.17, +2.37]", "tie"] in table


def test_a_baseline_must_name_an_axis_and_one_of_its_labels(tmp_path):
    with pytest.raises(SweepError, match="not an axis"):
        load_sweep(fake_sweep(tmp_path, extra="baseline: {head: mask_rcnn}\n"))
    with pytest.raises(SweepError, match="not among"):
        load_sweep(fake_sweep(tmp_path, extra="baseline: {SOLVER.BASE_LR: 0.3}\n"))


def test_pair_over_pools_a_replicate_axis_and_pairs_by_its_value_and_seed(tmp_path):
    # Two frozen "detectors" (an axis of named groups), one seed each: each learning rate is one
    # cell of n = 2 runs, and the comparison pairs runs of the same detector and seed.
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    path = write_sweep(
        tmp_path,
        f"""
        base_config: {MASK_RCNN}
        output_root: {tmp_path / "out"}
        train_script: {script}
        axes:
          SOLVER.BASE_LR: [0.1, 0.2]
          detector: {{d0: {{SOLVER.WEIGHT_DECAY: 0.0}}, d1: {{SOLVER.WEIGHT_DECAY: 0.01}}}}
        seeds: [0]
        baseline: {{SOLVER.BASE_LR: 0.1}}
        pair_over: [detector]
        """,
    )
    spec = load_sweep(path)
    assert spec.pair_over == ["detector"]
    runs = {run.name: run for run in expand_runs(spec)}
    finals = {  # baseline 30 / 34 on d0 / d1; the other cell +1.0 on d0, +1.2 on d1
        "SOLVER.BASE_LR=0.1__detector=d0__seed=0": 30.0,
        "SOLVER.BASE_LR=0.1__detector=d1__seed=0": 34.0,
        "SOLVER.BASE_LR=0.2__detector=d0__seed=0": 31.0,
        "SOLVER.BASE_LR=0.2__detector=d1__seed=0": 35.2,
    }
    for name, ap in finals.items():
        fake_finished(runs[name].output_dir, run=runs[name], aps=(1.0, ap))
    paths = write_report(spec, list(runs.values()))
    rows = {(r["cell"], r["metric"]): r for r in csv.DictReader(open(paths["paired"]))}
    mask = rows[("SOLVER.BASE_LR=0.2", "segm/AP")]
    assert mask["baseline"] == "SOLVER.BASE_LR=0.1" and mask["n"] == "2"
    assert float(mask["mean"]) == pytest.approx(1.1)
    markdown = open(paths["markdown"]).read()
    table = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()]
    header = next(row for row in table if row[0] == "SOLVER.BASE_LR")
    assert "detector" not in header  # pooled: no column of its own
    pooled = [row for row in table if row[0] == "0.2"]
    assert len(pooled) == 1 and "2/2" in pooled[0] and "33.1 ± 3.0" in pooled[0]
    # The committed-CSV path renders the same pooled tables.
    results = open(paths["markdown"]).read()
    block = render(paths["csv"], path)
    assert block.split("\n\n")[0].strip() in results
    with pytest.raises(SweepError, match="both baseline and pair_over"):
        load_sweep(
            fake_sweep(
                tmp_path, extra="baseline: {SOLVER.BASE_LR: 0.1}\npair_over: [SOLVER.BASE_LR]\n"
            )
        )
