"""Wall time of a call, measured by ``torch.utils.benchmark.Timer`` (which synchronises CUDA
around what it times), for the benchmark and profiling tools."""

from typing import Callable, List

import torch
from torch.utils import benchmark


def wall_times_ms(fn: Callable[[], object], repeat: int, warmup: int = 1) -> List[float]:
    """Per-call wall times of ``fn()`` in milliseconds, ``repeat`` of them, after ``warmup``
    untimed calls, on the process's current number of threads (the Timer's default is one)."""
    for _ in range(warmup):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return [timer.timeit(number=1).mean * 1000 for _ in range(max(1, repeat))]
