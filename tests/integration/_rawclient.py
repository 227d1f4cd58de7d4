"""A minimal blocking NBD client for conformance tests, written from the spec's byte layout.

It shares no code with the server: every message is packed and parsed here with ``struct``, so
a misreading of the spec in the server's encoders cannot be mirrored on this side. It speaks
fixed newstyle, structured replies and extended headers, and returns replies as plain values
for the tests to inspect.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXTENDED_MAGIC = 0x6E8A278C

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
ERR = 1 << 31
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID = ERR + 1, ERR + 2, ERR + 3
REP_ERR_UNKNOWN, REP_ERR_BLOCK_SIZE_REQD, REP_ERR_TOO_BIG = ERR + 6, ERR + 8, ERR + 9
REP_ERR_EXT_HEADER_REQD = ERR + 10
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE = 0, 1, 2, 3, 4, 5
CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 6, 7
FLAG_FUA, FLAG_NO_HOLE, FLAG_DF, FLAG_REQ_ONE, FLAG_FAST_ZERO, FLAG_PAYLOAD_LEN = (
    1,
    2,
    4,
    8,
    16,
    32,
)
T_SEND_DF, T_SEND_CACHE, T_SEND_FAST_ZERO, T_BLOCK_STATUS_PAYLOAD = (
    1 << 7,
    1 << 10,
    1 << 11,
    1 << 12,
)

TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE = 0, 1, 2
TYPE_BLOCK_STATUS, TYPE_BLOCK_STATUS_EXT = 5, 6
TYPE_ERROR, TYPE_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2
REPLY_DONE = 1

EINVAL, ENOTSUP, EOVERFLOW = 22, 95, 75


@dataclass
class OptReply:
    option: int
    rep: int
    data: bytes


@dataclass
class Chunk:
    """One reply message: a simple reply (``simple``) or a structured/extended chunk."""

    cookie: int
    simple: bool
    error: int = 0
    flags: int = 0
    type: int = 0
    offset: int | None = None
    payload: bytes = b""
    magic: int = 0

    @property
    def done(self) -> bool:
        return self.simple or bool(self.flags & REPLY_DONE)

    def error_chunk(self) -> tuple[int, str]:
        """(error, message) of an error chunk."""
        error, msglen = struct.unpack_from(">IH", self.payload)
        return error, self.payload[6 : 6 + msglen].decode()


@dataclass
class Client:
    sock: socket.socket
    extended: bool = False
    structured: bool = False
    size: int = 0
    flags: int = 0
    contexts: dict[int, str] = field(default_factory=dict)
    read_lengths: dict[int, int] = field(default_factory=dict)

    # -- raw I/O --------------------------------------------------------------------------

    def recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise EOFError(f"server closed the connection ({len(buf)} of {n} bytes)")
            buf += got
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """True if the server closes the connection (EOF or reset) without sending anything."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            return False

    # -- handshake ------------------------------------------------------------------------

    def option(self, opt: int, data: bytes = b"") -> list[OptReply]:
        """Send one option, collect replies up to the first ACK or error."""
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            reply = self.read_option_reply()
            replies.append(reply)
            if reply.rep == REP_ACK or reply.rep & ERR:
                return replies

    def read_option_reply(self) -> OptReply:
        magic, opt, rep, length = struct.unpack(">QIII", self.recv_exactly(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return OptReply(opt, rep, self.recv_exactly(length))

    def go(self, name: str = "", infos: tuple[int, ...] = (), opt: int = OPT_GO) -> list[OptReply]:
        raw = name.encode()
        data = (
            struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)
        )
        replies = self.option(opt, data)
        if replies[-1].rep == REP_ACK:
            for r in replies:
                if r.rep == REP_INFO and struct.unpack_from(">H", r.data)[0] == INFO_EXPORT:
                    _, self.size, self.flags = struct.unpack(">HQH", r.data)
        return replies

    def meta(self, opt: int, queries: list[str], name: str = "") -> list[OptReply]:
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q.encode())) + q.encode()
        replies = self.option(opt, data)
        if opt == OPT_SET_META:
            self.contexts = {
                struct.unpack_from(">I", r.data)[0]: r.data[4:].decode()
                for r in replies
                if r.rep == REP_META_CONTEXT
            }
        return replies

    # -- transmission ---------------------------------------------------------------------

    def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        cookie: int = 1,
        flags: int = 0,
        payload: bytes = b"",
    ) -> None:
        if self.extended:
            header = struct.pack(
                ">IHHQQQ", EXT_REQUEST_MAGIC, flags, command, cookie, offset, length
            )
        else:
            header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, cookie, offset, length)
        if command == CMD_READ:
            self.read_lengths[cookie] = length
        self.sock.sendall(header + payload)

    def read_message(self) -> Chunk:
        (magic,) = struct.unpack(">I", self.recv_exactly(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exactly(12))
            payload = b""
            if not error and not self.structured and not self.extended:
                payload = self.recv_exactly(self.read_lengths.pop(cookie, 0))
            return Chunk(cookie, True, error=error, payload=payload, magic=magic)
        if magic == STRUCTURED_MAGIC:
            flags, type_, cookie, length = struct.unpack(">HHQI", self.recv_exactly(16))
            return Chunk(
                cookie,
                False,
                flags=flags,
                type=type_,
                payload=self.recv_exactly(length),
                magic=magic,
            )
        if magic == EXTENDED_MAGIC:
            flags, type_, cookie, offset, length = struct.unpack(">HHQQQ", self.recv_exactly(28))
            return Chunk(
                cookie,
                False,
                flags=flags,
                type=type_,
                offset=offset,
                payload=self.recv_exactly(length),
                magic=magic,
            )
        raise AssertionError(f"unknown reply magic {magic:#x}")

    def reply(self) -> list[Chunk]:
        """All messages of the next reply (one cookie), up to the DONE chunk."""
        chunks = [self.read_message()]
        while not chunks[-1].done:
            nxt = self.read_message()
            assert nxt.cookie == chunks[0].cookie, "test client expects one request at a time"
            chunks.append(nxt)
        return chunks

    def command(self, command: int, offset: int = 0, length: int = 0, **kw: object) -> list[Chunk]:
        self.request(command, offset, length, **kw)  # type: ignore[arg-type]
        return self.reply()

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        """Read and reassemble; raise on any error chunk."""
        chunks = self.command(CMD_READ, offset, length, flags=flags)
        return assemble_read(chunks, offset, length)

    def disconnect(self) -> None:
        try:
            self.request(CMD_DISC)
        finally:
            self.sock.close()


def assemble_read(chunks: list[Chunk], offset: int, length: int) -> bytes:
    """Reassemble a READ reply, checking the spec's content-chunk rules as it goes."""
    first = chunks[0]
    if first.simple:
        assert first.error == 0, f"read failed with {first.error}"
        return first.payload
    out = bytearray(length)
    covered = 0
    seen: list[tuple[int, int]] = []
    for c in chunks:
        if c.type & (1 << 15):
            raise OSError(*c.error_chunk())
        if c.type == TYPE_NONE:
            assert c.done and not c.payload
            continue
        (start,) = struct.unpack_from(">Q", c.payload)
        if c.type == TYPE_OFFSET_DATA:
            data = c.payload[8:]
            n = len(data)
            assert n >= 1
            out[start - offset : start - offset + n] = data
        else:
            assert c.type == TYPE_OFFSET_HOLE and len(c.payload) == 12, c
            (n,) = struct.unpack_from(">I", c.payload, 8)
            assert n >= 1
        assert offset <= start and start + n <= offset + length, "chunk outside the request"
        assert all(start + n <= a or b <= start for a, b in seen), "overlapping chunks"
        seen.append((start, start + n))
        covered += n
    assert covered == length, f"chunks cover {covered} of {length} bytes"
    return bytes(out)


def parse_block_status(chunk: Chunk) -> tuple[int, list[tuple[int, int]]]:
    """(context id, [(length, status), ...]) of a BLOCK_STATUS or BLOCK_STATUS_EXT chunk."""
    p = chunk.payload
    if chunk.type == TYPE_BLOCK_STATUS:
        assert (len(p) - 4) % 8 == 0 and len(p) > 4
        (ctx,) = struct.unpack_from(">I", p)
        vals = struct.unpack_from(f">{(len(p) - 4) // 4}I", p, 4)
    else:
        assert chunk.type == TYPE_BLOCK_STATUS_EXT, chunk
        assert (len(p) - 8) % 16 == 0 and len(p) > 8
        ctx, count = struct.unpack_from(">II", p)
        assert count == (len(p) - 8) // 16
        vals = struct.unpack_from(f">{2 * count}Q", p, 8)
    return ctx, list(zip(vals[::2], vals[1::2], strict=True))


def connect(
    address: str | tuple[str, int],
    *,
    structured: bool = False,
    extended: bool = False,
    contexts: tuple[str, ...] = (),
    name: str = "",
    infos: tuple[int, ...] = (INFO_BLOCK_SIZE,),
    timeout: float = 10.0,
) -> Client:
    """Connect, negotiate what is asked for, and GO; the Client is in transmission phase."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    c = Client(sock)
    greeting = c.recv_exactly(18)
    assert greeting[:16] == NBDMAGIC + b"IHAVEOPT", greeting
    sock.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    if extended:
        assert c.option(OPT_EXTENDED_HEADERS)[-1].rep == REP_ACK
        c.extended = True
    if structured:
        assert c.option(OPT_STRUCTURED_REPLY)[-1].rep == REP_ACK
        c.structured = True
    if contexts:
        c.meta(OPT_SET_META, list(contexts), name)
    replies = c.go(name, infos)
    assert replies[-1].rep == REP_ACK, replies
    return c


def handshake_only(address: str | tuple[str, int], timeout: float = 10.0) -> Client:
    """Connected, greeting read and client flags sent: ready for options."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(address)
    c = Client(sock)
    c.recv_exactly(18)
    sock.sendall(struct.pack(">I", 3))
    return c
