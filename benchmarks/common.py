"""Shared timing helpers for the benchmarks (no framework imports here)."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable


def timeit(fn: Callable[[], object], sync: Callable[[object], object] = lambda r: r, warmup: int = 2,
           min_time: float = 2.0, max_iters: int = 50) -> float:
    """Median seconds per call after ``warmup`` calls; at least 3 timed calls."""
    for _ in range(warmup):
        sync(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_iters):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
