"""The ring against real files: no sockets, no Trio, no mocks."""

from __future__ import annotations

import errno
import gc
import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_uring.engine.buffers import BufferPool
from nbd_uring.engine.export import Export
from nbd_uring.engine.ring import Ring

from ._ringwait import drain


@pytest.fixture
def ring() -> Iterator[Ring]:
    with Ring(16) as r:
        yield r


@pytest.fixture
def export(ring: Ring, tmp_path: Path) -> Iterator[Export]:
    exp = Export(ring, str(tmp_path / "disk.img"), size=4 << 20, create=True)
    yield exp
    exp.close()


def test_hundreds_in_flight_on_a_small_ring(ring: Ring, export: Export) -> None:
    """More operations than the ring has entries all complete: a full queue waits, never fails."""
    pool = BufferPool()
    results: list[int] = []
    count = 400
    for i in range(count):
        buf = pool.acquire(4096)
        buf.view[:] = bytes([i % 251]) * 4096
        export.write(i * 4096, buf, results.append, fua=i % 7 == 0)
    assert ring.in_flight == count
    ring.submit()
    drain(ring)
    assert results == [0] * count
    for i in range(0, count, 37):
        assert os.pread(export.fd, 4096, i * 4096) == bytes([i % 251]) * 4096

    reads: list[tuple[int, int]] = []
    bufs = [pool.acquire(4096) for _ in range(count)]
    for i, buf in enumerate(bufs):
        export.read(i * 4096, buf.view, lambda err, i=i: reads.append((i, err)))
    ring.submit()
    drain(ring)
    assert sorted(reads) == [(i, 0) for i in range(count)]
    assert all(buf.view.tobytes() == bytes([i % 251]) * 4096 for i, buf in enumerate(bufs))


def test_fdatasync_and_fua_write_reach_the_file(ring: Ring, export: Export) -> None:
    results: list[int] = []
    buf = BufferPool().acquire(4096)
    buf.view[:] = b"fua-data" * 512
    export.write(8192, buf, results.append, fua=True)
    export.flush(results.append)
    ring.submit()
    drain(ring)
    assert results == [0, 0]
    assert os.pread(export.fd, 4096, 8192) == b"fua-data" * 512


def test_trim_punches_a_hole_that_reads_back_zero(ring: Ring, export: Export) -> None:
    data = os.urandom(1 << 20)
    os.pwrite(export.fd, data, 0)
    os.fsync(export.fd)
    blocks_before = os.fstat(export.fd).st_blocks
    results: list[int] = []
    export.trim(0, 512 * 1024, results.append, fua=True)
    ring.submit()
    drain(ring)
    assert results == [0]
    assert os.pread(export.fd, 512 * 1024, 0) == bytes(512 * 1024)
    assert os.pread(export.fd, 1024, 512 * 1024) == data[512 * 1024 : 512 * 1024 + 1024]
    assert os.fstat(export.fd).st_blocks < blocks_before


@pytest.mark.parametrize("may_trim", [True, False])
def test_zero_reads_back_zero(ring: Ring, export: Export, may_trim: bool) -> None:
    os.pwrite(export.fd, b"\xff" * 65536, 4096)
    results: list[int] = []
    export.zero(4096, 65536 - 4096, results.append, may_trim=may_trim)
    ring.submit()
    drain(ring)
    assert results == [0]
    assert os.pread(export.fd, 65536, 4096) == bytes(65536 - 4096) + b"\xff" * 4096


def test_zero_falls_back_to_writing_zeroes(ring: Ring, export: Export) -> None:
    """Where fallocate cannot zero (e.g. some block devices), zeroes are written instead."""
    os.pwrite(export.fd, b"\xee" * (3 << 20), 0)
    export._punch_ok = export._zero_range_ok = False
    results: list[int] = []
    export.zero(1000, (2 << 20) + 5, results.append, may_trim=False, fua=True)
    ring.submit()
    drain(ring)
    assert results == [0]
    assert os.pread(export.fd, 1000, 0) == b"\xee" * 1000
    assert os.pread(export.fd, (2 << 20) + 5, 1000) == bytes((2 << 20) + 5)
    assert os.pread(export.fd, 10, 1000 + (2 << 20) + 5) == b"\xee" * 10


