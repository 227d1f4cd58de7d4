"""Handshake transcripts: client bytes built by hand, server bytes compared exactly.

Every transcript goes through ``converse``, which feeds it whole and one byte at a time and
requires the same outcome both ways. Each conformance test quotes the sentence of
``doc/proto.md`` (NetworkBlockDevice/nbd master) that it checks.
"""

import struct

import pytest

from nbd_uring.protocol import (
    MAX_OPTIONS,
    MAX_STRING,
    ExportInfo,
    HandshakeState,
    Info,
    Opt,
    ProtocolViolation,
    Rep,
    ServerHandshake,
    TransmissionFlag,
    transmission_flags_for,
)
from nbd_uring.protocol.handshake import _clip

from ._helpers import (
    DEFAULT,
    DISK,
    FIXED,
    GREETING,
    NO_ZEROES,
    RO_FLAGS,
    client_flags,
    converse,
    feed,
    info_data,
    info_export,
    is_error_with_message,
    no_export,
    option,
    parse_replies,
    reply,
)

START = client_flags(FIXED | NO_ZEROES)
PIPELINED = struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 512)


# --- greeting and client flags ---------------------------------------------------------------


def test_greeting_is_queued_before_any_input() -> None:
    """S: 64 bits, ``NBDMAGIC``; S: 64 bits, ``IHAVEOPT``; S: 16 bits, handshake flags.

    "bit 0, NBD_FLAG_FIXED_NEWSTYLE; MUST be set by servers that support the fixed newstyle
    protocol"; bit 1 is NBD_FLAG_NO_ZEROES, and "The server MUST NOT set any other flags".
    """
    handshake = ServerHandshake(no_export, list)
    assert handshake.data_to_send() == GREETING
    assert handshake.data_to_send() == b""
    assert handshake.state is HandshakeState.NEGOTIATING
    assert handshake.export is None


@pytest.mark.parametrize("flags", [1 << 2, 1 << 31, 0xFFFFFFFF, FIXED | 1 << 5])
def test_unknown_client_flags_drop_the_connection(flags: int) -> None:
    """ "Clients MUST NOT set any other flags; the server MUST drop the TCP connection if the
    client sets an unknown flag, or a flag that does not match something advertised by the
    server."
    """
    outcome = converse(client_flags(flags) + option(Opt.GO, info_data("disk")))
    assert outcome.violation is not None
    assert f"{flags:#x}" in outcome.violation
    assert outcome.sent == GREETING
    assert outcome.state is HandshakeState.CLOSED


@pytest.mark.parametrize("flags", [0, FIXED, NO_ZEROES, FIXED | NO_ZEROES])
def test_advertised_client_flags_are_accepted(flags: int) -> None:
    """ "bit 1, NBD_FLAG_C_NO_ZEROES; MUST NOT be set if the server did not set
    NBD_FLAG_NO_ZEROES": the server sets it, so both defined bits are acceptable.
    """
    outcome = converse(client_flags(flags))
    assert outcome.violation is None
    assert outcome.state is HandshakeState.NEGOTIATING
    assert outcome.no_zeroes is bool(flags & NO_ZEROES)
    handshake = ServerHandshake(no_export, list)
    handshake.receive_data(client_flags(flags))
    assert handshake.fixed_newstyle is bool(flags & FIXED)


# --- NBD_OPT_GO and NBD_OPT_INFO -------------------------------------------------------------


@pytest.mark.parametrize("flags", [FIXED | NO_ZEROES, FIXED])
def test_go_enters_transmission_without_padding(flags: int) -> None:
    """ "after a successful reply to NBD_OPT_GO (i.e. one or more NBD_REP_INFO then an
    NBD_REP_ACK), transmission mode is entered immediately." "The server MUST NOT send any zero
    padding bytes after the NBD_REP_ACK data, whether or not the client negotiated the
    NBD_FLAG_C_NO_ZEROES flag."
    """
    outcome = converse(client_flags(flags) + option(Opt.GO, info_data("disk")))
    assert outcome.sent == GREETING + reply(Opt.GO, Rep.INFO, info_export(DISK)) + reply(
        Opt.GO, Rep.ACK
    )
    assert outcome.state is HandshakeState.TRANSMISSION
    assert outcome.export == DISK
    assert outcome.unused == b""
    assert outcome.close_reason is None


