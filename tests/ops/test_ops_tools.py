"""Smoke tests of the op benchmark (tiny sizes, no timing claims); gpu_check's own tests are in
test_gpu_check.py."""

import torch

from masklab_d2.tools import benchmark_ops


def test_benchmark_baselines_compute_the_same_crops():
    """The grid_sample baseline (the op's reference, one grid_sample per image, boxes of the
    images interleaved and crossing the border) and the per-sub-box baseline equal the ops they
    stand in for, so the table compares equal work."""
    g = torch.Generator().manual_seed(50)
    features = torch.randn(2, 3, 20, 24, generator=g, dtype=torch.float64)
    xy = torch.rand(6, 2, generator=g, dtype=torch.float64) * 20 + 4
    rois = torch.cat([torch.tensor([[0.0], [1], [0], [1], [1], [0]]), xy, xy + 12], dim=1)
    from masklab_d2.layers import (
        crop_and_resize,
        crop_and_resize_reference,
        deformable_crop_and_resize,
    )

    border = rois.clone()
    border[:, 1:] -= 8  # half the boxes start outside the map
    for boxes in (rois, border):
        torch.testing.assert_close(
            crop_and_resize_reference(features, boxes, 0.5, 7, True),
            crop_and_resize(features, boxes, 0.5, 7, True),
        )
    offsets = 0.3 * torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(
        benchmark_ops.sub_box_crops(features, rois, offsets, 0.5, 6),
        deformable_crop_and_resize(features, rois, offsets, 0.5, 6, 0.1, True),
    )


def test_benchmark_runs_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "bench.md"
    benchmark_ops.main(
        ["--maps", "12x10", "8x6", "--sizes", "4", "--boxes", "5", "--channels", "3",
         "--grid", "2", "--threads", "1", "2", "--repeat", "1", "--devices", "cpu",
         "--layouts", "nchw", "channels_last", "--markdown", str(out)]
    )  # fmt: skip
    table = out.read_text()
    assert "| device | threads | map |" in capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| cpu |")]
    # 2 maps x 2 layouts x 2 thread counts x 6 cases
    assert len(rows) == 2 * 2 * 2 * 6
    assert any("per-sub-box crops (G=2)" in row for row in rows)
    assert any("grid_sample (per image)" in row for row in rows)
    assert "| 2x3x8x6 /16 |" in table and "| 2 | 2x3x12x10 /16 | channels_last |" in table
    assert benchmark_ops.parse_maps(["fpn", "shapes"])[0] == (200, 304, 4)
    assert benchmark_ops.parse_maps(["shapes"])[-1] == (8, 8, 32)
