"""One client connection: handshake, then a reader that submits requests in arrival order and a
writer that sends replies as they complete, out of order.

This is the one place where errors become replies: a refused request (``RequestError``) or a
failed I/O (errno from the engine) becomes an error reply for that cookie and the connection goes
on; a ``ProtocolViolation`` or a vanished peer closes this connection only.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from nbd_uring.engine.buffers import Buffer
from nbd_uring.engine.lane import (
    SERVE_EOF,
    SERVE_IDLE,
    SERVE_PYTHON,
    SERVE_YIELD,
    LaneConnection,
)
from nbd_uring.engine.ring import Completion
from nbd_uring.protocol import (
    EXTENDED_REQUEST_SIZE,
    NBD_REQUEST_MAGIC,
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
    TransmissionFlag,
    check_request,
    decode_extended_request,
    decode_request,
    encode_data_chunk,
    encode_simple_reply,
    extended_payload_length,
    nbd_errno_for,
    payload_length,
    unpack_request_from,
)
from nbd_uring.server.tls import TlsError, TlsSocket, TlsTransport

if TYPE_CHECKING:
    from nbd_uring.server.metrics import Stats
    from nbd_uring.server.serve import ServedExport, Server

log = logging.getLogger("nbd_uring.connection")

RECV_SIZE = 256 * 1024
HANDSHAKE_RECV = 64 * 1024
# Past this a WRITE's payload is not worth draining: the peer is broken or hostile.
MAX_DISCARD = 256 * 1024 * 1024
IOV_MAX = 1024
# Receives in a row that found data at once before the reader yields to Trio's scheduler.
EAGER_RECVS = 8
# Runs of one structured READ reply; past this the rest of the range is sent as one data chunk.
MAX_READ_RUNS = 4096
# Descriptors per BLOCK_STATUS reply (the spec's SHOULD is 2^20; fewer bounds the lseek calls
# made on the event loop, and clients ask again from where the reply stopped).
MAX_STATUS_EXTENTS = 16384
_HOLE_STATUS = int(AllocationState.HOLE | AllocationState.ZERO)
_DF = int(CmdFlag.DF)
_REQ_ONE = int(CmdFlag.REQ_ONE)
# A READ shorter than this is answered with one OFFSET_DATA chunk without asking the file
# system where its holes are (two lseek calls): zeroes sent as data are still correct.
READ_HOLE_MIN = 64 * 1024
_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_READ_ONLY = int(TransmissionFlag.READ_ONLY)

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
        self._changed: trio.Event | None = None
        """Set on the next release; made only when someone waits."""
        self.lane: LaneConnection | None = None
        """The connection's lane, whose requests count too (it keeps its own tally)."""

    def would_block(self, nbytes: int) -> bool:
        requests, used = self.requests, self.bytes
        lane = self.lane
        if lane is not None:
            tally = lane.tally
            requests += tally.requests
            used += tally.bytes
        return requests >= self.max_requests or (used > 0 and used + nbytes > self.max_bytes)

    @property
    def outstanding(self) -> int:
        """Requests received and not yet answered, the lane's included."""
        lane = self.lane
        return self.requests if lane is None else self.requests + int(lane.tally.requests)

    def lane_released(self) -> None:
        """The lane sent replies: wake whoever waits for room."""
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    def take(self, nbytes: int) -> None:
        """Acquire without waiting; only after :meth:`would_block` said False."""
        self.bytes += nbytes
        self.requests += 1

    async def _wait(self) -> None:
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

    async def acquire(self, nbytes: int) -> None:
        while self.would_block(nbytes):
            await self._wait()
        self.bytes += nbytes
        self.requests += 1

    def release(self, nbytes: int) -> None:
        self.release_many(nbytes, 1)

    def release_many(self, nbytes: int, requests: int) -> None:
        self.bytes -= nbytes
        self.requests -= requests
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    async def drained(self) -> None:
        while self.outstanding:
            await self._wait()


def _command_name(command: int) -> str:
    try:
        return f"NBD_CMD_{Cmd(command).name}"
    except ValueError:
        return f"command {command}"


