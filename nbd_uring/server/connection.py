"""One client connection: handshake, then a reader that submits requests in arrival order and a
writer that sends replies as they complete, out of order.

This is the one place where errors become replies: a refused request (``RequestError``) or a
failed I/O (errno from the engine) becomes an error reply for that cookie and the connection goes
on; a ``ProtocolViolation`` or a vanished peer closes this connection only.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from nbd_uring.engine.buffers import Buffer
from nbd_uring.protocol import (
    REQUEST_SIZE,
    Cmd,
    CmdFlag,
    HandshakeState,
    ProtocolViolation,
    Request,
    RequestError,
    ServerHandshake,
    check_request,
    decode_request,
    encode_simple_reply,
    nbd_errno_for,
    payload_length,
)

if TYPE_CHECKING:
    from nbd_uring.server.serve import ServedExport, Server

log = logging.getLogger("nbd_uring.connection")

RECV_SIZE = 256 * 1024
HANDSHAKE_RECV = 64 * 1024
# Past this a WRITE's payload is not worth draining: the peer is broken or hostile.
MAX_DISCARD = 256 * 1024 * 1024
IOV_MAX = 1024

_PEER_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError, OSError)


class ClientGone(Exception):
    """The peer closed or reset the connection."""


class _Budget:
    """Bytes and requests in flight on one connection; past the cap the reader stops reading."""

    def __init__(self, max_bytes: int, max_requests: int) -> None:
        self.max_bytes = max_bytes
        self.max_requests = max_requests
        self.bytes = 0
        self.requests = 0
        self._changed = trio.Event()

    def would_block(self, nbytes: int) -> bool:
        return self.requests >= self.max_requests or (
            self.bytes > 0 and self.bytes + nbytes > self.max_bytes
        )

    async def acquire(self, nbytes: int) -> None:
        while self.would_block(nbytes):
            await self._changed.wait()
        self.bytes += nbytes
        self.requests += 1

    def release(self, nbytes: int) -> None:
        self.bytes -= nbytes
        self.requests -= 1
        self._changed.set()
        self._changed = trio.Event()

    async def drained(self) -> None:
        while self.requests:
            await self._changed.wait()


class Connection:
    def __init__(self, server: Server, sock: trio.socket.SocketType, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.export: ServedExport | None = None
        self.closed = False
        self._replies: list[tuple[bytes, Buffer | None, int]] = []
        self._have_replies = trio.Event()
        self._budget = _Budget(server.config.max_bytes_in_flight, server.config.max_in_flight)
        self._leftover = b""

    # -- life cycle ---------------------------------------------------------------------

    async def run(self) -> None:
        try:
            if await self._negotiate():
                await self._transmit()
        except ProtocolViolation as exc:
            log.warning("%s: closing connection: %s", self.peer, exc.message)
        except ClientGone as exc:
            log.info("%s: client went away%s", self.peer, f" ({exc})" if str(exc) else "")
        finally:
            self.closed = True
            self._drop_pending_replies()
            self.sock.close()
            log.info("%s: connection closed", self.peer)

    async def _recv(self, nbytes: int) -> bytes:
        try:
            data = await self.sock.recv(nbytes)
        except _PEER_GONE as exc:
            raise ClientGone(str(exc)) from None
        return data

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                sent = await self.sock.send(view)
                view = view[sent:]
        except _PEER_GONE as exc:
            raise ClientGone(str(exc)) from None

    # -- handshake ----------------------------------------------------------------------

    async def _negotiate(self) -> bool:
        server = self.server
        hs = ServerHandshake(server.lookup_info, server.list_infos)
        with trio.move_on_after(server.config.handshake_timeout_s) as scope:
            while True:
                out = hs.data_to_send()
                if out:
                    await self._send_all(out)
                if hs.state is HandshakeState.TRANSMISSION:
                    break
                if hs.state is HandshakeState.CLOSED:
                    log.info("%s: negotiation ended: %s", self.peer, hs.close_reason)
                    return False
                data = await self._recv(HANDSHAKE_RECV)
                if not data:
                    raise ClientGone("during negotiation")
                hs.receive_data(data)
        if scope.cancelled_caught:
            log.warning(
                "%s: closing connection: handshake not finished within %.1f s",
                self.peer,
                server.config.handshake_timeout_s,
            )
            return False
        assert hs.export is not None
        self.export = server.exports_by_name[hs.export.name]
        self._leftover = hs.unused_data
        log.info("%s: export %r chosen, transmission begins", self.peer, hs.export.name)
        return True

    # -- transmission -------------------------------------------------------------------

    async def _transmit(self) -> None:
        failure: ProtocolViolation | ClientGone | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer_task, nursery.cancel_scope)
            try:
                await self._reader_task()
                # NBD_CMD_DISC or end of stream: finish everything outstanding, then close.
                await self._budget.drained()
            except (ProtocolViolation, ClientGone) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _reader_task(self) -> None:
        assert self.export is not None
        export = self.export
        info = export.info
        ring = self.server.ring
        buf = bytearray(RECV_SIZE)
        mv = memoryview(buf)
        end = len(self._leftover)
        buf[:end] = self._leftover
        pos = 0
        while True:
            while end - pos >= REQUEST_SIZE:
                request = decode_request(mv[pos : pos + REQUEST_SIZE])
                pos += REQUEST_SIZE
                if request.command == Cmd.DISC:
                    log.info("%s: client sent NBD_CMD_DISC", self.peer)
                    ring.submit()
                    return
                plen = payload_length(request)
                try:
                    check_request(request, info)
                except RequestError as exc:
                    log.info("%s: refused: %s", self.peer, exc.message)
                    pos, end = await self._discard(mv, pos, end, plen)
                    if self._budget.would_block(0):
                        ring.submit()
                    await self._budget.acquire(0)
                    self._reply(request.cookie, 0, None, 0, nbd_error=exc.nbd_errno)
                    continue
                if plen:
                    ring.submit()
                    await self._budget.acquire(plen)
                    lease = self.server.pool.acquire(plen)
                    have = min(end - pos, plen)
                    lease.view[:have] = mv[pos : pos + have]
                    pos += have
                    if have < plen:
                        await self._recv_exactly(lease.view[have:])
                    self._submit_write(request, lease)
                else:
                    nbytes = request.length if request.command == Cmd.READ else 0
                    if self._budget.would_block(nbytes):
                        ring.submit()
                    await self._budget.acquire(nbytes)
                    self._submit(request, nbytes)
            ring.submit()
            if pos:
                buf[: end - pos] = mv[pos:end]
                end -= pos
                pos = 0
            try:
                n = await self.sock.recv_into(mv[end:])
            except _PEER_GONE as exc:
                raise ClientGone(str(exc)) from None
            if n == 0:
                if end:
                    raise ProtocolViolation(
                        f"connection closed inside a request header ({end} of 28 bytes)"
                    )
                log.info("%s: client closed the connection without NBD_CMD_DISC", self.peer)
                return
            end += n

    async def _recv_exactly(self, view: memoryview) -> None:
        while view:
            try:
                n = await self.sock.recv_into(view)
            except _PEER_GONE as exc:
                raise ClientGone(str(exc)) from None
            if n == 0:
                raise ClientGone(f"inside a write payload, {len(view)} bytes short")
            view = view[n:]

    async def _discard(self, mv: memoryview, pos: int, end: int, nbytes: int) -> tuple[int, int]:
        """Skip a refused request's payload without buffering it, keeping the stream in sync."""
        if nbytes > MAX_DISCARD:
            raise ProtocolViolation(
                f"write payload of {nbytes} bytes is past the {MAX_DISCARD}-byte discard limit"
            )
        have = min(end - pos, nbytes)
        pos += have
        nbytes -= have
        while nbytes:
            # Only reached once the buffer is used up, so it serves as the scratch space.
            pos = end = 0
            try:
                n = await self.sock.recv_into(mv[: min(nbytes, len(mv))])
            except _PEER_GONE as exc:
                raise ClientGone(str(exc)) from None
            if n == 0:
                raise ClientGone(f"inside a refused write payload, {nbytes} bytes short")
            nbytes -= n
        return pos, end

    # -- submission ---------------------------------------------------------------------

    def _submit_write(self, request: Request, lease: Buffer) -> None:
        assert self.export is not None
        cookie = request.cookie
        nbytes = lease.length

        self.export.backend.write(
            request.offset, lease, self._completion(cookie, nbytes), fua=request.fua
        )

    def _submit(self, request: Request, nbytes: int) -> None:
        assert self.export is not None
        backend = self.export.backend
        cookie = request.cookie
        command = request.command
        done = self._completion(cookie, nbytes)
        if command == Cmd.READ:
            lease = self.server.pool.acquire(request.length)

            def read_done(err: int) -> None:
                self._reply(cookie, err, lease, nbytes)

            backend.read(request.offset, lease.view, read_done)
        elif command == Cmd.FLUSH:
            backend.flush(done)
        elif command == Cmd.TRIM:
            backend.trim(request.offset, request.length, done, fua=request.fua)
        elif command == Cmd.WRITE_ZEROES:
            backend.zero(
                request.offset,
                request.length,
                done,
                may_trim=not request.flags & CmdFlag.NO_HOLE,
                fua=request.fua,
            )
        elif command == Cmd.CACHE:
            backend.cache(request.offset, request.length, done)
        else:  # check_request lets only the commands above through
            self._reply(cookie, errno.EINVAL, None, nbytes)

    def _completion(self, cookie: int, nbytes: int) -> Callable[[int], None]:
        return lambda err: self._reply(cookie, err, None, nbytes)

    # -- replies ------------------------------------------------------------------------

    def _reply(
        self,
        cookie: int,
        err: int,
        data: Buffer | None,
        nbytes: int,
        *,
        nbd_error: int | None = None,
    ) -> None:
        """Queue the reply for ``cookie``; ``err`` is an errno from the engine."""
        if nbd_error is None:
            nbd_error = nbd_errno_for(err) if err else 0
            if err:
                reason = errno.errorcode.get(err, str(err))
                log.info("%s: request cookie=%#x failed: %s", self.peer, cookie, reason)
        if nbd_error and data is not None:
            data.release()
            data = None
        if self.closed:
            if data is not None:
                data.release()
            return
        self._replies.append((encode_simple_reply(cookie, nbd_error), data, nbytes))
        self._have_replies.set()

    async def _writer_task(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                await self._have_replies.wait()
                self._have_replies = trio.Event()
                batch, self._replies = self._replies, []
                try:
                    await self._send_replies(batch)
                finally:
                    for _header, data, nbytes in batch:
                        if data is not None:
                            data.release()
                        self._budget.release(nbytes)
        except ClientGone as exc:
            log.info("%s: client went away while sending replies (%s)", self.peer, exc)
            self.closed = True
            scope.cancel()

    async def _send_replies(self, batch: list[tuple[bytes, Buffer | None, int]]) -> None:
        iov: list[bytes | memoryview] = []
        for header, data, _nbytes in batch:
            iov.append(header)
            if data is not None:
                iov.append(data.view)
        sock = self.sock
        try:
            while iov:
                sent = await sock.sendmsg(iov[:IOV_MAX])
                while sent:
                    first = len(iov[0])
                    if sent >= first:
                        sent -= first
                        del iov[0]
                    else:
                        iov[0] = memoryview(iov[0])[sent:]
                        sent = 0
        except _PEER_GONE as exc:
            raise ClientGone(str(exc)) from None

    def _drop_pending_replies(self) -> None:
        for _header, data, _nbytes in self._replies:
            if data is not None:
                data.release()
        self._replies = []


def set_nodelay(sock: trio.socket.SocketType) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
