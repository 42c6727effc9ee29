"""Where a training iteration's time goes: per model part, per op kind, and the data loader's share.

    python -m masklab_d2.tools.profile_training \
        --config-file configs/shapes/mask_rcnn_R_18_FPN.yaml [--iters 5] [--warmup 2] \
        [--loader-iters 20] [--markdown out.md] [--opts KEY VALUE ...]

Measures ``train_net.py``'s own trainer pieces (model, optimizer, training loader) built from the
config; what each of its three tables means is in docs/tools.md.
"""

import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from tabulate import tabulate
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from masklab_d2.tools.sweeps.spec import REPO_ROOT

_LABEL = "part::"
# Op kinds, first match wins (substrings of profiler event names).
OP_KINDS = (
    ("crop ops", ("crop_and_resize",)),
    ("conv backward", ("convolution_backward",)),
    ("conv", ("mkldnn_convolution", "_convolution", "conv2d", "slow_conv")),
    ("layout copies", ("aten::copy_", "aten::contiguous", "aten::clone", "aten::_to_copy")),
    ("matmul", ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear")),
    ("NMS", ("nms",)),
)


def part_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """{part name: module} of a GeneralizedRCNN: the backbone's trunk and neck, the proposal
    generator and each child of the ROI heads, by name; other meta-architectures: their children.
    """
    parts: Dict[str, nn.Module] = {"model (other)": model}
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        trunk = getattr(backbone, "bottom_up", None)
        parts["backbone"] = trunk if trunk is not None else backbone
        if trunk is not None:
            parts["FPN"] = backbone  # the innermost label wins: what bottom_up does not run
    if getattr(model, "proposal_generator", None) is not None:
        parts["RPN"] = model.proposal_generator
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        parts["ROI heads (other)"] = roi_heads
        parts.update({f"ROI {name}": child for name, child in roi_heads.named_children()})
    if len(parts) == 1:
        parts.update(model.named_children())
    return parts


@contextlib.contextmanager
def labelled_parts(parts: Dict[str, nn.Module]):
    """Wraps each part's forward in a profiler range named ``part::<name>``."""
    handles = []
    for name, module in parts.items():
        ranges: List[record_function] = []

        def enter(_module, _inputs, label=_LABEL + name, ranges=ranges):
            ranges.append(record_function(label))
            ranges[-1].__enter__()

        def leave(_module, _inputs, _outputs, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _own_part(event) -> Optional[str]:
    """The innermost ``part::`` range around a profiler event, or None."""
    while event is not None:
        if event.name.startswith(_LABEL):
            return event.name[len(_LABEL) :]
        event = event.cpu_parent
    return None


def attribute(events: Iterable) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Self CPU time (ms) per model part (forward / backward split) and per op kind.

    Args:
        events: ``prof.events()`` of one or more profiled steps.

    Returns:
        ({"<part> forward"/"<part> backward"/"optimizer"/"unattributed": ms}, {kind: ms}).
    """
    events = list(events)
    part_of_sequence: Dict[int, str] = {}
    for event in events:  # forward ops that recorded an autograd node
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            part = _own_part(event)
            if part is not None:
                part_of_sequence.setdefault(event.sequence_nr, part)
    by_part: Dict[str, float] = defaultdict(float)
    by_kind: Dict[str, float] = defaultdict(float)
    for event in events:
        ms = event.self_cpu_time_total / 1e3
        if ms <= 0:
            continue
        node, backward_sequence, in_optimizer = event, None, False
        while node is not None:  # the backward node this op runs under, or the optimizer
            if node.name.startswith("autograd::engine::evaluate_function"):
                backward_sequence = node.sequence_nr
            in_optimizer |= node.name == _LABEL + "optimizer"
            node = node.cpu_parent
        kind = next(
            (k for k, keys in OP_KINDS if any(key in event.name for key in keys)), "other ops"
        )
        by_kind["optimizer" if in_optimizer else kind] += ms
        if in_optimizer:
            by_part["optimizer"] += ms
        elif backward_sequence is not None:
            by_part[f"{part_of_sequence.get(backward_sequence, 'unattributed')} backward"] += ms
        else:
            part = _own_part(event)
            by_part[f"{part} forward" if part else "unattributed"] += ms
    return dict(by_part), dict(by_kind)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc); 0.0 where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _children_cpu_seconds() -> float:
    import multiprocessing

    return sum(_cpu_seconds(child.pid) for child in multiprocessing.active_children())


def build(config_file: str, opts: Sequence[str]):
    """train_net.py's Trainer pieces for ``config_file``: (cfg, model, optimizer, loader)."""
    from masklab_d2.config import load_config
    from masklab_d2.engine.trainer import Trainer

    cfg = load_config(config_file, list(opts) + ["MODEL.DEVICE", "cpu"])
    model = Trainer.build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        from masklab_d2.modeling import MaskLabCheckpointer

        MaskLabCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.train()
    return cfg, model, Trainer.build_optimizer(cfg, model), Trainer.build_train_loader(cfg)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch) -> float:
    """One step as detectron2's SimpleTrainer runs it; returns the total loss."""
    losses = sum(model(batch).values())
    optimizer.zero_grad()
    losses.backward()
    with record_function(_LABEL + "optimizer"):
        optimizer.step()
    return float(losses)


def profile_steps(model, optimizer, batches: List) -> Tuple[Dict, Dict, float]:
    """Profiles one step per batch; returns (by part, by kind, wall seconds per step)."""
    with labelled_parts(part_modules(model)), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for batch in batches:
            train_step(model, optimizer, batch)
        wall = (time.perf_counter() - start) / len(batches)
    by_part, by_kind = (
        {k: v / len(batches) for k, v in d.items()} for d in attribute(prof.events())
    )
    return by_part, by_kind, wall


def loader_share(model, optimizer, data, iters: int) -> str:
    """Trains ``iters`` iterations from the live loader; their wall and CPU time, as a sentence."""
    cpu_main, cpu_workers = _cpu_seconds(os.getpid()), _children_cpu_seconds()
    walls, data_walls = [], []
    for _ in range(iters):
        start = time.perf_counter()
        batch = next(data)
        data_walls.append(time.perf_counter() - start)
        train_step(model, optimizer, batch)
        walls.append(time.perf_counter() - start)
    cpu_main = (_cpu_seconds(os.getpid()) - cpu_main) / iters
    cpu_workers = (_children_cpu_seconds() - cpu_workers) / iters
    median, cores = statistics.median(walls), os.cpu_count()
    return (
        f"Training from the live loader ({iters} iterations): seconds per iteration "
        f"{min(walls):.3f} / {median:.3f} / {max(walls):.3f} (min / median / max), "
        f"{statistics.median(data_walls):.3f} s median waiting for a batch; CPU seconds per "
        f"iteration: training process {cpu_main:.3f}, loader workers {cpu_workers:.3f} "
        f"({100 * cpu_workers / (median * cores):.0f}% of the machine's {cores} cores)."
    )


def _table(rows: Dict[str, float], total: float, header: str) -> str:
    ordered = sorted(rows.items(), key=lambda kv: -kv[1])
    body = [(name, f"{ms:.1f}", f"{100 * ms / total:.1f}") for name, ms in ordered]
    body.append(("total", f"{total:.1f}", "100.0"))
    return tabulate(body, headers=[header, "ms / step", "%"], tablefmt="github")


def report(config_file: str, args) -> str:
    from detectron2.utils.events import EventStorage

    torch.manual_seed(0)
    cfg, model, optimizer, loader = build(config_file, args.opts)
    header = (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"batch {cfg.SOLVER.IMS_PER_BATCH}, {cfg.DATALOADER.NUM_WORKERS} loader workers, "
        f"{time.strftime('%Y-%m-%d %H:%M')}"
    )
    data = iter(loader)
    with EventStorage(0):
        for _ in range(args.warmup):
            train_step(model, optimizer, next(data))
        batches = [next(data) for _ in range(args.iters)]
        by_part, by_kind, wall = profile_steps(model, optimizer, batches)
        shares = loader_share(model, optimizer, data, args.loader_iters)
    paragraphs = [
        f"## {os.path.relpath(config_file, REPO_ROOT)}",
        header,
        f"Model step on prepared batches: {wall:.3f} s wall per step under the profiler "
        f"({args.iters} steps); self CPU time of the ops by model part:",
        _table(by_part, sum(by_part.values()), "part"),
        "The same ops by kind:",
        _table(by_kind, sum(by_kind.values()), "op kind"),
        shares,
    ]
    return "\n\n".join(paragraphs) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", nargs="+", required=True)
    parser.add_argument("--iters", type=int, default=5, help="profiled steps")
    parser.add_argument("--warmup", type=int, default=2, help="steps before any measurement")
    parser.add_argument("--loader-iters", type=int, default=20, help="steps from the live loader")
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE pairs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    text = "\n".join(report(path, args) for path in args.config_file)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
