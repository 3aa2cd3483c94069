"""Process-level memory tuning for conversion (the CLI and zoo workers call it once at start)."""

from __future__ import annotations

#: glibc mmap threshold: buffers below it are recycled from the heap
MMAP_THRESHOLD = 64 << 20


def tune_allocator() -> None:
    """Let glibc recycle large tensor buffers instead of mmap'ing (and page-faulting) fresh ones.

    Conversion allocates and frees the same few large buffers for every layer; with glibc's
    default 128 KiB-ish mmap threshold each one is a fresh mapping whose pages fault in on first
    touch, which costs more than the repack itself (measured ~2x on repack throughput, see
    benchmarks/RESULTS.md). Buffers of 64 MiB and more (embeddings, huge experts) still get their own
    mappings and are returned at once, so peak RSS stays bounded by the tensors in flight. No-op off glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)  # buffers below this are recycled from the heap
    libc.mallopt(m_trim_threshold, 2 * MMAP_THRESHOLD)  # keep up to this much freed heap for reuse
