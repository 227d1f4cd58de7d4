"""Page-aligned I/O buffers that never move while the kernel may be using them.

A ``bytearray`` can be resized under an in-flight SQE; an ``mmap`` cannot, it is page
aligned (ready for O_DIRECT) and its address is fixed for its whole life. Buffers are kept in
power-of-two size classes and recycled whole (mapping, views and the C pointer the ring hands
to the kernel), so the hot path neither maps memory nor builds objects.
"""

from __future__ import annotations

import mmap
from typing import Any

from nbd_uring._uring import ffi

PAGE = mmap.PAGESIZE
_MIN_CLASS = PAGE


def _size_class(length: int) -> int:
    size = _MIN_CLASS
    while size < length:
        size <<= 1
    return size


class Buffer:
    """A leased, fixed-address buffer; ``view`` covers exactly the requested length and
    ``ptr`` is its address for the ring."""

    __slots__ = ("_full", "_pool", "capacity", "length", "mem", "ptr", "view")

    def __init__(self, pool: BufferPool, mem: mmap.mmap) -> None:
        self._pool = pool
        self.mem = mem
        self.capacity = len(mem)
        self._full = memoryview(mem)
        self.ptr: Any = ffi.from_buffer(mem, require_writable=True)
        self.length = 0
        self.view = self._full

    def release(self) -> None:
        """Give the buffer back; the caller must no longer use ``view``."""
        self._pool._put(self)

    def _close(self) -> None:
        self.ptr = None
        self.view = self._full = memoryview(b"")
        try:
            self.mem.close()
        except BufferError:
            pass  # a view still exists somewhere; the mapping goes when it does


class BufferPool:
    """Recycles mmap-backed buffers, keeping at most ``max_cached`` bytes of idle ones."""

    def __init__(self, max_cached: int = 64 * 1024 * 1024) -> None:
        self.max_cached = max_cached
        self.cached = 0
        self._free: dict[int, list[Buffer]] = {}

    def acquire(self, length: int) -> Buffer:
        size = _MIN_CLASS if length <= _MIN_CLASS else _size_class(length)
        free = self._free.get(size)
        if free:
            buf = free.pop()
            self.cached -= size
        else:
            buf = Buffer(self, mmap.mmap(-1, size))
        buf.length = length
        buf.view = buf._full if length == size else buf._full[:length]
        return buf

    def _put(self, buf: Buffer) -> None:
        size = buf.capacity
        if self.cached + size > self.max_cached:
            buf._close()
            return
        free = self._free.get(size)
        if free is None:
            self._free[size] = [buf]
        else:
            free.append(buf)
        self.cached += size