def test_go_with_empty_name_selects_the_default_export() -> None:
    """ "If no name is specified (i.e. a zero length string is provided), this specifies the
    default export (if any), as with NBD_OPT_EXPORT_NAME."
    """
    outcome = converse(START + option(Opt.GO, info_data("")))
    assert outcome.export == DEFAULT
    assert outcome.replies[0].payload == info_export(DEFAULT)


def test_info_replies_requested_items_and_ignores_unknown_ones() -> None:
    """ "The server MUST ignore any information requests it does not understand." INFO_EXPORT is
    "Mandatory information before a successful completion"; NAME, DESCRIPTION and BLOCK_SIZE
    (length 14: min, preferred, max payload) are sent when asked for.
    """
    data = info_data("disk", 99, Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE, 0xFFFF)
    outcome = converse(START + option(Opt.INFO, data))
    assert outcome.sent == GREETING + b"".join(
        [
            reply(Opt.INFO, Rep.INFO, info_export(DISK)),
            reply(Opt.INFO, Rep.INFO, struct.pack(">H", 1) + b"disk"),
            reply(Opt.INFO, Rep.INFO, struct.pack(">H", 2) + b"scratch disk"),
            reply(Opt.INFO, Rep.INFO, struct.pack(">HIII", 3, 1, 4096, 32 * 1024 * 1024)),
            reply(Opt.INFO, Rep.ACK),
        ]
    )
    assert outcome.state is HandshakeState.NEGOTIATING
    assert outcome.export is None


def test_info_answers_a_repeated_request_once() -> None:
    """ "A particular information type SHOULD only appear once for a given export"."""
    outcome = converse(START + option(Opt.INFO, info_data("disk", Info.NAME, Info.NAME)))
    assert [r.rep for r in outcome.replies] == [Rep.INFO, Rep.INFO, Rep.ACK]


def test_info_then_go_returns_the_same_information() -> None:
    """ "If there are no intervening option requests between a successful NBD_OPT_INFO ... and
    an NBD_OPT_GO with the same parameters ..., then the server MUST reply with the same set of
    information, such as transmission flags in the NBD_INFO_EXPORT reply".

    The lookup here answers differently on every call, as a resized export would.
    """

    def run(pieces: list[bytes]) -> tuple[bytes, ExportInfo | None]:
        sizes = iter([4096, 8192, 16384])

        def lookup(name: str) -> ExportInfo:
            return ExportInfo(name, next(sizes), RO_FLAGS)

        outcome = feed(pieces, lookup=lookup)
        return outcome.sent, outcome.export

    data = info_data("disk", Info.BLOCK_SIZE)
    client = START + option(Opt.INFO, data) + option(Opt.GO, data)
    sent, export = run([client])
    assert run([client[i : i + 1] for i in range(len(client))]) == (sent, export)
    replies = parse_replies(sent[len(GREETING) :])
    assert [r.option for r in replies] == [Opt.INFO] * 3 + [Opt.GO] * 3
    assert [(r.rep, r.payload) for r in replies[:3]] == [(r.rep, r.payload) for r in replies[3:]]
    assert export is not None
    assert export.size == 4096


def test_go_after_an_intervening_option_looks_the_export_up_again() -> None:
    """ "Otherwise, due to the intervening option requests or the use of different parameters,
    the server MAY send different data in the successful response".
    """
    sizes = iter([4096, 8192])

    def lookup(name: str) -> ExportInfo:
        return ExportInfo(name, next(sizes), RO_FLAGS)

    data = info_data("disk")
    outcome = feed(
        [START + option(Opt.INFO, data) + option(99) + option(Opt.GO, data)], lookup=lookup
    )
    assert outcome.export is not None
    assert outcome.export.size == 8192


