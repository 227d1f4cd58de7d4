"""A file or block device served through the ring, in block-device vocabulary.

The engine knows nothing of NBD: it reads, writes, syncs, discards and zeroes byte ranges and
reports each outcome as ``0`` or a positive errno to a callback. Here live the design concept's
rules, shared by every connection to the export:

- ordering: a request that overlaps an earlier unfinished one waits for it (``Ordering.STRICT``);
- FLUSH by callbacks: it waits for the writes received before it, then one fdatasync, which
  concurrent FLUSHes share;
- durability levels (:class:`Durability`), with write-back errors reported at the next FLUSH.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

from nbd_uring.engine.buffers import Buffer
from nbd_uring.engine.durability import Durability, FlushEpochs, Ordering
from nbd_uring.engine.faults import FaultInjector
from nbd_uring.engine.lane import LaneExport
from nbd_uring.engine.ordering import OverlapTracker
from nbd_uring.engine.ring import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    Completion,
    Ring,
)

log = logging.getLogger(__name__)

_ZERO_CHUNK = 1024 * 1024
_BLKSSZGET = 0x1268
_FILE_BLOCK = 512
_TAIL_ZONE = mmap.PAGESIZE * (mmap.PAGESIZE // 8)
"""The largest page-cache folio (one PMD: 2 MiB with 4 KiB pages). O_DIRECT and buffered I/O
must never touch the same folio: a direct write that cannot invalidate a folio a buffered write
keeps dirty makes the kernel warn of possible corruption and fail the next fsync with EIO."""
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENODEV)
_zeros: mmap.mmap | None = None

IO = Callable[[Completion], None]


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
        ordering: Ordering = Ordering.STRICT,
        durability: Durability = Durability.FLUSH,
        writeback_limit: int = 64 * 1024 * 1024,
        faults: FaultInjector | None = None,
        fua_dsync: bool = False,
        inline_writes: bool = False,
        direct: bool = False,
    ) -> None:
        self.ring = ring
        self.path = path
        self.read_only = read_only
        self.ordering = ordering
        self.durability = durability
        self.writeback_limit = writeback_limit
        self.faults = faults
        self.fua_dsync = fua_dsync
        self.inline_writes = inline_writes
        """Small plain writes with pwrite(2) on the spot instead of the ring (opt-in: on ext4
        io_uring hands buffered writes to one io-wq worker per file, which is slower)."""
        self.direct = direct
        """The file is open with O_DIRECT: every I/O through ``fd`` is aligned to
        ``block_size`` in offset, length and memory (buffers are mmap-backed, page aligned)."""
        flags = os.O_CLOEXEC | (os.O_RDONLY if read_only else os.O_RDWR)
        if create and not read_only:
            flags |= os.O_CREAT
        self.fd = os.open(path, flags | (os.O_DIRECT if direct else 0), 0o644)
        self._tail_fd = -1
        self.lane: LaneExport | None = None
        """This file in the ring's lane (plain exports, when the ring has one)."""
        try:
            st = os.fstat(self.fd)
            self.is_block_device = stat.S_ISBLK(st.st_mode)
            if size is not None and not self.is_block_device and st.st_size < size:
                if read_only:
                    raise ValueError(f"{path} is {st.st_size} bytes, smaller than --size {size}")
                os.ftruncate(self.fd, size)
            actual = os.lseek(self.fd, 0, os.SEEK_END)
            self.size = actual if size is None else min(size, actual)
            self.block_size = _logical_block_size(self.fd, self.is_block_device) if direct else 1
            """The alignment O_DIRECT needs (1 without ``direct``)."""
            self._tail_start = self.size
            """Bytes from here to ``size`` go through ``_tail_fd``, opened without O_DIRECT,
            when the size is not a multiple of the block size: an O_DIRECT write of the whole
            last block would extend the file. The zone starts at a ``_TAIL_ZONE`` boundary,
            so the page cache that buffered tail I/O uses never shares a folio with direct
            I/O; the rest of the export is pure O_DIRECT."""
            if self.size % self.block_size:
                self._tail_start = self.size - self.size % max(_TAIL_ZONE, self.block_size)
            if self._tail_start < self.size:
                self._tail_fd = os.open(path, flags & ~os.O_CREAT)
        except BaseException:
            self.close()
            raise
        self._punch_ok = not read_only
        self._zero_range_ok = not read_only
        self._plain = ordering is Ordering.STRICT and faults is None
        """Reads and writes may take the fast path: strict ordering, no fault injection."""
        if self._plain and ring.lane is not None:
            self.lane = ring.lane.export(
                self.fd,
                self._tail_start,
                writable=not read_only and durability is Durability.FLUSH and not inline_writes,
            )
        self._tracker = OverlapTracker(self.lane)
        self._epochs = FlushEpochs()
        self._sync_waiters: list[Completion] | None = None
        self._next_sync_waiters: list[Completion] = []
        self.syncs_issued = 0
        self.writeback_bytes = 0
        self.deferred_errors: list[tuple[int, int, int]] = []
        self.deferred_errors_total = 0

    def close(self) -> None:
        if self.lane is not None:
            self.lane.close()
            self.lane = None
        if self._tail_fd >= 0:
            os.close(self._tail_fd)
            self._tail_fd = -1
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- requests -----------------------------------------------------------------------

    def read(self, offset: int, buf: memoryview, done: Completion, ptr: Any = None) -> None:
        """Fill ``buf`` from ``offset``; ``buf`` stays the caller's (``ptr``: its address,
        which a pooled buffer carries, saving the ring from making one)."""
        if self._plain:
            # What _ordered and _faulted do, with one closure instead of four.
            tracker = self._tracker
            entry = tracker.admit(offset, len(buf), False, None)

            def finished(err: int) -> None:
                tracker.release(entry)
                done(err)

            if entry.blockers:
                entry.defer(lambda: self._read_at(buf, offset, finished, ptr))
            else:
                self._read_at(buf, offset, finished, ptr)
            return
        self._ordered(
            "read", offset, len(buf), False, lambda fin: self._read_at(buf, offset, fin), done
        )

    def write(self, offset: int, buf: Buffer, done: Completion, *, fua: bool = False) -> None:
        """Write ``buf`` at ``offset``. The export owns ``buf`` from here on and releases it
        once the kernel is done with it, whenever the caller is told."""
        fua = fua or self.durability is Durability.SYNC
        length = buf.length
        epoch = self._epochs.write_started()
        if (
            self._plain
            and not fua
            and self.durability is Durability.FLUSH
            and offset + length <= self._tail_start
        ):
            # What _ordered, _faulted and the closures below do, with one closure.
            tracker = self._tracker
            entry = tracker.admit(offset, length, True, None)
            epochs = self._epochs

            def finished(err: int) -> None:
                tracker.release(entry)
                buf.release()
                epochs.write_finished(epoch)
                done(err)

            if entry.blockers:
                entry.defer(
                    lambda: self.ring.write(
                        self.fd, buf.view, offset, finished, inline=self.inline_writes, ptr=buf.ptr
                    )
                )
            else:
                self.ring.write(
                    self.fd, buf.view, offset, finished, inline=self.inline_writes, ptr=buf.ptr
                )
            return
        early = (
            self.durability is Durability.WRITEBACK
            and not fua
            and self.writeback_bytes + length <= self.writeback_limit
        )

        def written(err: int) -> None:
            buf.release()
            self._epochs.write_finished(epoch)
            if not early:
                done(err)
                return
            self.writeback_bytes -= length
            if err:
                self._defer_error(offset, length, err)

        if early:
            self.writeback_bytes += length
            done(0)

        def io(fin: Completion) -> None:
            if fua and self.fua_dsync:
                self._write_at(buf.view, offset, fin, dsync=True)
            else:
                self._write_at(buf.view, offset, fin, fua=fua, inline=self.inline_writes)

        self._ordered("write", offset, length, True, io, written)

    def flush(self, done: Completion) -> None:
        """Reply once every write received before this FLUSH is on stable storage, plus any
        error that a write already replied to (write-back) met since the last FLUSH."""

        def ready() -> None:
            self._faulted("flush", 0, 0, self._sync, report)

        def report(err: int) -> None:
            if not err and self.deferred_errors:
                self.deferred_errors.clear()
                err = errno.EIO
            done(err)

        if self.lane is not None:
            # Also the lane's writes received before this FLUSH: both, then ready.
            waiting = [2]

            def one() -> None:
                waiting[0] -= 1
                if not waiting[0]:
                    ready()

            if not self.lane.flush_wait(one):
                waiting[0] = 1
            self._epochs.flush(one)
            return
        self._epochs.flush(ready)

    def trim(self, offset: int, length: int, done: Completion, *, fua: bool = False) -> None:
        """Punch a hole; a discard is only a hint, so a file system that cannot is not an error."""
        fua = fua or self.durability is Durability.SYNC

        def io(fin: Completion) -> None:
            if not self._punch_ok or length == 0:
                fin(0)
                return

            def punched(err: int) -> None:
                if err in _UNSUPPORTED:
                    self._punch_ok = False
                    err = 0
                self._then_sync(err, fua, fin)

            self.ring.fallocate(
                self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, punched
            )

        self._ordered_write("trim", offset, length, io, done)

    def zero(
        self,
        offset: int,
        length: int,
        done: Completion,
        *,
        may_trim: bool = True,
        fua: bool = False,
        fast: bool = False,
    ) -> None:
        """Make the range read back as zeroes: punch a hole when allowed, else zero the range
        in place, else write zeroes. ``fast``: never write zeroes, fail with ENOTSUP instead
        (and leave the data untouched) when the file system cannot zero with fallocate."""
        fua = fua or self.durability is Durability.SYNC
        self._ordered_write(
            "zero",
            offset,
            length,
            lambda fin: self._zero_io(offset, length, may_trim, fua, fin, fast),
            done,
        )

    def cache(self, offset: int, length: int, done: Completion) -> None:
        """Ask the kernel to read the range ahead; failure only loses the hint."""
        self.ring.fadvise_willneed(self.fd, offset, length, lambda _err: done(0))

    def extents(
        self, offset: int, length: int, max_extents: int = 1 << 20
    ) -> list[tuple[int, bool]]:
        """``(length, is_hole)`` runs from ``offset``, from SEEK_DATA/SEEK_HOLE, alternating.

        They cover ``[offset, offset + length)`` unless ``max_extents`` runs were needed first.
        A hole reads as zeroes. A block device, or a file system that cannot tell, is all data.
        These are two cheap system calls per run, made synchronously.
        """
        end = offset + length
        if self.is_block_device or length <= 0:
            return [(length, False)] if length > 0 else []
        runs: list[tuple[int, bool]] = []
        fd = self.fd
        pos = offset
        while pos < end and len(runs) < max_extents:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # cannot tell: call the rest data
                    runs.append((end - pos, False))
                    break
                data = end  # ENXIO: no data at or after pos
            if data > pos:
                stop = min(data, end)
                runs.append((stop - pos, True))
                pos = stop
                continue
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            stop = min(hole, end) if hole > pos else end
            runs.append((stop - pos, False))
            pos = stop
        return runs

    # -- direct I/O: the unaligned tail -------------------------------------------------

    def _read_at(self, buf: memoryview, offset: int, done: Completion, ptr: Any = None) -> None:
        """Read through ``fd``, and through ``_tail_fd`` for the part past ``_tail_start``
        (``ptr``: ``buf``'s address, when the caller has one)."""
        split = self._tail_start - offset
        if offset + len(buf) <= self._tail_start:
            self.ring.read(self.fd, buf, offset, done, ptr)
        elif split <= 0:
            self.ring.read(self._tail_fd, buf, offset, done)
        else:
            both = _joined(done)
            self.ring.read(self.fd, buf[:split], offset, both)
            self.ring.read(self._tail_fd, buf[split:], self._tail_start, both)

    def _write_at(
        self,
        buf: memoryview,
        offset: int,
        done: Completion,
        *,
        fua: bool = False,
        dsync: bool = False,
        inline: bool = False,
    ) -> None:
        """Write through ``fd``, and through ``_tail_fd`` for the part past ``_tail_start``
        (each part with its own FUA or RWF_DSYNC)."""
        split = self._tail_start - offset
        ring = self.ring
        if offset + len(buf) <= self._tail_start:
            ring.write(self.fd, buf, offset, done, fua=fua, dsync=dsync, inline=inline)
        elif split <= 0:
            ring.write(self._tail_fd, buf, offset, done, fua=fua, dsync=dsync, inline=inline)
        else:
            both = _joined(done)
            ring.write(self.fd, buf[:split], offset, both, fua=fua, dsync=dsync, inline=inline)
            ring.write(
                self._tail_fd, buf[split:], self._tail_start, both,
                fua=fua, dsync=dsync, inline=inline,
            )

    # -- ordering, faults, syncing ------------------------------------------------------

    def _ordered(
        self, op: str, offset: int, length: int, exclusive: bool, io: IO, done: Completion
    ) -> None:
        if self.ordering is Ordering.KERNEL:
            self._faulted(op, offset, length, io, done)
            return
        tracker = self._tracker

        def finished(err: int) -> None:
            tracker.release(entry)
            done(err)

        entry = tracker.admit(
            offset, length, exclusive, lambda: self._faulted(op, offset, length, io, finished)
        )
        if entry.blockers == 0:
            entry.begin()

    def _ordered_write(self, op: str, offset: int, length: int, io: IO, done: Completion) -> None:
        epoch = self._epochs.write_started()

        def finished(err: int) -> None:
            self._epochs.write_finished(epoch)
            done(err)

        self._ordered(op, offset, length, True, io, finished)

    def _faulted(self, op: str, offset: int, length: int, io: IO, done: Completion) -> None:
        if self.faults is None:
            io(done)
            return
        delay, err = self.faults.decide(op, offset, length)
        if not delay and not err:
            io(done)
        elif err:
            self.ring.timeout(delay, lambda _e: done(err))
        else:
            self.ring.timeout(delay, lambda _e: io(done))

    def _sync(self, done: Completion) -> None:
        """fdatasync, shared: a FLUSH that becomes ready while a sync runs joins the next one
        (the running sync may have started before its writes finished)."""
        if self._sync_waiters is not None:
            self._next_sync_waiters.append(done)
            return
        self._start_sync([done])

    def _start_sync(self, waiters: list[Completion]) -> None:
        self._sync_waiters = waiters
        self.syncs_issued += 1

        def synced(err: int) -> None:
            self._sync_waiters = None
            for waiter in waiters:
                waiter(err)
            if self._next_sync_waiters and self._sync_waiters is None:
                following, self._next_sync_waiters = self._next_sync_waiters, []
                self._start_sync(following)

        self.ring.fdatasync(self.fd, synced)

    def _defer_error(self, offset: int, length: int, err: int) -> None:
        log.error(
            "%s: write-back of %d bytes at offset %d failed after its reply: %s; "
            "the next FLUSH will return EIO",
            self.path,
            length,
            offset,
            os.strerror(err),
        )
        self.deferred_errors.append((offset, length, err))
        self.deferred_errors_total += 1

    def _zero_io(
        self,
        offset: int,
        length: int,
        may_trim: bool,
        fua: bool,
        done: Completion,
        fast: bool = False,
    ) -> None:
        if length == 0:
            self._then_sync(0, fua, done)
            return
        if may_trim and self._punch_ok:
            mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        elif self._zero_range_ok:
            mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
        elif fast:
            done(errno.ENOTSUP)
            return
        else:
            self._write_zeroes(offset, length, fua, done)
            return

        def allocated(err: int) -> None:
            if err in _UNSUPPORTED:
                if mode & FALLOC_FL_PUNCH_HOLE:
                    self._punch_ok = False
                else:
                    self._zero_range_ok = False
                self._zero_io(offset, length, may_trim, fua, done, fast)
                return
            self._then_sync(err, fua, done)

        self.ring.fallocate(self.fd, mode, offset, length, allocated)

    def _write_zeroes(self, offset: int, length: int, fua: bool, done: Completion) -> None:
        zeros = _zero_buffer()
        end = offset + length

        def step(err: int, pos: int = offset) -> None:
            if err or pos >= end:
                self._then_sync(err, fua, done)
                return
            n = min(_ZERO_CHUNK, end - pos)
            self._write_at(zeros[:n], pos, _bind(step, pos + n))

        step(0)

    def _then_sync(self, err: int, fua: bool, done: Completion) -> None:
        if err or not fua:
            done(err)
        else:
            self.ring.fdatasync(self.fd, done)


def _bind(step: Callable[[int, int], None], pos: int) -> Completion:
    return lambda err: step(err, pos)


def _joined(done: Completion, parts: int = 2) -> Completion:
    """A completion to give each of ``parts`` I/Os: ``done`` runs once all have finished,
    with the first error any of them met."""
    state = [parts, 0]

    def part(err: int) -> None:
        if err and not state[1]:
            state[1] = err
        state[0] -= 1
        if state[0] == 0:
            done(state[1])

    return part


def _logical_block_size(fd: int, is_block_device: bool) -> int:
    """The alignment O_DIRECT needs: the device's logical block size (BLKSSZGET), 512 for a
    file (what the common file systems on 512-byte-sector devices accept)."""
    if not is_block_device:
        return _FILE_BLOCK
    raw = fcntl.ioctl(fd, _BLKSSZGET, b"\0\0\0\0")
    return int.from_bytes(raw, sys.byteorder) or _FILE_BLOCK
