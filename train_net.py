#!/usr/bin/env python
"""Trains and evaluates masklab_d2 models (every head, full or partial mask supervision).

    python train_net.py --config-file configs/shapes/mask_rcnn_R_18_FPN.yaml
    python train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file ... --resume          # continue an interrupted run
    python train_net.py --config-file ... --num-gpus 8      # multi-GPU, detectron2's launch

It is detectron2's DefaultTrainer with the partial-mask dataset mapper, the seen / unseen
evaluator, an AdamW option, head-only training (MODEL.FREEZE_DETECTOR) and a checkpoint written
when training stops early (Ctrl-C, SIGTERM from a scheduler, an error), so `--resume` continues
from where it stopped. With no GPU it runs on the CPU.
"""

import logging
import os
import signal
import sys

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import (
    DefaultTrainer,
    HookBase,
    default_argument_parser,
    default_setup,
    launch,
)
from detectron2.evaluation import verify_results
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from masklab_d2.config import load_config
from masklab_d2.data import PartialMaskDatasetMapper, mask_train_class_ids, register_coco_datasets
from masklab_d2.data.datasets import check_mask_supervision
from masklab_d2.evaluation import PartialCOCOEvaluator
from masklab_d2.modeling import freeze_detector, load_detector_weights
from masklab_d2.modeling.optim import module_lr_factors

logger = logging.getLogger("masklab_d2")


class CheckpointOnInterrupt(HookBase):
    """Saves a checkpoint when training ends before MAX_ITER, so nothing trained is lost."""

    def after_train(self):
        trainer = self.trainer
        # The iteration the saved state belongs to. detectron2's LRScheduler hook steps the
        # schedule at the end of each iteration, so its count says whether the interrupted
        # iteration got that far (a signal can land in a later hook of the same iteration);
        # trainer.iter - 1 would then resume with the schedule one step ahead of the iteration.
        last_completed = min(trainer.iter, trainer.scheduler.last_epoch - 1)
        if trainer.iter + 1 >= trainer.max_iter or last_completed < trainer.start_iter:
            return
        if comm.is_main_process():
            logger.warning(
                f"Training stopped early; saving a checkpoint at iteration {last_completed}"
            )
            # The trainer's state (its iteration) goes into the checkpoint, and --resume starts
            # after it.
            trainer.iter = last_completed
            trainer.checkpointer.save(f"model_{last_completed:07d}", iteration=last_completed)


class Trainer(DefaultTrainer):
    """DefaultTrainer with masklab_d2's mapper, evaluator, optimizer choice and freezing."""

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if cfg.MODEL.FREEZE_DETECTOR:
            if not cfg.MODEL.WEIGHTS:
                raise ValueError(
                    "MODEL.FREEZE_DETECTOR trains the mask branch of a trained detector: set MODEL.WEIGHTS"
                )
            freeze_detector(model)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            logger.info(f"Detector frozen; training {trainable} mask-branch parameters")
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        """SGD (detectron2's settings) or AdamW, honouring modules' ``lr_factor``."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name not in ("SGD", "ADAMW"):
            raise ValueError(
                f"SOLVER.OPTIMIZER must be 'SGD' or 'ADAMW', got {cfg.SOLVER.OPTIMIZER!r}"
            )
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
            lr_factor_func=module_lr_factors(model),
        )
        if name == "SGD":
            optimizer = torch.optim.SGD(
                params,
                lr=cfg.SOLVER.BASE_LR,
                momentum=cfg.SOLVER.MOMENTUM,
                nesterov=cfg.SOLVER.NESTEROV,
                weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                foreach=True,
            )
        else:
            optimizer = torch.optim.AdamW(
                params,
                lr=cfg.SOLVER.BASE_LR,
                betas=tuple(cfg.SOLVER.BETAS),
                weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            )
        return maybe_add_gradient_clipping(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        if cfg.MODEL.MASK_ON:
            check_mask_supervision(
                dataset,
                mask_train_class_ids(cfg),
                cfg.DATASETS.MASK_TRAIN_CLASSES,
                MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes"),
            )
        mapper = PartialMaskDatasetMapper(cfg, is_train=True)
        return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=PartialMaskDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", "coco")
        if evaluator_type != "coco":
            raise NotImplementedError(
                f"{dataset_name}: only COCO-format evaluation is supported, got {evaluator_type!r}"
            )
        return PartialCOCOEvaluator(
            dataset_name,
            cfg,
            True,
            output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference"),
            mask_train_classes=cfg.DATASETS.MASK_TRAIN_CLASSES,
        )

    def build_hooks(self):
        return super().build_hooks() + [CheckpointOnInterrupt()]

    def resume_or_load(self, resume=True):
        """As DefaultTrainer's; a new head-only run loads the detector but not its mask branch."""
        if self.cfg.MODEL.FREEZE_DETECTOR and not (resume and self.checkpointer.has_checkpoint()):
            load_detector_weights(self.checkpointer, self.cfg.MODEL.WEIGHTS)
            self.start_iter = 0
            return
        super().resume_or_load(resume=resume)


def setup(args):
    """Config from file and command-line options; CPU when no GPU is visible."""
    cfg = load_config(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="masklab_d2")
    return cfg


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(args):
    register_coco_datasets(args.coco_dataset)
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    # A scheduler's SIGTERM (Slurm, preemption) unwinds like Ctrl-C, so the checkpoint hook runs.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def build_argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--coco-dataset",
        action="append",
        metavar="NAME=JSON:IMAGE_ROOT",
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    return parser


if __name__ == "__main__":
    args = build_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
