"""Per-image mask-branch latency of BlendMask at several R beside Mask R-CNN's 4-conv head.

    python -m masklab_d2.tools.benchmark_blender [--height 800] [--width 1216]
        [--detections 10 50 100] [--resolutions 28 56 112] [--rounds 15] [--threads 1]
        [--markdown out.md]

Complements ``masklab_d2.tools.profile_heads`` (parameters, fvcore FLOPs, peak memory; square
images, pooled heads timed without their pooler) for one question: what does raising BlendMask's
output resolution R cost, on a COCO-sized image? Here every row is the whole mask branch as
PartialROIHeads runs it at inference, eval mode, ``torch.no_grad()``, one image:

* Mask R-CNN (configs/coco/mask_rcnn_R_50_FPN_1x.yaml): the ROIAlignV2 14x14 pooler over p2-p5,
  then the 4-conv head (28x28 masks, 80 classes);
* BlendMask (configs/coco/blendmask_R_50_FPN_1x.yaml, MODEL.BLENDMASK.BOTTOM_RESOLUTION = R): the
  bottom module (once per image, whatever the number of detections), the attention pooler and
  network, the bases' RoIAlign and the blend;
* "bottom module only": BlendMask's per-image part alone.

Inputs are random: R-50-FPN maps (256 channels, p2-p5 of a ``--height`` x ``--width`` image padded
to a multiple of 32) and D random boxes (as profile_heads draws them). Rows are interleaved
round by round so that load from other processes hits all of them alike; the table gives the
median over ``--rounds`` and, in brackets, the minimum (the least disturbed run).
"""

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

MASK_RCNN_CONFIG = "configs/coco/mask_rcnn_R_50_FPN_1x.yaml"
BLENDMASK_CONFIG = "configs/coco/blendmask_R_50_FPN_1x.yaml"


def build_mask_branch(config_file: str, opts: Sequence[str]):
    """(roi_heads, backbone output shapes) of a config, random weights, eval mode, CPU."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import masklab_d2.modeling  # noqa: F401  (registration)
    from masklab_d2.config import add_masklab_config

    cfg = get_cfg()
    add_masklab_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    return model.roi_heads, model.backbone.output_shape()


def random_features(shapes, names: Sequence[str], height: int, width: int, seed: int = 0):
    """{name: [1, C, ceil(H'/s), ceil(W'/s)]} with H', W' the image padded to a multiple of 32."""
    generator = torch.Generator().manual_seed(seed)
    padded_h, padded_w = -(-height // 32) * 32, -(-width // 32) * 32
    return {
        n: torch.randn(
            1,
            shapes[n].channels,
            padded_h // shapes[n].stride,
            padded_w // shapes[n].stride,
            generator=generator,
        )
        for n in names
    }


def random_detections(num: int, height: int, width: int, num_classes: int, seed: int = 0):
    """One image's Instances with ``num`` random pred_boxes / pred_classes."""
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(seed)
    size = torch.tensor([width, height], dtype=torch.float32)
    xy = torch.rand(num, 2, generator=generator) * size * 0.7
    wh = torch.rand(num, 2, generator=generator) * size * 0.45 + 8
    boxes = torch.cat([xy, torch.minimum(xy + wh, size)], dim=1)
    instances = Instances((height, width))
    instances.pred_boxes = Boxes(boxes)
    instances.pred_classes = torch.randint(num_classes, (num,), generator=generator)
    return instances


def branch_runner(roi_heads, features: Dict[str, torch.Tensor], detections) -> Callable[[], object]:
    """Runs PartialROIHeads' inference mask branch (pooler + head) on fresh copies of detections."""

    def run():
        with torch.no_grad():
            return roi_heads._forward_mask(features, [detections[:]])

    return run


def benchmark(args) -> List[Dict[str, object]]:
    rows = []
    mask_rcnn, shapes = build_mask_branch(MASK_RCNN_CONFIG, [])
    candidates = [("Mask R-CNN 4-conv, R=28 (pooler + head)", mask_rcnn)]
    for resolution in args.resolutions:
        heads, _ = build_mask_branch(
            BLENDMASK_CONFIG, ["MODEL.BLENDMASK.BOTTOM_RESOLUTION", str(resolution)]
        )
        candidates.append((f"BlendMask K=4, R={resolution}", heads))
    names = sorted(
        {f for _, h in candidates for f in h.mask_in_features}, key=lambda f: shapes[f].stride
    )
    features = random_features(shapes, names, args.height, args.width)
    bottom = candidates[-1][1].mask_head
    bottom_inputs = [features[f] for f in bottom.bottom_in_features]

    def run_bottom():
        with torch.no_grad():
            return bottom.bottom(bottom_inputs)

    times = {label: {} for label, _ in candidates}
    times["BlendMask bottom module only (per image)"] = {}
    for num in args.detections:
        detections = random_detections(num, args.height, args.width, 80)
        runners = [(label, branch_runner(h, features, detections)) for label, h in candidates]
        runners.append(("BlendMask bottom module only (per image)", run_bottom))
        for _, fn in runners:  # warm-up
            fn()
        samples = {label: [] for label, _ in runners}
        for _ in range(args.rounds):
            for label, fn in runners:
                start = time.perf_counter()
                fn()
                samples[label].append((time.perf_counter() - start) * 1000)
        for label, values in samples.items():
            times[label][num] = (statistics.median(values), min(values))
    for label, by_num in times.items():
        rows.append({"row": label, "ms": by_num})
    return rows


def markdown_table(rows, detections, args) -> str:
    header = ["mask branch"] + [f"ms @{d} det." for d in detections]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row["row"]] + [
            f"{row['ms'][d][0]:.0f} ({row['ms'][d][1]:.0f})" for d in detections
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"CPU, {torch.get_num_threads()} thread(s), one {args.height}x{args.width} image, R-50-FPN "
        f"maps (256 ch), random weights and boxes; median of {args.rounds} interleaved rounds "
        "(minimum in brackets)."
    )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1216)
    parser.add_argument("--detections", nargs="+", type=int, default=[10, 50, 100])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[28, 56, 112])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = markdown_table(benchmark(args), args.detections, args)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
