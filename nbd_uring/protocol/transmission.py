"""Transmission phase: request headers in, replies out, and request validation.

This is the hot path: codecs are precompiled ``struct.Struct`` objects and validation is one dict
lookup plus a few integer comparisons driven by :data:`COMMAND_SPECS`. Compact (28-byte) and
extended (32-byte) requests decode to the same :class:`Request`; simple replies, structured chunks
and extended chunks come from :func:`encode_simple_reply` and :class:`ChunkEncoder`.
"""

import struct
from dataclasses import dataclass
from typing import Final

from nbd_uring.protocol.constants import (
    EXTENDED_REQUEST_SIZE,
    MAX_STRING,
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    REQUEST_SIZE,
    Cmd,
    CmdFlag,
    NbdErrno,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)
from nbd_uring.protocol.errors import ProtocolViolation, RequestError
from nbd_uring.protocol.handshake import ExportInfo

_REQUEST: Final = struct.Struct(">IHHQQI")
_EXTENDED_REQUEST: Final = struct.Struct(">IHHQQQ")
_SIMPLE_REPLY: Final = struct.Struct(">IIQ")
_STRUCTURED_HEADER: Final = struct.Struct(">IHHQI")
_EXTENDED_HEADER: Final = struct.Struct(">IHHQQQ")
_U64: Final = struct.Struct(">Q")
_HOLE: Final = struct.Struct(">QI")
_ERROR_HEAD: Final = struct.Struct(">IH")
_DATA_CHUNK: Final = struct.Struct(">IHHQIQ")
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)
_PAYLOAD_LEN: Final = int(CmdFlag.PAYLOAD_LEN)
_DONE: Final = int(ReplyFlag.DONE)
_FUA: Final = int(CmdFlag.FUA)
_WRITE: Final = int(Cmd.WRITE)
_BLOCK_STATUS: Final = int(Cmd.BLOCK_STATUS)
_SEND_FUA: Final = int(TransmissionFlag.SEND_FUA)
_READ_ONLY: Final = int(TransmissionFlag.READ_ONLY)


@dataclass(slots=True)
class Request:
    """One decoded request header; ``command`` and ``flags`` stay plain ints (unknown ones too)."""

    cookie: int
    command: int
    flags: int
    offset: int
    length: int

    @property
    def fua(self) -> bool:
        return bool(self.flags & _FUA)


def decode_request(header: bytes | bytearray | memoryview) -> Request:
    """Decode a 28-byte request header; a wrong magic means the stream is lost."""
    if len(header) != REQUEST_SIZE:
        raise ValueError(f"a request header is {REQUEST_SIZE} bytes, got {len(header)}")
    magic, flags, command, cookie, offset, length = _REQUEST.unpack(header)
    if magic != NBD_REQUEST_MAGIC:
        hint = (
            " (extended headers were not negotiated)" if magic == NBD_EXTENDED_REQUEST_MAGIC else ""
        )
        raise ProtocolViolation(
            f"bad request magic {magic:#010x}, expected {NBD_REQUEST_MAGIC:#010x}{hint}"
        )
    return Request(cookie, command, flags, offset, length)


def decode_extended_request(header: bytes | bytearray | memoryview) -> Request:
    """Decode a 32-byte extended request header (only valid after NBD_OPT_EXTENDED_HEADERS)."""
    if len(header) != EXTENDED_REQUEST_SIZE:
        raise ValueError(
            f"an extended request header is {EXTENDED_REQUEST_SIZE} bytes, got {len(header)}"
        )
    magic, flags, command, cookie, offset, length = _EXTENDED_REQUEST.unpack(header)
    if magic != NBD_EXTENDED_REQUEST_MAGIC:
        hint = " (a compact header after extended headers were negotiated)" * (
            magic == NBD_REQUEST_MAGIC
        )
        raise ProtocolViolation(
            f"bad extended request magic {magic:#010x}, expected "
            f"{NBD_EXTENDED_REQUEST_MAGIC:#010x}{hint}"
        )
    return Request(cookie, command, flags, offset, length)


def encode_extended_request(request: Request) -> bytes:
    """The 32 wire bytes of ``request`` as an extended header (client side; tests and tools)."""
    return _EXTENDED_REQUEST.pack(
        NBD_EXTENDED_REQUEST_MAGIC,
        request.flags,
        request.command,
        request.cookie,
        request.offset,
        request.length,
    )


