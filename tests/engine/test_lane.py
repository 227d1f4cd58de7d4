"""The lane on a real ring, real files and a real socket pair: what it takes, what it
answers, how it shares ordering and budget with the Python path, and how it fails."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_uring.engine.buffers import BufferPool
from nbd_uring.engine.durability import Durability
from nbd_uring.engine.export import Export
from nbd_uring.engine.lane import SERVE_EOF, SERVE_IDLE, SERVE_PYTHON, LaneConnection, LaneExport
from nbd_uring.engine.ring import Ring

from ._ringwait import drain, run_until

SIZE = 4 << 20
REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
READ, WRITE = 0, 1


class Client:
    """What a connection using the lane is told, recorded."""

    def __init__(self) -> None:
        self.notified = 0
        self.failed: list[tuple[int, int, int, int]] = []
        self.commands: list[int] = []

    def lane_replies(self) -> None:
        self.notified += 1

    def lane_failed(self, command: int, cookie: int, offset: int, length: int, err: int) -> None:
        self.failed.append((cookie, offset, length, err))
        self.commands.append(command)


@pytest.fixture
def ring() -> Iterator[Ring]:
    with Ring(64, lane=True) as r:
        yield r


@pytest.fixture
def content() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def export(ring: Ring, tmp_path: Path, content: bytes) -> Iterator[Export]:
    path = tmp_path / "disk.img"
    path.write_bytes(content)
    exp = Export(ring, str(path))
    yield exp
    exp.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def connect(
    exp: LaneExport | None,
    client: Client,
    *,
    structured: bool = False,
    max_requests: int = 256,
    max_bytes: int = 128 << 20,
    size: int = SIZE,
) -> tuple[LaneConnection, mmap.mmap]:
    assert exp is not None
    conn = exp.connect(
        client,
        size=size,
        max_block=32 << 20,
        min_block=1,
        hole_check_from=64 * 1024 if structured else 0,
        max_bytes=max_bytes,
        max_requests=max_requests,
    )
    buf = mmap.mmap(-1, 256 * 1024)
    conn.attach(buf)
    return conn, buf


@contextlib.contextmanager
def failing_export(ring: Ring, tmp_path: Path, flags: int) -> Iterator[LaneExport]:
    """A lane export over a descriptor opened ``O_WRONLY`` (reads fail with EBADF) or
    ``O_RDONLY`` (writes do)."""
    path = tmp_path / "failing.img"
    path.write_bytes(bytes(SIZE))
    fd = os.open(path, flags)
    assert ring.lane is not None
    exp = ring.lane.export(fd, SIZE, writable=True)
    try:
        yield exp
    finally:
        exp.close()
        os.close(fd)


def put(buf: mmap.mmap, requests: list[tuple[int, int, int, int, int]]) -> int:
    """Write (flags, command, cookie, offset, length) headers at the start; returns the end."""
    pos = 0
    for flags, command, cookie, offset, length in requests:
        REQUEST.pack_into(buf, pos, REQUEST_MAGIC, flags, command, cookie, offset, length)
        pos += REQUEST.size
    return pos


def parse_simple(data: bytes, lengths: dict[int, int]) -> dict[int, bytes]:
    replies: dict[int, bytes] = {}
    pos = 0
    while len(replies) < len(lengths):
        magic, error, cookie = struct.unpack_from(">IIQ", data, pos)
        assert magic == SIMPLE_MAGIC and error == 0
        replies[cookie] = data[pos + 16 : pos + 16 + lengths[cookie]]
        pos += 16 + lengths[cookie]
    assert pos == len(data)
    return replies


def send_all(ring: Ring, conn: LaneConnection, pair: tuple[socket.socket, socket.socket]) -> bytes:
    """Reap everything, then send every queued reply; returns what the peer received."""
    drain(ring)
    a, b = pair
    received = bytearray()
    while conn.send(a.fileno()) != 1:
        received += b.recv(1 << 20)
    b.setblocking(False)
    try:
        while True:
            got = b.recv(1 << 20)
            if not got:
                break
            received += got
    except BlockingIOError:
        pass
    finally:
        b.settimeout(10)
    return bytes(received)


def test_plain_reads_are_answered_whole_in_the_lane(
    ring: Ring, export: Export, content: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    client = Client()
    conn, buf = connect(export.lane, client)
    reads = [(0, READ, 100 + i, i * 40960, 4096 * (1 + i % 8)) for i in range(40)]
    end = put(buf, reads)
    assert conn.feed(0, end, 0, 0) == end
    assert conn.requests == 40
    assert ring.in_flight == 40
    data = send_all(ring, conn, pair)
    assert client.notified == 1
    got = parse_simple(data, {cookie: length for _f, _c, cookie, _o, length in reads})
    for _f, _c, cookie, offset, length in reads:
        assert got[cookie] == content[offset : offset + length]
    assert (conn.requests, conn.bytes) == (0, 0)
    conn.close()


def test_structured_replies_are_one_offset_data_chunk(
    ring: Ring, export: Export, content: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    conn, buf = connect(export.lane, Client(), structured=True)
    end = put(buf, [(0, READ, 7, 12288, 8192)])
    assert conn.feed(0, end, 0, 0) == end
    data = send_all(ring, conn, pair)
    magic, flags, type_, cookie, length, offset = struct.unpack_from(">IHHQIQ", data)
    assert (magic, flags, type_, cookie, length) == (STRUCTURED_MAGIC, 1, 1, 7, 8 + 8192)
    assert offset == 12288
    assert data[28:] == content[12288 : 12288 + 8192]
    conn.close()


@pytest.mark.parametrize(
    "request_",
    [
        (0, WRITE, 1, 0, 4096),  # a write without its payload
        (1, WRITE, 1, 0, 0),  # a write with FUA (and no payload: length 0)
        (4, READ, 1, 0, 4096),  # a flag (DF)
        (0, READ, 1, 0, 0),  # zero length
        (0, READ, 1, SIZE - 4096, 8192),  # past the end
        (0, 9, 1, 0, 4096),  # an unknown command
    ],
)
def test_feed_leaves_what_the_lane_does_not_handle(
    export: Export, request_: tuple[int, int, int, int, int]
) -> None:
    conn, buf = connect(export.lane, Client(), structured=True)
    end = put(buf, [(0, READ, 5, 0, 4096), request_, (0, READ, 6, 0, 4096)])
    assert conn.feed(0, end, 0, 0) == REQUEST.size  # took the first, stopped at the second
    assert conn.feed(0, REQUEST.size - 1, 0, 0) == 0  # an incomplete header stays
    buf[REQUEST.size : REQUEST.size + 4] = b"\0\0\0\0"  # bad magic: Python's to refuse
    assert conn.feed(REQUEST.size, end, 0, 0) == REQUEST.size
    conn.close()
    drain(export.ring)


def test_no_lane_read_starts_while_a_write_is_admitted(
    ring: Ring, export: Export, pair: tuple[socket.socket, socket.socket]
) -> None:
    conn, buf = connect(export.lane, Client())
    end = put(buf, [(0, READ, 1, 1 << 20, 4096)])
    lease = BufferPool().acquire(4096)
    lease.view[:] = b"w" * 4096
    results: list[int] = []
    export.write(0, lease, results.append)  # elsewhere on the disk, but a write all the same
    assert conn.feed(0, end, 0, 0) == 0
    drain(ring)
    assert results == [0]
    assert conn.feed(0, end, 0, 0) == end
    assert len(send_all(ring, conn, pair)) == 16 + 4096
    conn.close()


def test_a_write_waits_for_the_lane_reads_it_overlaps(
    ring: Ring, export: Export, content: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    conn, buf = connect(export.lane, Client())
    end = put(buf, [(0, READ, 1, 8192, 65536), (0, READ, 2, 1 << 20, 4096)])
    assert conn.feed(0, end, 0, 0) == end  # prepared, not yet submitted
    pool = BufferPool()
    overlapping, elsewhere = pool.acquire(4096), pool.acquire(4096)
    overlapping.view[:] = b"o" * 4096
    elsewhere.view[:] = b"e" * 4096
    order: list[str] = []
    export.write(65536, overlapping, lambda err: order.append(f"overlapping {err}"))
    assert ring.in_flight == 2  # the two lane reads; the write waits
    export.write(2 << 20, elsewhere, lambda err: order.append(f"elsewhere {err}"))
    assert ring.in_flight == 3  # no overlap: it starts at once
    data = send_all(ring, conn, pair)
    assert sorted(order) == ["elsewhere 0", "overlapping 0"]
    got = parse_simple(data, {1: 65536, 2: 4096})
    assert got[1] == content[8192 : 8192 + 65536]  # what was there before the write
    assert os.pread(export.fd, 4096, 65536) == b"o" * 4096
    conn.close()


def test_budget_counts_lane_requests_until_their_replies_are_sent(
    ring: Ring, export: Export, pair: tuple[socket.socket, socket.socket]
) -> None:
    conn, buf = connect(export.lane, Client(), max_requests=4, max_bytes=32 * 1024)
    end = put(buf, [(0, READ, i, i * 4096, 4096) for i in range(6)])
    # Two requests held elsewhere on the connection leave room for two here.
    assert conn.feed(0, end, 0, 2) == 2 * REQUEST.size
    assert (conn.requests, conn.bytes) == (2, 8192)
    # 20 KiB held elsewhere: one more 4 KiB read fits the 32 KiB, the next would not.
    pos = conn.feed(2 * REQUEST.size, end, 20 * 1024, 0)
    assert pos == 3 * REQUEST.size
    drain(ring)
    assert conn.requests == 3  # until sent
    assert conn.send(pair[0].fileno()) == 1
    assert (conn.requests, conn.bytes) == (0, 0)
    conn.close()


def test_a_failed_read_goes_to_the_connection(
    ring: Ring, tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    with failing_export(ring, tmp_path, os.O_WRONLY) as exp:
        client = Client()
        conn, buf = connect(exp, client)
        end = put(buf, [(0, READ, 9, 4096, 4096)])
        assert conn.feed(0, end, 0, 0) == end
        run_until(ring, lambda: bool(client.failed))
        assert client.failed == [(9, 4096, 4096, errno.EBADF)] and client.commands == [READ]
        assert (conn.requests, conn.bytes) == (0, 0)
        assert conn.send(pair[0].fileno()) == 1  # nothing queued
        conn.close()


def test_a_read_past_the_end_of_a_shrunk_file_fails_with_eio(
    ring: Ring, export: Export, tmp_path: Path
) -> None:
    client = Client()
    conn, buf = connect(export.lane, client)
    os.truncate(tmp_path / "disk.img", 8192)
    end = put(buf, [(0, READ, 3, 4096, 8192), (0, READ, 4, 65536, 4096)])
    assert conn.feed(0, end, 0, 0) == end
    run_until(ring, lambda: len(client.failed) == 2)
    assert sorted(client.failed) == [(3, 4096, 8192, errno.EIO), (4, 65536, 4096, errno.EIO)]
    conn.close()


def test_a_full_socket_leaves_a_reply_half_sent_and_resumes_it(
    ring: Ring, export: Export, content: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * 1024)
    conn, buf = connect(export.lane, Client())
    reads = [(0, READ, i, i * 65536, 65536) for i in range(30)]
    end = put(buf, reads)
    assert conn.feed(0, end, 0, 0) == end
    drain(ring)
    assert conn.send(a.fileno()) == 0
    received = bytearray()
    partial_seen = False
    while True:
        partial_seen = partial_seen or conn.partial
        received += b.recv(1 << 20)
        if conn.send(a.fileno()) == 1:
            break
    assert partial_seen
    b.settimeout(1)
    try:
        while len(received) < 30 * (16 + 65536):
            received += b.recv(1 << 20)
    except TimeoutError:
        pass
    assert len(received) == 30 * (16 + 65536)
    pos = 0
    for _ in reads:
        magic, error, cookie = struct.unpack_from(">IIQ", received, pos)
        assert (magic, error) == (SIMPLE_MAGIC, 0)
        offset = cookie * 65536
        assert received[pos + 16 : pos + 16 + 65536] == content[offset : offset + 65536]
        pos += 16 + 65536
    conn.close()


def test_closing_with_reads_in_flight_retires_them(ring: Ring, export: Export) -> None:
    client = Client()
    conn, buf = connect(export.lane, client)
    end = put(buf, [(0, READ, i, i * 4096, 4096) for i in range(16)])
    assert conn.feed(0, end, 0, 0) == end
    conn.close()
    drain(ring)
    assert ring.in_flight == 0
    assert client.notified == 0 and client.failed == []
    assert not ring.uses_fd(export.fd)


def test_serve_answers_a_lone_client_until_it_goes_quiet(
    ring: Ring, export: Export, content: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    """The reader's loop in C: requests already buffered and those that arrive while it
    polls are answered; with nothing more coming it reports IDLE, keeping a partial header."""
    a, b = pair
    client = Client()
    conn, buf = connect(export.lane, client)
    end = put(buf, [(0, READ, 1, 0, 4096)])
    b.sendall(REQUEST.pack(REQUEST_MAGIC, 0, READ, 2, 8192, 4096) + b"\x25\x60")
    status, end = conn.serve(a.fileno(), end, 2_000_000)
    assert (status, end) == (SERVE_IDLE, 2)
    assert bytes(buf[:2]) == b"\x25\x60"
    got = parse_simple(b.recv(1 << 16), {1: 4096, 2: 4096})
    assert got == {1: content[:4096], 2: content[8192 : 8192 + 4096]}
    assert (conn.requests, ring.in_flight) == (0, 0)
    conn.close()


def test_serve_hands_python_what_is_not_the_lanes(
    ring: Ring, export: Export, content: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    conn, buf = connect(export.lane, Client())
    b.sendall(
        REQUEST.pack(REQUEST_MAGIC, 0, READ, 1, 0, 4096)
        + REQUEST.pack(REQUEST_MAGIC, 0, WRITE, 2, 0, 4)
        + b"data"
    )
    status, end = conn.serve(a.fileno(), 0, 1_000_000_000)
    assert status == SERVE_PYTHON
    assert bytes(buf[:end]) == REQUEST.pack(REQUEST_MAGIC, 0, WRITE, 2, 0, 4) + b"data"
    assert parse_simple(b.recv(1 << 16), {1: 4096}) == {1: content[:4096]}
    b.close()
    status, end = conn.serve(a.fileno(), 0, 1_000_000_000)
    assert (status, end) == (SERVE_EOF, 0)
    conn.close()


def test_serve_returns_when_a_read_fails(
    ring: Ring, tmp_path: Path, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    with failing_export(ring, tmp_path, os.O_WRONLY) as exp:
        client = Client()
        conn, _buf = connect(exp, client)
        b.sendall(REQUEST.pack(REQUEST_MAGIC, 0, READ, 4, 0, 4096))
        status, _end = conn.serve(a.fileno(), 0, 1_000_000_000)
        assert status == SERVE_PYTHON
        ring.submit()  # what the reader does next: reap and hand out the lane's events
        assert client.failed == [(4, 0, 4096, errno.EBADF)]
        conn.close()


def test_structured_reads_over_holes_are_left_to_python(
    ring: Ring, export: Export, content: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    """From 64 KiB on, a structured read is the lane's only over data (one OFFSET_DATA
    chunk); over a hole Python sends OFFSET_HOLE chunks."""
    trimmed: list[int] = []
    export.trim(1 << 20, 1 << 20, trimmed.append)
    drain(ring)
    assert trimmed == [0]
    conn, buf = connect(export.lane, Client(), structured=True)
    end = put(buf, [(0, READ, 1, 0, 1 << 20), (0, READ, 2, (1 << 20) - 4096, 65536)])
    assert conn.feed(0, end, 0, 0) == REQUEST.size  # the first, all data; not the second
    data = send_all(ring, conn, pair)
    magic, flags, type_, cookie, length, offset = struct.unpack_from(">IHHQIQ", data)
    assert (magic, flags, type_, cookie, length, offset) == (
        STRUCTURED_MAGIC, 1, 1, 1, 8 + (1 << 20), 0
    )
    assert data[28:] == content[: 1 << 20]
    small = put(buf, [(0, READ, 3, 1 << 20, 4096)])  # shorter than 64 KiB: no check needed
    assert conn.feed(0, small, 0, 0) == small
    send_all(ring, conn, pair)
    conn.close()


def put_write(buf: mmap.mmap, pos: int, cookie: int, offset: int, payload: bytes) -> int:
    REQUEST.pack_into(buf, pos, REQUEST_MAGIC, 0, WRITE, cookie, offset, len(payload))
    buf[pos + REQUEST.size : pos + REQUEST.size + len(payload)] = payload
    return pos + REQUEST.size + len(payload)


def test_plain_writes_are_answered_whole_in_the_lane(
    ring: Ring, export: Export, pair: tuple[socket.socket, socket.socket]
) -> None:
    client = Client()
    conn, buf = connect(export.lane, client, structured=True)
    pos = put_write(buf, 0, 1, 8192, b"a" * 4096)
    end = put_write(buf, pos, 2, 65536, b"b" * 16384)
    assert conn.feed(0, end, 0, 0) == end
    assert (conn.requests, conn.bytes) == (2, 4096 + 16384)
    data = send_all(ring, conn, pair)
    # Simple replies, which structured replies allow for a success without payload.
    replies = {struct.unpack_from(">IIQ", data, i) for i in (0, 16)}
    assert replies == {(SIMPLE_MAGIC, 0, 1), (SIMPLE_MAGIC, 0, 2)} and len(data) == 32
    assert os.pread(export.fd, 4096, 8192) == b"a" * 4096
    assert os.pread(export.fd, 16384, 65536) == b"b" * 16384
    assert (conn.requests, conn.bytes) == (0, 0)
    conn.close()


def test_lane_ops_in_flight_make_conflicting_ones_python_s(
    ring: Ring, export: Export, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A lane write is not taken over a lane op in flight, nor a lane read over a lane
    write: they go to Python, whose tracker makes them wait."""
    conn, buf = connect(export.lane, Client())
    end = put(buf, [(0, READ, 1, 0, 8192)])
    assert conn.feed(0, end, 0, 0) == end
    end = put_write(buf, 0, 2, 4096, b"w" * 4096)  # overlaps the read in flight
    assert conn.feed(0, end, 0, 0) == 0
    end = put_write(buf, 0, 3, 1 << 20, b"x" * 4096)  # elsewhere
    assert conn.feed(0, end, 0, 0) == end
    end = put(buf, [(0, READ, 4, (1 << 20) + 2048, 4096)])  # overlaps the write in flight
    assert conn.feed(0, end, 0, 0) == 0
    end = put(buf, [(0, READ, 5, 4096, 4096)])  # overlaps only the read: fine
    assert conn.feed(0, end, 0, 0) == end
    send_all(ring, conn, pair)
    conn.close()


