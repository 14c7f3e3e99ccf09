"""Put CPU training on PyTorch's fast path without the user having to know the tricks.

Two things slow CPU training of conv nets with large activations:

1. glibc's ``malloc`` serves big blocks with ``mmap`` and hands freed memory back
   to the kernel (``munmap`` / heap trimming). Every training step then re-faults
   the same pages in, which costs about a quarter of the step time at the digits
   sizes of the DARTS supernet and far more under memory pressure. Raising
   ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps the memory in the process
   for reuse (the same effect as the ``MALLOC_MMAP_THRESHOLD_`` and
   ``MALLOC_TRIM_THRESHOLD_`` environment variables, but applied at run time).
2. Denormal floats make some kernels crawl; flushing them to zero is harmless
   for training.

:func:`tune_cpu` applies both, once per process; it is a no-op where glibc is
absent (macOS, Windows, musl).

A third thing slows a run on shared cores: one torch thread per core when other jobs
hold some of them. :func:`threads_from_free_cores` (called by every program's
``cli_main`` unless ``OMP_NUM_THREADS`` is set) gives torch the cores :func:`free_cores`
finds idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import time

import torch

__all__ = ["tune_cpu", "glibc", "free_cores", "threads_from_free_cores"]

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# glibc refuses an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit),
# so try the largest accepted value first.
_MMAP_THRESHOLDS = (32 * 1024 * 1024, 16 * 1024 * 1024, 4 * 1024 * 1024)
_TRIM_THRESHOLD = 1024 * 1024 * 1024

_applied: dict | None = None


def tune_cpu() -> dict:
    """Raise glibc's mmap/trim thresholds and flush denormals; safe to call many times.

    Returns what was applied, e.g.
    ``{"glibc": True, "mmap_threshold": 33554432, "trim_threshold": 1073741824, "flush_denormal": True}``.
    """
    global _applied
    if _applied is not None:
        if _applied["flush_denormal"]:
            torch.set_flush_denormal(True)   # cheap; someone may have switched it off since
        return dict(_applied)
    result: dict = {"glibc": False, "mmap_threshold": None, "trim_threshold": None}
    libc = glibc()
    if libc is not None:
        result["glibc"] = True
        mallopt = libc.mallopt
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        for value in _MMAP_THRESHOLDS:
            if mallopt(M_MMAP_THRESHOLD, value) == 1:
                result["mmap_threshold"] = value
                break
        if mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1:
            result["trim_threshold"] = _TRIM_THRESHOLD
    result["flush_denormal"] = bool(torch.set_flush_denormal(True))
    _applied = result
    return dict(result)


def glibc():
    """The process's C library if it is glibc (``mallopt``, ``malloc_trim``), else ``None``.

    Shared with the benchmarks, which trim the heap between memory measurements.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    return libc


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(idle, total) clock ticks summed over ``cpus`` from ``/proc/stat``; None where it cannot be read."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    idle = total = 0
    seen = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(x) for x in fields[:8]]          # user nice system idle iowait irq softirq steal
        idle += ticks[3] + ticks[4]
        total += sum(ticks)
        seen += 1
    return (idle, total) if seen == len(cpus) else None


def free_cores(window: float = 0.25) -> int:
    """How many of the cores this process may run on are idle now (at least 1).

    The cores are ``os.sched_getaffinity(0)`` (what ``taskset``/cgroups allow, else
    ``os.cpu_count()``); their idle share is measured from ``/proc/stat`` over ``window``
    seconds, during which this process sleeps, so the count is what other processes
    leave free at this moment. Without ``/proc/stat`` (not Linux) the cores minus the
    1-minute load average.
    """
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = set(range(os.cpu_count() or 1))
    n = len(cpus)
    before = _cpu_times(cpus)
    if before is not None:
        time.sleep(window)
        after = _cpu_times(cpus)
        if after is not None and after[1] > before[1]:
            idle_share = (after[0] - before[0]) / (after[1] - before[1])
            return max(1, min(n, round(idle_share * n)))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return n
    return max(1, min(n, round(n - load)))


def threads_from_free_cores(window: float = 0.1) -> int | None:
    """Give torch as many threads as cores are free now, unless ``OMP_NUM_THREADS`` is set (it wins).

    Returns the thread count set, or None when the environment fixes it. Beside other
    CPU-bound jobs, torch's default (one thread per core) makes every thread wait for
    the one that shares its core with another job, and libgomp's spinning threads take
    the cores from the others: the default search's step went from 1.4 s idle to 50 s
    beside one single-thread job on 2 cores, against 1.2 s with this count
    (``python -m benchmarks.shared_cores``, docs/benchmarks.md). The count depends on
    the load when the program starts, and floating-point reductions depend on it: set
    ``OMP_NUM_THREADS`` for bit-identical reruns.
    """
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    n = free_cores(window)
    torch.set_num_threads(n)
    return n
