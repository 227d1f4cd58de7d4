"""TlsTransport over a socketpair, against a client SSLObject driven by hand: the non-blocking
contract the connection's reader and writer rely on (BlockingIOError exactly when the socket
has nothing whole to give or take, 0 at end of stream, queued ciphertext flushed by
``unflushed``)."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from nbd_uring.config import ExportConfig, ServerConfig, TlsMode
from nbd_uring.server.tls import TlsError, TlsTransport, server_context


@dataclass
class Pair:
    server: TlsTransport
    client: ssl.SSLObject
    client_in: ssl.MemoryBIO
    client_out: ssl.MemoryBIO
    peer: socket.socket
    """The client's end of the socketpair (non-blocking)."""

    def client_send(self, data: bytes) -> None:
        self.client.write(data)
        self.peer.sendall(self.client_out.read())

    def client_receive_all(self) -> bytes:
        """Everything the server has sent so far, decrypted."""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                break
            self.client_in.write(chunk)
        out = bytearray()
        while True:
            try:
                out += self.client.read(1 << 20)
            except ssl.SSLWantReadError:
                return bytes(out)


def _shuttle_handshake(pair: Pair) -> None:
    async def client_side() -> None:
        while True:
            try:
                pair.client.do_handshake()
                break
            except ssl.SSLWantReadError:
                pair.peer.sendall(pair.client_out.read())
                await trio.lowlevel.wait_readable(pair.peer)
                pair.client_in.write(pair.peer.recv(1 << 16))
        pair.peer.sendall(pair.client_out.read())

    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.server.handshake)
                nursery.start_soon(client_side)

    trio.run(main)


@pytest.fixture
def pair(pem: tuple[Path, Path]) -> Iterator[Pair]:
    cert, key = pem
    config = ServerConfig(
        exports=(ExportConfig(path="/x"),), tls=TlsMode.ON, tls_cert=str(cert), tls_key=str(key)
    )
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    server = TlsTransport(server_context(config), ours.fileno())
    client_ctx = ssl.create_default_context(cafile=str(cert))
    cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(cin, cout, server_hostname="localhost")
    result = Pair(server, client, cin, cout, theirs)
    _shuttle_handshake(result)
    yield result
    server.close()
    ours.close()
    theirs.close()


def test_records_in_and_blocking_when_none_is_whole(pair: Pair) -> None:
    buf = bytearray(1 << 16)
    with pytest.raises(BlockingIOError):
        pair.server.recv_into(buf)
    pair.client.write(b"hello, server")
    record = pair.client_out.read()
    pair.peer.sendall(record[:7])  # part of a record decrypts to nothing yet
    with pytest.raises(BlockingIOError):
        pair.server.recv_into(buf)
    pair.peer.sendall(record[7:])
    n = pair.server.recv_into(memoryview(buf)[100:])
    assert bytes(buf[100 : 100 + n]) == b"hello, server"
    with pytest.raises(BlockingIOError):
        pair.server.recv_into(buf)


def test_more_plaintext_than_one_read_takes(pair: Pair) -> None:
    data = os.urandom(100_000)
    pair.client_send(data)
    got = bytearray()
    buf = bytearray(4096)
    while len(got) < len(data):
        n = pair.server.recv_into(buf)
        got += buf[:n]
    assert got == data


def test_sendmsg_queues_ciphertext_and_unflushed_drains_it(pair: Pair) -> None:
    data = os.urandom(4 << 20)
    view = memoryview(data)
    taken = 0
    received = bytearray()
    blocked = False
    while taken < len(data) or pair.server.unflushed():
        try:
            taken += pair.server.sendmsg([view[taken : taken + 100_000], b""])
        except BlockingIOError:
            blocked = True
            assert pair.server.unflushed()
            received += pair.client_receive_all()
    received += pair.client_receive_all()
    assert blocked, "the socket buffer never filled: the test did not test queueing"
    assert not pair.server.unflushed()
    assert received == data


def test_end_of_stream_is_zero(pair: Pair) -> None:
    pair.peer.shutdown(socket.SHUT_WR)
    assert pair.server.recv_into(bytearray(16)) == 0


def test_close_notify_is_zero(pair: Pair) -> None:
    with pytest.raises(ssl.SSLWantReadError):
        pair.client.unwrap()
    pair.peer.sendall(pair.client_out.read())
    assert pair.server.recv_into(bytearray(16)) == 0


def test_peer_common_name_without_client_certificate(pair: Pair) -> None:
    assert pair.server.peer_common_name is None
    assert pair.server.describe().startswith("TLS")


def test_garbage_handshake_is_a_tls_error(pem: tuple[Path, Path]) -> None:
    cert, key = pem
    config = ServerConfig(
        exports=(ExportConfig(path="/x"),), tls=TlsMode.ON, tls_cert=str(cert), tls_key=str(key)
    )
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    server = TlsTransport(server_context(config), ours.fileno())
    theirs.sendall(b"GET / HTTP/1.1\r\n\r\n")

    async def main() -> None:
        with trio.fail_after(10):
            await server.handshake()

    with pytest.raises(TlsError, match=r"wrong version number|unexpected|http"):
        trio.run(main)
    server.close()
    ours.close()
    theirs.close()