def extended_payload_length(request: Request) -> int:
    """Bytes of payload after an extended header: *length* when NBD_CMD_FLAG_PAYLOAD_LEN is set.

    With extended headers the flag, not the command, says whether a payload follows; a command
    that takes none still has its payload consumed before it is refused.
    """
    return request.length if request.flags & _PAYLOAD_LEN else 0


def encode_request(request: Request) -> bytes:
    """The 28 wire bytes of ``request`` (the client's side; used by tests and tools)."""
    return _REQUEST.pack(
        NBD_REQUEST_MAGIC,
        request.flags,
        request.command,
        request.cookie,
        request.offset,
        request.length,
    )


def payload_length(request: Request) -> int:
    """Bytes of payload that follow this header on the wire.

    Only NBD_CMD_WRITE carries one, and it follows even when the request is refused, so the
    reader must consume (or disconnect) before it can parse the next header.
    """
    return request.length if request.command == _WRITE else 0


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    """The 16-byte simple reply header; a successful READ's data follows it."""
    return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


unpack_request_from: Final = _REQUEST.unpack_from
"""``(magic, flags, command, cookie, offset, length)`` of the compact header at an offset of a
buffer, unchecked: for a server's fast path, which validates the fields itself and hands
anything unusual to :func:`decode_request`."""


def encode_data_chunk(cookie: int, offset: int, length: int) -> bytes:
    """Header and offset of the one structured (compact) ``NBD_REPLY_TYPE_OFFSET_DATA`` chunk,
    flagged DONE, that answers a whole READ; ``length`` data bytes must follow. The same bytes
    as ``ChunkEncoder(extended=False).offset_data(..., done=True)``, in one struct call."""
    return _DATA_CHUNK.pack(
        NBD_STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA, cookie, 8 + length, offset
    )


