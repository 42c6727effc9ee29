"""Re-evaluates a trained model twice: with its BatchNorm running statistics as trained, and
with precise statistics recomputed on training batches (detectron2's PreciseBN, without training).

    python -m masklab_d2.tools.precise_bn_eval --config-file CONFIG.yaml \
        --weights output/run/model_final.pth [--num-iter 100] [--markdown out.md] [KEY VALUE ...]

Only BatchNorm layers in training mode are recomputed, as detectron2's hook does (a frozen
detector's stay as they are); why this matters for Deep-MARC's heads: docs/tools.md.
"""

import argparse
import copy
import logging
from typing import Dict, List, Optional, Sequence

from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules
from tabulate import tabulate

from masklab_d2.config import load_config
from masklab_d2.engine.hooks import precise_bn_hook
from masklab_d2.engine.trainer import Trainer
from masklab_d2.evaluation import PartialCOCOEvaluator
from masklab_d2.modeling import MaskLabCheckpointer, freeze_detector
from masklab_d2.tools.sweeps.report import table_keys

logger = logging.getLogger("masklab_d2.precise_bn_eval")


def evaluate(cfg, model, dataset_name: str) -> Dict[str, float]:
    """Box / mask / Boundary AP (and per class group) on one test set, flattened; no files."""
    loader = Trainer.build_test_loader(cfg, dataset_name)
    evaluator = PartialCOCOEvaluator(
        dataset_name, cfg, True, mask_train_classes=cfg.DATASETS.MASK_TRAIN_CLASSES
    )
    results = inference_on_dataset(model, loader, evaluator)
    return {f"{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}


def recompute_bn_statistics(cfg, model, num_iter: int) -> int:
    """Replaces the running statistics of ``model``'s trainable BN layers by precise ones.

    Returns:
        The number of BN layers updated (0: nothing to do, the model is unchanged).
    """
    model.train()
    layers = get_bn_modules(model)
    hook = precise_bn_hook(model, lambda: Trainer.build_train_loader(cfg), num_iter)
    if hook is not None:
        hook.update_stats()
    model.eval()
    return len(layers)


def precise_bn_comparison(cfg, weights: str, num_iter: int) -> List[Dict[str, object]]:
    """Evaluates ``weights`` as trained and with precise BN statistics, on every test set."""
    model = build_model(cfg)
    MaskLabCheckpointer(model).load(weights)
    if cfg.MODEL.FREEZE_DETECTOR:
        freeze_detector(model)  # as trained: a head-only run's detector BN layers are frozen
    rows = []
    model.eval()
    for dataset_name in cfg.DATASETS.TEST:
        rows.append({"statistics": "as trained", "dataset": dataset_name})
        rows[-1].update(evaluate(cfg, model, dataset_name))
    precise = copy.deepcopy(model)
    num_layers = recompute_bn_statistics(cfg, precise, num_iter)
    for dataset_name in cfg.DATASETS.TEST:
        rows.append(
            {
                "statistics": f"precise ({num_iter} batches, {num_layers} BN layers)",
                "dataset": dataset_name,
            }
        )
        rows[-1].update(evaluate(cfg, precise, dataset_name))
    return rows


def format_rows(rows: Sequence[Dict[str, object]], tablefmt: str = "pipe") -> str:
    """The rows as a table: box AP, mask AP and the mask AP of each class group, each with its
    Boundary AP beside it where the rows have it."""
    mask_keys = ["segm/AP"] + sorted(
        {k for row in rows for k in row if k.startswith("segm/") and k.endswith("/AP")}
        - {"segm/AP"}
    )
    reported = {k for row in rows for k in row}
    keys, twins = table_keys(["bbox/AP"] + mask_keys)
    keys = [k for k in keys if k not in twins or k in reported]
    table = [
        [row["statistics"], row["dataset"]]
        + [f"{row[k]:.2f}" if isinstance(row.get(k), float) else "-" for k in keys]
        for row in rows
    ]
    return tabulate(table, headers=["BN statistics", "dataset"] + keys, tablefmt=tablefmt)


def build_argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="the trained model (.pth)")
    parser.add_argument("--num-iter", type=int, default=100, help="training batches for PreciseBN")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config options KEY VALUE ... (last)"
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    args = build_argument_parser().parse_args(argv)
    if args.num_iter <= 0:
        raise SystemExit("--num-iter must be positive")
    setup_logger(name="masklab_d2")
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    rows = precise_bn_comparison(cfg, args.weights, args.num_iter)
    table = format_rows(rows)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
