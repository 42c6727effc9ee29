"""The training hooks of both config systems, written once.

detectron2's ``DefaultTrainer.build_hooks`` (YAML) and ``tools/lazyconfig_train_net.py``
(LazyConfig) assemble the same hooks from different config layouts; here they take plain
arguments, so :class:`masklab_d2.engine.trainer.Trainer` and
:mod:`masklab_d2.engine.lazy_train` build the same list, in ``DefaultTrainer``'s order, with the
graceful-stop hook last.
"""

from typing import Callable, Iterable, List, Optional

from detectron2.engine import hooks
from detectron2.utils import comm
from fvcore.nn.precise_bn import get_bn_modules
from torch import nn

from .graceful_stop import GracefulStopHook

__all__ = ["precise_bn_hook", "training_hooks"]


def precise_bn_hook(
    model: nn.Module, build_loader: Callable[[], Iterable], num_iter: int, period: int = 0
) -> Optional[hooks.PreciseBN]:
    """detectron2's PreciseBN hook, or None when ``model`` has no BN layer in training mode.

    Args:
        model: the model whose BN statistics are recomputed.
        build_loader: makes the loader of training batches; called only when a hook is made
            (training passes a second training loader without workers, as DefaultTrainer).
        num_iter: batches per recomputation.
        period: recompute every ``period`` iterations (before each evaluation) and at the end;
            0: only at the end, or when ``update_stats()`` is called.
    """
    if not get_bn_modules(model):
        return None
    return hooks.PreciseBN(period, model, build_loader(), num_iter)


def training_hooks(
    model: nn.Module,
    checkpointer,
    *,
    periodic_checkpointer: dict,
    eval_period: int,
    test: Callable[[], dict],
    build_writers: Callable[[], List],
    log_period: int = 20,
    scheduler=None,
    precise_bn_loader: Optional[Callable[[], Iterable]] = None,
    precise_bn_iters: int = 200,
) -> List[Optional[hooks.HookBase]]:
    """The hooks of a training run (None entries are skipped by ``register_hooks``).

    Args:
        model: the trained model (PreciseBN's).
        checkpointer: saves periodic checkpoints, and the iteration a stop signal ends.
        periodic_checkpointer: detectron2 ``PeriodicCheckpointer`` arguments (``period``, and
            optionally ``max_to_keep``, ``file_prefix``).
        eval_period: iterations between evaluations (and PreciseBN recomputations).
        test: runs an evaluation; returns its results.
        build_writers: makes detectron2's event writers (called in the main process only).
        log_period: iterations between writes.
        scheduler: the learning-rate scheduler; None: the trainer's own.
        precise_bn_loader: makes PreciseBN's loader; None: no PreciseBN.
        precise_bn_iters: batches per PreciseBN recomputation.
    """
    main_process = comm.is_main_process()
    return [
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=scheduler),
        # Before the checkpointer and the evaluation: it updates the model they save and test.
        (
            precise_bn_hook(model, precise_bn_loader, precise_bn_iters, eval_period)
            if precise_bn_loader is not None
            else None
        ),
        (
            hooks.PeriodicCheckpointer(checkpointer, **periodic_checkpointer)
            if main_process
            else None
        ),
        hooks.EvalHook(eval_period, test),
        hooks.PeriodicWriter(build_writers(), period=log_period) if main_process else None,
        # Last, so that the iteration it saves on a stop is complete (scheduler step included).
        GracefulStopHook(checkpointer),
    ]