def test_python_requests_wait_for_the_lane_writes_they_conflict_with(
    ring: Ring, export: Export, content: bytes, pair: tuple[socket.socket, socket.socket]
) -> None:
    conn, buf = connect(export.lane, Client())
    end = put_write(buf, 0, 1, 0, b"L" * 8192)
    assert conn.feed(0, end, 0, 0) == end  # prepared, not submitted
    pool = BufferPool()
    got = pool.acquire(4096)
    order: list[str] = []
    export.read(4096, got.view, lambda err: order.append(f"read {err}"))
    assert ring.in_flight == 1  # the read waits for the lane write
    later = pool.acquire(4096)
    later.view[:] = b"P" * 4096
    export.write(0, later, lambda err: order.append(f"write {err}"))
    assert ring.in_flight == 1  # so does the write
    elsewhere = pool.acquire(4096)
    export.read(1 << 20, elsewhere.view, lambda err: order.append(f"elsewhere {err}"))
    assert ring.in_flight == 2  # no conflict: at once
    send_all(ring, conn, pair)
    assert sorted(order) == ["elsewhere 0", "read 0", "write 0"]
    assert bytes(got.view) == b"L" * 4096  # the read saw the earlier lane write
    assert os.pread(export.fd, 8192, 0) == b"P" * 4096 + b"L" * 4096  # and the write won
    assert bytes(elsewhere.view) == content[1 << 20 : (1 << 20) + 4096]
    conn.close()


