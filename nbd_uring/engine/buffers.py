"""Page-aligned I/O buffers that never move while the kernel may be using them.

A ``bytearray`` can be resized under an in-flight SQE; an ``mmap`` cannot, it is page
aligned (ready for O_DIRECT) and its address is fixed for its whole life. Buffers are kept in
power-of-two size classes and recycled, so the hot path rarely maps memory.
"""

from __future__ import annotations

import mmap

PAGE = mmap.PAGESIZE
_MIN_CLASS = PAGE


def _size_class(length: int) -> int:
    size = _MIN_CLASS
    while size < length:
        size <<= 1
    return size


class Buffer:
    """A leased, fixed-address buffer; ``view`` covers exactly the requested length."""

    __slots__ = ("_pool", "capacity", "length", "mem", "view")

    def __init__(self, pool: BufferPool, mem: mmap.mmap, length: int) -> None:
        self._pool = pool
        self.mem = mem
        self.capacity = len(mem)
        self.length = length
        self.view = memoryview(mem)[:length]

    def release(self) -> None:
        """Give the buffer back; the caller must no longer use ``view``."""
        self.view.release()
        self._pool._put(self.mem)


class BufferPool:
    """Recycles mmap-backed buffers, keeping at most ``max_cached`` bytes of idle ones."""

    def __init__(self, max_cached: int = 64 * 1024 * 1024) -> None:
        self.max_cached = max_cached
        self.cached = 0
        self._free: dict[int, list[mmap.mmap]] = {}

    def acquire(self, length: int) -> Buffer:
        size = _size_class(max(length, 1))
        free = self._free.get(size)
        if free:
            mem = free.pop()
            self.cached -= size
        else:
            mem = mmap.mmap(-1, size)
        return Buffer(self, mem, length)

    def _put(self, mem: mmap.mmap) -> None:
        size = len(mem)
        if self.cached + size > self.max_cached:
            try:
                mem.close()
            except BufferError:
                pass  # a view still exists somewhere; the mapping goes when it does
            return
        self._free.setdefault(size, []).append(mem)
        self.cached += size
