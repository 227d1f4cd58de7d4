"""Helpers for the load tests: many raw connections at once, and the server's memory."""

from __future__ import annotations

import resource
import socket
import struct

from ._util import Server

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
OPT_GO = 7
REP_ACK = 1
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (anonymous, file and shared memory: what the OOM killer sees)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}: the process has exited")


def raise_nofile(want: int) -> None:
    """Let this process (and the server it starts) open ``want`` descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        limit = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed by the server {n - len(data)} bytes short")
        data += chunk
    return bytes(data)


def negotiate(sock: socket.socket, name: bytes = b"") -> int:
    """Fixed newstyle, NO_ZEROES, NBD_OPT_GO: returns the export size."""
    magic, opt_magic, _flags = struct.unpack(">QQH", recv_exact(sock, 18))
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
    sock.sendall(struct.pack(">I", 3))
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(go)) + go)
    size = 0
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
        assert magic == OPT_REPLY_MAGIC
        payload = recv_exact(sock, length)
        assert not rtype & (1 << 31), f"NBD_OPT_GO refused: {rtype:#x} {payload!r}"
        if rtype == REP_ACK:
            return size
        if rtype == 3 and payload[:2] == b"\0\0":
            (size,) = struct.unpack(">Q", payload[2:10])


def header(command: int, cookie: int, offset: int, length: int) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, command, cookie, offset, length)


def read_reply(sock: socket.socket, data_length: int = 0) -> tuple[int, int, bytes]:
    """(cookie, error, data) of one simple reply; ``data_length`` bytes follow a good READ."""
    magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
    assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
    data = recv_exact(sock, data_length) if data_length and not error else b""
    return cookie, error, data


def connect(server: Server, timeout: float = 30.0) -> socket.socket:
    return server.connect_raw(timeout=timeout)