def _refusal(request: Request, exc: RequestError) -> str:
    """The log line of a request refused before it ran: which one, the errno and why."""
    return (
        f"{_command_name(request.command)} cookie={request.cookie:#x} offset={request.offset} "
        f"length={request.length} refused with {NbdErrno(exc.nbd_errno).name}: {exc.message}"
    )


class Connection:
    def __init__(self, server: Server, sock: trio.socket.SocketType, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.export: ServedExport | None = None
        self.closed = False
        self._replies: list[tuple[_Head, Buffer | None, int]] = []
        self._have_replies = trio.Event()
        self._unsent: list[bytes | memoryview] = []
        """Reply bytes taken from ``_replies`` that the socket has not accepted yet."""
        self._sending: list[tuple[Buffer | None, int]] = []
        """Buffers and budget of the replies in ``_unsent``, released once it is empty."""
        self._quiet = False
        """The reader is between a receive and its flush: queued replies need no wake-up of
        the writer, the reader sends them itself before it next waits."""
        self._raw: socket.socket | TlsTransport | None = None
        """The connection's socket as a plain non-blocking socket (or its TLS transport), for
        sends and receives that need no Trio checkpoint when they succeed at once."""
        self._io: trio.socket.SocketType | TlsSocket = sock
        """What negotiation and the slow paths await: the Trio socket, or TLS over it."""
        self._tls: TlsTransport | None = None
        self._unflushed: Callable[[], bool] | None = None
        """With TLS: pushes ciphertext queued in the transport, True while some is left."""
        self.tls_established = False
        self.tls_name: str | None = None
        """The verified client certificate's subject CN, for per-export TLS name lists."""
        self._budget = _Budget(server.config.max_bytes_in_flight, server.config.max_in_flight)
        self._leftover = b""
        self.info: ExportInfo | None = None
        """The export as negotiated (transmission flags included)."""
        self._chunks: ChunkEncoder | None = None
        """None: simple replies only. Otherwise structured or extended chunks."""
        self._extended = False
        self._contexts: dict[int, str] = {}
        self._stats: Stats | None = None
        """The export's counters when --metrics is on."""
        self.draining: str | None = None
        """Why this connection is being drained (server shutdown, export removed by a reload):
        new requests get ESHUTDOWN, and once those in flight are answered it closes."""
        self._drain = trio.Event()
        self._lane: LaneConnection | None = None
        """Plain READs and WRITEs answered in C (engine.lane), or None."""
        self._fd = sock.fileno()

    # -- life cycle ---------------------------------------------------------------------

    async def run(self, export: ServedExport | None = None) -> None:
        """Serve this connection until it closes. With ``export``, the handshake happened
        elsewhere (the kernel's netlink attach) and transmission on that export starts at once."""
        try:
            if export is not None:
                self.export, self.info = export, export.info
                self.peer = f"{self.peer} export {export.info.name!r}"
                self._stats = self.server.export_chosen(export, self)
                await self._transmit()
            elif await self._negotiate():
                await self._transmit()
        except ProtocolViolation as exc:
            log.warning("%s: closing connection: %s", self.peer, exc.message)
        except TlsError as exc:
            log.warning("%s: closing connection: TLS handshake failed: %s", self.peer, exc)
        except ClientGone as exc:
            log.info("%s: client went away%s", self.peer, f" ({exc})" if str(exc) else "")
        finally:
            self.closed = True
            self._drop_pending_replies()
            if self._lane is not None:
                self._lane.close()
                self._budget.lane = None
            if self._tls is not None:
                self._tls.close()
            self.sock.close()
            if self.export is not None:
                self.server.export_released(self.export, self)
            log.info("%s: connection closed", self.peer)

    async def _recv(self, nbytes: int) -> bytes:
        try:
            data = await self._io.recv(nbytes)
        except _PEER_GONE as exc:
            raise ClientGone(str(exc)) from None
        return data

    async def _send_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                sent = await self._io.send(view)
                view = view[sent:]
        except _PEER_GONE as exc:
            raise ClientGone(str(exc)) from None

    # -- handshake ----------------------------------------------------------------------

    async def _negotiate(self) -> bool:
        server = self.server
        try:
            address: str | None = str(self.sock.getpeername()[0])
        except (OSError, IndexError, TypeError):
            address = None
        if self.sock.family == socket.AF_UNIX:
            address = None
        hs = ServerHandshake(
            *server.policy_for(address, self),
            tls_available=server.tls_context is not None,
            tls_required=server.tls_required,
        )
        with trio.move_on_after(server.config.handshake_timeout_s) as scope:
            while True:
                for refusal in hs.take_refusals():
                    log.info("%s: %s", self.peer, refusal)
                out = hs.data_to_send()
                if out:
                    await self._send_all(out)
                if hs.state is HandshakeState.TRANSMISSION:
                    break
                if hs.state is HandshakeState.CLOSED:
                    log.info("%s: negotiation ended: %s", self.peer, hs.close_reason)
                    return False
                if hs.state is HandshakeState.STARTTLS:
                    await self._start_tls(hs.unused_data)
                    hs.tls_started()
                    continue
                data = await self._recv(HANDSHAKE_RECV)
                if not data:
                    raise ClientGone("during negotiation")
                if server.draining:
                    hs.begin_shutdown()
                hs.receive_data(data)
        if scope.cancelled_caught:
            log.warning(
                "%s: closing connection: handshake not finished within %.1f s",
                self.peer,
                server.config.handshake_timeout_s,
            )
            return False
        assert hs.export is not None
        export = server.resolve(hs.export)
        if export is None:
            log.warning("%s: closing: export %r changed meanwhile", self.peer, hs.export.name)
            return False
        self.export = export
        self._stats = server.export_chosen(export, self)
        self.info = hs.export
        self._extended = hs.extended_headers
        if hs.extended_headers or hs.structured_replies:
            self._chunks = ChunkEncoder(extended=hs.extended_headers)
        self._contexts = hs.meta_contexts
        self._leftover = hs.unused_data
        log.info("%s: export %r chosen, transmission begins", self.peer, hs.export.name)
        self.peer = f"{self.peer} export {hs.export.name!r}"  # every later line names it
        return True

    async def _start_tls(self, early: bytes) -> None:
        """The TLS handshake after STARTTLS's ACK went out; from here on all I/O goes through
        the TLS transport."""
        if early:
            raise ProtocolViolation(
                f"client sent {len(early)} bytes after NBD_OPT_STARTTLS without waiting for "
                "the TLS handshake"
            )
        context = self.server.tls_context
        assert context is not None
        self._tls = TlsTransport(context, self.sock.fileno())
        try:
            await self._tls.handshake()
        except OSError as exc:
            raise ClientGone(f"during the TLS handshake: {exc}") from None
        self._io = TlsSocket(self._tls)
        self._unflushed = self._tls.unflushed
        self.tls_name = self._tls.peer_common_name
        self.tls_established = True
        log.info("%s: TLS established (%s)", self.peer, self._tls.describe())

    # -- transmission -------------------------------------------------------------------

    async def _transmit(self) -> None:
        if self._tls is not None:
            self._raw = self._tls
            await self._transmit_phase()
            return
        # Same descriptor, no dup: detached below so that only self.sock ever closes it.
        self._raw = socket.socket(fileno=self.sock.fileno())
        self._lane = self._open_lane()
        self._budget.lane = self._lane
        try:
            await self._transmit_phase()
        finally:
            self._raw.detach()

    async def _transmit_phase(self) -> None:
        failure: ProtocolViolation | ClientGone | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer_task, nursery.cancel_scope)
            nursery.start_soon(self._shutdown_task, nursery.cancel_scope)
            try:
                await self._reader_task()
                # NBD_CMD_DISC or end of stream: finish everything outstanding, then close.
                await self._budget.drained()
            except (ProtocolViolation, ClientGone) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure

    def _open_lane(self) -> LaneConnection | None:
        """The lane for this connection, where it applies: compact headers, no
        metrics, a plain export (the lane exists only for those). TLS never gets here."""
        assert self.export is not None and self.info is not None
        lane = self.export.backend.lane
        if lane is None or self._extended or self._stats is not None:
            return None
        info = self.info
        config = self.server.config
        return lane.connect(
            self,
            size=info.size,
            max_block=info.max_block,
            min_block=info.min_block,
            hole_check_from=READ_HOLE_MIN if self._chunks is not None else 0,
            max_bytes=config.max_bytes_in_flight,
            max_requests=config.max_in_flight,
        )

    def lane_replies(self) -> None:
        if not self._quiet:
            self._have_replies.set()

    def lane_failed(self, command: int, cookie: int, offset: int, length: int, err: int) -> None:
        self._budget.take(0)
        self._reply(cookie, err, None, 0, request=Request(cookie, command, 0, offset, length))

    def begin_drain(self, reason: str) -> None:
        """Server shutdown, or this connection's export removed by a reload."""
        if self.draining is None:
            self.draining = reason
            self._drain.set()

    async def _shutdown_task(self, scope: trio.CancelScope) -> None:
        """Once draining: new requests get ESHUTDOWN (the reader sees ``draining``); once
        every request received so far is answered, the connection closes."""
        await self._drain.wait()
        await self._budget.drained()
        log.info("%s: closing: %s", self.peer, self.draining)
        scope.cancel()

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
        budget = self._budget
        server = self.server
        idle_timeout = server.config.idle_timeout_s
        pool = server.pool
        # Fast path: compact headers, READ or WRITE without flags, in bounds and aligned; it
        # accepts exactly what check_request would, anything else takes the general path.
        fast = not extended
        unpack_from = unpack_request_from
        size = info.size
        max_block = info.max_block
        align = info.min_block - 1
        writable = not int(info.flags) & _READ_ONLY
        raw = self._raw
        assert raw is not None
        eager = 0
        poll_ns = server.config.poll_us * 1000
        # Anonymous memory costs RSS only where touched: an idle connection holds one page of
        # it, not 256 KiB (a bytearray is zeroed, so touched, at once).
        buf = mmap.mmap(-1, RECV_SIZE)
        mv = memoryview(buf)
        lane = self._lane
        if lane is not None:
            lane.attach(buf)
        end = len(self._leftover)
        buf[:end] = self._leftover
        pos = 0
        self._quiet = True
        while True:
            while end - pos >= hsize:
                if lane is not None and buf[pos + 7] < 2 and not self.draining:
                    # A READ or WRITE (by the command's low byte): maybe the lane's.
                    pos = lane.feed(pos, end, budget.bytes, budget.requests)
                    if end - pos < hsize:
                        break
                if fast:
                    magic, flags, command, cookie, offset, length = unpack_from(buf, pos)
                    if (
                        magic == NBD_REQUEST_MAGIC
                        and not flags
                        and not self.draining
                        and 0 < length <= max_block
                        and offset + length <= size
                        and not (offset | length) & align
                    ):
                        if command == _READ:
                            pos += hsize
                            if budget.would_block(length):
                                ring.submit()
                                self._unquiet()
                                await budget.acquire(length)
                                self._quiet = True
                            else:
                                budget.take(length)
                            self._fast_read(cookie, offset, length)
                            continue
                        if command == _WRITE and writable:
                            pos += hsize
                            have = min(end - pos, length)
                            if have < length or budget.would_block(length):
                                ring.submit()  # about to wait: prepared SQEs go now
                                self._unquiet()
                                await budget.acquire(length)
                            else:
                                budget.take(length)
                            lease = pool.acquire(length)
                            lease.view[:have] = mv[pos : pos + have]
                            pos += have
                            if have < length:
                                await self._recv_exactly(lease.view[have:])
                            self._quiet = True
                            self._fast_write(cookie, offset, lease)
                            continue
                request = decode(mv[pos : pos + hsize])
                pos += hsize
                if request.command == Cmd.DISC:
                    log.info("%s: client sent NBD_CMD_DISC", self.peer)
                    ring.submit()
                    self._unquiet()
                    return
                plen = payload_of(request)
                if extended and plen > info.max_block:
                    # Spec: "A server SHOULD initiate hard disconnect if a client sets the
                    # NBD_CMD_FLAG_PAYLOAD_LEN flag and uses a length larger than" max payload.
                    raise ProtocolViolation(
                        f"payload of {plen} bytes is over the maximum payload {info.max_block}"
                    )
                try:
                    if self.draining:
                        raise RequestError(NbdErrno.ESHUTDOWN, self.draining)
                    check_request(request, info, extended=extended, meta_contexts=meta_contexts)
                except RequestError as exc:
                    log.info("%s: %s", self.peer, _refusal(request, exc))
                    ring.submit()
                    self._unquiet()
                    pos, end = await self._discard(mv, pos, end, plen)
                    await self._budget.acquire(0)
                    self._quiet = True
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
                    have = min(end - pos, plen)
                    if have < plen or self._budget.would_block(plen):
                        ring.submit()  # about to wait: what is prepared goes to the kernel now
                        self._unquiet()
                    await self._budget.acquire(plen)
                    lease = self.server.pool.acquire(plen)
                    lease.view[:have] = mv[pos : pos + have]
                    pos += have
                    if have < plen:
                        await self._recv_exactly(lease.view[have:])
                    self._quiet = True
                    self._submit_write(request, lease)
                else:
                    nbytes = request.length if request.command == Cmd.READ else 0
                    if self._budget.would_block(nbytes):
                        ring.submit()
                        self._unquiet()
                    await self._budget.acquire(nbytes)
                    self._quiet = True
                    self._submit(request, nbytes)
            ring.submit()
            self._unquiet()  # replies that completed inline go out in one sendmsg, from here
            if pos:
                buf[: end - pos] = mv[pos:end]
                end -= pos
                pos = 0
            # A receive that succeeds at once costs no trip through Trio's scheduler; every
            # few of those the reader yields anyway, so a client that never lets the socket
            # run dry cannot starve the other tasks. With nothing of Python's in flight, the
            # lane's loop in C receives instead, for as long as every request is the lane's
            # (polling first if this is the only client).
            while True:
                try:
                    if lane is not None and not budget.outstanding and not self.draining:
                        lone = poll_ns and server.connections == 1
                        status, end = lane.serve(self._fd, end, poll_ns if lone else 0)
                        if status == SERVE_PYTHON or status == SERVE_YIELD:
                            n = -2 if status == SERVE_YIELD else -1
                            break
                        if status == SERVE_EOF:
                            n = 0
                            break
                        if status != SERVE_IDLE:
                            raise ClientGone(os.strerror(-status))
                        raise BlockingIOError  # nothing more for now: wait for the socket
                    n = raw.recv_into(mv[end:])
                    break
                except BlockingIOError:
                    eager = 0
                    if lane is None and poll_ns and not budget.outstanding:
                        if server.connections == 1:
                            n = _poll_recv(raw, mv[end:], poll_ns)
                            if n >= 0:
                                break
                    if idle_timeout is None or budget.outstanding or end:
                        await trio.lowlevel.wait_readable(raw)
                        continue
                    with trio.move_on_after(idle_timeout):
                        await trio.lowlevel.wait_readable(raw)
                        continue
                    log.info(
                        "%s: closing: no request for %.0f s (idle timeout)", self.peer, idle_timeout
                    )
                    return
                except _PEER_GONE as exc:
                    raise ClientGone(str(exc)) from None
            eager += 1
            if eager >= EAGER_RECVS or n == -2:
                eager = 0
                await trio.lowlevel.checkpoint()
            if n < 0:  # the lane served in C; what it left is Python's
                self._quiet = True
                continue
            if n == 0:
                if end:
                    raise ProtocolViolation(
                        f"connection closed inside a request header ({end} of {hsize} bytes)"
                    )
                log.info("%s: client closed the connection without NBD_CMD_DISC", self.peer)
                return
            end += n
            self._quiet = True

    async def _recv_exactly(self, view: memoryview) -> None:
        """Receive a WRITE payload straight into its buffer. Receives that find data cost no
        trip through Trio's scheduler (a 1 MiB payload arrives in dozens of them); every few
        the reader yields anyway, as in its main loop."""
        raw = self._raw
        assert raw is not None
        eager = 0
        while view:
            try:
                n = raw.recv_into(view)
            except BlockingIOError:
                eager = 0
                await trio.lowlevel.wait_readable(raw)
                continue
            except _PEER_GONE as exc:
                raise ClientGone(str(exc)) from None
            if n == 0:
                raise ClientGone(f"inside a write payload, {len(view)} bytes short")
            view = view[n:]
            eager += 1
            if eager >= EAGER_RECVS:
                eager = 0
                await trio.lowlevel.checkpoint()

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
                n = await self._io.recv_into(mv[: min(nbytes, len(mv))])
            except _PEER_GONE as exc:
                raise ClientGone(str(exc)) from None
            if n == 0:
                raise ClientGone(f"inside a refused write payload, {nbytes} bytes short")
            nbytes -= n
        return pos, end

    # -- submission ---------------------------------------------------------------------

    def _fast_read(self, cookie: int, offset: int, length: int) -> None:
        """A READ the fast path accepted (compact headers, no flags, length > 0)."""
        assert self.export is not None
        lease = self.server.pool.acquire(length)
        structured = self._chunks is not None

        def read_done(err: int) -> None:
            if err or self.closed or (structured and length >= READ_HOLE_MIN):
                request = Request(cookie, _READ, 0, offset, length)
                if structured:
                    self._structured_read_done(request, err, lease, length)
                else:
                    self._reply(cookie, err, lease, length, request=request)
                return
            head = (
                encode_data_chunk(cookie, offset, length)
                if structured
                else encode_simple_reply(cookie)
            )
            self._replies.append((head, lease, length))
            if not self._quiet:
                self._have_replies.set()

        self.export.backend.read(
            offset, lease.view, self._tracked(_READ, length, read_done), lease.ptr
        )

    def _fast_write(self, cookie: int, offset: int, lease: Buffer) -> None:
        """A WRITE the fast path accepted (compact headers, no flags)."""
        assert self.export is not None
        length = lease.length

        def write_done(err: int) -> None:
            if err or self.closed:
                request = Request(cookie, _WRITE, 0, offset, length)
                self._reply(cookie, err, None, length, request=request)
                return
            # Compact headers: a simple reply, which structured replies allow for a success
            # without payload.
            self._replies.append((encode_simple_reply(cookie), None, length))
            if not self._quiet:
                self._have_replies.set()

        self.export.backend.write(offset, lease, self._tracked(_WRITE, length, write_done))

    def _submit_write(self, request: Request, lease: Buffer) -> None:
        assert self.export is not None
        nbytes = lease.length

        self.export.backend.write(
            request.offset,
            lease,
            self._tracked(_WRITE, nbytes, self._completion(request, nbytes)),
            fua=request.fua,
        )

    def _submit(self, request: Request, nbytes: int) -> None:
        assert self.export is not None
        backend = self.export.backend
        cookie = request.cookie
        command = request.command
        if command == Cmd.READ:
            lease = self.server.pool.acquire(request.length)
            if self._chunks is None:

                def read_done(err: int) -> None:
                    self._reply(cookie, err, lease, nbytes)

            else:

                def read_done(err: int) -> None:
                    self._structured_read_done(request, err, lease, nbytes)

            backend.read(request.offset, lease.view, self._tracked(_READ, nbytes, read_done))
            return
        done = self._tracked(command, request.length, self._completion(request, nbytes))
        if command == Cmd.FLUSH:
            backend.flush(self._counted_flush(done))
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

    def _tracked(self, command: int, nbytes: int, done: Completion) -> Completion:
        """With --metrics: count the request and time it to its completion."""
        stats = self._stats
        if stats is None:
            return done
        stats.started()
        start = time.monotonic()

        def finished(err: int) -> None:
            stats.finished(command, nbytes, err, time.monotonic() - start)
            done(err)

        return finished

    def _counted_flush(self, done: Completion) -> Completion:
        """With --metrics: a FLUSH counts as waiting until earlier writes and its fdatasync
        are done."""
        stats = self._stats
        if stats is None:
            return done
        stats.flushes_waiting += 1

        def finished(err: int) -> None:
            stats.flushes_waiting -= 1
            done(err)

        return finished

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
        if length < READ_HOLE_MIN:
            runs = [(length, False)]
        else:
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
        what = (
            "request"
            if request is None
            else f"{_command_name(request.command)} offset={request.offset} "
            f"length={request.length}"
        )
        return f"{what} failed: {os.strerror(err)} ({errno.errorcode.get(err, err)})"

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
                reason = self._failure_message(request, err)
                log.info("%s: request cookie=%#x: %s", self.peer, cookie, reason)
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
        if not self._quiet:
            self._have_replies.set()

    def _queue(self, head: _Head, data: Buffer | None, nbytes: int) -> None:
        """Queue a reply already encoded; ``data`` is released once it is sent."""
        if self.closed:
            if data is not None:
                data.release()
            return
        self._replies.append((head, data, nbytes))
        if not self._quiet:
            self._have_replies.set()

    def _unquiet(self) -> None:
        """End a quiet stretch of the reader: send what it queued; what the socket does not
        take now is left to the writer task."""
        self._quiet = False
        if (self._replies or self._unsent or self._lane is not None) and not self._flush():
            self._have_replies.set()

    def _flush(self) -> bool:
        """Send queued replies, as many per sendmsg as IOV_MAX allows, without waiting;
        True once everything is sent (and its buffers and budget released).

        The lane queues its replies apart; a reply partly sent, from either queue, is
        finished before the other queue sends anything."""
        lane = self._lane
        if lane is not None and lane.tally.partial and not self._lane_send(lane):
            return False
        iov = self._unsent
        if self._replies:
            batch, self._replies = self._replies, []
            sending = self._sending
            for header, data, nbytes in batch:
                if type(header) is list:
                    iov.extend(header)  # chunks whose data views point into ``data``
                else:
                    iov.append(header)  # type: ignore[arg-type]
                    if data is not None and data.length:  # an empty view would never be "sent"
                        iov.append(data.view)
                sending.append((data, nbytes))
        raw = self._raw
        assert raw is not None
        while iov:
            chunk = iov[:IOV_MAX] if len(iov) > IOV_MAX else iov
            try:
                sent = raw.sendmsg(chunk)
            except BlockingIOError:
                return False
            except _PEER_GONE as exc:
                raise ClientGone(str(exc)) from None
            if sent == sum(map(len, chunk)):
                del iov[: len(chunk)]
                continue
            done = 0
            while sent:
                first = len(iov[done])
                if sent >= first:
                    sent -= first
                    done += 1
                else:
                    iov[done] = memoryview(iov[done])[sent:]
                    sent = 0
            del iov[:done]
        if self._unflushed is not None and self._unflushed():
            return False
        sending, self._sending = self._sending, []
        total = 0
        for data, nbytes in sending:
            if data is not None:
                data.release()
            total += nbytes
        self._budget.release_many(total, len(sending))
        return lane is None or self._lane_send(lane)

    def _lane_send(self, lane: LaneConnection) -> bool:
        rc = lane.send(self._fd)
        self._budget.lane_released()
        if rc < 0:
            raise ClientGone(os.strerror(-rc))
        return rc == 1

    async def _writer_task(self, scope: trio.CancelScope) -> None:
        raw = self._raw
        assert raw is not None
        try:
            while True:
                await self._have_replies.wait()
                self._have_replies = trio.Event()
                while not self._flush():
                    await trio.lowlevel.wait_writable(raw)
        except ClientGone as exc:
            log.info("%s: client went away while sending replies (%s)", self.peer, exc)
            self.closed = True
            scope.cancel()

    def _drop_pending_replies(self) -> None:
        self._unsent = []  # views into the buffers released below
        for _header, data, _nbytes in self._replies:
            if data is not None:
                data.release()
        self._replies = []
        for data, _nbytes in self._sending:
            if data is not None:
                data.release()
        self._sending = []


def _poll_recv(raw: socket.socket | TlsTransport, view: memoryview, poll_ns: int) -> int:
    """Receive what arrives within ``poll_ns``, or -1. Only for a lone client with nothing
    in flight: its next request usually comes sooner than a sleep in epoll and a wake-up
    take (tens of microseconds on a virtual machine), and no other connection waits."""
    deadline = time.perf_counter_ns() + poll_ns
    while time.perf_counter_ns() < deadline:
        try:
            return raw.recv_into(view)
        except BlockingIOError:
            pass
        except _PEER_GONE as exc:
            raise ClientGone(str(exc)) from None
    return -1


def set_nodelay(sock: trio.socket.SocketType) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
