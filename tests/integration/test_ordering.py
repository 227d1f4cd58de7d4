"""The design concept's ordering rules, observed on the wire with raw clients.

Delays come from the server's own ``--fault`` injection, so each interleaving is forced rather
than hoped for. A READ on the same connection as an earlier request serves as a barrier: the
server reads each connection's requests in order, so once the READ's reply is in, every earlier
request of that connection has arrived at the server.
"""

from __future__ import annotations

import struct
import time

import pytest

from ._util import MiB, Server, StartServer, is_nbdkit
from .test_malformed import CMD_FLUSH, CMD_READ, CMD_WRITE, RawClient, Reply, recv_exact

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="uses nbd-uring's --fault and --ordering"),
]

SLOW = "1s"
BLOCK = 4096


def collect(client: RawClient, expected: dict[int, int]) -> list[Reply]:
    """Read one reply for each cookie in ``expected`` (cookie -> READ length or 0), in
    whatever order the server sends them; returns them in arrival order."""
    got: list[Reply] = []
    while len(got) < len(expected):
        magic, error, cookie = struct.unpack(">IIQ", recv_exact(client.sock, 16))
        assert magic == 0x67446698, hex(magic)
        assert cookie in expected, f"reply for unknown cookie {cookie}"
        length = expected[cookie]
        data = recv_exact(client.sock, length) if error == 0 and length else b""
        got.append(Reply(error, cookie, data))
    return got


def start(start_nbd_server: StartServer, *args: str) -> Server:
    return start_nbd_server(size=64 * MiB, extra_args=args)


def test_replies_come_out_of_order(start_nbd_server: StartServer) -> None:
    """A delayed READ does not hold back a later READ of another range on the same
    connection: its reply is sent first."""
    server = start(start_nbd_server, "--fault", f"read@0-4k:delay={SLOW}")
    c = RawClient(server).handshake()
    slow = c.request(CMD_READ, 0, BLOCK)
    fast = c.request(CMD_READ, MiB, BLOCK)
    replies = collect(c, {slow: BLOCK, fast: BLOCK})
    assert [r.cookie for r in replies] == [fast, slow]
    assert all(r.error == 0 for r in replies)
    c.disconnect()


@pytest.mark.parametrize("ordering", ["strict", "kernel"])
def test_read_from_another_connection_sees_earlier_write(
    start_nbd_server: StartServer, ordering: str
) -> None:
    """ "A write from client A should not cut in front of a read from client B" — nor the
    other way round: B's READ received after A's overlapping (slow) WRITE returns A's data in
    strict mode, every time. In kernel mode the READ overtakes the WRITE and sees old data."""
    server = start(start_nbd_server, "--ordering", ordering, "--fault", f"write@0-4k:delay={SLOW}")
    a = RawClient(server).handshake()
    b = RawClient(server).handshake()
    write = a.request(CMD_WRITE, 0, BLOCK, payload=b"A" * BLOCK)
    barrier = a.request(CMD_READ, MiB, 16)
    assert collect(a, {barrier: 16})[0].cookie == barrier
    seen = b.read(0, BLOCK)
    assert collect(a, {write: 0})[0].error == 0
    if ordering == "strict":
        assert seen == b"A" * BLOCK
    else:
        assert seen == bytes(BLOCK)
    a.disconnect()
    b.disconnect()


@pytest.mark.parametrize("ordering", ["strict", "kernel"])
def test_overlapping_writes_from_two_connections_land_in_arrival_order(
    start_nbd_server: StartServer, ordering: str
) -> None:
    """A's slow WRITE of [0, 8k) arrives before B's WRITE of [4k, 8k): in strict mode B's
    data is what stays; in kernel mode A's late write lands on top of it."""
    server = start(start_nbd_server, "--ordering", ordering, "--fault", f"write@0-1:delay={SLOW}")
    a = RawClient(server).handshake()
    b = RawClient(server).handshake()
    write_a = a.request(CMD_WRITE, 0, 2 * BLOCK, payload=b"A" * 2 * BLOCK)
    barrier = a.request(CMD_READ, MiB, 16)
    assert collect(a, {barrier: 16})[0].cookie == barrier
    b.write(BLOCK, b"B" * BLOCK)
    assert collect(a, {write_a: 0})[0].error == 0
    final = b.read(BLOCK, BLOCK)
    assert final == (b"B" if ordering == "strict" else b"A") * BLOCK
    a.disconnect()
    b.disconnect()


def test_flush_waits_for_earlier_writes_and_stalls_nothing(
    start_nbd_server: StartServer,
) -> None:
    """A FLUSH is replied to only after the (slow) write received before it; a (slower)
    write received after it does not hold it back; meanwhile another connection's reads and
    writes all complete."""
    server = start(
        start_nbd_server,
        "--fault",
        f"write@0-4k:delay={SLOW}",
        "--fault",
        "write@2M-3M:delay=3s",
    )
    a = RawClient(server).handshake()
    b = RawClient(server).handshake()
    earlier = a.request(CMD_WRITE, 0, BLOCK, payload=b"E" * BLOCK)
    flush = a.request(CMD_FLUSH, 0, 0)
    later = a.request(CMD_WRITE, 2 * MiB, BLOCK, payload=b"L" * BLOCK)
    barrier = a.request(CMD_READ, MiB, 16)
    assert collect(a, {barrier: 16})[0].cookie == barrier
    for i in range(20):
        b.write(4 * MiB + i * BLOCK, bytes([i]) * BLOCK)
        assert b.read(4 * MiB + i * BLOCK, BLOCK) == bytes([i]) * BLOCK
    b_done = time.monotonic()
    replies = collect(a, {earlier: 0, flush: 0, later: 0})
    flush_replied = time.monotonic()
    assert [r.cookie for r in replies] == [earlier, flush, later]
    assert all(r.error == 0 for r in replies)
    assert b_done < flush_replied
    a.disconnect()
    b.disconnect()


def test_writeback_error_is_reported_by_the_next_flush(start_nbd_server: StartServer) -> None:
    """In writeback mode a WRITE is answered before it reaches the disk; when that I/O then
    fails, the next FLUSH on the export returns EIO, and the one after it succeeds."""
    server = start(start_nbd_server, "--durability", "writeback", "--fault", "write@0-4k:error=EIO")
    c = RawClient(server).handshake()
    c.write(0, b"W" * BLOCK)  # replied 0, then fails on its way to disk
    flush = c.request(CMD_FLUSH, 0, 0)
    assert collect(c, {flush: 0})[0].error == 5  # NBD_EIO
    again = c.request(CMD_FLUSH, 0, 0)
    assert collect(c, {again: 0})[0].error == 0
    c.disconnect()
    assert "write-back of 4096 bytes at offset 0 failed" in server.stderr_text()
