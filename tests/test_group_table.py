"""The evaluator's group AP table prints numbers with two decimals, also next to a "-" row."""

import pytest

pytestmark = pytest.mark.detectron2
pytest.importorskip("detectron2", reason="detectron2 is not installed (see README: Install)")

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
