"""Wall-clock timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from typing import Callable


def best_time(fn: Callable[[], object], repeats: int, *, warmup: bool = False) -> float:
    """Best wall-clock time of ``repeats`` calls of ``fn``, in seconds (after one untimed call
    if ``warmup``)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
