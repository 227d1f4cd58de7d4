"""Client-side byte builders and a transcript runner for the handshake tests.

Client bytes are packed by hand with struct, independently of the code under test, so a test
fails if the implementation and the spec's wire layout disagree.
"""

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from nbd_uring.protocol import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    ExportInfo,
    HandshakeState,
    ProtocolViolation,
    Rep,
    ServerHandshake,
    TransmissionFlag,
)

GREETING = b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
FIXED = 1
NO_ZEROES = 2

RW_FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.CAN_MULTI_CONN
)
RO_FLAGS = TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH

DISK = ExportInfo("disk", 1 << 20, RW_FLAGS, description="scratch disk")
DEFAULT = ExportInfo("", 8192, RO_FLAGS)
EXPORTS = {export.name: export for export in (DISK, DEFAULT)}

assert struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3) == GREETING


def client_flags(flags: int) -> bytes:
    return struct.pack(">I", flags)


def option(
    opt: int, data: bytes = b"", *, magic: int = IHAVEOPT, length: int | None = None
) -> bytes:
    declared = len(data) if length is None else length
    return struct.pack(">QII", magic, opt, declared) + data


def info_data(name: bytes | str, *requests: int) -> bytes:
    raw = name.encode() if isinstance(name, str) else name
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(requests))
        + b"".join(struct.pack(">H", r) for r in requests)
    )


def reply(opt: int, rep: int, payload: bytes = b"") -> bytes:
    return struct.pack(">QIII", OPTION_REPLY_MAGIC, opt, rep, len(payload)) + payload


def info_export(export: ExportInfo) -> bytes:
    return struct.pack(">HQH", 0, export.size, int(export.flags))


@dataclass(frozen=True)
class OptionReply:
    option: int
    rep: int
    payload: bytes


def parse_replies(data: bytes) -> list[OptionReply]:
    """Split a stream of option replies; fails the test on anything that is not one."""
    replies = []
    pos = 0
    while pos < len(data):
        magic, opt, rep, length = struct.unpack_from(">QIII", data, pos)
        assert magic == OPTION_REPLY_MAGIC, f"bad reply magic at {pos}"
        pos += 20
        payload = data[pos : pos + length]
        assert len(payload) == length, "truncated reply"
        pos += length
        replies.append(OptionReply(opt, rep, payload))
    return replies


@dataclass(frozen=True)
class Outcome:
    """Everything observable after feeding a transcript."""

    sent: bytes
    state: HandshakeState
    violation: str | None
    export: ExportInfo | None
    unused: bytes
    close_reason: str | None
    no_zeroes: bool
    max_buffered: int = field(compare=False)
    """Largest input buffer seen; differs with the split, so not compared."""

    @property
    def replies(self) -> list[OptionReply]:
        """The option replies after the greeting (for transcripts that end in option replies)."""
        assert self.sent.startswith(GREETING)
        return parse_replies(self.sent[len(GREETING) :])


Lookup = Callable[[str], ExportInfo | None]
Lister = Callable[[], Sequence[ExportInfo]]


def no_export(name: str) -> ExportInfo | None:
    return None


def all_exports() -> list[ExportInfo]:
    return list(EXPORTS.values())


def feed(
    pieces: Iterable[bytes],
    *,
    lookup: Lookup = EXPORTS.get,
    list_exports: Lister = all_exports,
    max_option_length: int = MAX_OPTION_LENGTH,
    max_options: int = MAX_OPTIONS,
) -> Outcome:
    handshake = ServerHandshake(
        lookup, list_exports, max_option_length=max_option_length, max_options=max_options
    )
    sent = bytearray(handshake.data_to_send())
    violation = None
    max_buffered = 0
    try:
        for piece in pieces:
            handshake.receive_data(piece)
            max_buffered = max(max_buffered, handshake.buffered)
            sent += handshake.data_to_send()
    except ProtocolViolation as exc:
        violation = exc.message
        assert handshake.state is HandshakeState.CLOSED
        assert handshake.close_reason == exc.message
    sent += handshake.data_to_send()
    return Outcome(
        bytes(sent),
        handshake.state,
        violation,
        handshake.export,
        handshake.unused_data,
        handshake.close_reason,
        handshake.no_zeroes,
        max_buffered,
    )


def converse(
    client: bytes,
    *,
    lookup: Lookup = EXPORTS.get,
    list_exports: Lister = all_exports,
    max_option_length: int = MAX_OPTION_LENGTH,
    max_options: int = MAX_OPTIONS,
) -> Outcome:
    """Feed ``client`` whole and one byte at a time; both must give the same outcome."""
    whole = feed(
        [client],
        lookup=lookup,
        list_exports=list_exports,
        max_option_length=max_option_length,
        max_options=max_options,
    )
    bytewise = feed(
        [client[i : i + 1] for i in range(len(client))],
        lookup=lookup,
        list_exports=list_exports,
        max_option_length=max_option_length,
        max_options=max_options,
    )
    assert bytewise == whole
    return whole


def is_error_with_message(r: OptionReply, rep: Rep) -> bool:
    """An error reply of type ``rep`` whose payload is a non-empty UTF-8 message."""
    return r.rep == rep and len(r.payload) > 0 and bool(r.payload.decode("utf-8"))
