"""Graceful stop: a signal ends training at an iteration boundary, with a checkpoint that resumes.

Schedulers stop jobs with signals: Ctrl-C (SIGINT), ``kill`` and Slurm preemption (SIGTERM),
submitit's warning before a time limit (SIGUSR2 by default) and SIGUSR1 for custom setups. A
handler that raises wherever the program happens to be leaves half-imported modules, aborts
evaluations and cuts checkpoint writes short, so here:

* the handlers only record the signal (:func:`install_signal_handlers`); repeats, e.g. Ctrl-C
  followed by the sweep's SIGTERM, are ignored, so nothing interrupts the save;
* :class:`GracefulStopHook`, the last hook of the trainer, checks the record after each iteration.
  All ranks agree through an all-reduce, so they stop at the same iteration; the main process
  saves a checkpoint of that iteration (model, optimizer, LR scheduler, iteration), every rank
  waits for it and :class:`StopTraining` ends the loop;
* the process exits with :data:`EXIT_INTERRUPTED` (75, EX_TEMPFAIL: try again later), which the
  sweep records as "interrupted" and ``--resume`` continues from;
* with several processes per machine, :func:`launch` (detectron2's, wrapped) forwards the signals
  its parent receives to the ranks, so none of them is left training as an orphan, and each
  rank destroys its process group before it exits, stopped or finished;
* DataLoader workers ignore stop signals (:func:`spare_loader_workers` on every loader with
  workers): Slurm's ``scancel`` and ``kill -TERM -<pgid>`` signal every process of a job, and
  a worker killed by it makes torch raise in the main process, mid-step or mid-save; only
  their parent's SIGTERM still ends them, so that workers still alive at exit do not keep a
  finished run waiting for them;
* once training is over (finished, stopped or failed), the stop signals get their previous
  handlers back: a signal during the exit ends the process.

The signal-recording core is torch-only (:mod:`masklab_d2.utils.stop_signals`); this module adds
what needs detectron2: the hook, the ranks' agreement and the launcher.

Exceptions (a NaN loss, an out-of-memory) save nothing: ``last_checkpoint`` keeps pointing at the
last good checkpoint.

Any detectron2 trainer can use it::

    loader = spare_loader_workers(build_detection_train_loader(...))   # and test loaders
    trainer.register_hooks([GracefulStopHook(checkpointer)])   # last, after the LR scheduler
    # (DefaultTrainer subclasses: GracefulStopHook() saves with trainer.checkpointer)
    launch(main, num_gpus, ...)                                 # instead of detectron2's launch
"""

import logging
import multiprocessing
import os
import signal
import sys
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

from masklab_d2.utils.stop_signals import (  # noqa: F401  (re-exported: the engine's API)
    _STATE,
    EXIT_INTERRUPTED,
    STOP_SIGNALS,
    StopTraining,
    _record,
    _signal_name,
    destroy_process_group,
    install_signal_handlers,
    previous_handler,
    request_stop,
    reset,
    restore_signal_handlers,
    spare_loader_workers,
    stop_requested,
)

logger = logging.getLogger(__name__)