def test_go_on_unknown_export_is_err_unknown_and_negotiation_continues() -> None:
    """ "NBD_REP_ERR_UNKNOWN: The chosen export does not exist on this server. In this case, the
    server SHOULD NOT send NBD_REP_INFO replies."
    """
    outcome = converse(
        START + option(Opt.GO, info_data("nope")) + option(Opt.GO, info_data("disk"))
    )
    first, *rest = outcome.replies
    assert is_error_with_message(first, Rep.ERR_UNKNOWN)
    assert first.payload == b"export 'nope' does not exist"
    assert [r.rep for r in rest] == [Rep.INFO, Rep.ACK]
    assert outcome.state is HandshakeState.TRANSMISSION


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "at least 6"),
        (b"\x00\x00\x00\x00\x00", "at least 6"),
        (struct.pack(">I", 5) + b"disk" + b"\x00\x00", "name length 5"),
        (struct.pack(">I", 0xFFFFFFFF) + b"\x00\x00", "name length 4294967295"),
        (info_data("disk") + b"\x00", "carries 1 bytes"),
        (info_data("disk", 1)[:-1], "announces 1"),
        (info_data(b"\xff\xfe"), "UTF-8"),
        (info_data(b"di\x00sk"), "NUL"),
        (info_data(b"x" * (MAX_STRING + 1)), "4097 bytes"),
    ],
)
@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_malformed_info_and_go_are_err_invalid(opt: Opt, data: bytes, why: str) -> None:
    """Data: "32 bits, length of name (unsigned); MUST be no larger than the option data length
    - 6", the name, "16 bits, number of information requests", "16 bits x n". NBD_REP_ERR_INVALID:
    "The option sent by the client is known by this server, but was determined by the server to
    be syntactically or semantically invalid." Strings "MUST NOT contain NUL characters" and
    "MUST be no longer than 4096 bytes".
    """
    outcome = converse(START + option(opt, data) + option(Opt.GO, info_data("disk")))
    first, *rest = outcome.replies
    assert is_error_with_message(first, Rep.ERR_INVALID)
    assert why in first.payload.decode()
    assert [r.rep for r in rest] == [Rep.INFO, Rep.ACK]


def test_pipelined_requests_after_go_land_in_unused_data() -> None:
    """The client "MUST NOT send further option requests unless the final reply from the server
    indicates an error", but may send transmission requests right behind NBD_OPT_GO: those bytes
    belong to the transmission phase.
    """
    outcome = converse(START + option(Opt.GO, info_data("disk")) + PIPELINED + PIPELINED)
    assert outcome.state is HandshakeState.TRANSMISSION
    assert outcome.unused == PIPELINED + PIPELINED


def test_bytes_fed_after_transmission_are_kept_as_unused_data() -> None:
    handshake = ServerHandshake({"disk": DISK}.get, list)
    handshake.receive_data(START + option(Opt.GO, info_data("disk")) + PIPELINED[:10])
    handshake.receive_data(PIPELINED[10:])
    assert handshake.unused_data == PIPELINED


# --- NBD_OPT_EXPORT_NAME ---------------------------------------------------------------------


def test_export_name_without_no_zeroes_sends_124_zero_bytes() -> None:
    """ "S: 64 bits, size of the export in bytes (unsigned); S: 16 bits, transmission flags;
    S: 124 bytes, zeroes (reserved) (unless NBD_FLAG_C_NO_ZEROES was negotiated by the client)".
    """
    outcome = converse(client_flags(FIXED) + option(Opt.EXPORT_NAME, b"disk") + PIPELINED)
    assert outcome.sent == GREETING + struct.pack(">QH", DISK.size, int(DISK.flags)) + bytes(124)
    assert outcome.state is HandshakeState.TRANSMISSION
    assert outcome.export == DISK
    assert outcome.unused == PIPELINED


