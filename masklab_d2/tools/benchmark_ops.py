"""Benchmarks the compiled crop ops against two baselines, at realistic feature-map sizes.

    python3 -m masklab_d2.tools.benchmark_ops [--maps fpn shapes 64x64] [--sizes 7 14]
        [--boxes 512] [--channels 256] [--threads 1 0] [--layouts nchw channels_last]
        [--devices cpu cuda] [--repeat 7] [--boxes-on-one-image] [--markdown out.md]

Maps (``--maps``): ``fpn`` is P2-P5 of an 800x1216 image (200x304 at stride 4 ... 25x38 at
stride 32), ``shapes`` P2-P5 of the shapes dataset's 256x256 images (64x64 ... 8x8), ``HxW`` a
map at stride 16; every map is a batch of 2. Each row crops ``--boxes`` boxes spread over the
image (worst case: all on one level), each on one of the 2 images at random (with
``--boxes-on-one-image``, all on the first: a batch whose images hold very different numbers of
boxes), with one bilinear sample per output pixel for every op.

Ops and baselines, all producing [K, C, S, S] from the same features and boxes:

* ``roi_align``: torchvision's RoIAlign with ``sampling_ratio=1`` (one sample per bin, the same
  work). Its CPU kernels are serial scalar loops: a weak baseline, shown because detectron2 uses
  it.
* ``grid_sample``: the op's pure-PyTorch reference (``crop_and_resize_reference``, what a PyTorch
  user would write): per image, one ``F.grid_sample`` over all of its boxes' sample grids
  (parallel, vectorised ATen code; no [K, C, H, W] expansion), with RoIAlign's border rule.
* ``crop_and_resize``, with gradients to the features, or to features and boxes.
* ``deformable (G=g)``, gradients to features and offsets, and its baseline ``per-sub-box crops``:
  the G x G shifted sub-boxes of every box as K * G^2 plain crops of S/G samples in one call,
  reassembled (what one would write without the deformable op; the offsets get their gradient
  through the sub-box coordinates).

``--threads``: torch thread counts to run every row with (0 = all cores); with two or more, the
``scaling`` column is the speed-up over 1 thread divided by the thread count (1.0 = linear).
Times are min / median / max over ``--repeat`` runs after a warm-up run; "bwd" is the backward
pass alone (``torch.autograd.grad`` on a retained graph), for the gradients named. ``x best
baseline`` divides the faster baseline's median by the op's (forward, backward), comparing like
with like: crop_and_resize (features) against both baselines' feature gradient, the deformable op
against the per-sub-box crops with the same gradients.
"""

import argparse
import os
import statistics
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from masklab_d2.layers import (
    crop_and_resize,
    crop_and_resize_reference,
    deformable_crop_and_resize,
)
from masklab_d2.utils.timing import wall_times_ms

FPN_800x1216 = [(200, 304, 4), (100, 152, 8), (50, 76, 16), (25, 38, 32)]
SHAPES_256 = [(64, 64, 4), (32, 32, 8), (16, 16, 16), (8, 8, 32)]


def parse_maps(names: Sequence[str]) -> List[Tuple[int, int, int]]:
    """--maps entries -> [(height, width, stride)]."""
    maps = []
    for name in names:
        if name == "fpn":
            maps += FPN_800x1216
        elif name == "shapes":
            maps += SHAPES_256
        else:
            height, width = (int(v) for v in name.lower().split("x"))
            maps.append((height, width, 16))
    return maps


def timed(fn: Callable[[], object], repeat: int) -> Tuple[float, float, float]:
    """(min, median, max) wall time of fn() in milliseconds, after one warm-up call."""
    times = wall_times_ms(fn, repeat, warmup=1)  # the Timer synchronises CUDA itself
    return min(times), statistics.median(times), max(times)


