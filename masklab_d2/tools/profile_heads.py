"""Cost of the mask heads of detectron2 configs: parameters, FLOPs, latency and peak memory.

    python -m masklab_d2.tools.profile_heads --config-file A.yaml B.yaml ... \
        [--detections 10 50 100] [--device cpu cuda] [--repeat 5] [--warmup 2] \
        [--markdown out.md] [--opts KEY VALUE ...]

Each config's mask branch is built through detectron2 from the YAML (``build_model``, random
weights, ``MODEL.WEIGHTS`` ignored) and run in eval mode, as at inference, on one image
(``--image-size H [W]``, default 256) with D random detections (``pred_boxes``, ``pred_classes``,
``scores``) and random feature maps shaped like the backbone's outputs for that image
(``ROI_MASK_HEAD.IN_FEATURES``, else ``ROI_HEADS.IN_FEATURES``). The branch is everything the ROI
heads run for masks: the mask pooler (RoIAlign of Mask R-CNN, Deep-MARC) and the head, or the
head alone when it crops for itself (``POOLER_TYPE: ""``: MaskLab, BlendMask, PointRend) -- so
every row includes its cropping, per-image work such as BlendMask's bottom module, and
PointRend's whole subdivision inference (its point sampling counted as ``aten::grid_sampler``).

A config entry may carry overrides for that entry alone, ``PATH@KEY=VALUE[@KEY=VALUE...]``
(e.g. ``deep_marc_R_50_FPN_hg52_1x.yaml@MODEL.DEEP_MARC.NETWORK=hourglass20``); ``--opts``
apply to every entry.

Columns:

* params: parameters of the mask branch.
* GFLOPs: fvcore's ``FlopCountAnalysis`` of one forward pass, in its convention: one fused
  multiply-add counts as one FLOP (so these are GMACs); convolutions, matmuls, norms and
  interpolation are counted, element-wise ops (ReLU, sigmoid, additions) are not. Added handles:
  ``masklab::crop_and_resize`` and ``masklab::deformable_crop_and_resize`` count bilinear sampling
  as 4 multiply-adds per output element per channel (as fvcore counts ``aten::grid_sampler``),
  ``torchvision::roi_align`` the same per sampling point (``sampling_ratio``^2 points per bin; an
  adaptive ratio of 0 is counted as 1 point, a lower bound).
* ms: latency per image, the median of ``--repeat`` timed runs after ``--warmup`` runs, under
  ``torch.no_grad()``; CUDA runs are synchronised.
* peak MB: extra memory while the head runs with the largest D. CUDA:
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the run. CPU: increase of
  the process's peak resident set size (Linux ``VmHWM``, reset to the current RSS through
  ``/proc/self/clear_refs`` after ``malloc_trim`` returned freed heap memory to the system), so it
  includes allocator and oneDNN scratch memory; ``tracemalloc`` is not used because it does not
  see tensor allocations. Where ``clear_refs`` cannot be written the fallback is the increase of
  ``resource.getrusage().ru_maxrss``, which stays 0 unless the run sets a new process peak; such
  values are marked with ">=".

Latencies depend on the machine and its load: compare rows from one run, and say how many
threads were used (``OMP_NUM_THREADS`` / ``torch.get_num_threads()``, printed with the table).
"""

import argparse
import contextlib
import ctypes
import logging
import os
import resource
import statistics
import sys
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from masklab_d2.utils.timing import wall_times_ms

logger = logging.getLogger("masklab_d2.tools.profile_heads")

DEFAULT_DETECTIONS = (10, 50, 100)


# ------------------------------------------------------------------------------------------------
# Building the head and its inputs
# ------------------------------------------------------------------------------------------------
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


def branch_config(config_file: str, opts: Sequence[str], device: str):
    """The config of ``config_file`` and ``opts``, for a randomly initialised mask branch."""
    from masklab_d2.config import load_config

    cfg = load_config(config_file, opts)
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.DEVICE = device
    cfg.MODEL.MASK_ON = True
    return cfg