@pytest.mark.parametrize("flags", [FIXED | NO_ZEROES, NO_ZEROES])
def test_export_name_with_no_zeroes_omits_the_padding(flags: int) -> None:
    """NBD_FLAG_NO_ZEROES: "if set, and if the client replies with NBD_FLAG_C_NO_ZEROES in the
    client flags field, the server MUST NOT send the 124 bytes of zero when the client ends
    negotiation with NBD_OPT_EXPORT_NAME."
    """
    outcome = converse(client_flags(flags) + option(Opt.EXPORT_NAME, b"disk"))
    assert outcome.sent == GREETING + struct.pack(">QH", DISK.size, int(DISK.flags))
    assert outcome.state is HandshakeState.TRANSMISSION


def test_export_name_empty_is_the_default_export() -> None:
    """ "A special, "empty", name (i.e., the length field is zero and no name is specified), is
    reserved for a "default" export".
    """
    outcome = converse(START + option(Opt.EXPORT_NAME))
    assert outcome.export == DEFAULT
    assert outcome.sent == GREETING + struct.pack(">QH", DEFAULT.size, int(DEFAULT.flags))


def test_export_name_of_unknown_export_disconnects() -> None:
    """ "If the chosen export does not exist ... the server MUST terminate the session." The
    server "cannot return an error (e.g. after an NBD_OPT_EXPORT_NAME it cannot satisfy)", so this
    is a hard disconnect: state CLOSED, nothing sent, later bytes ignored.
    """
    outcome = converse(START + option(Opt.EXPORT_NAME, b"nope") + option(Opt.GO, info_data("")))
    assert outcome.sent == GREETING
    assert outcome.state is HandshakeState.CLOSED
    assert outcome.violation is None
    assert outcome.close_reason is not None
    assert "'nope' does not exist" in outcome.close_reason


def test_export_name_longer_than_max_string_disconnects_before_buffering() -> None:
    """A string "MUST be no longer than 4096 bytes. This applies to export names"; a longer
    NBD_OPT_EXPORT_NAME is refused from its header alone, since the option cannot carry an error.
    """
    outcome = converse(START + option(Opt.EXPORT_NAME, length=MAX_STRING + 1))
    assert outcome.violation is not None
    assert "4097" in outcome.violation
    assert "4096" in outcome.violation
    assert outcome.max_buffered <= 16


@pytest.mark.parametrize(("name", "why"), [(b"\xc3", "UTF-8"), (b"a\x00b", "NUL")])
def test_export_name_that_is_not_a_valid_string_is_a_violation(name: bytes, why: str) -> None:
    """A string is "a sequence of UTF-8 code points, which ... MUST NOT contain NUL characters";
    a client breaking a MUST may be hard-disconnected ("If either the client or the server detects
    a violation of a mandatory condition ('MUST' etc.) by the other party, it MAY initiate a hard
    disconnect").
    """
    outcome = converse(START + option(Opt.EXPORT_NAME, name))
    assert outcome.violation is not None
    assert why in outcome.violation


# --- non-fixed newstyle ----------------------------------------------------------------------


def test_non_fixed_newstyle_client_can_use_export_name() -> None:
    """ "In non-fixed newstyle only one option can be set (NBD_OPT_EXPORT_NAME), and it is not
    optional."
    """
    outcome = converse(client_flags(0) + option(Opt.EXPORT_NAME, b"disk"))
    assert outcome.state is HandshakeState.TRANSMISSION
    assert outcome.sent == GREETING + struct.pack(">QH", DISK.size, int(DISK.flags)) + bytes(124)


@pytest.mark.parametrize("opt", [Opt.GO, Opt.LIST, Opt.ABORT, 42])
def test_non_fixed_newstyle_client_sending_other_options_is_disconnected(opt: int) -> None:
    """ "This is the only valid option in nonfixed newstyle negotiation." Before fixed newstyle
    "the server would immediately close the connection when it saw an option it did not
    understand": a non-fixed client cannot parse option replies, so the server closes instead of
    replying.
    """
    outcome = converse(client_flags(NO_ZEROES) + option(opt, info_data("disk")))
    assert outcome.violation is not None
    assert "NBD_FLAG_C_FIXED_NEWSTYLE" in outcome.violation
    assert outcome.sent == GREETING


