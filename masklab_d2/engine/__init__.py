"""Training-loop machinery shared by every masklab_d2 trainer (yacs or LazyConfig).

May import detectron2 and masklab_d2's modeling, data and evaluation packages, never the tools.
"""

from .graceful_stop import (
    EXIT_INTERRUPTED,
    STOP_SIGNALS,
    GracefulStopHook,
    StopTraining,
    install_signal_handlers,
    launch,
    request_stop,
    spare_loader_workers,
    stop_requested,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "STOP_SIGNALS",
    "GracefulStopHook",
    "StopTraining",
    "install_signal_handlers",
    "launch",
    "request_stop",
    "spare_loader_workers",
    "stop_requested",
]