def _agree_on_stop() -> Optional[int]:
    """The stop signal when any rank has one (all ranks get the same answer), else None."""
    local = stop_requested()
    if comm.get_world_size() == 1:
        return local
    device = "cuda" if dist.get_backend() == dist.Backend.NCCL else "cpu"
    # One small all-reduce per iteration (detectron2 already gathers metrics every iteration):
    # ranks receive a signal at slightly different times, yet must all stop at the same step.
    flag = torch.tensor([local or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


class GracefulStopHook(HookBase):
    """Stops training after the iteration during which a stop was requested, with a checkpoint.

    Register it last, so that the iteration it saves is complete: every other hook, the LR
    scheduler's step and a periodic evaluation included, has run. A stop requested before
    training starts ends it before the first iteration, saving nothing. A stop requested during
    the last iteration lets training finish normally (final checkpoint and evaluation).

    Args:
        checkpointer: a DetectionCheckpointer with the trainer's state as a checkpointable, as
            detectron2's lazy-config script sets up; None: the trainer's ``checkpointer`` at the
            time of the stop (DefaultTrainer; a subclass may replace it after build_hooks).
    """

    def __init__(self, checkpointer=None):
        self.checkpointer = checkpointer

    def before_train(self):
        signum = _agree_on_stop()
        if signum is not None:
            logger.warning(f"{_signal_name(signum)} received before training started; stopping")
            raise StopTraining(self.trainer.iter - 1, signum)

    def after_step(self):
        signum = _agree_on_stop()
        iteration = self.trainer.iter
        if signum is None or iteration + 1 >= self.trainer.max_iter:
            return
        logger.warning(
            f"{_signal_name(signum)} received: stopping after iteration {iteration}; saving a "
            "checkpoint (further stop signals are ignored; `kill -9` aborts)"
        )
        # As detectron2's PeriodicCheckpointer names and tags it; the trainer's own state (its
        # iteration, the LR scheduler) is a checkpointable, so --resume starts at iteration + 1.
        checkpointer = self.checkpointer or self.trainer.checkpointer
        checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
        comm.synchronize()  # no rank exits (and tears the group down) before the save is done
        raise StopTraining(iteration, signum)


def evaluation_ends_on_signals() -> None:
    """Makes Ctrl-C and a scheduler's SIGTERM end an evaluation-only run at once (it has nothing
    to save), and exits with EXIT_INTERRUPTED when a stop already arrived; both config systems'
    ``--eval-only`` call it first."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.default_int_handler)
    if stop_requested() is not None:
        raise SystemExit(EXIT_INTERRUPTED)


def _stoppable_main(main_func: Callable, *args) -> Any:
    """Runs ``main_func(*args)`` in a training process; a requested stop exits it with
    EXIT_INTERRUPTED (module-level, so that detectron2's launch can pickle it)."""
    if _STATE.pid != os.getpid():
        install_signal_handlers()  # a rank started by launch: a fresh interpreter
    try:
        result = main_func(*args)
    except StopTraining as stop:
        stopped = str(stop)  # not the exception: its traceback would keep the trainer alive
    except BaseException:
        restore_signal_handlers()  # a failed rank must end on a stop signal too
        raise
    else:
        stopped = None
        # No rank tears the group down while another still needs it (a stopped rank passed
        # this barrier after the save).
        comm.synchronize()
    destroy_process_group()
    restore_signal_handlers()  # from here on a stop signal ends the rank, e.g. during its exit
    if stopped is not None:
        logger.warning(f"Stopped: {stopped}; exiting with status {EXIT_INTERRUPTED}")
        sys.exit(EXIT_INTERRUPTED)
    return result


def _forward_to_ranks(signum: int, frame: Any) -> None:
    """The launch parent's handler: the ranks, not this waiting parent, must stop and save."""
    _record(signum, frame)
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass


def launch(
    main_func: Callable,
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: Optional[str] = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
) -> Any:
    """detectron2's :func:`~detectron2.engine.launch`, with graceful stops.

    Every training process records stop signals (:func:`install_signal_handlers`) and exits with
    EXIT_INTERRUPTED after a :class:`StopTraining`. With several processes per machine this
    parent forwards the stop signals it receives to the ranks and exits with EXIT_INTERRUPTED
    when they stopped so. Call it from the main thread. Arguments as detectron2's.
    """
    world_size = num_machines * num_gpus_per_machine
    if world_size == 1:
        install_signal_handlers()
        try:
            return d2_launch(
                _stoppable_main,
                1,
                num_machines,
                machine_rank,
                dist_url,
                (main_func, *args),
                timeout,
            )
        finally:
            restore_signal_handlers()  # the work is done: a stop signal during the exit ends it
    _STATE.pid = os.getpid()
    for signum in STOP_SIGNALS:
        _STATE.previous[signum] = signal.signal(signum, _forward_to_ranks)
    try:
        return d2_launch(
            _stoppable_main,
            num_gpus_per_machine,
            num_machines,
            machine_rank,
            dist_url,
            (main_func, *args),
            timeout,
        )
    except torch.multiprocessing.ProcessExitedException as error:
        # Ranks that stopped exit with EXIT_INTERRUPTED; one killed by the forwarded signal
        # before it could install its handlers (still importing) had nothing to save.
        if error.exit_code == EXIT_INTERRUPTED or stop_requested() is not None:
            sys.exit(EXIT_INTERRUPTED)
        raise
    finally:
        restore_signal_handlers()
