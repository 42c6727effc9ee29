"""README tables generated from committed CSVs (masklab_d2/tools/sweeps/tables.py): every block in
projects/ is what its CSV gives, and a CSV changed by hand makes the check fail until rewritten."""

import glob
import os
import shutil

import pytest
from helpers import REPO

from masklab_d2.tools.sweeps import tables

README_BLOCKS = [
    path
    for path in sorted(glob.glob(os.path.join(REPO, "projects", "**", "*.md"), recursive=True))
    if "<!-- sweep-table:" in open(path).read() or "<!-- csv-table:" in open(path).read()
]


@pytest.mark.parametrize(
    "readme", README_BLOCKS, ids=[os.path.relpath(p, REPO) for p in README_BLOCKS]
)
def test_published_tables_are_what_their_csvs_give(readme):
    assert tables.update(readme, check=True), (
        f"{readme}: a sweep-table block differs from its CSV; run "
        f"python3 -m masklab_d2.tools.sweeps.tables {os.path.relpath(readme, REPO)}"
    )


def test_a_changed_csv_fails_the_check_until_the_block_is_rewritten(tmp_path):
    source = os.path.join(REPO, "projects", "shapes-partial-heads")
    shutil.copy(os.path.join(source, "results.csv"), tmp_path / "results.csv")
    shutil.copy(os.path.join(source, "sweep.yaml"), tmp_path / "sweep.yaml")
    sweep_text = (tmp_path / "sweep.yaml").read_text()
    (tmp_path / "sweep.yaml").write_text(sweep_text.replace("../../configs", REPO + "/configs"))
    readme = tmp_path / "README.md"
    readme.write_text(
        "# A suite\n\n<!-- sweep-table: results.csv sweep.yaml -->\nhand-typed\n"
        "<!-- /sweep-table -->\n\nProse stays.\n"
    )
    assert not tables.update(str(readme), check=True)
    assert "hand-typed" in readme.read_text()  # --check changes nothing
    assert tables.main([str(readme)]) == 0 and tables.main(["--check", str(readme)]) == 0
    text = readme.read_text()
    assert "Prose stays." in text and "hand-typed" not in text
    row = next(line for line in text.splitlines() if line.startswith("| mask_rcnn "))
    assert "38.0 ± 0.1" in row  # the 4-conv head's mask AP over its 3 seeds
    assert "| head=blendmask " in text and "worse" in text  # the paired comparisons

    csv_text = (tmp_path / "results.csv").read_text().splitlines()
    first = csv_text[1].split(",")
    first[csv_text[0].split(",").index("segm/AP")] = "99.000"
    (tmp_path / "results.csv").write_text("\n".join([csv_text[0], ",".join(first)] + csv_text[2:]))
    assert tables.main(["--check", str(readme)]) == 1


def test_a_csv_that_is_not_a_report_is_refused(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a sweep report"):
        tables.rows_from_csv(str(tmp_path / "x.csv"))


def test_a_runs_curve_as_csv(tmp_path):
    import csv

    from test_sweep import fake_finished

    from masklab_d2.tools import curve_csv

    run = tmp_path / "run"
    fake_finished(str(run), aps=(5.0, 30.0), seen=(40.0, 10.0), boundary=(20.0, 25.0, 6.0))
    curve_csv.main([str(run), str(tmp_path / "curve.csv")])
    rows = list(csv.DictReader(open(tmp_path / "curve.csv")))
    assert [r["iteration"] for r in rows] == ["1", "4"]
    assert list(rows[0])[:4] == ["iteration", "bbox/AP", "segm/AP", "boundary/AP"]
    assert rows[1]["segm/AP"] == "30.000" and rows[1]["segm/unseen/AP"] == "10.000"
    assert rows[1]["boundary/unseen/AP"] == "6.000" and rows[0]["segm/unseen/AP"] == ""
    with pytest.raises(SystemExit, match="no evaluation"):
        curve_csv.main([str(tmp_path), str(tmp_path / "none.csv")])


def test_a_csv_table_block_is_the_csvs_named_columns(tmp_path):
    (tmp_path / "curve.csv").write_text(
        "iteration,bbox/AP,segm/AP,segm/unseen/AP\n899,11.754,9.542,6.184\n1799,26.999,23.777,\n"
    )
    readme = tmp_path / "README.md"
    readme.write_text(
        "Curve:\n\n<!-- csv-table: curve.csv iteration segm/AP bbox/AP -->\nold\n"
        "<!-- /csv-table -->\nProse.\n"
    )
    assert not tables.update(str(readme), check=True)
    assert tables.update(str(readme)) is False and tables.update(str(readme), check=True)
    text = readme.read_text()
    assert "| iteration | mask AP | box AP |" in text
    assert "| 899 | 9.5 | 11.8 |" in text and "| 1799 | 23.8 | 27.0 |" in text
    assert "Prose." in text and "old" not in text
    (tmp_path / "curve.csv").write_text("iteration,bbox/AP,segm/AP\n899,11.754,9.6\n")
    assert not tables.update(str(readme), check=True)
    readme.write_text(text.replace("iteration segm/AP", "iteration segm/AP75"))
    with pytest.raises(ValueError, match="no column"):
        tables.update(str(readme))
