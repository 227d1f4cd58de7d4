"""Hostile or broken clients, spoken to over raw sockets.

Each test keeps a well-behaved "bystander" client connected while another connection
misbehaves, and checks afterwards that the bystander can still write and read and that the
server process is alive: one bad connection must never hurt the others.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ._util import KiB, MiB, Server, StartServer, is_nbdkit

pytestmark = pytest.mark.integration

# --- protocol constants (from the NBD protocol specification) -------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
INFO_EXPORT = 0

TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_FLAG_FUA = 1 << 0

NBD_EPERM = 1
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28

IO_TIMEOUT = 15.0

# nbdkit's limit on a request is 64 MiB (and it answers ENOMEM); nbd-uring's is 32 MiB
# (EINVAL). Use a length over both limits for nbdkit so the tests can be validated on it.
OVERSIZE = 64 * MiB + (4 * KiB if is_nbdkit() else 0)
OVERSIZE_ERRORS = {NBD_EINVAL, NBD_ENOMEM} if is_nbdkit() else {NBD_EINVAL}


#: Every RawClient, closed after each test even if it failed (see _close_raw_clients).
_OPEN_CLIENTS: list[RawClient] = []


class Closed(Exception):
    """The server closed the connection."""


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        try:
            chunk = sock.recv(min(n - len(buf), 1 << 20))
        except ConnectionResetError as exc:
            raise Closed("connection reset") from exc
        if not chunk:
            raise Closed(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def expect_closed(sock: socket.socket, timeout: float = IO_TIMEOUT) -> None:
    """Assert the server closes the connection (EOF or reset) within ``timeout``; any bytes
    it sends first (e.g. an error reply) are ignored."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        pytest.fail(f"server did not close the connection within {timeout}s")


@dataclass
class Reply:
    error: int
    cookie: int
    data: bytes = b""


class RawClient:
    """A deliberately minimal NBD client: fixed newstyle, NO_ZEROES, NBD_OPT_GO, simple
    replies only (it never asks for structured replies)."""

    def __init__(self, server: Server) -> None:
        self.sock = server.connect_raw(timeout=IO_TIMEOUT)
        _OPEN_CLIENTS.append(self)
        self.size = 0
        self.tflags = 0
        self._cookie = 0

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def greeting(self) -> int:
        magic, opt_magic, hflags = struct.unpack(">QQH", recv_exact(self.sock, 18))
        assert magic == NBDMAGIC, hex(magic)
        assert opt_magic == IHAVEOPT, hex(opt_magic)
        assert hflags & FLAG_FIXED_NEWSTYLE, hflags
        self.send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        return int(hflags)

    def send_option(self, option: int, data: bytes, length: int | None = None) -> None:
        size = len(data) if length is None else length
        self.send(struct.pack(">QII", IHAVEOPT, option, size) + data)

    def handshake(self, name: bytes = b"") -> RawClient:
        """Greeting, client flags, NBD_OPT_GO with no info requests, replies until ACK."""
        self.greeting()
        self.send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
        while True:
            magic, option, rtype, length = struct.unpack(">QIII", recv_exact(self.sock, 20))
            assert magic == OPT_REPLY_MAGIC, hex(magic)
            assert option == OPT_GO, option
            payload = recv_exact(self.sock, length)
            assert not rtype & REP_FLAG_ERROR, f"NBD_OPT_GO failed: {rtype:#x} {payload!r}"
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size, self.tflags = struct.unpack(">QH", payload[2:12])
        assert self.size > 0, "no NBD_INFO_EXPORT before NBD_REP_ACK"
        return self

    def request(
        self, cmd: int, offset: int, length: int, *, flags: int = 0, payload: bytes = b""
    ) -> int:
        self._cookie += 1
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, self._cookie, offset, length)
        self.send(header + payload)
        return self._cookie

    def reply(self, read_length: int = 0) -> Reply:
        """Read one simple reply; ``read_length`` payload bytes follow a successful READ."""
        magic, error, cookie = struct.unpack(">IIQ", recv_exact(self.sock, 16))
        assert magic == SIMPLE_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        data = recv_exact(self.sock, read_length) if error == 0 and read_length else b""
        return Reply(error, cookie, data)

    def write(self, offset: int, data: bytes, flags: int = 0) -> None:
        cookie = self.request(CMD_WRITE, offset, len(data), flags=flags, payload=data)
        rep = self.reply()
        assert (rep.error, rep.cookie) == (0, cookie)

    def read(self, offset: int, length: int) -> bytes:
        cookie = self.request(CMD_READ, offset, length)
        rep = self.reply(length)
        assert (rep.error, rep.cookie) == (0, cookie)
        return rep.data

    def disconnect(self) -> None:
        self.request(CMD_DISC, 0, 0)
        expect_closed(self.sock)
        self.close()