def test_short_read_is_resubmitted_until_complete(ring: Ring) -> None:
    """A read that returns fewer bytes than asked (here: a pipe with half the data) is
    finished by the ring; the callback sees one successful completion."""
    rfd, wfd = os.pipe()
    try:
        buf = bytearray(8192)
        results: list[int] = []
        ring.read(rfd, buf, 0, results.append)
        ring.submit()
        os.write(wfd, b"a" * 4096)
        select.select([ring.eventfd], [], [], 5)
        ring.reap()
        assert results == []
        assert ring.in_flight == 1
        os.write(wfd, b"b" * 4096)
        drain(ring)
        assert results == [0]
        assert bytes(buf) == b"a" * 4096 + b"b" * 4096
    finally:
        os.close(rfd)
        os.close(wfd)


def test_short_write_is_resubmitted(tmp_path: Path) -> None:
    """A short write (forced with RLIMIT_FSIZE) breaks the FUA link; the ring writes the rest
    instead of replying, and the error the remainder meets (EFBIG) is what the caller sees."""
    script = textwrap.dedent(
        f"""
        import os, resource, select, signal
        from nbd_uring.engine.ring import Ring
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        ring = Ring(8)
        fd = os.open({str(tmp_path / "f")!r}, os.O_RDWR | os.O_CREAT)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.RLIM_INFINITY))
        for fua in (True, False):
            out = []
            ring.write(fd, b"x" * 8192, 0, out.append, fua=fua)
            ring.submit()
            while ring.in_flight:
                select.select([ring.eventfd], [], [], 5)
                ring.reap()
            print(fua, out, os.fstat(fd).st_size)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.split("\n")[:2] == [
        f"True [{errno.EFBIG}] 6000",
        f"False [{errno.EFBIG}] 6000",
    ]


def test_write_to_read_only_fd_reports_ebadf(ring: Ring, tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    path.write_bytes(bytes(8192))
    exp = Export(ring, str(path), read_only=True)
    try:
        results: list[int] = []
        pool = BufferPool()
        exp.write(0, pool.acquire(512), results.append)
        exp.write(0, pool.acquire(512), results.append, fua=True)
        ring.submit()
        drain(ring)
        assert results == [errno.EBADF, errno.EBADF]
    finally:
        exp.close()


def test_read_past_end_of_file_is_eio(ring: Ring, tmp_path: Path) -> None:
    """The file shrank under the server: the read cannot be finished, so it fails."""
    path = tmp_path / "small.img"
    path.write_bytes(b"q" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        results: list[int] = []
        ring.read(fd, bytearray(4096), 0, results.append)
        ring.submit()
        drain(ring)
        assert results == [errno.EIO]
    finally:
        os.close(fd)


def test_buffer_is_kept_alive_until_completion(ring: Ring, export: Export) -> None:
    """The ring holds the buffer of an in-flight read; dropping every other reference and
    collecting garbage before reaping is harmless."""
    os.pwrite(export.fd, b"keep" * 16384, 0)
    seen: list[bytes] = []
    pool = BufferPool(max_cached=0)

    def submit() -> None:
        buf = pool.acquire(65536)
        export.read(0, buf.view, lambda err: seen.append(buf.view.tobytes()))

    for _ in range(8):
        submit()
    ring.submit()
    gc.collect()
    drain(ring)
    assert seen == [b"keep" * 16384] * 8


def test_close_waits_for_in_flight_operations(tmp_path: Path) -> None:
    ring = Ring(8)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    results: list[int] = []
    for i in range(20):
        ring.write(fd, b"w" * 65536, i * 65536, results.append)
    ring.submit()
    ring.close()
    assert results == [0] * 20
    assert os.fstat(fd).st_size == 20 * 65536
    os.close(fd)


def test_buffer_pool_recycles_within_its_cap() -> None:
    pool = BufferPool(max_cached=16384)
    a = pool.acquire(5000)
    assert a.capacity == 8192 and len(a.view) == 5000
    mem = a.mem
    a.release()
    b = pool.acquire(6000)
    assert b.mem is mem
    big = pool.acquire(1 << 20)
    big.release()
    assert pool.cached == 0
    b.release()
    assert pool.cached == 8192


def _eventfd_count(ring: Ring) -> int:
    try:
        return os.eventfd_read(ring.eventfd)
    except BlockingIOError:
        return 0


def test_inline_completions_do_not_signal_the_eventfd(ring: Ring, tmp_path: Path) -> None:
    """A page-cache read completes inside io_uring_submit and is reaped there; with the
    eventfd switched off meanwhile it wakes nobody (no eventfd write, no reaper wake-up)."""
    path = tmp_path / "warm.img"
    path.write_bytes(b"x" * 65536)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, 65536, 0)  # in the page cache now
        pool = BufferPool()
        done: list[int] = []
        for i in range(8):
            lease = pool.acquire(4096)
            ring.read(fd, lease.view, i * 4096, done.append)
        ring.submit()
        if len(done) < 8:
            pytest.skip("the kernel did not complete page-cache reads inline here")
        assert done == [0] * 8
        assert _eventfd_count(ring) == 0
    finally:
        os.close(fd)


def test_a_later_completion_still_signals_the_eventfd(ring: Ring) -> None:
    """What completes after submit returns (a timeout here) signals the eventfd, so the
    reaper is woken: switching it off during submit never loses a completion."""
    done: list[int] = []
    ring.timeout(0.05, done.append)
    assert ring.submit() == 0 and not done
    readable, _, _ = select.select([ring.eventfd], [], [], 5.0)
    assert readable, "the eventfd never fired for a completion posted after submit"
    ring.reap()
    assert done == [0]


def test_deferred_completions_wake_the_reaper_once_queued(tmp_path: Path) -> None:
    """With deferred task work a completion from io-wq (an ext4 buffered write) waits until
    this thread enters the kernel; the eventfd must still fire so the reaper does that."""
    with Ring(16) as ring:
        if not ring.deferred:
            pytest.skip("this kernel has no IORING_SETUP_DEFER_TASKRUN")
        fd = os.open(tmp_path / "w.img", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            pool = BufferPool()
            done: list[int] = []
            for i in range(32):
                lease = pool.acquire(4096)
                lease.view[:] = bytes([i]) * 4096
                ring.write(fd, lease.view, i * 4096, done.append)
            ring.submit()
            deadline = time.monotonic() + 10
            while len(done) < 32:
                assert time.monotonic() < deadline, f"{len(done)} of 32 writes reported"
                readable, _, _ = select.select([ring.eventfd], [], [], 5.0)
                assert readable, "the eventfd never fired for deferred completions"
                ring.reap()
            assert done == [0] * 32
            assert os.pread(fd, 4096, 31 * 4096) == bytes([31]) * 4096
        finally:
            os.close(fd)


def test_submit_alone_posts_deferred_completions(tmp_path: Path) -> None:
    """A caller that only ever calls submit (the reader between receives) still sees
    completions queued as task work: submit enters the kernel for them."""
    with Ring(16) as ring:
        fd = os.open(tmp_path / "w.img", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            pool = BufferPool()
            done: list[int] = []
            lease = pool.acquire(4096)
            ring.write(fd, lease.view, 0, done.append)
            deadline = time.monotonic() + 10
            while not done:
                assert time.monotonic() < deadline, "the write was never reported"
                ring.submit()
                time.sleep(0.001)
            assert done == [0]
        finally:
            os.close(fd)


@pytest.mark.parametrize("deferred", [True, False])
def test_both_ring_kinds_complete_everything(tmp_path: Path, deferred: bool) -> None:
    """The ring set up with or without deferred task work behaves the same to its users."""
    with Ring(8, deferred=deferred) as ring:
        exp = Export(ring, str(tmp_path / "d.img"), size=1 << 20, create=True)
        try:
            pool = BufferPool()
            results: list[int] = []
            for i in range(64):
                lease = pool.acquire(4096)
                lease.view[:] = bytes([i % 251]) * 4096
                exp.write((i % 256) * 4096, lease, results.append)
            drain(ring)
            reads = [pool.acquire(4096) for _ in range(64)]
            for i, lease in enumerate(reads):
                exp.read((i % 256) * 4096, lease.view, results.append)
            drain(ring)
            assert results == [0] * 128
            assert all(bytes(r.view) == bytes([i % 251]) * 4096 for i, r in enumerate(reads))
        finally:
            exp.close()


def test_one_wakeup_reaps_every_deferred_completion(tmp_path: Path) -> None:
    """Linux (6.13 and later) posts at most 20 deferred completions per kernel entry and keeps
    the rest with no eventfd signal of their own. 64 writes that all finished before the
    reaper runs must still all be reported by the one reap their single signal causes."""
    with Ring(128) as ring:
        if not ring.deferred:
            pytest.skip("this kernel has no IORING_SETUP_DEFER_TASKRUN")
        fd = os.open(tmp_path / "w.img", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            pool = BufferPool()
            done: list[int] = []
            for i in range(64):
                lease = pool.acquire(4096)
                lease.view[:] = bytes([i]) * 4096
                ring.write(fd, lease.view, i * 4096, done.append)
            ring.submit()
            readable, _, _ = select.select([ring.eventfd], [], [], 10.0)
            assert readable, "the eventfd never fired for deferred completions"
            deadline = time.monotonic() + 10
            while os.pread(fd, 1, 63 * 4096) != bytes([63]):  # the workers are done writing
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.05)
            ring.reap()
            assert done == [0] * 64
        finally:
            os.close(fd)
