"""Process-level resources: the cores this process may use, and memory tuning for conversion
(the CLI and zoo workers call :func:`tune_allocator` once at start)."""

from __future__ import annotations

import os

#: glibc mmap threshold: buffers below it are recycled from the heap, larger ones are unmapped on free
MMAP_THRESHOLD = 8 << 20
#: glibc malloc arenas shared by all threads (one per producer thread would keep freed buffers apart)
MALLOC_ARENAS = 2


def tune_allocator() -> None:
    """Let glibc recycle small and mid-sized tensor buffers instead of mmap'ing (and page-faulting)
    fresh ones, and keep the number of malloc arenas small.

    Buffers of :data:`MMAP_THRESHOLD` and more (layer weights, embeddings) get their own mappings
    and are returned to the system when freed, so peak RSS follows the tensors in flight; smaller
    ones are recycled from the heap. Measured on GPTQ → npu-int4, 1.37 GB, ``--workers 15``, 2 cores:
    peak RSS 1507 MB with a 64 MiB threshold, 1119 MB with 16 MiB, 921 MB with 8 MiB (522 MB at
    ``--workers 1``); see benchmarks/RESULTS.md. No-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)  # buffers below this are recycled from the heap
    libc.mallopt(m_trim_threshold, 2 * MMAP_THRESHOLD)  # keep up to this much freed heap for reuse
    # every producer thread would otherwise get an arena of its own, each keeping its freed buffers:
    # RSS would grow with --workers; a few shared arenas recycle the same buffers across threads
    libc.mallopt(m_arena_max, MALLOC_ARENAS)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under ``taskset``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
