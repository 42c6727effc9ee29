"""Speed candidates for a training step (by default the main job's), against the step as it is.

    python3 projects/training-profile/candidates.py [--rounds 4] [--steps 6] [--markdown out.md]
        [--variants "as is,bf16 autocast"] [--config-file C] [KEY VALUE ...]

Each variant is its own copy of the model (``train_net.py``'s trainer pieces, random weights or
the config's ``MODEL.WEIGHTS``) and optimizer, trained on the same prepared batches (no data work
overlaps); variants alternate round by round (ABC, CBA, ...) so drift on a shared machine hits all
of them alike. The first step of each round is a warm-up and not counted. Variants:

* ``as is``: the step ``train_net.py`` runs.
* ``channels-last``: the model's weights in channels-last layout (convolutions then produce
  channels-last maps throughout, the crop ops take their channels-last fast path).
* ``compiled backbone``: ``torch.compile`` (inductor) of the backbone and FPN, the parts that
  compile without graph breaks; its compilation time is reported apart.
* ``bf16 autocast``: the forward in bfloat16, as ``SOLVER.AMP.ENABLED`` trains on a CPU
  (:func:`masklab_d2.engine.cpu_autocast.autocast_training_forward`).
* ``bf16 autocast + channels-last``: both.
"""

import argparse
import copy
import statistics
import time

import torch
from detectron2.utils.events import EventStorage
from tabulate import tabulate

from masklab_d2.engine.cpu_autocast import autocast_training_forward
from masklab_d2.engine.trainer import Trainer
from masklab_d2.tools.profile_training import build, train_step

CONFIG = "configs/shapes/mask_rcnn_R_18_FPN.yaml"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="steps per round (first: warm-up)")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--variants", help="comma-separated variants to run (default: all)")
    parser.add_argument("--config-file", default=CONFIG)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg, model, _, loader = build(args.config_file, args.opts)
    data = iter(loader)
    batches = [next(data) for _ in range(args.steps)]
    del data, loader

    def variant(prepare):
        copied = copy.deepcopy(model)
        prepare(copied)
        return copied, Trainer.build_optimizer(cfg, copied)

    def compile_backbone(m):
        m.backbone = torch.compile(m.backbone)

    def bf16_channels_last(m):
        autocast_training_forward(m.to(memory_format=torch.channels_last))

    preparations = {
        "as is": lambda m: None,
        "channels-last": lambda m: m.to(memory_format=torch.channels_last),
        "compiled backbone": compile_backbone,
        "bf16 autocast": autocast_training_forward,
        "bf16 autocast + channels-last": bf16_channels_last,
    }
    names = args.variants.split(",") if args.variants else list(preparations)
    unknown = sorted(set(names) - set(preparations))
    if unknown or "as is" not in names:
        parser.error(f"--variants: known {list(preparations)}, 'as is' included; got {unknown}")
    variants = {name: variant(preparations[name]) for name in names}
    times = {name: [] for name in variants}
    first_step = {}
    with EventStorage(0):
        for round_ in range(args.rounds):
            names = list(variants) if round_ % 2 == 0 else list(reversed(variants))
            for name in names:
                m, opt = variants[name]
                for i, batch in enumerate(batches):
                    start = time.perf_counter()
                    train_step(m, opt, batch)
                    seconds = time.perf_counter() - start
                    first_step.setdefault(name, seconds)
                    if i > 0:
                        times[name].append(seconds)
    base = statistics.median(times["as is"])
    rows = [
        [
            name,
            f"{min(t):.3f}",
            f"{statistics.median(t):.3f}",
            f"{max(t):.3f}",
            len(t),
            f"{base / statistics.median(t):.2f}",
            f"{first_step[name]:.1f}",
        ]
        for name, t in times.items()
    ]
    table = tabulate(
        rows,
        headers=["variant", "min s", "median s", "max s", "steps", "speed-up", "first step s"],
        tablefmt="github",
    )
    header = (
        f"{' '.join([args.config_file] + args.opts)}, batch {cfg.SOLVER.IMS_PER_BATCH}, "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.rounds} alternating rounds of "
        f"{args.steps - 1} counted steps, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(header + "\n\n" + table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