# --- NBD_OPT_ABORT ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_is_acked_and_closes(data: bytes) -> None:
    """NBD_OPT_ABORT: "The server MUST reply with NBD_REP_ACK." "The client SHOULD NOT send any
    additional data with the option; however, a server SHOULD ignore any data sent by the client
    rather than rejecting the request as invalid."
    """
    outcome = converse(START + option(Opt.ABORT, data) + option(Opt.GO, info_data("disk")))
    assert outcome.sent == GREETING + reply(Opt.ABORT, Rep.ACK)
    assert outcome.state is HandshakeState.CLOSED
    assert outcome.close_reason == "client sent NBD_OPT_ABORT"
    assert outcome.violation is None


def test_client_closing_during_negotiation_closes() -> None:
    """ "the server SHOULD gracefully handle the client sending an NBD_OPT_ABORT and closing the
    connection without waiting for a reply": end of input (``b""``) is a clean close.
    """
    handshake = ServerHandshake(no_export, list)
    handshake.receive_data(START)
    handshake.receive_data(b"")
    assert handshake.state is HandshakeState.CLOSED
    assert handshake.close_reason == "client closed the connection during negotiation"
    handshake.receive_data(option(Opt.GO, info_data("")))
    assert handshake.data_to_send() == GREETING


# --- NBD_OPT_LIST ----------------------------------------------------------------------------


def test_list_sends_one_server_reply_per_export_then_ack() -> None:
    """NBD_OPT_LIST: "Return zero or more NBD_REP_SERVER replies, one for each export, followed
    by NBD_REP_ACK". NBD_REP_SERVER: "32 bits, length of name (unsigned) ... String, name of the
    export ... the rest of the data ... this field is defined to be a string suitable for direct
    display to a human being."
    """
    outcome = converse(START + option(Opt.LIST) + option(Opt.GO, info_data("disk")))
    assert outcome.sent.startswith(
        GREETING
        + reply(Opt.LIST, Rep.SERVER, struct.pack(">I", 4) + b"disk" + b"scratch disk")
        + reply(Opt.LIST, Rep.SERVER, struct.pack(">I", 0))
        + reply(Opt.LIST, Rep.ACK)
    )
    assert outcome.state is HandshakeState.TRANSMISSION


def test_list_with_no_exports_is_a_single_ack() -> None:
    """ "Return zero or more NBD_REP_SERVER replies ... followed by NBD_REP_ACK"."""
    outcome = converse(START + option(Opt.LIST), list_exports=list)
    assert outcome.sent == GREETING + reply(Opt.LIST, Rep.ACK)


def test_list_with_data_is_err_invalid() -> None:
    """ "The client MUST NOT send any additional data with the option, and the server SHOULD
    reject a request that includes data with NBD_REP_ERR_INVALID."
    """
    outcome = converse(START + option(Opt.LIST, b"xyz") + option(Opt.LIST), list_exports=list)
    first, second = outcome.replies
    assert is_error_with_message(first, Rep.ERR_INVALID)
    assert first.payload == b"NBD_OPT_LIST takes no data, got 3 bytes"
    assert second.rep == Rep.ACK


# --- STARTTLS and unsupported options --------------------------------------------------------


def test_starttls_is_refused_by_policy() -> None:
    """NOTLS mode: "If the server receives NBD_OPT_STARTTLS it MUST respond with
    NBD_REP_ERR_POLICY (if it does not support TLS for policy reasons) ... The server MUST NOT
    respond to any option request with NBD_REP_ERR_TLS_REQD."
    """
    outcome = converse(START + option(Opt.STARTTLS) + option(Opt.GO, info_data("disk")))
    first, *rest = outcome.replies
    assert first == type(first)(
        Opt.STARTTLS, Rep.ERR_POLICY, b"TLS is not configured on this server"
    )
    assert [r.rep for r in rest] == [Rep.INFO, Rep.ACK]
    assert all(r.rep != Rep.ERR_TLS_REQD for r in outcome.replies)


