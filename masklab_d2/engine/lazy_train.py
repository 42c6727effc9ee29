"""Training and evaluation of LazyConfig (``.py``) configs, for ``train_net.py``.

detectron2's recipe (``tools/lazyconfig_train_net.py``: ``LazyConfig``, ``instantiate``,
``SimpleTrainer`` / ``AMPTrainer``, ``default_setup`` and its hooks), with what masklab_d2's
YAML path adds: graceful stops (:mod:`masklab_d2.engine.graceful_stop`), COCO-format datasets
from ``--coco-dataset``, the YAML path's device policy (``train.device`` "auto"; no silent
CPU fallback), and per-module learning-rate factors
(``lr_factor`` attributes, e.g. the deformable pooler's offset network).

A config has detectron2's LazyConfig layout (its ``configs/common/train.py``): ``model``,
``dataloader.{train, test, evaluator}``, ``optimizer``, ``lr_multiplier`` and ``train``
(``output_dir``, ``init_checkpoint``, ``max_iter``, ``amp``, ``ddp``, ``checkpointer``,
``eval_period``, ``log_period``, ``device`` ("cuda", "cpu" or "auto"); optional: ``seed``, and
``precise_bn`` = dict(enabled, num_iter), the YAML TEST.PRECISE_BN: every evaluation uses BN
statistics recomputed on ``num_iter`` training batches).
"""

import logging
import weakref

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_setup, default_writers
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from masklab_d2 import config
from masklab_d2.data import register_coco_datasets
from masklab_d2.modeling import MaskLabCheckpointer
from masklab_d2.modeling.optim import module_lr_factors

from .cpu_autocast import build_step_trainer
from .graceful_stop import evaluation_ends_on_signals, spare_loader_workers
from .hooks import training_hooks

logger = logging.getLogger("masklab_d2")

__all__ = [
    "build_model",
    "build_optimizer",
    "do_test",
    "do_train",
    "main",
    "resolve_device",
]


def setup(args):
    """The config of ``args.config_file`` with ``args.opts`` (``key=value``) applied, its device
    resolved (:func:`resolve_device`); logging and the output folder set up."""
    cfg = LazyConfig.load(args.config_file)
    cfg = LazyConfig.apply_overrides(cfg, args.opts)
    resolve_device(cfg)
    default_setup(cfg, args)
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="masklab_d2")
    return cfg


def resolve_device(cfg) -> None:
    """Sets ``cfg.train.device`` by the YAML path's device policy
    (:func:`masklab_d2.config.resolve_device`, the fallback as train_net.py allows it)."""
    cfg.train.device = config.resolve_device(
        cfg.train.device, "train.device", "pass train.device=cpu (or auto)"
    )


def build_model(cfg) -> nn.Module:
    """``cfg.model`` instantiated, on ``cfg.train.device``."""
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    return model


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` for ``model``; modules' ``lr_factor`` scale their learning rates.

    The factors multiply any ``lr_factor_func`` the config already has (ViTDet's layer decay).
    """
    cfg.optimizer.params.model = model
    if any(getattr(m, "lr_factor", None) is not None for m in model.modules()):
        factors = module_lr_factors(model)
        configured = cfg.optimizer.params.get("lr_factor_func")
        cfg.optimizer.params.lr_factor_func = (
            factors if configured is None else (lambda name: configured(name) * factors(name))
        )
    return instantiate(cfg.optimizer)


def do_test(cfg, model: nn.Module) -> dict:
    """Inference on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``; {} without one."""
    if "evaluator" not in cfg.dataloader:
        return {}
    loader = spare_loader_workers(instantiate(cfg.dataloader.test))
    results = inference_on_dataset(model, loader, instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def _precise_bn_loader(cfg):
    """A second training loader, without workers (as DefaultTrainer's), for PreciseBN."""
    train = cfg.dataloader.train
    num_workers = train.get("num_workers")
    train.num_workers = 0
    try:
        return instantiate(train)
    finally:
        train.num_workers = num_workers


def do_train(args, cfg) -> None:
    """Trains ``cfg.model`` as detectron2's lazy trainer does, stopping gracefully on signals.

    Args:
        args: the command line (``resume``).
        cfg: the loaded config (see the module docstring).
    """
    model = build_model(cfg)
    logger.info(f"Model:\n{model}")
    optimizer = build_optimizer(cfg, model)
    # Its workers survive a stop signal sent to every process of the run (graceful stops).
    train_loader = spare_loader_workers(instantiate(cfg.dataloader.train))
    model = create_ddp_model(model, **cfg.train.ddp)
    # float16 AMPTrainer on a GPU, bfloat16 on a CPU (masklab_d2.engine.cpu_autocast).
    trainer = build_step_trainer(model, train_loader, optimizer, bool(cfg.train.amp.enabled))
    # MaskLabCheckpointer: also initialises duplicated pretrained blocks (see its docstring).
    # The trainer by weak proxy, as DefaultTrainer does: a strong one closes a reference cycle
    # (trainer -> hooks -> checkpointer -> trainer) that keeps the trainer, and its loader's
    # workers, alive after training, until the process exits.
    checkpointer = MaskLabCheckpointer(model, cfg.train.output_dir, trainer=weakref.proxy(trainer))
    precise_bn = cfg.train.get("precise_bn") or {}
    trainer.register_hooks(
        training_hooks(
            model,
            checkpointer,
            periodic_checkpointer=cfg.train.checkpointer,
            eval_period=cfg.train.eval_period,
            test=lambda: do_test(cfg, model),
            build_writers=lambda: default_writers(cfg.train.output_dir, cfg.train.max_iter),
            log_period=cfg.train.log_period,
            scheduler=instantiate(cfg.lr_multiplier),
            precise_bn_loader=(
                (lambda: _precise_bn_loader(cfg)) if precise_bn.get("enabled") else None
            ),
            precise_bn_iters=precise_bn.get("num_iter", 200),
        )
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    # A checkpoint holds the iteration that had just finished.
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args):
    """train_net.py's entry for a LazyConfig file: train, or evaluate with ``--eval-only``.

    ``--eval-only`` evaluates ``train.init_checkpoint`` (with ``--resume``: the output folder's
    last checkpoint, when there is one).
    """
    register_coco_datasets(getattr(args, "coco_dataset", None))
    cfg = setup(args)
    if not args.eval_only:
        return do_train(args, cfg)
    evaluation_ends_on_signals()
    model = build_model(cfg)
    model = create_ddp_model(model)
    MaskLabCheckpointer(model, save_dir=cfg.train.output_dir).resume_or_load(
        cfg.train.init_checkpoint, resume=args.resume
    )
    return do_test(cfg, model)
