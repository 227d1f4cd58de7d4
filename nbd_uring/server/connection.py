"""One client connection: handshake, then a reader that submits requests in arrival order and a
writer that sends replies as they complete, out of order.

This is the one place where errors become replies: a refused request (``RequestError``) or a
failed I/O (errno from the engine) becomes an error reply for that cookie and the connection goes
on; a ``ProtocolViolation`` or a vanished peer closes this connection only.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from nbd_uring.engine.buffers import Buffer
from nbd_uring.protocol import (
    EXTENDED_REQUEST_SIZE,
    REQUEST_SIZE,
    AllocationState,
    ChunkEncoder,
    Cmd,
    CmdFlag,
    ExportInfo,
    HandshakeState,
    NbdErrno,
    ProtocolViolation,
    Request,
    RequestError,
    ServerHandshake,
    check_request,
    decode_extended_request,
    decode_request,
    encode_simple_reply,
    extended_payload_length,
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
# Runs of one structured READ reply; past this the rest of the range is sent as one data chunk.
MAX_READ_RUNS = 4096
# Descriptors per BLOCK_STATUS reply (the spec's SHOULD is 2^20; fewer bounds the lseek calls
# made on the event loop, and clients ask again from where the reply stopped).
MAX_STATUS_EXTENTS = 16384
_HOLE_STATUS = int(AllocationState.HOLE | AllocationState.ZERO)
_DF = int(CmdFlag.DF)
_REQ_ONE = int(CmdFlag.REQ_ONE)

_Head = bytes | list[bytes | memoryview]
"""A reply as queued: simple reply or chunk bytes, or a list of chunk headers and data views."""

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
        self._replies: list[tuple[_Head, Buffer | None, int]] = []
        self._have_replies = trio.Event()
        self._budget = _Budget(server.config.max_bytes_in_flight, server.config.max_in_flight)
        self._leftover = b""
        self.info: ExportInfo | None = None
        """The export as negotiated (transmission flags included)."""
        self._chunks: ChunkEncoder | None = None
        """None: simple replies only. Otherwise structured or extended chunks."""
        self._extended = False
        self._contexts: dict[int, str] = {}

    # -- life cycle ---------------------------------------------------------------------

    async def run(self, export: ServedExport | None = None) -> None:
        """Serve this connection until it closes. With ``export``, the handshake happened
        elsewhere (the kernel's netlink attach) and transmission on that export starts at once."""
        try:
            if export is not None:
                self.export, self.info = export, export.info
                await self._transmit()
            elif await self._negotiate():
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
        self.info = hs.export
        self._extended = hs.extended_headers
        if hs.extended_headers or hs.structured_replies:
            self._chunks = ChunkEncoder(extended=hs.extended_headers)
        self._contexts = hs.meta_contexts
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
        info = self.info
        assert info is not None
        ring = self.server.ring
        extended = self._extended
        meta_contexts = len(self._contexts)
        hsize = EXTENDED_REQUEST_SIZE if extended else REQUEST_SIZE
        decode = decode_extended_request if extended else decode_request
        payload_of = extended_payload_length if extended else payload_length
        buf = bytearray(RECV_SIZE)
        mv = memoryview(buf)
        end = len(self._leftover)
        buf[:end] = self._leftover
        pos = 0
        while True:
            while end - pos >= hsize:
                request = decode(mv[pos : pos + hsize])
                pos += hsize
                if request.command == Cmd.DISC:
                    log.info("%s: client sent NBD_CMD_DISC", self.peer)
                    ring.submit()
                    return
                plen = payload_of(request)
                if extended and plen > info.max_block:
                    # Spec: "A server SHOULD initiate hard disconnect if a client sets the
                    # NBD_CMD_FLAG_PAYLOAD_LEN flag and uses a length larger than" max payload.
                    raise ProtocolViolation(
                        f"payload of {plen} bytes is over the maximum payload {info.max_block}"
                    )
                try:
                    check_request(request, info, extended=extended, meta_contexts=meta_contexts)
                except RequestError as exc:
                    log.info("%s: refused: %s", self.peer, exc.message)
                    pos, end = await self._discard(mv, pos, end, plen)
                    if self._budget.would_block(0):
                        ring.submit()
                    await self._budget.acquire(0)
                    self._reply(
                        request.cookie,
                        0,
                        None,
                        0,
                        nbd_error=exc.nbd_errno,
                        request=request,
                        message=exc.message,
                    )
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
                        f"connection closed inside a request header ({end} of {hsize} bytes)"
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
        nbytes = lease.length

        self.export.backend.write(
            request.offset, lease, self._completion(request, nbytes), fua=request.fua
        )

    def _submit(self, request: Request, nbytes: int) -> None:
        assert self.export is not None
        backend = self.export.backend
        cookie = request.cookie
        command = request.command
        done = self._completion(request, nbytes)
        if command == Cmd.READ:
            lease = self.server.pool.acquire(request.length)
            if self._chunks is None:

                def read_done(err: int) -> None:
                    self._reply(cookie, err, lease, nbytes)

            else:

                def read_done(err: int) -> None:
                    self._structured_read_done(request, err, lease, nbytes)

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
                fast=bool(request.flags & CmdFlag.FAST_ZERO),
            )
        elif command == Cmd.CACHE:
            backend.cache(request.offset, request.length, done)
        elif command == Cmd.BLOCK_STATUS:
            self._block_status(request, nbytes)
        else:  # check_request lets only the commands above through
            self._reply(cookie, errno.EINVAL, None, nbytes)

    def _completion(self, request: Request, nbytes: int) -> Callable[[int], None]:
        cookie = request.cookie
        return lambda err: self._reply(cookie, err, None, nbytes, request=request)

    def _structured_read_done(
        self, request: Request, err: int, lease: Buffer, nbytes: int
    ) -> None:
        """Reply to a READ with OFFSET_DATA chunks for data and OFFSET_HOLE chunks for holes.

        The data is already in memory, so no error can arise while the chunks go out and the
        last one carries NBD_REPLY_FLAG_DONE. With NBD_CMD_FLAG_DF there is at most one content
        chunk: a range mixing data and holes goes as one OFFSET_DATA with the zeroes in it.
        """
        chunks = self._chunks
        assert chunks is not None and self.export is not None
        if err or self.closed:
            self._reply(request.cookie, err, lease, nbytes, request=request)
            return
        cookie = request.cookie
        start = request.offset
        length = request.length
        if length == 0:
            self._queue(chunks.none(cookie, start), lease, nbytes)
            return
        runs = self.export.backend.extents(start, length, MAX_READ_RUNS)
        covered = sum(n for n, _ in runs)
        if covered < length:
            runs.append((length - covered, False))
        if request.flags & _DF and len(runs) > 1:
            runs = [(length, False)]
        view = lease.view
        parts: list[bytes | memoryview] = []
        pos = 0
        last = len(runs) - 1
        for index, (n, hole) in enumerate(runs):
            if hole:
                parts.append(chunks.offset_hole(cookie, start, start + pos, n, done=index == last))
            else:
                parts.append(chunks.offset_data(cookie, start, start + pos, n, done=index == last))
                parts.append(view[pos : pos + n])
            pos += n
        self._queue(parts, lease, nbytes)

    def _block_status(self, request: Request, nbytes: int) -> None:
        """Answer NBD_CMD_BLOCK_STATUS for ``base:allocation`` from SEEK_DATA/SEEK_HOLE.

        Extents stay inside the request (and so inside the export); with REQ_ONE there is
        exactly one. A zero-length query has no extent to describe and gets EINVAL.
        """
        chunks = self._chunks
        assert chunks is not None and self.export is not None
        cookie = request.cookie
        if request.length == 0:
            self._reply(
                cookie,
                0,
                None,
                nbytes,
                nbd_error=NbdErrno.EINVAL,
                request=request,
                message="NBD_CMD_BLOCK_STATUS with length 0 has no extent to report",
            )
            return
        limit = 1 if request.flags & _REQ_ONE else MAX_STATUS_EXTENTS
        runs = self.export.backend.extents(request.offset, request.length, limit)
        extents = [(n, _HOLE_STATUS if hole else 0) for n, hole in runs]
        parts: list[bytes | memoryview] = []
        last = len(self._contexts) - 1
        for index, context_id in enumerate(self._contexts):
            parts.append(
                chunks.block_status(
                    cookie, request.offset, context_id, extents, done=index == last
                )
            )
        self._queue(parts, None, nbytes)

    def _failure_message(self, request: Request | None, err: int) -> str:
        if request is None:
            return os.strerror(err)
        try:
            name = f"NBD_CMD_{Cmd(request.command).name}"
        except ValueError:
            name = f"command {request.command}"
        return (
            f"{name} offset={request.offset} length={request.length} failed: "
            f"{os.strerror(err)} ({errno.errorcode.get(err, err)})"
        )

    # -- replies ------------------------------------------------------------------------

    def _reply(
        self,
        cookie: int,
        err: int,
        data: Buffer | None,
        nbytes: int,
        *,
        nbd_error: int | None = None,
        request: Request | None = None,
        message: str | None = None,
    ) -> None:
        """Queue the reply for ``cookie``; ``err`` is an errno from the engine.

        With structured replies or extended headers an error goes out as an ERROR chunk with
        ``message`` (or one made from ``request`` and ``err``) for a human to read.
        """
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
        chunks = self._chunks
        if chunks is None:
            self._replies.append((encode_simple_reply(cookie, nbd_error), data, nbytes))
        else:
            offset = 0 if request is None else request.offset
            if not nbd_error:
                # Structured replies MAY answer a payload-less success with a simple reply;
                # extended headers MUST NOT use one.
                head = (
                    chunks.none(cookie, offset)
                    if chunks.extended
                    else encode_simple_reply(cookie, 0)
                )
            else:
                if message is None:
                    message = self._failure_message(request, err)
                head = chunks.error(cookie, offset, nbd_error, message)
            self._replies.append((head, data, nbytes))
        self._have_replies.set()

    def _queue(self, head: _Head, data: Buffer | None, nbytes: int) -> None:
        """Queue a reply already encoded; ``data`` is released once it is sent."""
        if self.closed:
            if data is not None:
                data.release()
            return
        self._replies.append((head, data, nbytes))
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

    async def _send_replies(self, batch: list[tuple[_Head, Buffer | None, int]]) -> None:
        iov: list[bytes | memoryview] = []
        for header, data, _nbytes in batch:
            if type(header) is list:
                iov.extend(header)  # chunks whose data views point into ``data``
            else:
                iov.append(header)  # type: ignore[arg-type]
                if data is not None and data.length:  # an empty view would never be "sent"
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