def test_starttls_with_data_is_err_invalid() -> None:
    """ "The client MUST NOT send any additional data with the option. The server MUST either
    reply with NBD_REP_ACK ... or an error reply explicitly permitted by this document (for
    example, NBD_REP_ERR_INVALID if the client included data)."
    """
    outcome = converse(START + option(Opt.STARTTLS, b"\x01"))
    (only,) = outcome.replies
    assert is_error_with_message(only, Rep.ERR_INVALID)


@pytest.mark.parametrize(
    "opt",
    [
        Opt.PEEK_EXPORT,
        0,
        12,
        0x7FFFFFFF,
        0xFFFFFFFF,
    ],
)
@pytest.mark.parametrize("data", [b"", b"\x00" * 37])
def test_unsupported_options_get_err_unsup_and_the_next_option_works(opt: int, data: bytes) -> None:
    """Baseline: "Servers that receive messages which they do not implement MUST reply to them
    with NBD_REP_ERR_UNSUP, and MUST NOT fail to parse the next message received." "The presence
    of the option length in every option allows the server to skip any options presented by the
    client that it does not understand."
    """
    outcome = converse(START + option(opt, data) + option(Opt.GO, info_data("disk")))
    first, *rest = outcome.replies
    assert first.option == opt
    assert is_error_with_message(first, Rep.ERR_UNSUP)
    assert "not supported" in first.payload.decode()
    assert [r.rep for r in rest] == [Rep.INFO, Rep.ACK]
    assert outcome.state is HandshakeState.TRANSMISSION


# --- framing violations and limits -----------------------------------------------------------


def test_bad_option_magic_is_a_violation() -> None:
    """C: 64 bits, ``IHAVEOPT`` "(note same newstyle handshake's magic number)" starts every
    option; without it the stream cannot be framed, a violation of a mandatory condition.
    """
    outcome = converse(START + option(Opt.GO, info_data("disk"), magic=0x4E42444D41474943))
    assert outcome.violation is not None
    assert "bad option magic 0x4e42444d41474943" in outcome.violation
    assert outcome.sent == GREETING


def test_option_over_the_length_bound_is_refused_from_its_header() -> None:
    """ "if a server believes a client's behaviour constitutes a denial of service, it MAY
    initiate a hard disconnect": an option declaring more data than the bound is refused as soon
    as its 16-byte header is in, before any of the data is sent or buffered.
    """
    handshake = ServerHandshake(no_export, list, max_option_length=64)
    handshake.receive_data(START)
    with pytest.raises(ProtocolViolation) as info:
        handshake.receive_data(option(Opt.GO, length=65))
    assert info.value.message == "NBD_OPT_GO declares 65 bytes of data, over the limit of 64"
    assert handshake.state is HandshakeState.CLOSED
    assert handshake.buffered == 0


@pytest.mark.parametrize("length", [64, 0xFFFFFFFF])
def test_option_length_bound_is_inclusive(length: int) -> None:
    """An option of exactly ``max_option_length`` bytes is accepted; one of 2^32-1 is not."""
    outcome = converse(
        START + option(42, bytes(min(length, 64)), length=length), max_option_length=64
    )
    if length == 64:
        assert outcome.violation is None
        assert outcome.replies[0].rep == Rep.ERR_UNSUP
    else:
        assert outcome.violation is not None
        assert "4294967295" in outcome.violation
    assert outcome.max_buffered <= 16 + 64


def test_too_many_options_is_a_violation() -> None:
    """ "if a server believes a client's behaviour constitutes a denial of service, it MAY
    initiate a hard disconnect": an endless stream of options before choosing an export is one.
    """
    outcome = converse(START + option(42) * 4, max_options=3)
    assert len(outcome.replies) == 3
    assert outcome.violation == "client sent more than 3 options without choosing an export"


