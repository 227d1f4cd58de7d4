"""The io_uring: the only module that touches the compiled ``nbd_uring._uring``.

Operations are prepared into the submission queue as they arrive and go to the kernel in one
``io_uring_submit`` per :meth:`Ring.submit` (the caller submits once per batch of requests).
Completions are reaped in batches when the eventfd fires. From submission until its last
completion is reaped, an operation's buffer and callback are held in ``_in_flight``, so nothing
a client does can free memory the kernel is still writing into.

Callbacks receive ``0`` on success or a positive errno; short reads and writes are finished
here and never reach them.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from nbd_uring._uring import ffi, lib
from nbd_uring.engine.lane import Lane

log = logging.getLogger(__name__)

Completion = Callable[[int], None]

FALLOC_FL_KEEP_SIZE: Final[int] = lib.FALLOC_FL_KEEP_SIZE
FALLOC_FL_PUNCH_HOLE: Final[int] = lib.FALLOC_FL_PUNCH_HOLE
FALLOC_FL_ZERO_RANGE: Final[int] = lib.FALLOC_FL_ZERO_RANGE

_READ, _WRITE, _FSYNC, _FALLOCATE, _FADVISE, _TIMEOUT = range(6)
_EBUSY = -errno.EBUSY
LOCAL_WORK_BATCH: Final[int] = 16
"""Below the number of deferred completions Linux runs per kernel entry (20 since 6.13):
a batch this large may have left more behind, unannounced."""
STALL_CHECK_S: Final[float] = 0.05
"""With deferred completions and operations in flight, the reaper looks at the ring at
least this often even without an eventfd wake-up: a bound on any stall, not a timer the
hot path relies on."""
_REAP_BATCH = 256
_MAX_RW = 1 << 30
INLINE_WRITE_MAX: Final[int] = 64 * 1024
"""Largest write :meth:`Ring.write` may do with ``pwrite`` on the spot (``inline=True``)."""
_INLINE_STALL_NS = 10_000_000
_INLINE_PAUSE_NS = 1_000_000_000


class RingError(OSError):
    """The ring itself failed (setup, submit): not the result of one operation."""


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise RingError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


class _Op:
    """One logical operation; it may take several SQEs (short I/O, linked fsync)."""

    __slots__ = (
        "buf",
        "callback",
        "done",
        "fd",
        "fua",
        "kind",
        "length",
        "mode",
        "offset",
        "ptr",
        "rw_flags",
        "sync_res",
        "waiting",
        "write_res",
    )

    def __init__(
        self,
        kind: int,
        fd: int,
        offset: int,
        length: int,
        callback: Completion,
        buf: Any = None,
        ptr: Any = None,
    ) -> None:
        self.kind = kind
        self.fd = fd
        self.offset = offset
        self.length = length
        self.callback = callback
        self.buf = buf
        if ptr is None and buf is not None:
            ptr = ffi.from_buffer(buf, require_writable=kind == _READ)
        self.ptr: Any = ptr
        self.done = 0
        self.fua = False
        self.rw_flags = 0
        self.mode = 0
        self.waiting = 0
        self.write_res = 0
        self.sync_res = 0


class Ring:
    """An io_uring with an eventfd, shared by every export and connection of a server.

    Not thread-safe: only the thread that made it may call it (the ring is set up for a
    single issuer, and with deferred task work where the kernel has it, 6.1 and later).
    """

    def __init__(self, entries: int = 256, *, deferred: bool = True, lane: bool = False) -> None:
        err = ffi.new("int *")
        ring = lib.nbdu_ring_new(entries, 1 if deferred else 0, err)
        if ring == ffi.NULL:
            raise RingError(-err[0], f"io_uring_queue_init: {os.strerror(-err[0])}")
        self._ring: Any = ring
        self.eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            # Not IORING_REGISTER_EVENTFD_ASYNC: that signals only for io-wq completions, and a
            # completion run as task work on this thread would then never wake the reaper.
            # Nor IORING_SETUP_COOP_TASKRUN: its task work does not wake a thread asleep in
            # epoll_wait, so the eventfd would not fire until something else woke it.
            _check(lib.nbdu_register_eventfd(ring, self.eventfd, 0), "io_uring_register_eventfd")
        except BaseException:
            os.close(self.eventfd)
            lib.nbdu_ring_free(ring)
            raise
        self.deferred = bool(lib.nbdu_deferred(ring))
        """Completions from io-wq wait as task work until this thread enters the kernel: the
        eventfd fires once per batch instead of once per completion."""
        self.sq_entries: int = lib.nbdu_sq_entries(ring)
        self.cq_entries: int = lib.nbdu_cq_entries(ring)
        self.supports_fallocate = bool(lib.nbdu_opcode_supported(ring, lib.IORING_OP_FALLOCATE))
        self.supports_fadvise = bool(lib.nbdu_opcode_supported(ring, lib.IORING_OP_FADVISE))
        self._in_flight: dict[int, _Op] = {}
        self._sqes = ffi.new("unsigned[1]")
        """SQEs whose completion is not reaped yet, the lane's included: never more than
        the completion queue holds, so no completion can be dropped."""
        self._backlog: deque[_Op] = deque()
        self._unsubmitted = 0
        self._submitting = False
        self._next_id = 1
        self._done_now: list[tuple[Completion, int]] = []
        self._inline_paused_until = 0
        self.inline_writes = 0
        self._ud = ffi.new("uint64_t[]", _REAP_BATCH)
        self._res = ffi.new("int32_t[]", _REAP_BATCH)
        self._lane_done = ffi.new("unsigned *")
        self.closed = False
        self.lane: Lane | None = Lane(self, self._sqes) if lane else None
        """Plain reads and writes handled whole in C (:mod:`nbd_uring.engine.lane`), or None."""

    # -- submission ---------------------------------------------------------------------

    def read(
        self, fd: int, buf: Any, offset: int, callback: Completion, ptr: Any = None
    ) -> None:
        """Fill the writable buffer ``buf`` from ``fd`` at ``offset``; ``ptr``, when given,
        is ``buf``'s address as a cffi pointer (a pooled buffer has one made already)."""
        self._start(_Op(_READ, fd, offset, memoryview(buf).nbytes, callback, buf, ptr))

    def write(
        self,
        fd: int,
        buf: Any,
        offset: int,
        callback: Completion,
        *,
        fua: bool = False,
        dsync: bool = False,
        inline: bool = False,
        ptr: Any = None,
    ) -> None:
        """Write ``buf`` at ``offset`` (``ptr``: its address, as for :meth:`read`); ``fua``
        links an fdatasync in the same submission, ``dsync`` uses RWF_DSYNC on the write
        itself instead.

        ``inline``: a small plain write may be done at once with ``pwrite`` (for a buffered
        write to a file system that cannot write without blocking, ext4 among them, io_uring
        would hand it to an io-wq thread, serialised per file: a thread hop and a wake-up per
        write for a copy into the page cache). The callback still runs only at the next
        :meth:`submit` or :meth:`reap`, like any completion. A write that took long (dirty
        throttling, a journal commit) sends the following ones through the ring for a while,
        so a slow file system cannot keep stalling the event loop."""
        nbytes = memoryview(buf).nbytes
        if inline and not fua and not dsync and nbytes <= INLINE_WRITE_MAX:
            now = time.monotonic_ns()
            if now >= self._inline_paused_until:
                self._write_now(fd, buf, offset, nbytes, callback)
                if time.monotonic_ns() - now > _INLINE_STALL_NS:
                    self._inline_paused_until = now + _INLINE_PAUSE_NS
                return
        op = _Op(_WRITE, fd, offset, nbytes, callback, buf, ptr)
        op.fua = fua
        op.rw_flags = lib.RWF_DSYNC if dsync else 0
        self._start(op)

    def _write_now(self, fd: int, buf: Any, offset: int, nbytes: int, callback: Completion) -> None:
        if self.closed:
            raise RingError(errno.ESHUTDOWN, "ring is closed")
        err = 0
        done = 0
        try:
            while done < nbytes:
                n = os.pwrite(fd, buf[done:] if done else buf, offset + done)
                if n <= 0:
                    err = errno.EIO
                    break
                done += n
        except OSError as exc:
            err = exc.errno or errno.EIO
        self.inline_writes += 1
        self._done_now.append((callback, err))

    def fdatasync(self, fd: int, callback: Completion) -> None:
        self._start(_Op(_FSYNC, fd, 0, 0, callback))

    def fallocate(self, fd: int, mode: int, offset: int, length: int, callback: Completion) -> None:
        op = _Op(_FALLOCATE, fd, offset, length, callback)
        op.mode = mode
        self._start(op)

    def fadvise_willneed(self, fd: int, offset: int, length: int, callback: Completion) -> None:
        self._start(_Op(_FADVISE, fd, offset, min(length, 0xFFFFFFFF), callback))

    def timeout(self, seconds: float, callback: Completion) -> None:
        """Call ``callback(0)`` after ``seconds``, through the ring like any other operation."""
        op = _Op(_TIMEOUT, -1, 0, int(seconds * 1e9), callback)
        op.buf = ffi.new("struct __kernel_timespec *")
        self._start(op)

    def submit(self) -> int:
        """Hand every prepared SQE to the kernel in one system call, then run the callbacks
        of whatever completed meanwhile (a read from the page cache completes inside the
        system call); returns how many completions ran.

        The eventfd is switched off meanwhile, so completions reaped here signal nobody;
        whatever is posted after it is switched back on signals as usual, and what came in
        between is caught by the last look at the completion queue. Deferred completions
        queued in between signalled nobody either: the kernel's "task work pending" flag says
        so, and one more entry runs them. The flag can stay set with nothing pending, so it
        is followed once per call, never looped on.
        """
        if self._submitting:
            return 0
        self._submitting = True
        ring = self._ring
        if self.lane is not None:
            self._unsubmitted += self.lane.take_prepared()
        deferred = self.deferred
        looked = False
        total = 0
        try:
            while True:
                lib.nbdu_eventfd_enable(ring, 0)
                try:
                    entered = False
                    while True:
                        if self._unsubmitted:
                            self._unsubmitted = 0
                            _check(lib.nbdu_submit(ring), "io_uring_submit")
                            entered = True
                        if self._done_now:
                            total += self._run_done_now()
                            continue
                        if not lib.nbdu_cq_ready(ring):
                            if self._unsubmitted:
                                continue
                            break
                        reaped = self._drain()
                        total += reaped
                        if entered and deferred and reaped >= LOCAL_WORK_BATCH:
                            # The kernel runs a bounded number of deferred completions per
                            # entry and may keep the rest without flag or signal: go back
                            # for them.
                            _check(lib.nbdu_get_events(ring), "io_uring_enter")
                finally:
                    lib.nbdu_eventfd_enable(ring, 1)
                if lib.nbdu_cq_ready(ring):
                    continue
                if deferred and not looked and lib.nbdu_work_pending(ring):
                    looked = True
                    _check(lib.nbdu_get_events(ring), "io_uring_enter")
                    continue
                lane = self.lane
                if lane is not None and lane.has_events():
                    lane.dispatch()  # what the lane's own loop reaped (LaneConnection.serve)
                return total
        finally:
            self._submitting = False

    @property
    def in_flight(self) -> int:
        """Operations submitted or waiting for ring space, not yet completed."""
        lane = 0 if self.lane is None else self.lane.in_flight
        return len(self._in_flight) + len(self._backlog) + len(self._done_now) + lane

    def uses_fd(self, fd: int) -> bool:
        """Whether an operation not yet completed names ``fd`` (before closing it for good)."""
        if self.lane is not None and self.lane.uses_fd(fd):
            return True
        return any(op.fd == fd for op in (*self._in_flight.values(), *self._backlog))

    def _start(self, op: _Op) -> None:
        if self.closed:
            raise RingError(errno.ESHUTDOWN, "ring is closed")
        if self._backlog or not self._prep(op):
            self._backlog.append(op)

    def _prep(self, op: _Op) -> bool:
        """Prepare the SQE(s) for the unfinished part of ``op``; False when there is no room."""
        kind = op.kind
        need = 2 if kind == _WRITE and op.fua else 1
        if self._sqes[0] + need > self.cq_entries:
            return False
        op_id = self._next_id
        ud = op_id << 1
        rc = self._prep_sqes(op, ud)
        if rc == _EBUSY:
            # The submission queue is full: what is prepared goes to the kernel, then retry.
            self._unsubmitted = 0
            _check(lib.nbdu_submit(self._ring), "io_uring_submit")
            rc = self._prep_sqes(op, ud)
            if rc == _EBUSY:
                return False
        if rc < 0:
            _check(rc, "prepare SQE")
        self._next_id = op_id + 1
        op.waiting = need
        self._in_flight[op_id] = op
        self._sqes[0] += need
        self._unsubmitted += need
        return True

    def _prep_sqes(self, op: _Op, ud: int) -> int:
        """Fill the SQE(s) for ``op``'s unfinished part, tagged ``ud``: 0, or -errno (-EBUSY
        when the submission queue has no room)."""
        r = self._ring
        kind = op.kind
        if kind == _READ or kind == _WRITE:
            done = op.done
            if done:
                chunk = min(op.length - done, _MAX_RW)
                ptr = op.ptr + done
                pos = op.offset + done
            else:
                chunk = op.length if op.length <= _MAX_RW else _MAX_RW
                ptr = op.ptr
                pos = op.offset
            if kind == _READ:
                rc: int = lib.nbdu_prep_read(r, op.fd, ptr, chunk, pos, ud)
            elif op.fua:
                rc = lib.nbdu_prep_write_linked_fsync(r, op.fd, ptr, chunk, pos, ud, ud | 1)
            else:
                rc = lib.nbdu_prep_write(r, op.fd, ptr, chunk, pos, ud, op.rw_flags)
        elif kind == _FSYNC:
            rc = lib.nbdu_prep_fsync(r, op.fd, lib.IORING_FSYNC_DATASYNC, ud)
        elif kind == _FALLOCATE:
            rc = lib.nbdu_prep_fallocate(r, op.fd, op.mode, op.offset, op.length, ud)
        elif kind == _TIMEOUT:
            rc = lib.nbdu_prep_timeout(r, op.buf, op.length, ud)
        else:
            rc = lib.nbdu_prep_fadvise(r, op.fd, op.offset, op.length, lib.POSIX_FADV_WILLNEED, ud)
        return rc

    # -- completion ---------------------------------------------------------------------

    def reap(self) -> int:
        """Run the callbacks of every completion the kernel has posted; returns how many.

        Call it when the eventfd is readable."""
        self._clear_eventfd()
        total = 0
        while True:
            _check(lib.nbdu_get_events(self._ring), "io_uring_enter")
            reaped = self._drain()
            total += reaped
            if not self.deferred or reaped < LOCAL_WORK_BATCH:
                return total + self.submit()

    def _run_done_now(self) -> int:
        """Run the callbacks of writes done inline (they may start more of them)."""
        done, self._done_now = self._done_now, []
        for callback, err in done:
            try:
                callback(err)
            except Exception:
                log.exception("completion callback failed")
        return len(done)

    def _clear_eventfd(self) -> None:
        try:
            os.eventfd_read(self.eventfd)
        except BlockingIOError:
            pass

    def _drain(self) -> int:
        total = 0
        ud_arr, res_arr, lane_done = self._ud, self._res, self._lane_done
        while True:
            n: int = lib.nbdu_reap(self._ring, ud_arr, res_arr, _REAP_BATCH, lane_done)
            for i in range(n):
                self._complete(ud_arr[i], res_arr[i])
            total += n + int(lane_done[0])
            if n < _REAP_BATCH:
                break
        while self._backlog and self._prep(self._backlog[0]):
            self._backlog.popleft()
        lane = self.lane
        if lane is not None:
            self._unsubmitted += lane.take_prepared()  # short reads continued
            if lane.has_events():
                lane.dispatch()
        return total

    def _complete(self, ud: int, res: int) -> None:
        op_id = ud >> 1
        op = self._in_flight[op_id]
        self._sqes[0] -= 1
        if res == op.length and not op.done and not op.fua and op.kind <= _WRITE:
            # The common case, a read or write done whole in one go: straight to the callback.
            del self._in_flight[op_id]
            self._finish(op, 0)
            return
        op.waiting -= 1
        if op.kind == _WRITE and op.fua:
            if ud & 1:
                op.sync_res = res
            else:
                op.write_res = res
            if op.waiting:
                return
            del self._in_flight[op_id]
            self._complete_fua_write(op)
            return
        del self._in_flight[op_id]
        if op.kind == _TIMEOUT and res == -errno.ETIME:
            self._finish(op, 0)
        elif res < 0:
            self._finish(op, -res)
        elif op.kind == _READ or op.kind == _WRITE:
            self._advance(op, res)
        else:
            self._finish(op, 0)

    def _advance(self, op: _Op, res: int) -> None:
        if res == 0 and op.done < op.length:
            # A read at end of file, or a write the kernel would not take: nothing would change.
            self._finish(op, errno.EIO)
            return
        op.done += res
        if op.done < op.length:
            self._resubmit(op)
        else:
            self._finish(op, 0)

    def _complete_fua_write(self, op: _Op) -> None:
        wres, sres = op.write_res, op.sync_res
        if wres < 0:
            self._finish(op, -wres)
        elif op.done + wres < op.length:
            # Short write: the linked fsync came back -ECANCELED. Write the rest, then sync.
            self._advance(op, wres)
        elif sres < 0 and sres != -errno.ECANCELED:
            self._finish(op, -sres)
        elif sres < 0:
            op.done = op.length
            op.kind, op.fua = _FSYNC, False
            self._resubmit(op)
        else:
            self._finish(op, 0)

    def _resubmit(self, op: _Op) -> None:
        if not self._prep(op):
            self._backlog.appendleft(op)

    def _finish(self, op: _Op, err: int) -> None:
        callback = op.callback
        op.buf = op.ptr = None
        try:
            callback(err)
        except Exception:
            log.exception("completion callback failed")

    # -- teardown -----------------------------------------------------------------------

    def close(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for in-flight operations, then tear the ring down.

        Buffers of operations still in flight at the deadline are deliberately kept alive
        forever rather than freed under the kernel.
        """
        if self.closed:
            return
        self.submit()
        deadline = time.monotonic() + timeout_s
        while self.in_flight:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("closing ring with %d operations still in flight", self.in_flight)
                _leaked.append(list(self._in_flight.values()))
                break
            select.select([self.eventfd], [], [], left)
            self.reap()
        self.closed = True
        if self.lane is not None:
            self.lane.close()
        lib.nbdu_ring_free(self._ring)
        self._ring = ffi.NULL
        os.close(self.eventfd)
        self.eventfd = -1

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_leaked: list[list[_Op]] = []
