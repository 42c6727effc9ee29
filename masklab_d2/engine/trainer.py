"""train_net.py's trainer and command line: YAML configs here, LazyConfig files dispatched to
:mod:`masklab_d2.engine.lazy_train`.

:class:`Trainer` is detectron2's DefaultTrainer with the partial-mask dataset mapper, the seen /
unseen evaluator, an AdamW option, head-only training (MODEL.FREEZE_DETECTOR) and graceful stops
(:mod:`masklab_d2.engine.graceful_stop`): on SIGINT, SIGTERM, SIGUSR1 or SIGUSR2 every rank stops
after the current iteration, a checkpoint of it is saved and the process exits with status 75,
so ``--resume`` continues exactly where it stopped. An error (a NaN loss, out of memory) saves
nothing.

A script of one's own that registers a mask head (or anything else detectron2 builds by name)
and then trains exactly as ``train_net.py`` does is three lines (docs/bring_your_own_head.md)::

    import my_heads  # noqa: F401  (registers MyMaskHead in ROI_MASK_HEAD_REGISTRY)
    from masklab_d2.engine.trainer import invoke_main
    invoke_main()
"""

import logging
import os
import weakref

import torch
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import load_config
from ..data import PartialMaskDatasetMapper, checked_detection_dataset_dicts, register_coco_datasets
from ..evaluation import PartialCOCOEvaluator
from ..modeling import MaskLabCheckpointer, freeze_detector, load_detector_weights
from ..modeling.optim import module_lr_factors
from ..utils.config_files import is_lazy_config
from .cpu_autocast import build_step_trainer
from .graceful_stop import evaluation_ends_on_signals, launch, spare_loader_workers
from .hooks import training_hooks
from .lazy_train import main as lazy_main

logger = logging.getLogger("masklab_d2")


class Trainer(DefaultTrainer):
    """DefaultTrainer with masklab_d2's mapper, evaluator, optimizer choice and freezing, and
    ``SOLVER.AMP.ENABLED`` on a CPU too (bfloat16, :mod:`masklab_d2.engine.cpu_autocast`)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.SOLVER.AMP.ENABLED:  # DefaultTrainer's AMPTrainer fails on a CPU
            step = self._trainer
            self._trainer = build_step_trainer(step.model, step.data_loader, step.optimizer, True)

    @classmethod
    def build_model(cls, cfg):
        model = super().build_model(cfg)
        if cfg.MODEL.FREEZE_DETECTOR:
            if not cfg.MODEL.WEIGHTS:
                raise ValueError(
                    "MODEL.FREEZE_DETECTOR trains the mask branch of a trained detector: "
                    "set MODEL.WEIGHTS"
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
        dataset = checked_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            cfg.DATASETS.MASK_TRAIN_CLASSES if cfg.MODEL.MASK_ON else None,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
        mapper = PartialMaskDatasetMapper(cfg, is_train=True)
        # Its workers survive a stop signal sent to every process of the run (graceful stops).
        return spare_loader_workers(
            build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = PartialMaskDatasetMapper(cfg, is_train=False)
        return spare_loader_workers(build_detection_test_loader(cfg, dataset_name, mapper=mapper))

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
        # DefaultTrainer.__init__ made a DetectionCheckpointer just before calling this; swap it
        # for MaskLabCheckpointer first, so the periodic checkpointer, resume_or_load and the
        # stop hook all use it. It also initialises duplicated pretrained blocks (MaskLab's res5
        # box classifier) from an ImageNet checkpoint, where detectron2's matching stops.
        self.checkpointer = MaskLabCheckpointer(
            self._trainer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        cfg = self.cfg

        def test_and_save_results():
            self._last_eval_results = self.test(cfg, self.model)
            return self._last_eval_results

        def precise_bn_loader():
            loader_cfg = cfg.clone()
            loader_cfg.defrost()
            loader_cfg.DATALOADER.NUM_WORKERS = 0  # as DefaultTrainer: saves memory and time
            return self.build_train_loader(loader_cfg)

        return training_hooks(
            self.model,
            self.checkpointer,
            periodic_checkpointer=dict(period=cfg.SOLVER.CHECKPOINT_PERIOD),
            eval_period=cfg.TEST.EVAL_PERIOD,
            test=test_and_save_results,
            build_writers=self.build_writers,
            precise_bn_loader=precise_bn_loader if cfg.TEST.PRECISE_BN.ENABLED else None,
            precise_bn_iters=cfg.TEST.PRECISE_BN.NUM_ITER,
        )

    def resume_or_load(self, resume=True):
        """As DefaultTrainer's; a new head-only run loads the detector but not its mask branch."""
        if self.cfg.MODEL.FREEZE_DETECTOR and not (resume and self.checkpointer.has_checkpoint()):
            load_detector_weights(self.checkpointer, self.cfg.MODEL.WEIGHTS)
            self.start_iter = 0
            return
        super().resume_or_load(resume=resume)


def setup(args):
    """Config from file and command-line options.

    A CUDA config where no GPU is visible is an error unless MASKLAB_ALLOW_CPU=1 (or MODEL.DEVICE
    is "cpu" or "auto"): a cluster job must not train on the CPU unnoticed.
    """
    cfg = load_config(args.config_file, args.opts, allow_cpu_fallback=None)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="masklab_d2")
    return cfg


def main(args):
    if is_lazy_config(args.config_file):
        return lazy_main(args)  # a LazyConfig .py file (masklab_d2.engine.lazy_train)
    register_coco_datasets(args.coco_dataset)
    cfg = setup(args)
    if args.eval_only:
        evaluation_ends_on_signals()
        model = Trainer.build_model(cfg)
        MaskLabCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
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


def invoke_main(argv=None) -> None:
    """The command line: parses ``argv`` (sys.argv) and launches :func:`main` on every rank."""
    args = build_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    cuda_devices = torch.cuda.device_count()
    if args.num_gpus > 1 and cuda_devices < args.num_gpus:
        # Else every rank fails inside DistributedDataParallel (device_ids on a CPU model).
        raise SystemExit(
            f"train_net.py: --num-gpus {args.num_gpus} starts one training process per GPU, and "
            f"this machine has {cuda_devices} CUDA device(s): detectron2's trainers "
            "run several processes on GPUs only; on the CPU, train with --num-gpus 1"
        )
    # masklab_d2.engine's launch: detectron2's, plus the signal handling of graceful stops.
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