def sub_box_crops(features, rois, offsets, scale: float, size: int, gamma: float = 0.1):
    """deformable_crop_and_resize(aligned=True) as K * G^2 plain crops of shifted sub-boxes."""
    num_boxes, grid = rois.shape[0], offsets.shape[-1]
    cell = size // grid
    x1, y1, x2, y2 = (rois[:, i] for i in range(1, 5))
    width, height = x2 - x1, y2 - y1
    # Sample i of the S-lattice is at x1 + i w / (S - 1); sub-box g spans samples g*cell ...
    # g*cell + cell - 1, shifted by gamma * offset * w (all in input pixels).
    first = torch.arange(grid, device=rois.device, dtype=rois.dtype) * cell
    span = (cell - 1) / (size - 1) if size > 1 else 0.0
    start = first / (size - 1) if size > 1 else first * 0 + 0.5
    sx1 = x1[:, None, None] + width[:, None, None] * start[None, None, :]
    sy1 = y1[:, None, None] + height[:, None, None] * start[None, :, None]
    sx1 = sx1 + gamma * offsets[:, 0] * width[:, None, None]
    sy1 = sy1 + gamma * offsets[:, 1] * height[:, None, None]
    sx2 = sx1 + width[:, None, None] * span
    sy2 = sy1 + height[:, None, None] * span
    index = rois[:, :1, None].expand(-1, grid, grid)
    sub = torch.stack([index, sx1, sy1, sx2, sy2], dim=-1).reshape(-1, 5)
    crops = crop_and_resize(features, sub, scale, cell, aligned=True)  # [K*G*G, C, cell, cell]
    crops = crops.view(num_boxes, grid, grid, -1, cell, cell).permute(0, 3, 1, 4, 2, 5)
    return crops.reshape(num_boxes, -1, size, size)


def _case_times(forward, inputs, repeat) -> Dict[str, Tuple[float, float, float]]:
    """inputs[0] is the feature map; every input in the list gets a gradient."""
    forward_ms = timed(lambda: forward(*[x.detach() for x in inputs]), repeat)
    leaves = [x.detach().requires_grad_() for x in inputs]
    output = forward(*leaves)
    grad = torch.randn_like(output)
    backward_ms = timed(
        lambda: torch.autograd.grad(output, leaves, grad, retain_graph=True), repeat
    )
    return {"forward": forward_ms, "backward": backward_ms}


