"""Transmission phase: request headers in, simple replies out, and request validation.

This is the hot path: codecs are precompiled ``struct.Struct`` objects and validation is one dict
lookup plus a few integer comparisons driven by :data:`COMMAND_SPECS`.
"""

import struct
from dataclasses import dataclass
from typing import Final

from nbd_uring.protocol.constants import (
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    REQUEST_SIZE,
    Cmd,
    CmdFlag,
    NbdErrno,
    TransmissionFlag,
)
from nbd_uring.protocol.errors import ProtocolViolation, RequestError
from nbd_uring.protocol.handshake import ExportInfo

_REQUEST: Final = struct.Struct(">IHHQQI")
_SIMPLE_REPLY: Final = struct.Struct(">IIQ")
_FUA: Final = int(CmdFlag.FUA)
_WRITE: Final = int(Cmd.WRITE)
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


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """What the server accepts for one command: one row of the validation table."""

    name: str
    valid_flags: int = 0
    """Command flags valid besides FUA (FUA is valid on every command once SEND_FUA is set)."""
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
    Cmd.READ: CommandSpec("NBD_CMD_READ", range_checked=True, payload_bounded=True),
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
        needs=TransmissionFlag.SEND_WRITE_ZEROES,
        writes=True,
        range_checked=True,
        beyond_end=NbdErrno.ENOSPC,
    ),
}
"""Commands this server implements. NBD_CMD_BLOCK_STATUS needs metadata contexts and
NBD_CMD_RESIZE is experimental: both are refused like unknown commands."""


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


def check_request(request: Request, export: ExportInfo) -> None:
    """Raise RequestError if the server must refuse ``request`` on ``export``.

    Checks run in this order, so the first problem found is the one reported: command known and
    exposed, flags, reserved fields, read-only, payload size, bounds, alignment.
    """
    spec = COMMAND_SPECS.get(request.command)
    if spec is None:
        raise _unsupported(request.command)
    export_flags = int(export.flags)
    if spec.needs and not export_flags & spec.needs:
        raise RequestError(
            NbdErrno.EINVAL,
            f"{spec.name} was not advertised (NBD_FLAG_{TransmissionFlag(spec.needs).name} "
            "is not set for this export)",
        )
    flags = request.flags
    allowed = spec.valid_flags | (_FUA if export_flags & _SEND_FUA else 0)
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
