#!/usr/bin/env python
"""Trains and evaluates masklab_d2 models (every head, full or partial mask supervision).

    python train_net.py --config-file configs/shapes/mask_rcnn_R_18_FPN.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --resume          # continue an interrupted run
    python train_net.py --config-file ... --num-gpus 8      # multi-GPU, detectron2's launch
    python train_net.py --config-file configs/lazy/....py key=value   # a LazyConfig, same flags

A short dispatcher, as detectron2's tools/train_net.py: the trainer (detectron2's DefaultTrainer
with the partial-mask mapper, the seen / unseen evaluator, head-only training and graceful stops)
and this command line live in masklab_d2.engine.trainer; LazyConfig files go on to
masklab_d2.engine.lazy_train. On SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 a run saves a checkpoint of
its current iteration and exits with status 75; `--resume` continues exactly where it stopped.
"""

from masklab_d2.engine.trainer import (  # noqa: F401  (the names scripts and tests use)
    Trainer,
    build_argument_parser,
    invoke_main,
    main,
    setup,
)

if __name__ == "__main__":
    invoke_main()  # pragma: no cover