@pytest.fixture(autouse=True)
def _close_raw_clients(start_nbd_server: StartServer) -> Iterator[None]:
    """Close leftover raw connections before the server fixture stops the server (a failed
    test can leave one open, and a server may wait for open connections at shutdown)."""
    yield
    while _OPEN_CLIENTS:
        _OPEN_CLIENTS.pop().close()


@pytest.fixture
def bystander(server: Server) -> Iterator[RawClient]:
    """A well-behaved client connected to ``server`` for the whole test."""
    client = RawClient(server).handshake()
    yield client
    client.close()


def check_unharmed(server: Server, bystander: RawClient) -> None:
    """The bystander connection still works, a new connection works, the server is alive."""
    assert server.alive(), f"server died:\n{server.stderr_text()}"
    data = b"still here " * 100
    bystander.write(12345, data)
    assert bystander.read(12345, len(data)) == data
    fresh = RawClient(server).handshake()
    assert fresh.read(12345, len(data)) == data
    fresh.disconnect()
    assert server.alive()


# --- the tests ------------------------------------------------------------------------------


def test_raw_client_sanity(server: Server, bystander: RawClient) -> None:
    """The raw client itself works: handshake reports the size, write/read/flush/DISC."""
    assert bystander.size == server.path.stat().st_size
    c = RawClient(server).handshake()
    c.write(0, b"abc", flags=CMD_FLAG_FUA)
    assert c.read(0, 3) == b"abc"
    cookie = c.request(CMD_FLUSH, 0, 0)
    assert c.reply() == Reply(0, cookie)
    c.disconnect()
    check_unharmed(server, bystander)


def test_oversized_read_einval(server: Server, bystander: RawClient) -> None:
    """A READ longer than the 32 MiB maximum (64 MiB, within the export) gets an error
    reply (EINVAL) with no payload, and the same connection then serves a normal READ."""
    c = RawClient(server).handshake()
    assert c.size >= OVERSIZE
    c.write(0, b"\x42" * 4096)
    cookie = c.request(CMD_READ, 0, OVERSIZE)
    rep = c.reply()
    assert rep.cookie == cookie
    assert rep.error in OVERSIZE_ERRORS, rep.error
    assert c.read(0, 4096) == b"\x42" * 4096
    check_unharmed(server, bystander)


def test_oversized_write_payload_discarded(server: Server, bystander: RawClient) -> None:
    """A WRITE header announcing 64 MiB, followed by its 64 MiB payload, gets an error reply
    (EINVAL); the payload is read and discarded (the stream stays in sync: it is not parsed as
    requests, though it is made of valid request headers) and nothing is written."""
    c = RawClient(server).handshake()
    c.write(0, b"\x42" * 4096)
    # A payload that would do damage if the server parsed it as requests: WRITEs of 0xEE.
    evil = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 999, 0, 16) + b"\xee" * 16
    payload = evil * (OVERSIZE // len(evil)) + evil[: OVERSIZE % len(evil)]
    assert len(payload) == OVERSIZE
    cookie = c.request(CMD_WRITE, 0, OVERSIZE, payload=payload)
    rep = c.reply()
    assert rep.cookie == cookie
    assert rep.error in OVERSIZE_ERRORS, rep.error
    assert c.read(0, 4096) == b"\x42" * 4096
    c.disconnect()
    check_unharmed(server, bystander)


def test_oversized_option_disconnects(server: Server, bystander: RawClient) -> None:
    """An option header claiming a 1 MiB payload (over the 64 KiB limit) makes the server
    drop that client without waiting for (or buffering) the payload."""
    if is_nbdkit():
        pytest.skip("nbdkit accepts options up to 64 MiB")
    c = RawClient(server)
    c.greeting()
    c.send_option(OPT_GO, b"", length=1 * MiB)
    expect_closed(c.sock)
    c.close()
    check_unharmed(server, bystander)


def test_bad_request_magic_disconnects(server: Server, bystander: RawClient) -> None:
    """A request with a wrong magic number makes the server close that connection (the
    stream can no longer be trusted)."""
    c = RawClient(server).handshake()
    c.send(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
    expect_closed(c.sock)
    c.close()
    check_unharmed(server, bystander)


def test_truncated_header_then_close(server: Server, bystander: RawClient) -> None:
    """A client that sends half a request header and closes does not upset the server."""
    c = RawClient(server).handshake()
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[:13])
    c.close()
    check_unharmed(server, bystander)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_client_vanishes_mid_write_payload(server: Server, bystander: RawClient, how: str) -> None:
    """A client that sends a 1 MiB WRITE header and only 100 KiB of its payload, then closes
    (or resets) the connection, does not upset the server or other clients."""
    c = RawClient(server).handshake()
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 1 * MiB))
    c.send(b"\x99" * 100 * KiB)
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    check_unharmed(server, bystander)


def test_disconnect_mid_handshake(server: Server, bystander: RawClient) -> None:
    """Clients vanishing before sending their flags, or in the middle of an option, are
    dropped cleanly."""
    c1 = RawClient(server)
    c1.greeting()
    c1.close()
    c2 = RawClient(server)
    c2.greeting()
    c2.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 10) + b"\x00\x00")
    c2.close()
    c3 = RawClient(server)
    recv_exact(c3.sock, 18)
    c3.close()
    check_unharmed(server, bystander)


