"""Benchmarks the compiled crop ops against torchvision.ops.roi_align.

    python -m masklab_d2.tools.benchmark_ops [--boxes 512] [--channels 256] [--sizes 7 14 41]
        [--devices cpu cuda] [--markdown out.md]

Every op produces the same number of samples: roi_align runs with sampling_ratio=1 (one sample
per output bin), crop_and_resize with one sample per output pixel. "backward" is the backward pass
alone, for the gradients named in the table: the feature gradient (what roi_align offers), and
for the crop ops also the geometry gradient (boxes, or the deformable op's offsets, which is how
it is trained). "/ plain" compares with crop_and_resize computing the same kind of gradients. Times are the median of --repeat runs after a warm-up.
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
from torchvision.ops import roi_align

from masklab_d2.layers import crop_and_resize, deformable_crop_and_resize


def _timed(fn: Callable[[], object], device: str, repeat: int) -> float:
    """Median wall time of fn() in milliseconds."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _forward_backward_times(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inputs: List[torch.Tensor],
    device: str,
    repeat: int,
) -> Dict[str, float]:
    """inputs[0] is the feature map; every input in the list gets a gradient."""
    forward_ms = _timed(lambda: forward(*[x.detach() for x in inputs]), device, repeat)
    leaves = [x.detach().requires_grad_() for x in inputs]
    output = forward(*leaves)
    grad = torch.randn_like(output)
    backward_ms = _timed(
        lambda: torch.autograd.grad(output, leaves, grad, retain_graph=True), device, repeat
    )
    return {"forward": forward_ms, "backward": backward_ms}


def benchmark(
    device: str, num_boxes: int, channels: int, sizes: List[int], grid: int, repeat: int, seed: int
) -> List[Dict[str, object]]:
    generator = torch.Generator().manual_seed(seed)
    batch, height, width, stride = 2, 64, 64, 16
    features = torch.randn(batch, channels, height, width, generator=generator).to(device)
    xy = torch.rand(num_boxes, 2, generator=generator) * (width * stride * 0.6)
    wh = torch.rand(num_boxes, 2, generator=generator) * (width * stride * 0.35) + 16
    batch_index = torch.randint(0, batch, (num_boxes, 1), generator=generator).float()
    rois = torch.cat([batch_index, xy, xy + wh], dim=1).to(device)
    scale = 1.0 / stride
    rows = []
    for size in sizes:
        cell_grid = grid if size % grid == 0 else 1
        offsets = (0.1 * torch.randn(num_boxes, 2, cell_grid, cell_grid, generator=generator)).to(
            device
        )
        cases = [
            (
                "roi_align (torchvision)",
                "features",
                lambda f: roi_align(f, rois, size, scale, 1, True),
                [features],
            ),
            (
                "crop_and_resize",
                "features",
                lambda f: crop_and_resize(f, rois, scale, size),
                [features],
            ),
            (
                "crop_and_resize",
                "features + boxes",
                lambda f, b: crop_and_resize(f, b, scale, size),
                [features, rois],
            ),
            (
                f"deformable_crop_and_resize (G={cell_grid})",
                "features + offsets",
                lambda f, o: deformable_crop_and_resize(f, rois, o, scale, size),
                [features, offsets],
            ),
        ]
        timings = [
            (op, grads, _forward_backward_times(fn, inputs, device, repeat))
            for op, grads, fn, inputs in cases
        ]
        baseline = timings[0][2]
        plain = timings[2][2]  # same gradients as the deformable op: features + geometry
        for op, grads, t in timings:
            rows.append(
                {
                    "device": device,
                    "size": f"{size}x{size}",
                    "op": op,
                    "gradients": grads,
                    "forward ms": t["forward"],
                    "backward ms": t["backward"],
                    "fwd speedup vs roi_align": baseline["forward"] / t["forward"],
                    "bwd speedup vs roi_align": baseline["backward"] / t["backward"],
                    "fwd / plain": t["forward"] / plain["forward"],
                    "bwd / plain (same grads)": t["backward"] / plain["backward"],
                }
            )
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    """A Markdown table of benchmark rows."""
    header = list(rows[0].keys())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--boxes", type=int, default=512)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 41])
    parser.add_argument(
        "--grid",
        type=int,
        default=7,
        help="deformable sub-box grid G (G=1 if it does not divide the size)",
    )
    parser.add_argument(
        "--devices", nargs="+", default=None, help="default: cpu, plus cuda if available"
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    rows = []
    for device in devices:
        rows += benchmark(
            device, args.boxes, args.channels, args.sizes, args.grid, args.repeat, args.seed
        )
    table = format_table(rows)
    threads = torch.get_num_threads()
    header = (
        f"{args.boxes} boxes, {args.channels} channels, 2x{args.channels}x64x64 features (stride 16), "
        f"{threads} CPU threads, torch {torch.__version__}"
    )
    if torch.cuda.is_available():
        header += f", {torch.cuda.get_device_name()}"
    print(header)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
