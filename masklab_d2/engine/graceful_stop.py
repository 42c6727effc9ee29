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
  a worker killed by it makes torch raise in the main process, mid-step or mid-save.

Exceptions (a NaN loss, an out-of-memory) save nothing: ``last_checkpoint`` keeps pointing at the
last good checkpoint.

Any detectron2 trainer can use it::

    loader = spare_loader_workers(build_detection_train_loader(...))   # and test loaders
    trainer.register_hooks([GracefulStopHook(checkpointer)])   # last, after the LR scheduler
    # (DefaultTrainer subclasses: GracefulStopHook() saves with trainer.checkpointer)
    launch(main, num_gpus, ...)                                 # instead of detectron2's launch
"""

import dataclasses
import functools
import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
from datetime import timedelta
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.engine import launch as d2_launch
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm
from torch.utils.data import DataLoader

logger = logging.getLogger(__name__)

STOP_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)
# sysexits.h EX_TEMPFAIL: the run did not fail, it stopped early and can be resumed.
EXIT_INTERRUPTED = 75


class StopTraining(BaseException):
    """Ends the training loop after a requested stop, once the checkpoint is written.

    A BaseException, as KeyboardInterrupt is: detectron2's loop logs every Exception as an error
    ("Exception during training"), and a requested stop is not one.

    Attributes:
        iteration: the last completed iteration (the one saved), -1 when training never started.
        signum: the signal that asked for the stop.
    """

    def __init__(self, iteration: int, signum: int):
        super().__init__(f"training stopped by {_signal_name(signum)} after iteration {iteration}")
        self.iteration = iteration
        self.signum = signum


@dataclasses.dataclass
class _State:
    signum: Optional[int] = None  # the first stop signal received
    count: int = 0  # stop signals received, repeats included
    pid: int = -1  # the process that installed the handlers (forked children inherit them)
    previous: Dict[int, Any] = dataclasses.field(default_factory=dict)


_STATE = _State()


def _signal_name(signum: Optional[int]) -> str:
    try:
        return signal.Signals(signum).name
    except (TypeError, ValueError):
        return str(signum)


def _record(signum: int, frame: Any) -> None:
    """The signal handler: it records, nothing else (no logging: it may run inside a write)."""
    if os.getpid() != _STATE.pid:
        _in_forked_child(signum)
        return
    if _STATE.signum is None:
        _STATE.signum = signum
    _STATE.count += 1


def _in_forked_child(signum: int) -> None:
    """Forked children (DataLoader workers, pools) inherit the handler.

    DataLoader workers ignore every stop signal, as :func:`spare_loader_workers` makes them (the
    main process stops them itself). Other children keep SIGTERM's default, since
    multiprocessing pools terminate their workers with it.
    """
    from torch.utils.data import get_worker_info

    if signum == signal.SIGTERM and get_worker_info() is None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _ignore_stop_signals(worker_init_fn: Optional[Callable[[int], None]], worker_id: int) -> None:
    """A DataLoader worker's init: stop signals are ignored, then the loader's own init runs."""
    # torch's worker loop has just replaced the inherited SIGTERM handler by its own C handler,
    # which kills the worker when another process than its parent sends the signal.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def spare_loader_workers(loader: Any) -> Any:
    """Makes the worker processes of ``loader`` ignore stop signals; returns ``loader``.

    A stop signal sent to every process of a run (Slurm's ``scancel``, ``kill -TERM -<pgid>``)
    would kill the workers, and torch then raises "DataLoader worker ... is killed by signal" in
    the main process wherever it is, the stop's checkpoint write included. Ignoring it there
    leaves the stop to the main process; the workers end with their loader, as always.

    Args:
        loader: a torch DataLoader, or a dataset that iterates one as its ``dataset`` attribute
            (detectron2's AspectRatioGroupedDataset, built for aspect-ratio grouping); anything
            else, e.g. a loader without workers, is returned unchanged.
    """
    torch_loader = loader
    while not isinstance(torch_loader, DataLoader) and hasattr(torch_loader, "dataset"):
        torch_loader = torch_loader.dataset
    if isinstance(torch_loader, DataLoader) and torch_loader.num_workers > 0:
        init = torch_loader.worker_init_fn
        if not (isinstance(init, functools.partial) and init.func is _ignore_stop_signals):
            # A partial of module-level functions: it pickles, for spawn-started workers too.
            torch_loader.worker_init_fn = functools.partial(_ignore_stop_signals, init)
    return loader


def install_signal_handlers(signals: Sequence[int] = STOP_SIGNALS) -> bool:
    """Makes ``signals`` only record a stop request in this process.

    Args:
        signals: the signals to handle; the handlers they had are kept (:func:`previous_handler`).

    Returns:
        False when called outside the main thread (Python allows handlers only there).
    """
    if threading.current_thread() is not threading.main_thread():
        logger.warning("Signal handlers not installed: not in the main thread")
        return False
    _STATE.pid = os.getpid()
    for signum in signals:
        previous = signal.signal(signum, _record)
        if previous is not _record:
            _STATE.previous[signum] = previous
    return True


def previous_handler(signum: int) -> Any:
    """The handler ``signum`` had before :func:`install_signal_handlers` (e.g. submitit's)."""
    return _STATE.previous.get(signum, signal.SIG_DFL)


def request_stop(signum: int = signal.SIGTERM) -> None:
    """Asks for a stop as a signal would (from code: a callback, a test)."""
    _STATE.pid = _STATE.pid if _STATE.pid != -1 else os.getpid()
    _record(signum, None)


def stop_requested() -> Optional[int]:
    """The signal that asked this process to stop, or None."""
    return _STATE.signum


def reset() -> None:
    """Forgets a stop request (a process that trains again after a stop)."""
    _STATE.signum, _STATE.count = None, 0


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


def _stoppable_main(main_func: Callable, *args) -> Any:
    """Runs ``main_func(*args)`` in a training process; a requested stop exits it with
    EXIT_INTERRUPTED (module-level, so that detectron2's launch can pickle it)."""
    if _STATE.pid != os.getpid():
        install_signal_handlers()  # a rank started by launch: a fresh interpreter
    try:
        result = main_func(*args)
    except StopTraining as stop:
        stopped = str(stop)  # not the exception: its traceback would keep the trainer alive
    else:
        stopped = None
        # No rank tears the group down while another still needs it (a stopped rank passed
        # this barrier after the save).
        comm.synchronize()
    destroy_process_group()
    if stopped is not None:
        logger.warning(f"Stopped: {stopped}; exiting with status {EXIT_INTERRUPTED}")
        sys.exit(EXIT_INTERRUPTED)
    return result


def destroy_process_group() -> None:
    """Destroys the default process group, when there is one, before the rank's interpreter
    exits: left to the exit, the gloo group's destructor races its own threads and aborts the
    process ("terminate called without an active exception", SIGABRT) once in a few runs, after
    training finished and the final checkpoint was written."""
    if dist.is_available() and dist.is_initialized():
        # The trainer's reference cycles keep DDP's reducer, and through it the gloo group and
        # its pending work, alive until the exit's garbage collection: free them first.
        gc.collect()
        dist.destroy_process_group()


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
        return d2_launch(
            _stoppable_main, 1, num_machines, machine_rank, dist_url, (main_func, *args), timeout
        )
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