def test_default_option_count_limit() -> None:
    outcome = converse(
        START + option(Opt.INFO, info_data("disk")) * MAX_OPTIONS + option(Opt.ABORT)
    )
    assert outcome.violation is not None
    assert len([r for r in outcome.replies if r.rep == Rep.ACK]) == MAX_OPTIONS


def test_error_messages_stay_within_the_string_limit() -> None:
    """Error messages are strings, which "MUST be no longer than 4096 bytes"."""
    name = "\u00e9" * 2048
    outcome = converse(START + option(Opt.GO, info_data(name)), max_option_length=1 << 16)
    (only,) = outcome.replies
    assert only.rep == Rep.ERR_UNKNOWN
    assert len(only.payload) <= MAX_STRING
    only.payload.decode("utf-8")


def test_data_after_a_violation_is_ignored() -> None:
    handshake = ServerHandshake(no_export, list)
    with pytest.raises(ProtocolViolation, match="client flags"):
        handshake.receive_data(client_flags(0x100))
    handshake.receive_data(START + option(Opt.LIST))
    assert handshake.data_to_send() == GREETING
    assert handshake.state is HandshakeState.CLOSED


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"max_option_length": -1}, "max_option_length"), ({"max_options": 0}, "max_options")],
)
def test_limits_are_validated(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerHandshake(no_export, list, **kwargs)


# --- ExportInfo and transmission_flags_for ---------------------------------------------------


def test_transmission_flags_for_a_writable_export() -> None:
    """ "bit 0, NBD_FLAG_HAS_FLAGS: MUST always be 1."""
    assert transmission_flags_for(read_only=False) == (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_TRIM
        | TransmissionFlag.SEND_WRITE_ZEROES
        | TransmissionFlag.CAN_MULTI_CONN
    )


def test_transmission_flags_for_a_read_only_export_hide_write_commands() -> None:
    """NBD_FLAG_READ_ONLY: "If this flag is set, the server MUST error subsequent write
    operations to the export", so TRIM and WRITE_ZEROES are not exposed at all.
    """
    assert transmission_flags_for(read_only=True) == (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.READ_ONLY
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.CAN_MULTI_CONN
    )


def test_transmission_flags_for_minimal_capabilities() -> None:
    assert (
        transmission_flags_for(
            read_only=False,
            can_flush=False,
            can_fua=False,
            can_trim=False,
            can_write_zeroes=False,
            can_multi_conn=False,
        )
        == TransmissionFlag.HAS_FLAGS
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": -1}, "64 bits"),
        ({"size": 1 << 64}, "64 bits"),
        ({"flags": TransmissionFlag.READ_ONLY}, "HAS_FLAGS"),
        ({"flags": TransmissionFlag(1 << 16 | 1)}, "16 bits"),
        ({"min_block": 3}, "power of 2"),
        ({"min_block": 1 << 17, "preferred_block": 1 << 17, "max_block": 1 << 17}, "no larger"),
        ({"preferred_block": 256}, "at least 512"),
        ({"min_block": 8192}, "at least 8192"),
        ({"max_block": 2048}, "max_block"),
        ({"max_block": 1 << 32}, "max_block"),
        ({"name": "a\0b"}, "NUL"),
        ({"name": "x" * (MAX_STRING + 1)}, "4097 bytes"),
        ({"description": "\u00e9" * 2049}, "4098 bytes"),
    ],
)
def test_export_info_rejects_values_the_spec_forbids(kwargs: dict[str, object], match: str) -> None:
    """Minimum block: "MUST be a power of 2, MUST NOT be larger than 2^16". Preferred: "MUST be a
    power of 2 at least as large as the maximum of the minimum block size and 2^9". Maximum
    payload: "MUST be at least as large as the preferred block size"; it is a 32-bit field.
    """
    fields: dict[str, object] = {"name": "x", "size": 0, "flags": RO_FLAGS, **kwargs}
    with pytest.raises(ValueError, match=match):
        ExportInfo(**fields)  # type: ignore[arg-type]


