"""The lane: plain reads and writes handled whole in C, from the request's bytes to the reply's.

Most requests of a busy client are reads and writes with nothing unusual about them; for
those the Python path (parse, admit, buffer, SQE, completion, reply header, send) is the
server's main cost. The lane (``_csrc/lane.c``) takes them straight from a connection's
receive buffer (a write with its whole payload there), does the I/O through the ring in its
own buffers and queues the replies, which :meth:`LaneConnection.send` writes in one
``sendmsg``. Python hears of a lane request only when it fails.

The engine's rules hold. Ordering: the lane takes a read only while Python has no write,
trim or zeroing admitted and no lane write in flight overlaps it, and a write only while
Python has nothing admitted and no lane op in flight overlaps it (anything else goes to
Python); a request Python admits waits for the lane ops in flight it conflicts with
(:meth:`LaneExport.wait`), which :class:`~nbd_uring.engine.ordering.OverlapTracker` asks for.
Durability: the lane takes writes only on exports whose durability is ``flush``, and a FLUSH
waits for the lane writes received before it (:meth:`LaneExport.flush_wait`). Budget: every
byte a lane request holds counts against its connection's budget until its reply is sent.

The lane knows the request and reply formats it handles (compact headers: a simple reply, or
one OFFSET_DATA chunk for a read range without holes); everything else stays with the server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from nbd_uring._uring import ffi, lib

if TYPE_CHECKING:
    from nbd_uring.engine.ring import Ring

log = logging.getLogger(__name__)

_EVENTS = 64
_REPLIES: int = lib.NBDU_LANE_REPLIES
_FAILED: int = lib.NBDU_LANE_FAILED
_READY: int = lib.NBDU_LANE_READY
SERVE_IDLE: int = lib.NBDU_SERVE_IDLE
SERVE_PYTHON: int = lib.NBDU_SERVE_PYTHON
SERVE_EOF: int = lib.NBDU_SERVE_EOF
SERVE_YIELD: int = lib.NBDU_SERVE_YIELD
SERVE_ROUNDS = 32
"""Receives :meth:`LaneConnection.serve` makes before it lets the event loop run."""


class LaneClient(Protocol):
    """What a connection using the lane is told."""

    def lane_replies(self) -> None:
        """Replies are queued: call :meth:`LaneConnection.send` soon."""

    def lane_failed(self, command: int, cookie: int, offset: int, length: int, err: int) -> None:
        """A lane read or write (``command``, NBD's number) failed with ``err``; the
        connection answers it (the lane holds no budget for it any more)."""


class Lane:
    """One per ring. Idle buffers are kept up to ``max_cached`` bytes."""

    def __init__(self, ring: Ring, sqes_in_flight: Any, max_cached: int = 32 * 1024 * 1024) -> None:
        lane = lib.nbdu_lane_new(ring._ring, sqes_in_flight, max_cached)
        if lane == ffi.NULL:
            raise MemoryError("lane")
        self._lane: Any = lane
        self._clients: dict[int, LaneClient] = {}
        self._waiters: dict[int, Callable[[], None]] = {}
        self._exports: dict[int, LaneExport] = {}
        self._next_token = 1
        self._events = ffi.new("struct nbdu_lane_event[]", _EVENTS)
        self.closed = False

    @property
    def in_flight(self) -> int:
        return int(lib.nbdu_lane_inflight(self._lane))

    def take_prepared(self) -> int:
        """SQEs the lane prepared since the last call (the ring submits them)."""
        return int(lib.nbdu_lane_take_prepared(self._lane))

    def has_events(self) -> bool:
        return bool(lib.nbdu_lane_pending_events(self._lane))

    def export(self, fd: int, limit: int, *, writable: bool) -> LaneExport:
        """Register an open file; lane I/O must end at or before ``limit``, and takes writes
        only if ``writable``."""
        handle = lib.nbdu_lane_export_new(self._lane, fd, limit, 1 if writable else 0)
        if handle == ffi.NULL:
            raise MemoryError("lane export")
        exp = LaneExport(self, handle, fd)
        self._exports[id(exp)] = exp
        return exp

    def uses_fd(self, fd: int) -> bool:
        return any(e.fd == fd and e.in_flight for e in self._exports.values())

    def dispatch(self) -> None:
        """Tell connections and waiters what the last reap did."""
        lane, events = self._lane, self._events
        while True:
            n = lib.nbdu_lane_events(lane, events, _EVENTS)
            for i in range(n):
                ev = events[i]
                kind = ev.kind
                try:
                    if kind == _REPLIES:
                        client = self._clients.get(ev.token)
                        if client is not None:
                            client.lane_replies()
                    elif kind == _FAILED:
                        client = self._clients.get(ev.token)
                        if client is not None:
                            client.lane_failed(
                                ev.command, ev.cookie, ev.offset, ev.length, ev.err
                            )
                    else:
                        self._waiters.pop(ev.token)()
                except Exception:
                    log.exception("lane event handler failed")
            if n < _EVENTS:
                return

    def close(self) -> None:
        """The ring is closing: free the lane once its last connection and export are gone."""
        if self._lane is not None:
            lib.nbdu_lane_detach(self._lane)
        self.closed = True
        self._maybe_free()

    def _token(self) -> int:
        token = self._next_token
        self._next_token = token + 1
        return token

    def _maybe_free(self) -> None:
        if self.closed and not self._exports and not self._clients and self._lane is not None:
            lib.nbdu_lane_free(self._lane)
            self._lane = None


class LaneExport:
    """An export's lane side: its file, reads in flight, writes waiting for them."""

    def __init__(self, lane: Lane, handle: Any, fd: int) -> None:
        self._lane = lane
        self._handle: Any = handle
        self.fd = fd
        self.state: Any = lib.nbdu_lane_export_state(handle)
        """Shared with C, read and written without a call: ``inflight``, the lane's reads and
        writes in flight; ``exclusive``, set while Python has a write, trim or zeroing admitted
        (the lane then takes no read of this export); ``python_active``, how many requests
        Python has admitted (the lane takes writes only while there are none)."""

    @property
    def in_flight(self) -> int:
        return 0 if self._handle is None else int(self.state.inflight)

    def wait(self, start: int, end: int, exclusive: bool, ready: Callable[[], None]) -> bool:
        """If lane ops in flight conflict with a request for ``[start, end)`` (overlapping
        ones; only writes unless ``exclusive``): True, and ``ready`` is called once the last
        of them has completed. Call with ``state`` already telling the lane about it."""
        token = self._lane._token()
        rc = lib.nbdu_lane_export_wait(self._handle, start, end, 1 if exclusive else 0, token)
        return self._waiting(rc, token, ready)

    def flush_wait(self, ready: Callable[[], None]) -> bool:
        """If lane writes are in flight: True, and ``ready`` is called once those have
        completed (not the ones that come later)."""
        token = self._lane._token()
        return self._waiting(lib.nbdu_lane_export_flush_wait(self._handle, token), token, ready)

    def _waiting(self, rc: int, token: int, ready: Callable[[], None]) -> bool:
        """``rc``: how many lane ops the waiter registered under ``token`` counts."""
        if rc < 0:
            raise MemoryError("lane waiter")
        if rc == 0:
            return False
        self._lane._waiters[token] = ready
        return True

    def connect(
        self,
        client: LaneClient,
        *,
        size: int,
        max_block: int,
        min_block: int,
        hole_check_from: int,
        max_bytes: int,
        max_requests: int,
    ) -> LaneConnection:
        """A connection in transmission on this export. ``hole_check_from``: 0 for simple
        replies; else replies are one OFFSET_DATA chunk, and a read this long or longer is
        taken only if the file has no hole in its range (one ``lseek``), as Python would send
        OFFSET_HOLE chunks for holes."""
        lane = self._lane
        token = lane._token()
        handle = lib.nbdu_lane_conn_new(
            lane._lane,
            self._handle,
            token,
            size,
            max_block,
            min_block - 1,
            hole_check_from,
            max_bytes,
            max_requests,
        )
        if handle == ffi.NULL:
            raise MemoryError("lane connection")
        lane._clients[token] = client
        return LaneConnection(lane, handle, token)

    def close(self) -> None:
        if self._handle is not None:
            lib.nbdu_lane_export_close(self._handle)
            self._handle = None
            self.state = ffi.new("struct nbdu_lane_export_state *")
            self._lane._exports.pop(id(self), None)
            self._lane._maybe_free()


class LaneConnection:
    """One connection's lane: :meth:`feed` it received bytes, :meth:`send` its replies."""

    __slots__ = ("_cap", "_data", "_handle", "_lane", "_pos", "_token", "tally")

    def __init__(self, lane: Lane, handle: Any, token: int) -> None:
        self._lane = lane
        self._handle: Any = handle
        self._token = token
        self._pos = ffi.new("size_t *")
        self._data: Any = None
        self._cap = 0
        self.tally: Any = lib.nbdu_lane_conn_tally(handle)
        """Shared with C, read without a call: ``bytes`` and ``requests`` the lane's requests
        hold of the budget until their replies are sent, ``partial`` while one is half sent."""

    def attach(self, receive_buffer: Any) -> None:
        """The connection's receive buffer (writable, fixed address: an mmap), for :meth:`feed`."""
        self._data = ffi.from_buffer(receive_buffer, require_writable=True)
        self._cap = len(self._data)

    def serve(self, fd: int, end: int, poll_ns: int) -> tuple[int, int]:
        """The reader's loop in C, for a lone client with nothing else in flight: take its
        requests, read, reply, and poll ``fd`` up to ``poll_ns`` for the next ones, until
        something needs Python. The receive buffer holds ``[0:end)`` unread; returns
        ``(SERVE_IDLE | SERVE_PYTHON | SERVE_YIELD | SERVE_EOF or -errno, end)``, data again
        from 0; SERVE_YIELD: it made SERVE_ROUNDS receives, let the event loop run."""
        pos = self._pos
        pos[0] = end
        rc = lib.nbdu_lane_serve(
            self._handle, fd, self._data, self._cap, pos, poll_ns, SERVE_ROUNDS
        )
        return int(rc), int(pos[0])

    def feed(self, pos: int, end: int, other_bytes: int, other_requests: int) -> int:
        """Take the lane's requests from the receive buffer's ``[pos:end]``, up to the first
        one it does not handle; returns where that one starts. ``other_*``: what the
        connection's other requests hold of the budget."""
        lib.nbdu_lane_feed(
            self._handle, self._data, pos, end, other_bytes, other_requests, self._pos
        )
        return int(self._pos[0])

    def send(self, fd: int) -> int:
        """Send queued replies: 1 when none is left, 0 when the socket is full, or -errno."""
        return int(lib.nbdu_lane_send(self._handle, fd))

    @property
    def requests(self) -> int:
        """Lane requests received and not fully answered."""
        return int(self.tally.requests)

    @property
    def bytes(self) -> int:
        """What those requests hold of the connection's byte budget."""
        return int(self.tally.bytes)

    @property
    def partial(self) -> bool:
        """A reply is partly sent: it must be finished before anything else is sent."""
        return bool(self.tally.partial)

    def close(self) -> None:
        """Drop unsent replies; reads in flight are retired by the lane as they complete."""
        if self._handle is not None:
            lib.nbdu_lane_conn_close(self._handle)
            self._handle = None
            self._data = None
            self.tally = ffi.new("struct nbdu_lane_tally *")  # all zero from here on
            self._lane._clients.pop(self._token, None)
            self._lane._maybe_free()
