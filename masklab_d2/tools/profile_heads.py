"""Cost of the mask heads of detectron2 configs: parameters, FLOPs, latency and peak memory.

    python -m masklab_d2.tools.profile_heads --config-file A.yaml B.yaml ... \
        [--detections 10 50 100] [--device cpu cuda] [--repeat 5] [--warmup 2] \
        [--markdown out.md] [--opts KEY VALUE ...]

Each config's mask branch (mask pooler and head, or the head alone when it crops for itself) is
built through detectron2 from the YAML with random weights and run in eval mode on one image with
D random detections and random feature maps. A config entry may carry overrides for itself alone,
``PATH@KEY=VALUE[@KEY=VALUE...]``; ``--opts`` apply to every entry. What each column measures, and
how: docs/tools.md.
"""

import argparse
import contextlib
import ctypes
import math
import os
import resource
import statistics
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from masklab_d2.utils.timing import wall_times_ms


def split_config_entry(entry: str) -> Tuple[str, List[str]]:
    """``PATH@KEY=VALUE@...`` -> (PATH, [KEY, VALUE, ...])."""
    path, *overrides = entry.split("@")
    opts = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ValueError(f"config override {override!r} in {entry!r} is not KEY=VALUE")
        opts += [key, value]
    return path, opts


class MaskBranch(nn.Module):
    """A config's mask branch (pooler and head, or the head alone) with what it needs to run.

    Attributes:
        head: the mask head module.
        pooler: the mask pooler, or None for a head that crops for itself.
        in_features: names of the feature maps the branch reads.
        feature_shapes: backbone ShapeSpec per feature name.
        num_classes: ROI_HEADS.NUM_CLASSES (for random pred_classes).
        head_description, input_description: the table's "head" and "input" cells.
    """

    def __init__(self, cfg):
        from detectron2.modeling import build_model

        import masklab_d2.modeling  # noqa: F401  (registration)

        super().__init__()
        model = build_model(cfg)  # only its mask branch is kept
        roi_heads = model.roi_heads
        if not getattr(roi_heads, "mask_on", False):
            raise ValueError("the config's ROI heads have no mask branch")
        self.head = roi_heads.mask_head
        self.pooler = roi_heads.mask_pooler
        self.in_features = list(roi_heads.mask_in_features)
        self.feature_shapes = model.backbone.output_shape()
        self.num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        mask_cfg, summary = cfg.MODEL.ROI_MASK_HEAD, self.head.extra_repr()
        self.head_description = f"{mask_cfg.NAME} ({summary})" if summary else mask_cfg.NAME
        self.input_description = ",".join(self.in_features)
        if self.pooler is not None:
            pooler = f"{mask_cfg.POOLER_TYPE} {mask_cfg.POOLER_RESOLUTION}"
            self.input_description = f"{pooler} on {self.input_description}"
        self.eval()

    def forward(self, features: Dict[str, torch.Tensor], instances):
        """As PartialROIHeads runs the mask branch at inference."""
        if self.pooler is None:
            return self.head(features, instances)
        boxes = [x.pred_boxes for x in instances]
        return self.head(self.pooler([features[f] for f in self.in_features], boxes), instances)

    def random_inputs(
        self, num_detections: int, image_size: Tuple[int, int], device: str, seed: int = 0
    ) -> Tuple[Dict[str, torch.Tensor], Callable[[], object]]:
        """(feature maps, a function that makes fresh Instances) of one image with
        ``num_detections`` random boxes (fresh: the head writes pred_masks into them)."""
        from detectron2.structures import Boxes, Instances

        generator = torch.Generator().manual_seed(seed)
        height, width = image_size
        features = {}
        for name in self.in_features:
            spec = self.feature_shapes[name]
            # ceil: the feature size of an image padded to the stride
            size = (-(-height // spec.stride), -(-width // spec.stride))
            features[name] = torch.randn(1, spec.channels, *size, generator=generator).to(device)
        scale = torch.tensor([width, height], dtype=torch.float32)
        xy = torch.rand(num_detections, 2, generator=generator) * scale * 0.7
        wh = torch.rand(num_detections, 2, generator=generator) * scale * 0.45 + 8
        boxes = torch.cat([xy, torch.minimum(xy + wh, scale)], dim=1).to(device)
        classes = torch.randint(self.num_classes, (num_detections,), generator=generator).to(device)
        scores = torch.rand(num_detections, generator=generator).to(device)
        return features, lambda: Instances(
            tuple(image_size), pred_boxes=Boxes(boxes), pred_classes=classes, scores=scores
        )


class _TracedBranch(nn.Module):
    """Wraps branch(features, [instances]) as a module of tensors only, for fvcore's tracing."""

    def __init__(self, branch: MaskBranch, keys: List[str], new_instances: Callable[[], object]):
        super().__init__()
        self.branch = branch
        self.keys = keys
        self.new_instances = new_instances

    def forward(self, *tensors):
        return self.branch(dict(zip(self.keys, tensors)), [self.new_instances()])[0].pred_masks


def _bilinear_handle(inputs, outputs) -> float:
    """4 multiply-adds per output element (per channel) of a bilinear crop op."""
    from fvcore.nn.jit_handles import get_shape

    return 4 * math.prod(get_shape(outputs[0]))


def _roi_align_handle(inputs, outputs) -> float:
    """torchvision::roi_align: 4 multiply-adds per sampling point; ratio 0 counted as 1 point."""
    sampling_ratio = inputs[5].toIValue() if len(inputs) > 5 else None
    points = sampling_ratio**2 if isinstance(sampling_ratio, int) and sampling_ratio > 0 else 1
    return _bilinear_handle(inputs, outputs) * points


EXTRA_FLOP_HANDLES = {
    "masklab::crop_and_resize": _bilinear_handle,
    "masklab::deformable_crop_and_resize": _bilinear_handle,
    "torchvision::roi_align": _roi_align_handle,
}


def count_flops(branch: MaskBranch, features, new_instances) -> Tuple[float, List[str]]:
    """(FLOPs of one forward in fvcore's convention, op names fvcore did not count)."""
    from fvcore.nn import FlopCountAnalysis

    module = _TracedBranch(branch, list(features), new_instances)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(module, tuple(features.values()))
        analysis.set_op_handle(**EXTRA_FLOP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = analysis.total()
        unsupported = sorted(analysis.unsupported_ops())
    return float(total), unsupported


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_memory_mb(fn: Callable[[], object], device: str) -> Tuple[float, bool]:
    """(extra peak memory of fn() in MB, exact). CUDA: ``max_memory_allocated``; CPU: the rise of
    the peak RSS (``VmHWM``, reset after ``malloc_trim``: tensors, allocator and oneDNN scratch),
    else of ``ru_maxrss``, 0 unless fn() sets a new process peak: not exact (docs/tools.md)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, True
    with contextlib.suppress(Exception):  # return freed heap memory to the system first
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:  # reset VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = _status_kib("VmHWM") is not None
    except OSError:
        exact = False
    if exact:
        before = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - before) / 1024, True
    before = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _status_kib("VmRSS") or 0)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(0, after - before) / 1024, False


def profile_config(
    entry: str,
    opts: Sequence[str],
    detections: Sequence[int],
    devices: Sequence[str],
    repeat: int,
    warmup: int,
    image_size: Tuple[int, int],
    seed: int = 0,
) -> List[Dict[str, object]]:
    """One row per device for the config entry ``PATH[@KEY=VALUE...]``."""
    from masklab_d2.config import load_config

    path, entry_opts = split_config_entry(entry)
    short_path = "/".join(os.path.normpath(path).split(os.sep)[-2:])  # configs/a/b.yaml -> a/b.yaml
    rows = []
    flops: Dict[int, float] = {}
    unsupported: List[str] = []
    for device in devices:
        cfg = load_config(path, list(opts) + entry_opts)
        cfg.MODEL.WEIGHTS = ""  # random weights: MODEL.WEIGHTS is ignored
        cfg.MODEL.DEVICE = device
        cfg.MODEL.MASK_ON = True
        torch.manual_seed(seed)
        branch = MaskBranch(cfg).to(device)
        row = {
            "config": " ".join([short_path] + entry.split("@")[1:]),
            "head": branch.head_description,
            "input": branch.input_description,
            "params": sum(p.numel() for p in branch.parameters()),
            "device": device,
            "threads": torch.get_num_threads(),
            "ms": {},
        }
        for num in detections:
            features, new_instances = branch.random_inputs(num, image_size, device, seed)
            if num not in flops:
                branch.to("cpu")
                cpu_inputs = branch.random_inputs(num, image_size, "cpu", seed)
                flops[num], missing = count_flops(branch, *cpu_inputs)
                unsupported = sorted(set(unsupported) | set(missing))
                branch.to(device)

            def run(features=features, new_instances=new_instances, branch=branch):
                with torch.no_grad():
                    return branch(features, [new_instances()])

            row["ms"][num] = statistics.median(wall_times_ms(run, repeat, warmup))
            if num == max(detections):
                row["peak_mb"], row["peak_exact"] = peak_memory_mb(run, device)
        row["gflops"] = {num: flops[num] / 1e9 for num in detections}
        row["not_counted"] = unsupported
        rows.append(row)
        del branch
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def markdown_table(rows: List[Dict[str, object]], detections: Sequence[int]) -> str:
    """The rows as a Markdown table (one line per config and device)."""
    header = ["config", "head", "input", "device", "params (M)"]
    header += [f"GFLOPs @{d}" for d in detections] + [f"ms @{d}" for d in detections]
    header += [f"peak MB @{max(detections)}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        device = row["device"] + (f" ({row['threads']} thr)" if row["device"] == "cpu" else "")
        cells = [row["config"], row["head"], row["input"], device, f"{row['params'] / 1e6:.3f}"]
        cells += [f"{row['gflops'][d]:.2f}" for d in detections]
        cells += [f"{row['ms'][d]:.1f}" for d in detections]
        cells += [("" if row["peak_exact"] else ">=") + f"{row['peak_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    not_counted = sorted({op for row in rows for op in row["not_counted"]})
    notes = [
        "",
        "One image per run; the mask branch (pooler and head). GFLOPs: fvcore, one multiply-add "
        "= one FLOP. ms: median eval-mode latency per image. peak MB: see "
        "masklab_d2/tools/profile_heads.py.",
    ]
    if not_counted:
        notes.append("Ops without a FLOP count (element-wise etc.): " + ", ".join(not_counted))
    return "\n".join(lines + notes) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-file",
        nargs="+",
        required=True,
        metavar="PATH[@KEY=VALUE...]",
        help="detectron2 YAML configs, each optionally with its own overrides",
    )
    parser.add_argument("--detections", nargs="+", type=int, default=[10, 50, 100])
    parser.add_argument(
        "--device", nargs="+", help="cpu and/or cuda (default: cpu, plus cuda when available)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument(
        "--image-size", type=int, nargs="+", default=[256], metavar=("H", "W"), help="H [W]"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument(
        "--opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="KEY VALUE pairs applied to every config (last argument)",
    )
    args = parser.parse_args(argv)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: no CUDA device on this machine")
    if any(d <= 0 for d in args.detections):
        raise SystemExit("--detections must be positive")
    if len(args.image_size) > 2 or min(args.image_size) <= 0:
        raise SystemExit("--image-size takes one or two positive sizes: H [W]")
    image_size = (args.image_size[0], args.image_size[-1])
    options = (args.detections, devices, args.repeat, args.warmup, image_size, args.seed)
    rows = [row for entry in args.config_file for row in profile_config(entry, args.opts, *options)]
    table = markdown_table(rows, args.detections)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
