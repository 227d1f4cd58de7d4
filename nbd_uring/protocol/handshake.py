"""Server side of the fixed newstyle handshake, as a sans-I/O state machine.

Bytes go in through :meth:`ServerHandshake.receive_data`, bytes to write come out of
:meth:`ServerHandshake.data_to_send`; the caller owns the socket. The machine reads one fixed-size
piece at a time (client flags, option header, option data) and never buffers more than the piece it
is waiting for, so memory is bounded by ``max(16, max_option_length)`` whatever the peer sends.

Refusals that negotiation survives are :class:`OptionError` inside this module and leave it only as
``NBD_REP_ERR_*`` replies. A :class:`ProtocolViolation` escapes to the caller, which closes the
connection without a reply. An ``NBD_OPT_EXPORT_NAME`` that cannot be satisfied is not the client's
fault and has no error reply, so it ends in state ``CLOSED`` with a :attr:`close_reason` instead.

TLS (the spec's "TLS support") is decided here and done by the caller: an accepted
``NBD_OPT_STARTTLS`` stops the machine in state ``STARTTLS`` after queueing the ACK; the caller
sends it, runs the TLS handshake and calls :meth:`ServerHandshake.tls_started`, which discards
everything negotiated so far and resumes option haggling over the encrypted stream.
"""

