"""Evaluation time of a trained model with and without Boundary AP, alternating the two.

    python3 projects/boundary-ap-check/time_evaluation.py \
        --config-file configs/shapes-partial/mask_rcnn_R_18_FPN_gtcrop.yaml \
        --weights output/run/model_final.pth [--rounds 2] [--evaluate-only] [KEY VALUE ...]

Each round evaluates the first test set twice, as ``train_net.py`` does (detectron2's
inference_on_dataset with masklab_d2's test mapper and PartialCOCOEvaluator): once without
Boundary AP (``boundary_ap=False``: the evaluator's code before Boundary AP, which skips only the
Boundary AP call) and once with it, in alternating order. Then the evaluator's evaluate() alone
on the predictions of the last inference (or, with ``--evaluate-only``, on the
``instances_predictions.pth`` that the run's evaluation saved beside ``--weights``), alternating
again, one round more. On a machine shared with other work the rounds show the noise.
"""

import argparse
import copy
import os
import statistics
import tempfile
import time
from typing import Optional, Sequence

import torch
from detectron2.data import build_detection_test_loader
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model
from tabulate import tabulate

from masklab_d2.config import load_config
from masklab_d2.data import PartialMaskDatasetMapper
from masklab_d2.evaluation import PartialCOCOEvaluator
from masklab_d2.modeling import MaskLabCheckpointer


def _evaluator(cfg, dataset_name: str, boundary_ap: bool, output_dir=None):
    """The evaluator as train_net.py builds it; it writes its files to ``output_dir``."""
    evaluator = PartialCOCOEvaluator(
        dataset_name,
        cfg,
        False,
        output_dir=output_dir,
        mask_train_classes=cfg.DATASETS.MASK_TRAIN_CLASSES,
        boundary_ap=boundary_ap,
    )
    # Times its evaluate(), the part after inference.
    evaluate, evaluator.seconds = evaluator.evaluate, None

    def timed_evaluate():
        started = time.perf_counter()
        results = evaluate()
        evaluator.seconds = time.perf_counter() - started
        return results

    evaluator.evaluate = timed_evaluate
    return evaluator


def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="time evaluate() alone on <weights folder>/inference/instances_predictions.pth",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    dataset_name = cfg.DATASETS.TEST[0]
    if not args.evaluate_only:
        model = build_model(cfg)
        MaskLabCheckpointer(model).load(args.weights)
        model.eval()
        loader = build_detection_test_loader(
            cfg, dataset_name, mapper=PartialMaskDatasetMapper(cfg, is_train=False)
        )

    rows, times = [], {False: [], True: []}
    folder = os.path.join(os.path.dirname(args.weights), "inference")
    if not args.evaluate_only:
        folder = tempfile.mkdtemp(prefix="time_evaluation_")
    for round_ in range(0 if args.evaluate_only else args.rounds):
        # Alternate which goes first, so that a slow spell on the machine hits both.
        for boundary_ap in (False, True) if round_ % 2 == 0 else (True, False):
            evaluator = _evaluator(cfg, dataset_name, boundary_ap, folder)
            started = time.perf_counter()
            with torch.no_grad():
                results = inference_on_dataset(model, loader, evaluator)
            seconds = time.perf_counter() - started
            times[boundary_ap].append(seconds)
            rows.append(
                ["inference + evaluate", round_, boundary_ap, seconds, evaluator.seconds,
                 results["segm"]["AP"], results.get("boundary", {}).get("AP")]
            )  # fmt: skip
            print(rows[-1], flush=True)
    # As the evaluator saved them before evaluating: contiguous category ids.
    predictions = torch.load(os.path.join(folder, "instances_predictions.pth"))
    eval_times = {False: [], True: []}
    for round_ in range(args.rounds + 1):
        for boundary_ap in (False, True) if round_ % 2 == 0 else (True, False):
            evaluator = _evaluator(cfg, dataset_name, boundary_ap)
            # detectron2's evaluate() rewrites the predictions' category ids in place.
            evaluator._predictions = copy.deepcopy(predictions)
            results = evaluator.evaluate()
            eval_times[boundary_ap].append(evaluator.seconds)
            rows.append(
                ["evaluate() only", round_, boundary_ap, evaluator.seconds, evaluator.seconds,
                 results["segm"]["AP"], results.get("boundary", {}).get("AP")]
            )  # fmt: skip
            print(rows[-1], flush=True)
    detections = sum(len(p["instances"]) for p in predictions)
    print(f"{len(predictions)} images, {detections} detections")
    print(
        tabulate(
            rows,
            headers=["what", "round", "Boundary AP", "seconds", "of which evaluate()",
                     "mask AP", "boundary AP"],  # fmt: skip
            tablefmt="pipe",
            floatfmt=".2f",
        )
    )
    for name, measured in (("inference + evaluate", times), ("evaluate() only", eval_times)):
        if not measured[False]:
            continue
        old, new = statistics.median(measured[False]), statistics.median(measured[True])
        print(
            f"{name}: median {old:.2f} s without, {new:.2f} s with Boundary AP "
            f"(+{new - old:.2f} s, {100 * (new - old) / old:+.1f}%)"
        )


if __name__ == "__main__":
    main()