def test_unknown_command_and_flags_einval(server: Server, bystander: RawClient) -> None:
    """An unknown command type, or an unknown command flag, gets EINVAL and the connection
    stays in sync (for unknown commands the length field carries no payload)."""
    c = RawClient(server).handshake()
    cookie = c.request(0x7F, 0, 512)
    rep = c.reply()
    assert (rep.error, rep.cookie) == (NBD_EINVAL, cookie)
    cookie = c.request(CMD_READ, 0, 512, flags=1 << 14)
    rep = c.reply()
    assert (rep.error, rep.cookie) == (NBD_EINVAL, cookie)
    assert len(c.read(0, 512)) == 512
    check_unharmed(server, bystander)


def test_range_errors(server: Server, bystander: RawClient) -> None:
    """Range checks on the wire: WRITE/WRITE_ZEROES past the end -> ENOSPC (the WRITE payload
    is consumed), READ/TRIM past the end and offset+length overflowing 64 bits -> EINVAL."""
    c = RawClient(server).handshake()
    size = c.size
    cookie = c.request(CMD_WRITE, size - 512, 1024, payload=b"\x01" * 1024)
    assert c.reply() == Reply(NBD_ENOSPC, cookie)
    cookie = c.request(CMD_WRITE_ZEROES, size, 512)
    assert c.reply() == Reply(NBD_ENOSPC, cookie)
    cookie = c.request(CMD_READ, size - 512, 1024)
    assert c.reply() == Reply(NBD_EINVAL, cookie)
    cookie = c.request(CMD_TRIM, size, 4096)
    assert c.reply().error == NBD_EINVAL
    cookie = c.request(CMD_READ, (1 << 64) - 512, 1024)
    assert c.reply() == Reply(NBD_EINVAL, cookie)
    assert server.path.stat().st_size == size
    assert len(c.read(size - 512, 512)) == 512
    check_unharmed(server, bystander)


def test_zero_length_requests_get_replies(server: Server, bystander: RawClient) -> None:
    """Zero-length READ, WRITE, TRIM and WRITE_ZEROES each get exactly one reply (success or
    an error: the spec leaves it open, but never a hang), and the connection stays in sync."""
    c = RawClient(server).handshake()
    for cmd in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
        cookie = c.request(cmd, 4096, 0)
        try:
            rep = c.reply()
        except TimeoutError:
            pytest.fail(f"no reply within {IO_TIMEOUT}s to a zero-length command {cmd}")
        assert rep.cookie == cookie, (cmd, rep)
    assert len(c.read(0, 512)) == 512
    check_unharmed(server, bystander)


def test_read_only_write_eperm(start_nbd_server: StartServer) -> None:
    """On a --read-only export the server itself (not just the client library) rejects
    WRITE (payload consumed) with EPERM, and TRIM / WRITE_ZEROES with EPERM (or EINVAL if
    their SEND_ flag is not advertised on a read-only export); FLUSH and READ still work."""
    server = start_nbd_server(size=1 * MiB, read_only=True)
    c = RawClient(server).handshake()
    assert c.tflags & TFLAG_READ_ONLY
    cookie = c.request(CMD_WRITE, 0, 4096, payload=b"\x07" * 4096)
    assert c.reply() == Reply(NBD_EPERM, cookie)
    for cmd, flag in ((CMD_TRIM, TFLAG_SEND_TRIM), (CMD_WRITE_ZEROES, TFLAG_SEND_WRITE_ZEROES)):
        cookie = c.request(cmd, 0, 4096)
        rep = c.reply()
        assert rep.cookie == cookie
        allowed = {NBD_EPERM} if c.tflags & flag else {NBD_EPERM, NBD_EINVAL}
        assert rep.error in allowed, (cmd, rep, f"tflags={c.tflags:#x}")
    cookie = c.request(CMD_FLUSH, 0, 0)
    assert c.reply() == Reply(0, cookie)
    assert c.read(0, 4096) == bytes(4096)
    c.disconnect()
    assert server.path.read_bytes() == bytes(1 * MiB)


def test_many_idle_connections(server: Server, bystander: RawClient) -> None:
    """64 connections left open mid-handshake or idle after it do not stop the server from
    serving new clients."""
    clients: list[RawClient] = []
    try:
        for i in range(64):
            c = RawClient(server)
            if i % 2:
                c.handshake()
            clients.append(c)
        check_unharmed(server, bystander)
    finally:
        for c in clients:
            c.close()


def test_enospc_errno_value() -> None:
    """The wire error numbers used here are the Linux ones the NBD spec mandates."""
    assert (NBD_EPERM, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC) == (
        errno.EPERM,
        errno.ENOMEM,
        errno.EINVAL,
        errno.ENOSPC,
    )