def test_no_lane_write_while_python_has_a_request_admitted(ring: Ring, export: Export) -> None:
    conn, buf = connect(export.lane, Client())
    lease = BufferPool().acquire(4096)
    done: list[int] = []
    export.read(3 << 20, lease.view, done.append)  # anywhere: Python has something admitted
    end = put_write(buf, 0, 1, 0, b"w" * 4096)
    assert conn.feed(0, end, 0, 0) == 0
    drain(ring)
    assert done == [0]
    assert conn.feed(0, end, 0, 0) == end
    drain(ring)
    conn.close()


def test_flush_waits_for_lane_writes_received_before_it(
    ring: Ring, export: Export, pair: tuple[socket.socket, socket.socket]
) -> None:
    conn, buf = connect(export.lane, Client())
    end = put_write(buf, 0, 1, 0, b"f" * 4096)
    assert conn.feed(0, end, 0, 0) == end  # prepared, not submitted
    flushed: list[int] = []
    syncs = export.syncs_issued
    export.flush(flushed.append)
    assert export.syncs_issued == syncs  # no fdatasync before the write is done
    end = put_write(buf, 0, 2, 1 << 20, b"g" * 4096)  # after the FLUSH: not waited for
    assert conn.feed(0, end, 0, 0) == end
    run_until(ring, lambda: bool(flushed))
    assert flushed == [0] and export.syncs_issued == syncs + 1
    send_all(ring, conn, pair)
    conn.close()


