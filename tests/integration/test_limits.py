"""Memory under load: back-pressure past the per-connection in-flight cap, and a thousand
connections that announce 32 MiB WRITEs and send their payloads a few bytes at a time."""

from __future__ import annotations

import random
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from ._libnbd import connect as libnbd_connect
from ._load import (
    CMD_DISC,
    CMD_READ,
    CMD_WRITE,
    connect,
    header,
    negotiate,
    raise_nofile,
    read_reply,
    rss_kib,
)
from ._util import MiB, StartServer, is_nbdkit, make_sparse

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="nbd-uring's own limits and memory"),
]


def block(seed: int, size: int = MiB) -> bytes:
    return random.Random(seed).randbytes(size)


def send_until_blocked(sock: socket.socket, stream: bytes, stall_s: float = 1.0) -> int:
    """Send as much of ``stream`` as the peer takes; stop once it took nothing for
    ``stall_s``. Returns the bytes sent."""
    view = memoryview(stream)
    sent = 0
    sock.setblocking(False)
    try:
        while sent < len(view):
            try:
                sent += sock.send(view[sent : sent + 256 * 1024])
            except BlockingIOError:
                _r, writable, _x = select.select([], [sock], [], stall_s)
                if not writable:
                    break
    finally:
        sock.setblocking(True)
    return sent


def test_bytes_in_flight_cap_is_back_pressure(start_nbd_server: StartServer) -> None:
    """With --max-bytes-in-flight 32M, a client that pipelines 8 MiB of READs and then 1 MiB
    WRITEs without reading a reply can push only about 32 MiB before its sends block (the
    replies it does not read hold the budget, so the server stops reading); the server's RSS
    stays bounded meanwhile. Once the client reads, everything completes, and every write
    is on disk. Nothing is refused."""
    server = start_nbd_server(size=256 * MiB, extra_args=("--max-bytes-in-flight", "32M"))
    sock = connect(server)
    assert negotiate(sock) == 256 * MiB
    base = rss_kib(server.pid)
    reads = 8
    writes = 192
    stream = b"".join(header(CMD_READ, i, 0, MiB) for i in range(reads))
    stream += b"".join(
        header(CMD_WRITE, reads + i, (32 + i) * MiB, MiB) + block(i) for i in range(writes)
    )
    sent = send_until_blocked(sock, stream)
    peak = rss_kib(server.pid)
    written = (sent - reads * 28) // (MiB + 28)
    print(
        f"\nback-pressure: client blocked after {sent / MiB:.1f} MiB ({written} writes) of "
        f"{len(stream) / MiB:.0f} MiB; server RSS {base // 1024} -> {peak // 1024} MiB"
    )
    assert 16 * MiB < sent < 40 * MiB, "the server did not stop reading near its 32 MiB cap"
    assert (peak - base) * 1024 < 96 * MiB

    replies: dict[int, int] = {}

    def reader() -> None:
        for _ in range(reads):
            cookie, error, data = read_reply(sock, MiB)
            assert error == 0 and data == bytes(MiB), cookie
            replies[cookie] = error
        for _ in range(writes):
            cookie, error, _data = read_reply(sock)
            replies[cookie] = error

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sock.sendall(stream[sent:])
    thread.join(timeout=60)
    assert not thread.is_alive(), "replies never all arrived"
    assert replies == dict.fromkeys(range(reads + writes), 0)
    sock.sendall(header(CMD_DISC, 0, 0, 0))
    sock.close()
    with server.path.open("rb") as f:
        f.seek(32 * MiB)
        for i in range(writes):
            assert f.read(MiB) == block(i), f"write {i} not on disk"


SLOW_CLIENTS = 1000


@pytest.mark.requires("nbd")
def test_thousand_slow_32m_writes_keep_memory_bounded(
    start_nbd_server: StartServer, tmp_path: Path
) -> None:
    """A thousand connections each announce a 32 MiB WRITE and trickle its payload a few
    bytes at a time. The server must not hold 32 MiB (nor any big fixed buffer) per
    connection: its RSS grows by well under 100 KiB per connection, a client beside them
    writes and reads as usual, and the slow writes that do finish land on disk."""
    raise_nofile(SLOW_CLIENTS + 256)
    started = time.monotonic()
    disk = make_sparse(tmp_path / "disk.img", 256 * MiB)
    server = start_nbd_server(disk)
    socks: list[socket.socket] = []
    try:
        with libnbd_connect(server.uri) as h:
            h.pwrite(b"w" * MiB, 0)  # warm up: the pool, the ring, the first connection
            base = rss_kib(server.pid)
            for _ in range(SLOW_CLIENTS):
                sock = connect(server)
                socks.append(sock)
                negotiate(sock)
            negotiated = rss_kib(server.pid)
            for i, sock in enumerate(socks):
                sock.sendall(header(CMD_WRITE, i, (i % 8) * 32 * MiB, 32 * MiB) + b"p" * 8)
            for _ in range(5):
                for sock in socks:
                    sock.sendall(b"p" * 16)
                data = block(7)
                h.pwrite(data, 200 * MiB)  # the bystander is served meanwhile
                assert h.pread(MiB, 200 * MiB) == data
                time.sleep(0.1)
            trickled = rss_kib(server.pid)
            # Two of them finish their payload; the rest vanish mid-payload.
            for i in (0, 1):
                socks[i].sendall(b"p" * (32 * MiB - 8 - 5 * 16))
                cookie, error, _data = read_reply(socks[i])
                assert (cookie, error) == (i, 0)
            assert h.pread(MiB, 200 * MiB) == data
    finally:
        for sock in socks:
            sock.close()
    per_connection = (trickled - base) / SLOW_CLIENTS
    print(
        f"\n{SLOW_CLIENTS} slow 32 MiB writers: server RSS {base // 1024} MiB at start, "
        f"{negotiated // 1024} MiB negotiated, {trickled // 1024} MiB with every payload "
        f"announced and trickling ({per_connection:.1f} KiB per connection), "
        f"{time.monotonic() - started:.1f} s"
    )
    assert per_connection < 100, f"{per_connection:.0f} KiB of RSS per slow connection"
    with disk.open("rb") as f:
        assert f.read(32 * MiB) == b"p" * (32 * MiB)
    assert time.monotonic() - started < 60


def test_requests_in_flight_cap(start_nbd_server: StartServer) -> None:
    """With --max-requests-in-flight 4 and every READ held 300 ms, twelve pipelined READs are
    answered in waves of four: the server reads the fifth only once a reply has gone out."""
    server = start_nbd_server(
        size=8 * MiB,
        extra_args=("--max-requests-in-flight", "4", "--fault", "read:delay=300ms"),
    )
    sock = connect(server)
    negotiate(sock)
    start = time.monotonic()
    sock.sendall(b"".join(header(CMD_READ, i, i * 4096, 4096) for i in range(12)))
    times = []
    for _ in range(12):
        _cookie, error, _data = read_reply(sock, 4096)
        assert error == 0
        times.append(time.monotonic() - start)
    sock.sendall(header(CMD_DISC, 0, 0, 0))
    sock.close()
    print(f"\nreply times: {' '.join(f'{t:.2f}' for t in times)}")
    # Three waves of 300 ms; without the cap all twelve would be answered after one.
    assert times[11] > 0.85 and times[11] - times[3] > 0.5, times