import dataclasses
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from nbd_uring.protocol.constants import (
    BASE_ALLOCATION,
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREFERRED_BLOCK,
    EXPORT_NAME_PADDING,
    IHAVEOPT,
    MAX_META_QUERIES,
    MAX_OPTION_LENGTH,
    MAX_OPTIONS,
    MAX_PAYLOAD,
    MAX_STRING,
    NBDMAGIC,
    OPTION_HEADER_SIZE,
    OPTION_REPLY_MAGIC,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbd_uring.protocol.errors import OptionError, ProtocolViolation

_GREETING = struct.Struct(">QQH")
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY_HEADER = struct.Struct(">QIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")
_INFO_BLOCK_SIZE = struct.Struct(">HIII")

SERVER_HANDSHAKE_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
"""What nbd-uring advertises; a client flag outside these makes the server drop the connection."""
_ACCEPTED_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_U64_LIMIT: Final = 1 << 64
_U32_MAX: Final = (1 << 32) - 1
_MAX_MIN_BLOCK: Final = 1 << 16
_MIN_PREFERRED_BLOCK: Final = 512


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _check_string(what: str, value: str) -> None:
    if "\0" in value:
        raise ValueError(f"{what} must not contain NUL characters")
    encoded = len(value.encode("utf-8"))
    if encoded > MAX_STRING:
        raise ValueError(f"{what} is {encoded} bytes, longer than the {MAX_STRING}-byte limit")


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the handshake tells a client about one export; validated so every reply is legal."""

    name: str
    size: int
    flags: TransmissionFlag
    """The full transmission flags sent to the client, ``HAS_FLAGS`` included."""
    description: str = ""
    min_block: int = DEFAULT_MIN_BLOCK
    preferred_block: int = DEFAULT_PREFERRED_BLOCK
    max_block: int = MAX_PAYLOAD
    block_size_required: bool = False
    """Refuse clients that do not ask for NBD_INFO_BLOCK_SIZE (the export enforces min_block,
    e.g. because it is opened with O_DIRECT)."""
    tls_required: bool = False
    """Usable and listed only after STARTTLS (the spec's SELECTIVETLS for this export)."""

    def __post_init__(self) -> None:
        _check_string("export name", self.name)
        _check_string("export description", self.description)
        if not 0 <= self.size < _U64_LIMIT:
            raise ValueError(f"export size {self.size} does not fit in 64 bits")
        if not 0 <= self.flags <= 0xFFFF or not self.flags & TransmissionFlag.HAS_FLAGS:
            raise ValueError(
                f"transmission flags {int(self.flags):#x} must be 16 bits with HAS_FLAGS"
            )
        if not _is_power_of_two(self.min_block) or self.min_block > _MAX_MIN_BLOCK:
            raise ValueError(
                f"min_block {self.min_block} must be a power of 2 no larger than {_MAX_MIN_BLOCK}"
            )
        floor = max(self.min_block, _MIN_PREFERRED_BLOCK)
        if not _is_power_of_two(self.preferred_block) or self.preferred_block < floor:
            raise ValueError(
                f"preferred_block {self.preferred_block} must be a power of 2 of at least {floor}"
            )
        if not self.preferred_block <= self.max_block <= _U32_MAX:
            raise ValueError(
                f"max_block {self.max_block} must lie between preferred_block "
                f"{self.preferred_block} and {_U32_MAX}"
            )


def transmission_flags_for(
    *,
    read_only: bool,
    can_flush: bool = True,
    can_fua: bool = True,
    can_trim: bool = True,
    can_write_zeroes: bool = True,
    can_multi_conn: bool = True,
    can_cache: bool = False,
    can_fast_zero: bool = False,
) -> TransmissionFlag:
    """The transmission flags for an export with these capabilities.

    TRIM and WRITE_ZEROES are only exposed on writable exports: a client that sees them on a
    read-only export would only get EPERM back.
    """
    flags = TransmissionFlag.HAS_FLAGS
    if read_only:
        flags |= TransmissionFlag.READ_ONLY
    if can_flush:
        flags |= TransmissionFlag.SEND_FLUSH
    if can_fua:
        flags |= TransmissionFlag.SEND_FUA
    if can_trim and not read_only:
        flags |= TransmissionFlag.SEND_TRIM
    if can_write_zeroes and not read_only:
        flags |= TransmissionFlag.SEND_WRITE_ZEROES
        if can_fast_zero:
            # Spec: SEND_FAST_ZERO "MUST [be] 0 if NBD_FLAG_SEND_WRITE_ZEROES is not set".
            flags |= TransmissionFlag.SEND_FAST_ZERO
    if can_cache:
        flags |= TransmissionFlag.SEND_CACHE
    if can_multi_conn:
        flags |= TransmissionFlag.CAN_MULTI_CONN
    return flags


class HandshakeState(Enum):
    NEGOTIATING = auto()
    STARTTLS = auto()
    """STARTTLS was acknowledged: send :meth:`ServerHandshake.data_to_send`, then do the TLS
    handshake before anything else is read or written."""
    TRANSMISSION = auto()
    CLOSED = auto()


class _Phase(Enum):
    """What the next bytes from the client are."""

    CLIENT_FLAGS = auto()
    OPTION_HEADER = auto()
    OPTION_DATA = auto()
    DONE = auto()


def _option_name(option: int) -> str:
    """``NBD_OPT_GO`` for a known option, ``option 42`` for any other number."""
    try:
        return f"NBD_OPT_{Opt(option).name}"
    except ValueError:
        return f"option {option}"


def _clip(message: str) -> bytes:
    """UTF-8 of ``message`` cut to the spec's string limit without splitting a character."""
    encoded = message.encode("utf-8")
    if len(encoded) <= MAX_STRING:
        return encoded
    return encoded[:MAX_STRING].decode("utf-8", "ignore").encode("utf-8")


def _describe_name(name: str) -> str:
    return repr(name) if len(name) <= 256 else repr(name[:256]) + "..."


def _decode_name(raw: bytes) -> str:
    """An export name from the wire, or OptionError(ERR_INVALID) saying what is wrong with it."""
    if len(raw) > MAX_STRING:
        raise OptionError(
            Rep.ERR_INVALID,
            f"export name is {len(raw)} bytes, longer than the {MAX_STRING}-byte limit",
        )
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(Rep.ERR_INVALID, "export name is not valid UTF-8") from None
    if "\0" in name:
        raise OptionError(Rep.ERR_INVALID, "export name contains a NUL character")
    return name


@dataclass(frozen=True, slots=True)
class _InfoRequest:
    name: str
    requests: tuple[int, ...]


def _parse_info_request(option: int, data: bytes) -> _InfoRequest:
    """Parse the shared data of NBD_OPT_INFO and NBD_OPT_GO: u32 namelen, name, u16 n, n x u16."""
    what = _option_name(option)
    if len(data) < 6:
        raise OptionError(Rep.ERR_INVALID, f"{what} data is {len(data)} bytes, at least 6 needed")
    (name_length,) = _U32.unpack_from(data, 0)
    if name_length > len(data) - 6:
        raise OptionError(
            Rep.ERR_INVALID,
            f"{what} name length {name_length} exceeds option length {len(data)} - 6",
        )
    name = _decode_name(data[4 : 4 + name_length])
    (count,) = _U16.unpack_from(data, 4 + name_length)
    rest = len(data) - 6 - name_length
    if rest != 2 * count:
        raise OptionError(
            Rep.ERR_INVALID,
            f"{what} announces {count} information requests but carries {rest} bytes for them",
        )
    requests = struct.unpack_from(f">{count}H", data, 6 + name_length)
    return _InfoRequest(name, requests)


@dataclass(frozen=True, slots=True)
class _MetaRequest:
    name: str
    queries: tuple[str, ...]


def _parse_meta_request(option: int, data: bytes, max_queries: int) -> _MetaRequest:
    """Parse NBD_OPT_LIST/SET_META_CONTEXT data: u32 namelen, name, u32 n, n x (u32 len, query).

    Syntax errors are ERR_INVALID (a MUST); more than ``max_queries`` queries is ERR_TOO_BIG.
    """
    what = _option_name(option)
    size = len(data)
    if size < 8:
        raise OptionError(Rep.ERR_INVALID, f"{what} data is {size} bytes, at least 8 needed")
    (name_length,) = _U32.unpack_from(data, 0)
    if name_length > size - 8:
        raise OptionError(
            Rep.ERR_INVALID, f"{what} name length {name_length} exceeds option length {size} - 8"
        )
    name = _decode_name(data[4 : 4 + name_length])
    pos = 4 + name_length
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > (size - pos) // 4:
        raise OptionError(
            Rep.ERR_INVALID,
            f"{what} announces {count} queries but only {size - pos} bytes follow",
        )
    if count > max_queries:
        raise OptionError(
            Rep.ERR_TOO_BIG, f"{what} has {count} queries, more than the limit of {max_queries}"
        )
    queries: list[str] = []
    for index in range(count):
        if size - pos < 4:
            raise OptionError(Rep.ERR_INVALID, f"{what} query {index} is truncated")
        (length,) = _U32.unpack_from(data, pos)
        pos += 4
        if length > size - pos:
            raise OptionError(
                Rep.ERR_INVALID,
                f"{what} query {index} length {length} runs past the option data",
            )
        if length > MAX_STRING:
            raise OptionError(
                Rep.ERR_INVALID,
                f"{what} query {index} is {length} bytes, over the {MAX_STRING}-byte limit",
            )
        try:
            query = data[pos : pos + length].decode("utf-8")
        except UnicodeDecodeError:
            raise OptionError(Rep.ERR_INVALID, f"{what} query {index} is not UTF-8") from None
        pos += length
        if ":" not in query:
            raise OptionError(
                Rep.ERR_INVALID, f"{what} query {query[:64]!r} lacks a namespace and colon"
            )
        queries.append(query)
    if pos != size:
        raise OptionError(Rep.ERR_INVALID, f"{what} has {size - pos} bytes after its queries")
    return _MetaRequest(name, tuple(queries))


def _match_contexts(queries: Sequence[str], *, listing: bool) -> list[str]:
    """The contexts (all ours are in ``base:``) that ``queries`` select, without duplicates.

    ``base:`` is a wildcard when listing and selects nothing when setting; an unknown ``base:``
    leaf and every other namespace are ignored, as the spec requires.
    """
    if listing and not queries:
        return [BASE_ALLOCATION]
    found: list[str] = []
    for query in queries:
        if query == BASE_ALLOCATION or (listing and query == "base:"):
            if BASE_ALLOCATION not in found:
                found.append(BASE_ALLOCATION)
    return found


_OptionHandler = Callable[["ServerHandshake", int, bytes], None]


@dataclass(frozen=True, slots=True)
class _OptionRule:
    """How one option is handled: the table row the dispatcher follows."""

    handler: _OptionHandler
    takes_data: bool = True
    """False: the spec says the client MUST NOT send data, so data gets ERR_INVALID."""
    max_length: int | None = None
    """A bound tighter than ``max_option_length``, checked as soon as the header is in."""


class ServerHandshake:
    """The server's half of the handshake, from greeting to transmission or close.

    The caller loops: write :meth:`data_to_send`; stop if :attr:`state` is ``TRANSMISSION`` (hand
    :attr:`export` and :attr:`unused_data` to the transmission phase) or ``CLOSED``; otherwise read
    and :meth:`receive_data`. A :class:`ProtocolViolation` from ``receive_data`` means close now.

    ``lookup`` returns None for an export that does not exist, and may raise
    :class:`OptionError` (e.g. ``ERR_POLICY``) to refuse one that does: INFO and GO answer with
    that error, EXPORT_NAME disconnects.

    ``tls_available``: STARTTLS is accepted (else ERR_POLICY). ``tls_required`` (FORCEDTLS):
    before TLS every option but STARTTLS and ABORT gets ERR_TLS_REQD, and EXPORT_NAME a
    disconnect. An export with ``tls_required`` behaves so for itself alone (SELECTIVETLS).
    """

    def __init__(
        self,
        lookup: Callable[[str], ExportInfo | None],
        list_exports: Callable[[], Sequence[ExportInfo]],
        *,
        max_option_length: int = MAX_OPTION_LENGTH,
        max_options: int = MAX_OPTIONS,
        max_meta_queries: int = MAX_META_QUERIES,
        tls_available: bool = False,
        tls_required: bool = False,
    ) -> None:
        if tls_required and not tls_available:
            raise ValueError("tls_required needs tls_available")
        if max_option_length < 0:
            raise ValueError(f"max_option_length must be >= 0, got {max_option_length}")
        if max_options < 1:
            raise ValueError(f"max_options must be >= 1, got {max_options}")
        self._lookup = lookup
        self._list_exports = list_exports
        self._max_option_length = max_option_length
        self._max_options = max_options
        self._max_meta_queries = max_meta_queries
        self._tls_available = tls_available
        self._tls_required = tls_required
        self._tls = False
        self._state = HandshakeState.NEGOTIATING
        self._phase = _Phase.CLIENT_FLAGS
        self._need = _CLIENT_FLAGS.size
        self._buffer = bytearray()
        self._outgoing = bytearray(_GREETING.pack(NBDMAGIC, IHAVEOPT, int(SERVER_HANDSHAKE_FLAGS)))
        self._fixed_newstyle = False
        self._no_zeroes = False
        self._options_seen = 0
        self._shutting_down = False
        self._option = 0
        self._last_info: tuple[bytes, ExportInfo] | None = None
        self._export: ExportInfo | None = None
        self._unused = bytearray()
        self._close_reason: str | None = None
        self._refusals: list[str] = []
        self._structured = False
        self._extended = False
        self._meta: tuple[str, dict[int, str]] | None = None
        self._next_context_id = 1
        self._contexts: dict[int, str] = {}

    @property
    def state(self) -> HandshakeState:
        return self._state

    @property
    def tls(self) -> bool:
        """Whether :meth:`tls_started` was called: negotiation runs over TLS."""
        return self._tls

    @property
    def export(self) -> ExportInfo | None:
        """The chosen export once :attr:`state` is ``TRANSMISSION``, else None."""
        return self._export

    @property
    def fixed_newstyle(self) -> bool:
        """Whether the client set ``NBD_FLAG_C_FIXED_NEWSTYLE``."""
        return self._fixed_newstyle

    @property
    def no_zeroes(self) -> bool:
        """Whether the client set ``NBD_FLAG_C_NO_ZEROES``."""
        return self._no_zeroes

    @property
    def structured_replies(self) -> bool:
        """Whether NBD_OPT_STRUCTURED_REPLY was acknowledged."""
        return self._structured

    @property
    def extended_headers(self) -> bool:
        """Whether NBD_OPT_EXTENDED_HEADERS was acknowledged (replies are all 32-byte chunks)."""
        return self._extended

    @property
    def meta_contexts(self) -> dict[int, str]:
        """Context id -> name selected for the chosen export (empty: NBD_CMD_BLOCK_STATUS is
        refused). Only meaningful once :attr:`state` is ``TRANSMISSION``."""
        return dict(self._contexts)

    @property
    def unused_data(self) -> bytes:
        """Bytes received after the handshake's last byte: pipelined transmission requests. In
        state ``STARTTLS`` these are plaintext the client sent before the TLS handshake, which
        the spec forbids."""
        return bytes(self._unused)

    def take_refusals(self) -> list[str]:
        """The options refused (``NBD_REP_ERR_*`` replies) since the last call, one line each
        for the server's log: option, error and why."""
        refusals, self._refusals = self._refusals, []
        return refusals

    @property
    def close_reason(self) -> str | None:
        """Why the state went ``CLOSED``, for the server's log."""
        return self._close_reason

    @property
    def buffered(self) -> int:
        """Bytes held for the piece of input being assembled (bounded by the option limit)."""
        return len(self._buffer)

    def begin_shutdown(self) -> None:
        """The server is going away: from now on every option but ABORT gets
        ``NBD_REP_ERR_SHUTDOWN`` (the spec's SHOULD), and EXPORT_NAME a disconnect."""
        self._shutting_down = True

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: resume negotiation over TLS.

        Spec: the server "MUST discard" what was negotiated before STARTTLS, since an attacker
        may have altered it, so structured replies, extended headers and meta contexts are gone.
        """
        if self._state is not HandshakeState.STARTTLS:
            raise RuntimeError(f"tls_started() in state {self._state.name}, not STARTTLS")
        self._tls = True
        self._structured = False
        self._extended = False
        self._meta = None
        self._contexts = {}
        self._last_info = None
        self._unused.clear()
        self._state = HandshakeState.NEGOTIATING
        self._expect(_Phase.OPTION_HEADER, OPTION_HEADER_SIZE)

    def data_to_send(self) -> bytes:
        """Return and forget everything queued for the client."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the client, in any split; ``b""`` means the client closed its side.

        Raises ProtocolViolation (and moves to ``CLOSED``) when the client breaks the protocol.
        Bytes after the last handshake byte go to :attr:`unused_data`; after ``CLOSED`` they are
        dropped.
        """
        if self._state is not HandshakeState.NEGOTIATING:
            self._keep_leftover(data)
            return
        if not data:
            self._close("client closed the connection during negotiation")
            return
        view = memoryview(data).cast("B")
        try:
            while view and self._phase is not _Phase.DONE:
                take = self._need - len(self._buffer)
                self._buffer += view[:take]
                view = view[take:]
                if len(self._buffer) == self._need:
                    piece = bytes(self._buffer)
                    self._buffer.clear()
                    _PHASE_READERS[self._phase](self, piece)
        except ProtocolViolation as exc:
            self._close(exc.message)
            raise
        self._keep_leftover(view)

    def _keep_leftover(self, data: bytes | bytearray | memoryview) -> None:
        if self._state in (HandshakeState.TRANSMISSION, HandshakeState.STARTTLS):
            self._unused += data

    def _close(self, reason: str) -> None:
        self._state = HandshakeState.CLOSED
        self._phase = _Phase.DONE
        self._close_reason = reason
        self._buffer.clear()

    def _expect(self, phase: _Phase, size: int) -> None:
        self._phase = phase
        self._need = size

    def _on_client_flags(self, piece: bytes) -> None:
        (flags,) = _CLIENT_FLAGS.unpack(piece)
        unknown = flags & ~_ACCEPTED_CLIENT_FLAGS
        if unknown:
            raise ProtocolViolation(
                f"client flags {flags:#x} set bits {unknown:#x} the server did not advertise"
            )
        self._fixed_newstyle = bool(flags & ClientFlag.FIXED_NEWSTYLE)
        self._no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self._expect(_Phase.OPTION_HEADER, OPTION_HEADER_SIZE)

    def _on_option_header(self, piece: bytes) -> None:
        magic, option, length = _OPTION_HEADER.unpack(piece)
        if magic != IHAVEOPT:
            raise ProtocolViolation(
                f"bad option magic {magic:#018x}, expected IHAVEOPT {IHAVEOPT:#018x}"
            )
        self._options_seen += 1
        if self._options_seen > self._max_options:
            raise ProtocolViolation(
                f"client sent more than {self._max_options} options without choosing an export"
            )
        if not self._fixed_newstyle and option != Opt.EXPORT_NAME:
            raise ProtocolViolation(
                f"{_option_name(option)} from a client without NBD_FLAG_C_FIXED_NEWSTYLE: "
                "non-fixed newstyle allows only NBD_OPT_EXPORT_NAME"
            )
        rule = _OPTION_RULES.get(option, _UNSUPPORTED)
        limit = self._max_option_length
        if rule.max_length is not None:
            limit = min(limit, rule.max_length)
        if length > limit:
            raise ProtocolViolation(
                f"{_option_name(option)} declares {length} bytes of data, over the limit of {limit}"
            )
        self._option = option
        self._expect(_Phase.OPTION_DATA, length)
        if length == 0:
            self._on_option_data(b"")

    def _on_option_data(self, data: bytes) -> None:
        option = self._option
        self._expect(_Phase.OPTION_HEADER, OPTION_HEADER_SIZE)
        rule = _OPTION_RULES.get(option, _UNSUPPORTED)
        previous_info, self._last_info = self._last_info, None
        try:
            if data and not rule.takes_data:
                raise OptionError(
                    Rep.ERR_INVALID,
                    f"{_option_name(option)} takes no data, got {len(data)} bytes",
                )
            if self._shutting_down and option != Opt.ABORT:
                if option == Opt.EXPORT_NAME:
                    self._close("server is shutting down (NBD_OPT_EXPORT_NAME gets a disconnect)")
                    return
                raise OptionError(Rep.ERR_SHUTDOWN, "server is shutting down")
            if self._tls_required and not self._tls and option not in _ALLOWED_BEFORE_TLS:
                if option == Opt.EXPORT_NAME:
                    self._close(
                        "NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS "
                        "(it cannot return an error, so the server disconnects)"
                    )
                    return
                raise OptionError(
                    Rep.ERR_TLS_REQD, f"this server requires TLS before {_option_name(option)}"
                )
            if option == Opt.GO and previous_info is not None and previous_info[0] == data:
                self._finish_info(option, data, _parse_info_request(option, data), previous_info[1])
            else:
                rule.handler(self, option, data)
        except OptionError as exc:
            self._refusals.append(
                f"{_option_name(option)} refused with NBD_REP_{exc.rep.name}: {exc.message}"
            )
            self._reply(option, exc.rep, _clip(exc.message))

    def _reply(self, option: int, rep: Rep, payload: bytes = b"") -> None:
        self._outgoing += _OPTION_REPLY_HEADER.pack(
            OPTION_REPLY_MAGIC, option, int(rep), len(payload)
        )
        self._outgoing += payload

    def _enter_transmission(self, export: ExportInfo) -> None:
        self._export = export
        if self._meta is not None and self._meta[0] == export.name:
            self._contexts = self._meta[1]
        self._state = HandshakeState.TRANSMISSION
        self._phase = _Phase.DONE

    def _handle_export_name(self, option: int, data: bytes) -> None:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("NBD_OPT_EXPORT_NAME name is not valid UTF-8") from None
        if "\0" in name:
            raise ProtocolViolation("NBD_OPT_EXPORT_NAME name contains a NUL character")
        if self._extended:
            raise ProtocolViolation(
                "NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS: the client MUST NOT use it"
            )
        try:
            export = self._lookup(name)
        except OptionError as exc:
            self._close(
                f"export {_describe_name(name)} refused: {exc.message} "
                "(NBD_OPT_EXPORT_NAME cannot return an error, so the server disconnects)"
            )
            return
        if export is not None and export.tls_required and not self._tls:
            self._close(
                f"export {_describe_name(name)} requires TLS, and NBD_OPT_EXPORT_NAME came "
                "before STARTTLS (the server disconnects)"
            )
            return
        if export is not None and export.block_size_required:
            self._close(
                f"export {_describe_name(name)} needs NBD_INFO_BLOCK_SIZE, which "
                "NBD_OPT_EXPORT_NAME cannot request (the server disconnects)"
            )
            return
        if export is None:
            self._close(
                f"export {_describe_name(name)} does not exist "
                "(NBD_OPT_EXPORT_NAME cannot return an error, so the server disconnects)"
            )
            return
        export = self._negotiated(export)
        self._outgoing += _EXPORT_NAME_REPLY.pack(export.size, int(export.flags))
        if not self._no_zeroes:
            self._outgoing += bytes(EXPORT_NAME_PADDING)
        self._enter_transmission(export)

    def _handle_abort(self, option: int, data: bytes) -> None:
        self._reply(option, Rep.ACK)
        self._close("client sent NBD_OPT_ABORT")

    def _handle_list(self, option: int, data: bytes) -> None:
        for export in self._list_exports():
            if export.tls_required and not self._tls:
                continue
            name = export.name.encode("utf-8")
            self._reply(
                option,
                Rep.SERVER,
                _U32.pack(len(name)) + name + export.description.encode("utf-8"),
            )
        self._reply(option, Rep.ACK)

    def _handle_starttls(self, option: int, data: bytes) -> None:
        if not self._tls_available:
            raise OptionError(Rep.ERR_POLICY, "TLS is not configured on this server")
        if self._tls:
            raise OptionError(Rep.ERR_INVALID, "TLS is already negotiated on this connection")
        self._reply(option, Rep.ACK)
        self._state = HandshakeState.STARTTLS
        self._phase = _Phase.DONE

    def _handle_info_or_go(self, option: int, data: bytes) -> None:
        request = _parse_info_request(option, data)
        export = self._checked_lookup(request.name)
        self._finish_info(option, data, request, self._negotiated(export))

    def _checked_lookup(self, name: str) -> ExportInfo:
        """The export for INFO, GO and the meta context options, or the OptionError refusing it."""
        export = self._lookup(name)
        if export is None:
            raise OptionError(Rep.ERR_UNKNOWN, f"export {_describe_name(name)} does not exist")
        if export.tls_required and not self._tls:
            raise OptionError(
                Rep.ERR_TLS_REQD, f"export {_describe_name(name)} requires TLS (NBD_OPT_STARTTLS)"
            )
        return export

    def _negotiated(self, export: ExportInfo) -> ExportInfo:
        """``export`` with the transmission flags that depend on what was negotiated."""
        if self._structured or self._extended:
            return dataclasses.replace(export, flags=export.flags | TransmissionFlag.SEND_DF)
        return export

    def _finish_info(
        self, option: int, data: bytes, request: _InfoRequest, export: ExportInfo
    ) -> None:
        """Send the NBD_REP_INFO replies and the ACK of a successful NBD_OPT_INFO or NBD_OPT_GO.

        A repeated information request is answered once: the spec says a type "SHOULD only appear
        once" and the client "MUST NOT include any information request in the list more than once".
        """
        self._reply(option, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags))
        if export.block_size_required and Info.BLOCK_SIZE not in request.requests:
            # Spec: a server sending ERR_BLOCK_SIZE_REQD "SHOULD ensure it first sends an
            # NBD_INFO_BLOCK_SIZE information reply".
            self._reply(
                option,
                Rep.INFO,
                _INFO_BLOCK_SIZE.pack(
                    Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
                ),
            )
            raise OptionError(
                Rep.ERR_BLOCK_SIZE_REQD,
                f"export {_describe_name(export.name)} requires block sizes "
                f"(minimum {export.min_block}): request NBD_INFO_BLOCK_SIZE",
            )
        for info in dict.fromkeys(request.requests):
            if info == Info.NAME:
                self._reply(option, Rep.INFO, _U16.pack(Info.NAME) + export.name.encode("utf-8"))
            elif info == Info.DESCRIPTION:
                self._reply(
                    option,
                    Rep.INFO,
                    _U16.pack(Info.DESCRIPTION) + export.description.encode("utf-8"),
                )
            elif info == Info.BLOCK_SIZE:
                self._reply(
                    option,
                    Rep.INFO,
                    _INFO_BLOCK_SIZE.pack(
                        Info.BLOCK_SIZE, export.min_block, export.preferred_block, export.max_block
                    ),
                )
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._enter_transmission(export)
        else:
            self._last_info = (data, export)

    def _handle_structured_reply(self, option: int, data: bytes) -> None:
        if self._extended:
            raise OptionError(
                Rep.ERR_EXT_HEADER_REQD,
                "extended headers are already negotiated and take precedence over structured "
                "replies",
            )
        self._structured = True
        self._reply(option, Rep.ACK)

    def _handle_extended_headers(self, option: int, data: bytes) -> None:
        self._extended = True
        self._reply(option, Rep.ACK)

    def _handle_meta_context(self, option: int, data: bytes) -> None:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            # "Issuing this command replaces all previously-set metadata contexts (including
            # when this command fails)".
            self._meta = None
        request = _parse_meta_request(option, data, self._max_meta_queries)
        if setting and not (self._structured or self._extended):
            raise OptionError(
                Rep.ERR_INVALID,
                "NBD_OPT_SET_META_CONTEXT needs structured replies or extended headers first",
            )
        export = self._checked_lookup(request.name)
        selected: dict[int, str] = {}
        for context in _match_contexts(request.queries, listing=not setting):
            context_id = 0
            if setting:
                context_id = self._next_context_id
                self._next_context_id += 1
                selected[context_id] = context
            self._reply(option, Rep.META_CONTEXT, _U32.pack(context_id) + context.encode())
        if setting:
            self._meta = (export.name, selected)
        self._reply(option, Rep.ACK)

    def _handle_unsupported(self, option: int, data: bytes) -> None:
        raise OptionError(Rep.ERR_UNSUP, f"{_option_name(option)} is not supported by this server")


_PHASE_READERS: Final[dict[_Phase, Callable[[ServerHandshake, bytes], None]]] = {
    _Phase.CLIENT_FLAGS: ServerHandshake._on_client_flags,
    _Phase.OPTION_HEADER: ServerHandshake._on_option_header,
    _Phase.OPTION_DATA: ServerHandshake._on_option_data,
}
"""What a completed piece of input is, by phase; DONE reads nothing."""

_UNSUPPORTED: Final = _OptionRule(ServerHandshake._handle_unsupported)

_ALLOWED_BEFORE_TLS: Final = frozenset({Opt.STARTTLS, Opt.ABORT})
"""FORCEDTLS: the options a client may send in plaintext."""

_OPTION_RULES: Final[dict[int, _OptionRule]] = {
    Opt.EXPORT_NAME: _OptionRule(ServerHandshake._handle_export_name, max_length=MAX_STRING),
    Opt.ABORT: _OptionRule(ServerHandshake._handle_abort),
    Opt.LIST: _OptionRule(ServerHandshake._handle_list, takes_data=False),
    Opt.STARTTLS: _OptionRule(ServerHandshake._handle_starttls, takes_data=False),
    Opt.INFO: _OptionRule(ServerHandshake._handle_info_or_go),
    Opt.GO: _OptionRule(ServerHandshake._handle_info_or_go),
    Opt.STRUCTURED_REPLY: _OptionRule(ServerHandshake._handle_structured_reply, takes_data=False),
    Opt.LIST_META_CONTEXT: _OptionRule(ServerHandshake._handle_meta_context),
    Opt.SET_META_CONTEXT: _OptionRule(ServerHandshake._handle_meta_context),
    Opt.EXTENDED_HEADERS: _OptionRule(ServerHandshake._handle_extended_headers, takes_data=False),
}
"""Every option this server implements; any other number (known to the spec or not) gets
ERR_UNSUP and its data is skipped, as the baseline requires."""