def test_read_only_or_sync_exports_take_no_lane_write(ring: Ring, tmp_path: Path) -> None:
    path = tmp_path / "d"
    path.write_bytes(bytes(SIZE))
    for exp in (
        Export(ring, str(path), read_only=True),
        Export(ring, str(path), durability=Durability.SYNC),
    ):
        conn, buf = connect(exp.lane, Client())
        end = put_write(buf, 0, 1, 0, b"w" * 4096)
        assert conn.feed(0, end, 0, 0) == 0
        end = put(buf, [(0, READ, 2, 0, 4096)])
        assert conn.feed(0, end, 0, 0) == end  # reads still are the lane's
        drain(ring)
        conn.close()
        exp.close()


def test_a_failed_write_goes_to_the_connection(ring: Ring, tmp_path: Path) -> None:
    with failing_export(ring, tmp_path, os.O_RDONLY) as exp:
        client = Client()
        conn, buf = connect(exp, client)
        end = put_write(buf, 0, 6, 4096, b"z" * 4096)
        assert conn.feed(0, end, 0, 0) == end
        run_until(ring, lambda: bool(client.failed))
        assert client.failed == [(6, 4096, 4096, errno.EBADF)] and client.commands == [WRITE]
        assert (conn.requests, conn.bytes) == (0, 0)
        conn.close()