def test_export_info_accepts_the_no_limit_payload() -> None:
    """ "Advertising a maximum payload size of 0xffffffff is permitted"."""
    ExportInfo("x", 0, RO_FLAGS, min_block=65536, preferred_block=65536, max_block=0xFFFFFFFF)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("short", b"short"),
        ("x" * 5000, b"x" * MAX_STRING),
        ("x" * 4095 + "\u00e9", b"x" * 4095),
    ],
)
def test_error_messages_are_clipped_on_a_character_boundary(message: str, expected: bytes) -> None:
    """Error messages are strings: "a sequence of UTF-8 code points" that "MUST be no longer than
    4096 bytes"; clipping must not leave half a character behind.
    """
    assert _clip(message) == expected


def test_lookup_may_refuse_by_policy() -> None:
    """An export the lookup refuses with OptionError(ERR_POLICY) gets that error on GO (the
    negotiation goes on), and a disconnect on EXPORT_NAME, which "MUST NOT" be answered with an
    option reply."""
    import struct

    from nbd_uring.protocol import (
        IHAVEOPT,
        ClientFlag,
        ExportInfo,
        HandshakeState,
        Opt,
        OptionError,
        Rep,
        ServerHandshake,
        transmission_flags_for,
    )

    info = ExportInfo(name="x", size=4096, flags=transmission_flags_for(read_only=False))

    def refuse(name: str) -> ExportInfo | None:
        raise OptionError(Rep.ERR_POLICY, "address 127.0.0.2 is not allowed")

    flags = struct.pack(">I", int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    go = struct.pack(">IH", 1, 0)[:4] + b"x" + struct.pack(">H", 0)
    hs = ServerHandshake(refuse, lambda: [info])
    hs.data_to_send()
    hs.receive_data(flags + struct.pack(">QII", IHAVEOPT, Opt.GO, len(go)) + go)
    out = hs.data_to_send()
    _magic, option, rep, length = struct.unpack(">QIII", out[:20])
    assert (option, rep) == (Opt.GO, Rep.ERR_POLICY)
    assert b"not allowed" in out[20 : 20 + length]
    assert hs.state is HandshakeState.NEGOTIATING

    hs = ServerHandshake(refuse, lambda: [info])
    hs.data_to_send()
    hs.receive_data(flags + struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 1) + b"x")
    assert hs.data_to_send() == b""
    assert hs.state is HandshakeState.CLOSED
    assert hs.close_reason is not None and "not allowed" in hs.close_reason


def test_shutdown_answers_err_shutdown() -> None:
    """"When the server is shutting down, it SHOULD answer options (except ABORT) with
    NBD_REP_ERR_SHUTDOWN"; EXPORT_NAME, which cannot carry an error, gets a disconnect."""
    import struct

    from nbd_uring.protocol import (
        IHAVEOPT,
        ClientFlag,
        ExportInfo,
        HandshakeState,
        Opt,
        Rep,
        ServerHandshake,
        transmission_flags_for,
    )

    info = ExportInfo(name="", size=4096, flags=transmission_flags_for(read_only=False))
    flags = struct.pack(">I", int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES))
    hs = ServerHandshake(lambda name: info, lambda: [info])
    hs.data_to_send()
    hs.receive_data(flags)
    hs.begin_shutdown()
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Opt.LIST, 0))
    out = hs.data_to_send()
    assert struct.unpack(">QIII", out[:20])[1:3] == (Opt.LIST, Rep.ERR_SHUTDOWN)
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Opt.ABORT, 0))
    assert struct.unpack(">QIII", hs.data_to_send()[:20])[1:3] == (Opt.ABORT, Rep.ACK)
    assert hs.state is HandshakeState.CLOSED

    hs = ServerHandshake(lambda name: info, lambda: [info])
    hs.data_to_send()
    hs.receive_data(flags)
    hs.begin_shutdown()
    hs.receive_data(struct.pack(">QII", IHAVEOPT, Opt.EXPORT_NAME, 0))
    assert hs.data_to_send() == b""
    assert hs.state is HandshakeState.CLOSED