class MaskBranch(nn.Module):
    """A config's mask branch (pooler and head, or the head alone) with what it needs to run.

    Attributes:
        head: the mask head module.
        pooler: the mask pooler, or None for a head that crops for itself.
        in_features: names of the feature maps the branch reads.
        feature_shapes: backbone ShapeSpec per feature name.
        num_classes: ROI_HEADS.NUM_CLASSES (for random pred_classes).
    """

    def __init__(self, cfg):
        from detectron2.modeling import build_model

        import masklab_d2.modeling  # noqa: F401  (registration)

        super().__init__()
        model = build_model(cfg)
        roi_heads = model.roi_heads
        if not getattr(roi_heads, "mask_on", False):
            raise ValueError("the config's ROI heads have no mask branch")
        self.head = roi_heads.mask_head
        self.pooler = roi_heads.mask_pooler
        self.in_features = list(roi_heads.mask_in_features)
        self.feature_shapes = model.backbone.output_shape()
        self.num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.name = cfg.MODEL.ROI_MASK_HEAD.NAME
        self.pooler_description = (
            f"{cfg.MODEL.ROI_MASK_HEAD.POOLER_TYPE} {cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION}"
            if self.pooler is not None
            else ""
        )
        self.eval()
        del model  # only the mask branch is kept

    @property
    def input_description(self) -> str:
        features = ",".join(self.in_features)
        return f"{self.pooler_description} on {features}" if self.pooler_description else features

    def forward(self, features: Dict[str, torch.Tensor], instances):
        """As PartialROIHeads runs the mask branch at inference."""
        if self.pooler is not None:
            pooled = self.pooler(
                [features[f] for f in self.in_features], [x.pred_boxes for x in instances]
            )
            return self.head(pooled, instances)
        return self.head(features, instances)

    def random_inputs(
        self, num_detections: int, image_size: Tuple[int, int], device: str, seed: int = 0
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """(feature maps, instance fields) of one image with ``num_detections`` random boxes."""
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
        boxes = torch.cat([xy, torch.minimum(xy + wh, scale)], dim=1)
        fields = {
            "pred_boxes": boxes.to(device),
            "pred_classes": torch.randint(
                self.num_classes, (num_detections,), generator=generator
            ).to(device),
            "scores": torch.rand(num_detections, generator=generator).to(device),
        }
        return features, fields


def make_instances(fields: Dict[str, torch.Tensor], image_size: Tuple[int, int]):
    """Fresh detectron2 Instances (the head writes pred_masks into them)."""
    from detectron2.structures import Boxes, Instances

    instances = Instances(tuple(image_size))
    instances.pred_boxes = Boxes(fields["pred_boxes"])
    instances.pred_classes = fields["pred_classes"]
    instances.scores = fields["scores"]
    return instances


class _TracedBranch(nn.Module):
    """Wraps branch(features, [instances]) as a module of tensors only, for fvcore's tracing."""

    def __init__(self, branch: MaskBranch, keys: List[str], fields, image_size: Tuple[int, int]):
        super().__init__()
        self.branch = branch
        self.keys = keys
        self.fields = fields
        self.image_size = image_size

    def forward(self, *tensors):
        out = self.branch(
            dict(zip(self.keys, tensors)), [make_instances(self.fields, self.image_size)]
        )
        return out[0].pred_masks


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------
def _bilinear_handle(inputs, outputs) -> float:
    """4 multiply-adds per output element (per channel) of a bilinear crop op."""
    from fvcore.nn.jit_handles import get_shape

    numel = 1
    for dim in get_shape(outputs[0]):
        numel *= dim
    return 4 * numel


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


def count_flops(branch: MaskBranch, features, fields, image_size) -> Tuple[float, List[str]]:
    """(FLOPs of one forward in fvcore's convention, op names fvcore did not count)."""
    from fvcore.nn import FlopCountAnalysis

    module = _TracedBranch(branch, list(features), fields, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(module, tuple(features.values()))
        analysis.set_op_handle(**EXTRA_FLOP_HANDLES)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = analysis.total()
        unsupported = sorted(analysis.unsupported_ops())
    return float(total), unsupported


# ------------------------------------------------------------------------------------------------
# Latency and memory
# ------------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], device: str, repeat: int, warmup: int) -> float:
    """Median wall time of fn() in milliseconds, after ``warmup`` untimed calls."""
    del device  # the Timer synchronises CUDA itself
    return statistics.median(wall_times_ms(fn, repeat, warmup))


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def peak_memory_mb(fn: Callable[[], object], device: str) -> Tuple[float, bool]:
    """(extra peak memory of fn() in MB, exact) -- see the module docstring."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20, True
    _malloc_trim()
    if _reset_peak_rss():
        before = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - before) / 1024, True
    before = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _status_kib("VmRSS") or 0)
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return max(0, after - before) / 1024, False


# ------------------------------------------------------------------------------------------------
# Profiling and the table
# ------------------------------------------------------------------------------------------------
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
    path, entry_opts = split_config_entry(entry)
    rows = []
    flops: Dict[int, float] = {}
    unsupported: List[str] = []
    for device in devices:
        cfg = branch_config(path, list(opts) + entry_opts, device)
        torch.manual_seed(seed)
        branch = MaskBranch(cfg).to(device)
        row = {
            "config": " ".join([_short_path(path)] + entry.split("@")[1:]),
            "head": _head_description(branch),
            "input": branch.input_description,
            "params": sum(p.numel() for p in branch.parameters()),
            "device": device,
            "threads": torch.get_num_threads(),
            "ms": {},
        }
        for num in detections:
            features, fields = branch.random_inputs(num, image_size, device, seed)
            if num not in flops:
                cpu_features, cpu_fields = branch.random_inputs(num, image_size, "cpu", seed)
                branch.to("cpu")
                flops[num], missing = count_flops(branch, cpu_features, cpu_fields, image_size)
                unsupported = sorted(set(unsupported) | set(missing))
                branch.to(device)

            def run(features=features, fields=fields):
                with torch.no_grad():
                    return branch(features, [make_instances(fields, image_size)])

            row["ms"][num] = median_ms(run, device, repeat, warmup)
            if num == max(detections):
                row["peak_mb"], row["peak_exact"] = peak_memory_mb(run, device)
        row["gflops"] = {num: flops[num] / 1e9 for num in detections}
        row["not_counted"] = unsupported
        rows.append(row)
        del branch
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def _short_path(path: str) -> str:
    """``configs/a/b.yaml`` -> ``a/b.yaml``."""
    parts = os.path.normpath(path).split(os.sep)
    return "/".join(parts[-2:])


def _head_description(branch: MaskBranch) -> str:
    """The head's registered name and its module summary (``extra_repr``), if any."""
    summary = branch.head.extra_repr()
    return f"{branch.name} ({summary})" if summary else branch.name


def markdown_table(rows: List[Dict[str, object]], detections: Sequence[int]) -> str:
    """The rows as a Markdown table (one line per config and device)."""
    largest = max(detections)
    header = ["config", "head", "input", "device", "params (M)"]
    header += [f"GFLOPs @{d}" for d in detections]
    header += [f"ms @{d}" for d in detections]
    header += [f"peak MB @{largest}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [
            row["config"],
            row["head"],
            row["input"],
            f"{row['device']} ({row['threads']} thr)" if row["device"] == "cpu" else row["device"],
            f"{row['params'] / 1e6:.3f}",
        ]
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


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        nargs="+",
        required=True,
        metavar="PATH[@KEY=VALUE...]",
        help="detectron2 YAML configs, each optionally with its own overrides",
    )
    parser.add_argument("--detections", nargs="+", type=int, default=list(DEFAULT_DETECTIONS))
    parser.add_argument(
        "--device",
        nargs="+",
        default=None,
        help="cpu and/or cuda (default: cpu, plus cuda when available)",
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = build_argument_parser().parse_args(argv)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: no CUDA device on this machine")
    if any(d <= 0 for d in args.detections):
        raise SystemExit("--detections must be positive")
    if len(args.image_size) > 2 or min(args.image_size) <= 0:
        raise SystemExit("--image-size takes one or two positive sizes: H [W]")
    image_size = (args.image_size[0], args.image_size[-1])
    rows = []
    for entry in args.config_file:
        rows += profile_config(
            entry,
            args.opts,
            args.detections,
            devices,
            args.repeat,
            args.warmup,
            image_size,
            args.seed,
        )
    table = markdown_table(rows, args.detections)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