def test_a_short_lane_write_is_continued_and_its_error_reported(tmp_path: Path) -> None:
    """A write cut short (RLIMIT_FSIZE) is continued by the lane, not answered; the error
    the rest meets (EFBIG) is what the connection is told, and what fit was written."""
    script = textwrap.dedent(
        f"""
        import mmap, os, resource, select, signal, struct
        from nbd_uring.engine.ring import Ring
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        failed = []
        class Client:
            def lane_replies(self): pass
            def lane_failed(self, command, cookie, offset, length, err):
                failed.append((command, cookie, offset, length, err))
        ring = Ring(8, lane=True)
        fd = os.open({str(tmp_path / "f")!r}, os.O_RDWR | os.O_CREAT)
        exp = ring.lane.export(fd, 1 << 20, writable=True)
        conn = exp.connect(Client(), size=1 << 20, max_block=1 << 20, min_block=1,
                           hole_check_from=0, max_bytes=1 << 25, max_requests=16)
        buf = mmap.mmap(-1, 65536)
        conn.attach(buf)
        buf[:28] = struct.pack(">IHHQQI", 0x25609513, 0, 1, 7, 0, 8192)
        buf[28:28 + 8192] = b"x" * 8192
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, resource.RLIM_INFINITY))
        print(conn.feed(0, 28 + 8192, 0, 0))
        ring.submit()
        while not failed:
            select.select([ring.eventfd], [], [], 5)
            ring.reap()
        print(failed, os.fstat(fd).st_size, conn.requests)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    assert proc.stdout.split("\n")[:2] == [
        str(28 + 8192),
        f"[({WRITE}, 7, 0, 8192, {errno.EFBIG})] 6000 0",
    ]
