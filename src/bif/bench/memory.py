"""Peak memory of a block of code: RSS high-water mark on the CPU, allocator peak on CUDA."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import torch

T = TypeVar("T")
_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _hwm_kb() -> int | None:
    """VmHWM (peak resident set) of this process in kB, where Linux provides it."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_mb``.

    On Linux the RSS high-water mark is reset on entry (writing 5 to /proc/self/clear_refs), so
    the figure is the peak while the block ran (including memory already held on entry). Where
    that is impossible it falls back to the process-lifetime peak (``ru_maxrss``). With CUDA
    available, ``peak_cuda_mb`` is the allocator's peak during the block.
    """

    def __init__(self) -> None:
        self.peak_mb = float("nan")
        self.peak_cuda_mb: float | None = None
        self.exact = False

    def __enter__(self) -> PeakMemory:
        try:
            _CLEAR.write_text("5")
            self.exact = _hwm_kb() is not None
        except OSError:
            self.exact = False
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        kb = _hwm_kb() if self.exact else None
        if kb is None:
            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.peak_mb = kb / 1024
        if torch.cuda.is_available():
            self.peak_cuda_mb = torch.cuda.max_memory_allocated() / 2**20


def measured(fn: Callable[[], T]) -> tuple[T, float, float]:
    """Run ``fn()``; return its value, its wall time in seconds and its peak memory in MB."""
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t0
    return value, seconds, mem.peak_mb