def _clip_message(message: str) -> bytes:
    encoded = message.encode("utf-8")
    if len(encoded) <= MAX_STRING:
        return encoded
    return encoded[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")


class ChunkEncoder:
    """Reply chunks for one connection: structured (20-byte header) or extended (32-byte).

    Every method returns the bytes of one whole chunk, except :meth:`offset_data`, which returns
    the header and offset only: the caller sends ``length`` bytes of data right after it.
    ``offset`` arguments named ``request_offset`` only matter for extended headers, whose
    *offset* field "MUST match the *offset* of the client's request".
    """

    __slots__ = ("extended",)

    def __init__(self, *, extended: bool) -> None:
        self.extended = extended

    def header(
        self, cookie: int, request_offset: int, flags: int, reply_type: int, length: int
    ) -> bytes:
        if self.extended:
            return _EXTENDED_HEADER.pack(
                NBD_EXTENDED_REPLY_MAGIC, flags, reply_type, cookie, request_offset, length
            )
        return _STRUCTURED_HEADER.pack(
            NBD_STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length
        )

    def none(self, cookie: int, request_offset: int) -> bytes:
        """``NBD_REPLY_TYPE_NONE`` with DONE: success of a request with nothing to return."""
        return self.header(cookie, request_offset, _DONE, ReplyType.NONE, 0)

    def offset_data(
        self, cookie: int, request_offset: int, offset: int, length: int, *, done: bool
    ) -> bytes:
        """Header and offset of an ``NBD_REPLY_TYPE_OFFSET_DATA`` chunk; ``length`` data bytes
        must follow."""
        return self.header(
            cookie, request_offset, _DONE if done else 0, ReplyType.OFFSET_DATA, 8 + length
        ) + _U64.pack(offset)

    def offset_hole(
        self, cookie: int, request_offset: int, offset: int, length: int, *, done: bool
    ) -> bytes:
        if not 0 < length < 1 << 32:
            raise ValueError(f"a hole chunk describes 1 to 2^32-1 bytes, not {length}")
        return self.header(
            cookie, request_offset, _DONE if done else 0, ReplyType.OFFSET_HOLE, 12
        ) + _HOLE.pack(offset, length)

    def error(
        self,
        cookie: int,
        request_offset: int,
        nbd_errno: int,
        message: str,
        *,
        error_offset: int | None = None,
        done: bool = True,
    ) -> bytes:
        """``NBD_REPLY_TYPE_ERROR`` (or ``ERROR_OFFSET`` when ``error_offset`` is given)."""
        if not nbd_errno:
            raise ValueError("an error chunk needs a nonzero error")
        text = _clip_message(message)
        body = _ERROR_HEAD.pack(nbd_errno, len(text)) + text
        reply_type = ReplyType.ERROR
        if error_offset is not None:
            body += _U64.pack(error_offset)
            reply_type = ReplyType.ERROR_OFFSET
        return (
            self.header(cookie, request_offset, _DONE if done else 0, reply_type, len(body))
            + body
        )

    def block_status(
        self,
        cookie: int,
        request_offset: int,
        context_id: int,
        extents: list[tuple[int, int]],
        *,
        done: bool,
    ) -> bytes:
        """One status chunk: ``BLOCK_STATUS`` (32-bit) or ``BLOCK_STATUS_EXT`` (64-bit) with
        ``(length, status)`` descriptors."""
        if not extents:
            raise ValueError("a block status chunk needs at least one descriptor")
        flags = _DONE if done else 0
        if self.extended:
            body = struct.pack(
                f">II{2 * len(extents)}Q",
                context_id,
                len(extents),
                *[value for extent in extents for value in extent],
            )
            reply_type = ReplyType.BLOCK_STATUS_EXT
        else:
            body = struct.pack(
                f">I{2 * len(extents)}I",
                context_id,
                *[value for extent in extents for value in extent],
            )
            reply_type = ReplyType.BLOCK_STATUS
        return self.header(cookie, request_offset, flags, reply_type, len(body)) + body


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What the server accepts for one command: one row of the validation table."""

    name: str
    valid_flags: int = 0
    """Command flags valid besides FUA (FUA is valid on every command once SEND_FUA is set)."""
    gated_flags: tuple[tuple[int, int], ...] = ()
    """(command flag, transmission flag): the command flag is valid only when the export's
    transmission flags include the second (DF needs SEND_DF, FAST_ZERO needs SEND_FAST_ZERO)."""
    needs: int = 0
    """Transmission flag that exposes the command; 0 when the baseline includes it."""
    writes: bool = False
    """Refused with EPERM on a READ_ONLY export."""
    range_checked: bool = False
    """Offset and length address the export: bounds and minimum block alignment apply."""
    beyond_end: NbdErrno = NbdErrno.EINVAL
    payload_bounded: bool = False
    """Length is a payload length, bounded by the export's maximum payload (max_block)."""
    zero_range: bool = False
    """Offset and length are reserved and MUST be zero."""


COMMAND_SPECS: Final[dict[int, CommandSpec]] = {
    Cmd.READ: CommandSpec(
        "NBD_CMD_READ",
        gated_flags=((int(CmdFlag.DF), int(TransmissionFlag.SEND_DF)),),
        range_checked=True,
        payload_bounded=True,
    ),
    Cmd.WRITE: CommandSpec(
        "NBD_CMD_WRITE",
        writes=True,
        range_checked=True,
        beyond_end=NbdErrno.ENOSPC,
        payload_bounded=True,
    ),
    Cmd.DISC: CommandSpec("NBD_CMD_DISC", zero_range=True),
    Cmd.FLUSH: CommandSpec("NBD_CMD_FLUSH", needs=TransmissionFlag.SEND_FLUSH, zero_range=True),
    Cmd.TRIM: CommandSpec(
        "NBD_CMD_TRIM", needs=TransmissionFlag.SEND_TRIM, writes=True, range_checked=True
    ),
    Cmd.CACHE: CommandSpec("NBD_CMD_CACHE", needs=TransmissionFlag.SEND_CACHE, range_checked=True),
    Cmd.WRITE_ZEROES: CommandSpec(
        "NBD_CMD_WRITE_ZEROES",
        valid_flags=CmdFlag.NO_HOLE,
        gated_flags=((int(CmdFlag.FAST_ZERO), int(TransmissionFlag.SEND_FAST_ZERO)),),
        needs=TransmissionFlag.SEND_WRITE_ZEROES,
        writes=True,
        range_checked=True,
        beyond_end=NbdErrno.ENOSPC,
    ),
    Cmd.BLOCK_STATUS: CommandSpec(
        "NBD_CMD_BLOCK_STATUS", valid_flags=int(CmdFlag.REQ_ONE), range_checked=True
    ),
}
"""Commands this server implements. NBD_CMD_BLOCK_STATUS is further gated on selected metadata
contexts (see :func:`check_request`); NBD_CMD_RESIZE is experimental and refused like an unknown
command."""


def _unsupported(command: int) -> RequestError:
    try:
        return RequestError(
            NbdErrno.EINVAL, f"NBD_CMD_{Cmd(command).name} is not supported by this server"
        )
    except ValueError:
        return RequestError(NbdErrno.EINVAL, f"unknown command {command}")


def _flag_names(flags: int) -> str:
    names = [f.name for f in CmdFlag if flags & f and f.name is not None]
    unknown = flags & ~sum(CmdFlag)
    if unknown:
        names.append(f"{unknown:#x}")
    return "|".join(names)


def check_request(
    request: Request, export: ExportInfo, *, extended: bool = False, meta_contexts: int = 0
) -> None:
    """Raise RequestError if the server must refuse ``request`` on ``export``.

    ``extended``: extended headers are in use (NBD_CMD_FLAG_PAYLOAD_LEN is known, and WRITE must
    carry it). ``meta_contexts``: how many metadata contexts were selected for this export;
    NBD_CMD_BLOCK_STATUS is refused without one.

    Checks run in this order, so the first problem found is the one reported: command known and
    exposed, flags, reserved fields, read-only, payload size, bounds, alignment.
    """
    spec = COMMAND_SPECS.get(request.command)
    if spec is None:
        raise _unsupported(request.command)
    if request.command == _BLOCK_STATUS and not meta_contexts:
        raise RequestError(
            NbdErrno.EINVAL,
            "NBD_CMD_BLOCK_STATUS needs a metadata context selected with "
            "NBD_OPT_SET_META_CONTEXT for this export",
        )
    export_flags = int(export.flags)
    if spec.needs and not export_flags & spec.needs:
        raise RequestError(
            NbdErrno.EINVAL,
            f"{spec.name} was not advertised (NBD_FLAG_{TransmissionFlag(spec.needs).name} "
            "is not set for this export)",
        )
    flags = request.flags
    allowed = spec.valid_flags | (_FUA if export_flags & _SEND_FUA else 0)
    for flag, needed in spec.gated_flags:
        if export_flags & needed:
            allowed |= flag
    if extended and request.command == _WRITE:
        if not flags & _PAYLOAD_LEN:
            raise RequestError(
                NbdErrno.EINVAL,
                "NBD_CMD_WRITE without NBD_CMD_FLAG_PAYLOAD_LEN: with extended headers the "
                "flag MUST be set",
            )
        allowed |= _PAYLOAD_LEN
    if flags & ~allowed:
        raise RequestError(
            NbdErrno.EINVAL,
            f"{spec.name} does not accept command flags {_flag_names(flags & ~allowed)} "
            f"(flags={flags:#x})",
        )
    offset = request.offset
    length = request.length
    if spec.zero_range:
        if offset or length:
            raise RequestError(
                NbdErrno.EINVAL,
                f"{spec.name} must have zero offset and length: offset={offset} length={length}",
            )
        return
    if spec.writes and export_flags & _READ_ONLY:
        raise RequestError(NbdErrno.EPERM, f"{spec.name} on a read-only export")
    if spec.payload_bounded and length > export.max_block:
        raise RequestError(
            NbdErrno.EINVAL,
            f"{spec.name} length {length} exceeds maximum payload {export.max_block}",
        )
    if spec.range_checked:
        size = export.size
        end = offset + length
        if end > size:
            raise RequestError(
                spec.beyond_end,
                f"{spec.name} beyond end of export: offset={offset} length={length} size={size}",
            )
        block = export.min_block
        if block > 1 and (offset % block or (length % block and end != size)):
            raise RequestError(
                NbdErrno.EINVAL,
                f"{spec.name} not aligned to minimum block size {block}: "
                f"offset={offset} length={length}",
            )