def benchmark(
    device: str,
    maps: List[Tuple[int, int, int]],
    sizes: List[int],
    num_boxes: int,
    channels: int,
    grid: int,
    threads: List[int],
    layouts: List[str],
    repeat: int,
    seed: int,
    ops: Sequence[str] = ("roi_align", "grid_sample", "crop", "deformable"),
    boxes_on_one_image: bool = False,
) -> List[Dict[str, object]]:
    from torchvision.ops import roi_align

    rows = []
    thread_counts = [t or os.cpu_count() for t in threads] if device == "cpu" else [0]
    for height, width, stride in maps:
        generator = torch.Generator().manual_seed(seed)
        features_nchw = torch.randn(2, channels, height, width, generator=generator).to(device)
        image_w, image_h = width * stride, height * stride
        xy = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([image_w, image_h]) * 0.7
        wh = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([image_w, image_h]) * 0.3
        batch_index = torch.randint(0, 2, (num_boxes, 1), generator=generator).float()
        if boxes_on_one_image:
            batch_index.zero_()
        rois = torch.cat([batch_index, xy, xy + wh + stride], dim=1).to(device)
        scale = 1.0 / stride
        for size in sizes:
            cell_grid = grid if size % grid == 0 else 1
            offsets = 0.1 * torch.randn(num_boxes, 2, cell_grid, cell_grid, generator=generator)
            offsets = offsets.to(device)
            for layout in layouts:
                memory_format = (
                    torch.channels_last if layout == "channels_last" else torch.contiguous_format
                )
                features = features_nchw.contiguous(memory_format=memory_format)
                cases = []
                if "roi_align" in ops:
                    cases.append(
                        ("roi_align (torchvision)", "features", "baseline",
                         lambda f: roi_align(f, rois, size, scale, 1, True), [features])
                    )  # fmt: skip
                if "grid_sample" in ops:
                    cases.append(
                        ("grid_sample (per image)", "features", "baseline",
                         lambda f: crop_and_resize_reference(f, rois, scale, size, True),
                         [features])
                    )  # fmt: skip
                if "crop" in ops:
                    cases += [
                        ("crop_and_resize", "features", "op",
                         lambda f: crop_and_resize(f, rois, scale, size, True), [features]),
                        ("crop_and_resize", "features + boxes", "",
                         lambda f, b: crop_and_resize(f, b, scale, size, True), [features, rois]),
                    ]  # fmt: skip
                if "deformable" in ops:
                    cases += [
                        (f"per-sub-box crops (G={cell_grid})", "features + offsets", "dbaseline",
                         lambda f, o: sub_box_crops(f, rois, o, scale, size), [features, offsets]),
                        (f"deformable (G={cell_grid})", "features + offsets", "dop",
                         lambda f, o: deformable_crop_and_resize(
                             f, rois, o, scale, size, 0.1, True), [features, offsets]),
                    ]  # fmt: skip
                single = {}
                for count in thread_counts:
                    if device == "cpu":
                        torch.set_num_threads(count)
                    timings = [
                        (op, grads, role, _case_times(fn, inputs, repeat))
                        for op, grads, role, fn, inputs in cases
                    ]
                    baseline = {
                        key: min(
                            (t[key][1] for _, _, role, t in timings if role == "baseline"),
                            default=None,
                        )
                        for key in ("forward", "backward")
                    }
                    deformable_baseline = next(
                        (t for _, _, role, t in timings if role == "dbaseline"), None
                    )
                    for op, grads, role, t in timings:
                        reference = baseline
                        if role in ("dop", "dbaseline") and deformable_baseline is not None:
                            reference = {k: deformable_baseline[k][1] for k in t}
                        row = {
                            "device": device,
                            "threads": count if device == "cpu" else "-",
                            "map": f"2x{channels}x{height}x{width} /{stride}",
                            "layout": layout,
                            "size": f"{size}x{size}",
                            "op": op,
                            "gradients": grads,
                            "fwd ms min/med/max": "/".join(f"{v:.2f}" for v in t["forward"]),
                            "bwd ms min/med/max": "/".join(f"{v:.2f}" for v in t["backward"]),
                        }
                        for key, short in (("forward", "fwd"), ("backward", "bwd")):
                            best = reference.get(key) if reference else None
                            row[f"{short} x best baseline"] = (
                                f"{best / t[key][1]:.2f}" if best and role != "baseline" else ""
                            )
                        key = (op, grads)
                        if count == 1:
                            single[key] = t
                        scaling = ""
                        if count > 1 and key in single:
                            scaling = "{:.2f} / {:.2f}".format(
                                single[key]["forward"][1] / t["forward"][1] / count,
                                single[key]["backward"][1] / t["backward"][1] / count,
                            )
                        row["scaling fwd / bwd"] = scaling
                        rows.append(row)
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    """A Markdown table of benchmark rows."""
    header = list(rows[0].keys())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(v) for v in row.values()) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--boxes", type=int, default=512)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--maps", nargs="+", default=["fpn", "shapes"], help="fpn, shapes, HxW")
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14])
    parser.add_argument(
        "--grid",
        type=int,
        default=7,
        help="deformable sub-box grid G (G=1 if it does not divide the size)",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 0], help="CPU thread counts (0 = all)"
    )
    parser.add_argument("--layouts", nargs="+", default=["nchw"], choices=["nchw", "channels_last"])
    parser.add_argument(
        "--ops",
        nargs="+",
        default=["roi_align", "grid_sample", "crop", "deformable"],
        choices=["roi_align", "grid_sample", "crop", "deformable"],
    )
    parser.add_argument(
        "--devices", nargs="+", default=None, help="default: cpu, plus cuda if available"
    )
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--boxes-on-one-image", action="store_true", help="all boxes on the first image"
    )
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    previous_threads = torch.get_num_threads()
    rows = []
    try:
        for device in devices:
            rows += benchmark(
                device,
                parse_maps(args.maps),
                args.sizes,
                args.boxes,
                args.channels,
                args.grid,
                args.threads,
                args.layouts,
                args.repeat,
                args.seed,
                args.ops,
                args.boxes_on_one_image,
            )
    finally:
        torch.set_num_threads(previous_threads)
    table = format_table(rows)
    header = (
        f"{args.boxes} boxes per map (batch of 2, "
        f"{'all on the first image' if args.boxes_on_one_image else 'each on a random image'}), "
        f"{args.channels} channels, float32, one sample "
        f"per output pixel; {os.cpu_count()} CPU cores, torch {torch.__version__}; "
        f"min/median/max of {args.repeat} runs after a warm-up"
    )
    if "cuda" in devices:
        header += f"; {torch.cuda.get_device_name()}"
    print(header)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
