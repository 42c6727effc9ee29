"""The evaluator's group AP table prints numbers with two decimals, also next to a "-" row."""

import pytest

pytestmark = pytest.mark.detectron2

from masklab_d2.evaluation.partial_coco import group_table  # noqa: E402


def test_group_table_formats_numbers_next_to_an_empty_group():
    table = group_table([["seen", 8, 15.011713670497247, 30.0, 1.5], ["unseen", 0, "-", "-", "-"]])
    lines = table.splitlines()
    assert [c.strip() for c in lines[2].strip("|").split("|")] == [
        "seen",
        "8",
        "15.01",
        "30.00",
        "1.50",
    ]
    assert [c.strip() for c in lines[3].strip("|").split("|")] == ["unseen", "0", "-", "-", "-"]
    assert "15.0117" not in table


def test_group_table_heads_its_ap_column_with_the_metric():
    def header(*args):
        return [c.strip() for c in group_table(*args).splitlines()[0].strip("|").split("|")]

    rows = [["seen", 8, 12.5, 30.0, 1.5]]
    assert header(rows) == ["group", "#classes", "mask AP", "AP50", "AP75"]
    assert header(rows, "boundary AP") == ["group", "#classes", "boundary AP", "AP50", "AP75"]
