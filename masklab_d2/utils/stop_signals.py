"""Stop signals, recorded: the detectron2-free core of graceful stops.

:mod:`masklab_d2.engine.graceful_stop` builds graceful stops for detectron2 trainers on this
module; a process that only drives training (the sweep tool's submitit job function, a login
node without detectron2) needs just this part: recording handlers, :class:`StopTraining`,
:data:`EXIT_INTERRUPTED`, the process-group teardown and DataLoader workers that ignore stop
signals yet never outlive the process that started them. Importing it costs only the standard
library (the sweep tool reads :data:`EXIT_INTERRUPTED` from it); torch is imported by the
functions that use it.
"""

import dataclasses
import functools
import gc
import logging
import os
import signal
import threading
from typing import Any, Callable, Dict, Optional, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "EXIT_INTERRUPTED",
    "STOP_SIGNALS",
    "StopTraining",
    "destroy_process_group",
    "install_signal_handlers",
    "previous_handler",
    "request_stop",
    "reset",
    "restore_signal_handlers",
    "spare_loader_workers",
    "stop_requested",
]

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
    """A DataLoader worker's init: stop signals are ignored, except its parent's SIGTERM, which
    ends it; then the loader's own init runs."""
    # torch's worker loop has just replaced the inherited SIGTERM handler by its own C handler,
    # which exits quietly on its parent's SIGTERM and dies of anyone else's. The parent's must
    # keep working: multiprocessing ends daemonic children with it at exit, then waits for them
    # (a worker that ignored it kept a finished run alive for ever). Python handlers do not see
    # the sender, so the signals are blocked and one thread takes them with sigwaitinfo.
    if hasattr(signal, "sigwaitinfo"):
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # threads started later inherit it
        threading.Thread(
            target=_take_stop_signals, args=(os.getppid(),), name="stop-signals", daemon=True
        ).start()
    else:  # no POSIX real-time signal calls: ignore them all (the parent kills at exit instead)
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


def _take_stop_signals(parent_pid: int) -> None:
    """A worker's signal thread: the parent's SIGTERM exits the worker, as torch's handler does;
    every other stop signal is dropped."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent_pid:
            os._exit(0)


def spare_loader_workers(loader: Any) -> Any:
    """Makes the worker processes of ``loader`` ignore stop signals; returns ``loader``.

    A stop signal sent to every process of a run (Slurm's ``scancel``, ``kill -TERM -<pgid>``)
    would kill the workers, and torch then raises "DataLoader worker ... is killed by signal" in
    the main process wherever it is, the stop's checkpoint write included. Ignoring it there
    leaves the stop to the main process; the workers end with their loader, as always.

    The parent's own SIGTERM still ends a worker (torch's and multiprocessing's way of ending
    workers still alive at exit, e.g. when an exception's traceback keeps the loader alive).

    Args:
        loader: a torch DataLoader, or a dataset that iterates one as its ``dataset`` attribute
            (detectron2's AspectRatioGroupedDataset, built for aspect-ratio grouping); anything
            else, e.g. a loader without workers, is returned unchanged.
    """
    from torch.utils.data import DataLoader

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
    _reset_sigterm_in_forked_children()
    return True


@functools.lru_cache(maxsize=None)
def _reset_sigterm_in_forked_children() -> None:
    """Forked children (multiprocessing pools, DataLoader workers) start with SIGTERM's default.

    A Python handler runs only when the child's main thread runs Python: a pool worker blocked
    on its task queue while a library thread (OpenCV's, OpenMP's) took the signal never ran it,
    and the pool's terminate() then waited for it for ever. The kernel's default needs no
    thread. DataLoader workers install their own handlers after this.
    """
    os.register_at_fork(after_in_child=_default_sigterm)


def _default_sigterm() -> None:
    if signal.getsignal(signal.SIGTERM) is _record:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def restore_signal_handlers() -> None:
    """Gives the signals :func:`install_signal_handlers` took back their previous handlers.

    Once training is over, a stop signal must end the process again, e.g. one that arrives
    while the interpreter exits; a stop already requested stays recorded.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in _STATE.previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    _STATE.previous.clear()


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


def destroy_process_group() -> None:
    """Destroys the default process group, when there is one, before the rank's interpreter
    exits: left to the exit, the gloo group's destructor races its own threads and aborts the
    process ("terminate called without an active exception", SIGABRT) once in a few runs, after
    training finished and the final checkpoint was written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # The trainer's reference cycles keep DDP's reducer, and through it the gloo group and
        # its pending work, alive until the exit's garbage collection: free them first.
        gc.collect()
        dist.destroy_process_group()
