"""A file or block device served through the ring, in block-device vocabulary.

The engine knows nothing of NBD: it reads, writes, syncs, discards and zeroes byte ranges and
reports each outcome as ``0`` or a positive errno to a callback.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Callable

from nbd_uring.engine.buffers import Buffer
from nbd_uring.engine.ring import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Completion,
    Ring,
)

_ZERO_CHUNK = 1024 * 1024
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENODEV)
_zeros: mmap.mmap | None = None


def _zero_buffer() -> memoryview:
    global _zeros
    if _zeros is None:
        _zeros = mmap.mmap(-1, _ZERO_CHUNK, prot=mmap.PROT_READ)
    return memoryview(_zeros)


class Export:
    """One open file or block device; every I/O goes through ``ring``."""

    def __init__(
        self,
        ring: Ring,
        path: str,
        *,
        read_only: bool = False,
        size: int | None = None,
        create: bool = False,
    ) -> None:
        self.ring = ring
        self.path = path
        self.read_only = read_only
        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        if create and not read_only:
            flags |= os.O_CREAT
        self.fd = os.open(path, flags, 0o644)
        try:
            st = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if size is not None and not self.is_block_device and st.st_size < size:
                if read_only:
                    raise ValueError(f"{path} is {st.st_size} bytes, smaller than --size {size}")
                os.ftruncate(self.fd, size)
            actual = os.lseek(self.fd, 0, os.SEEK_END)
            self.size = actual if size is None else min(size, actual)
        except BaseException:
            os.close(self.fd)
            raise
        self._punch_ok = not read_only
        self._zero_range_ok = not read_only

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def read(self, offset: int, buf: object, done: Completion) -> None:
        self.ring.read(self.fd, buf, offset, done)

    def write(self, offset: int, buf: Buffer, done: Completion, *, fua: bool = False) -> None:
        """Write ``buf`` at ``offset``. The export owns ``buf`` from here on and releases it
        once the kernel is done with it, whenever the caller is told."""

        def written(err: int) -> None:
            buf.release()
            done(err)

        self.ring.write(self.fd, buf.view, offset, written, fua=fua)

    def flush(self, done: Completion) -> None:
        self.ring.fdatasync(self.fd, done)

    def trim(self, offset: int, length: int, done: Completion, *, fua: bool = False) -> None:
        """Punch a hole; a discard is only a hint, so a file system that cannot is not an error."""
        if not self._punch_ok or length == 0:
            done(0)
            return

        def punched(err: int) -> None:
            if err in _UNSUPPORTED:
                self._punch_ok = False
                err = 0
            self._then_sync(err, fua, done)

        self.ring.fallocate(
            self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, punched
        )

    def zero(
        self,
        offset: int,
        length: int,
        done: Completion,
        *,
        may_trim: bool = True,
        fua: bool = False,
    ) -> None:
        """Make the range read back as zeroes: punch a hole when allowed, else zero the range
        in place, else write zeroes."""
        if length == 0:
            self._then_sync(0, fua, done)
            return
        if may_trim and self._punch_ok:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        elif self._zero_range_ok:
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        else:
            self._write_zeroes(offset, length, fua, done)
            return

        def allocated(err: int) -> None:
            if err in _UNSUPPORTED:
                if mode & FALLOC_FL_PUNCH_HOLE:
                    self._punch_ok = False
                else:
                    self._zero_range_ok = False
                self.zero(offset, length, done, may_trim=may_trim, fua=fua)
                return
            self._then_sync(err, fua, done)

        self.ring.fallocate(self.fd, mode, offset, length, allocated)

    def cache(self, offset: int, length: int, done: Completion) -> None:
        """Ask the kernel to read the range ahead; failure only loses the hint."""
        self.ring.fadvise_willneed(self.fd, offset, length, lambda _err: done(0))

    def _write_zeroes(self, offset: int, length: int, fua: bool, done: Completion) -> None:
        zeros = _zero_buffer()
        end = offset + length

        def step(err: int, pos: int = offset) -> None:
            if err or pos >= end:
                self._then_sync(err, fua, done)
                return
            n = min(_ZERO_CHUNK, end - pos)
            self.ring.write(self.fd, zeros[:n], pos, _bind(step, pos + n))

        step(0)

    def _then_sync(self, err: int, fua: bool, done: Completion) -> None:
        if err or not fua:
            done(err)
        else:
            self.ring.fdatasync(self.fd, done)


def _bind(step: Callable[[int, int], None], pos: int) -> Completion:
    return lambda err: step(err, pos)
