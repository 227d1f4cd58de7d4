"""Structured replies, metadata contexts, extended headers and block sizes in the sans-I/O core.

Client bytes and expected server bytes are written out by hand (hex, from the spec's field
tables), so the encoders are checked against the spec rather than against themselves.
"""

import struct

import pytest

from nbd_uring.protocol import (
    MAX_META_QUERIES,
    ChunkEncoder,
    Cmd,
    CmdFlag,
    ExportInfo,
    HandshakeState,
    Info,
    NbdErrno,
    Opt,
    ProtocolViolation,
    Rep,
    Request,
    RequestError,
    ServerHandshake,
    TransmissionFlag,
    check_request,
    decode_extended_request,
    encode_extended_request,
    extended_payload_length,
    transmission_flags_for,
)

from ._helpers import (
    DISK,
    EXPORTS,
    FIXED,
    GREETING,
    NO_ZEROES,
    all_exports,
    client_flags,
    converse,
    info_data,
    option,
    parse_replies,
)

START = client_flags(FIXED | NO_ZEROES)
DIRECT = ExportInfo(
    "direct", 1 << 20, DISK.flags, min_block=4096, preferred_block=4096, block_size_required=True
)
ALL = {**EXPORTS, "direct": DIRECT}


def meta_data(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def session(client: bytes, *, max_meta_queries: int = MAX_META_QUERIES) -> ServerHandshake:
    """Feed ``client`` whole; return the machine (its replies are in ``sent``)."""
    hs = ServerHandshake(ALL.get, all_exports, max_meta_queries=max_meta_queries)
    hs.data_to_send()
    hs.receive_data(client)
    return hs


def replies_of(hs: ServerHandshake) -> list[tuple[int, int, bytes]]:
    return [(r.option, r.rep, r.payload) for r in parse_replies(hs.data_to_send())]


def go_flags(replies: list[tuple[int, int, bytes]]) -> int:
    for _opt, rep, payload in replies:
        if rep == Rep.INFO and payload[:2] == b"\0\0":
            return int(struct.unpack(">HQH", payload)[2])
    raise AssertionError("no NBD_INFO_EXPORT")


# --- NBD_OPT_STRUCTURED_REPLY and NBD_OPT_EXTENDED_HEADERS ----------------------------------


def test_structured_reply_is_acked_and_enables_send_df() -> None:
    """STRUCTURED_REPLY: "NBD_REP_ACK: Structured replies have been negotiated"; SEND_DF "MUST
    [be left] clear if neither structured replies nor extended headers have been negotiated"."""
    plain = session(START + option(Opt.GO, info_data("disk")))
    assert not go_flags(replies_of(plain)) & TransmissionFlag.SEND_DF
    hs = session(START + option(Opt.STRUCTURED_REPLY) + option(Opt.GO, info_data("disk")))
    replies = replies_of(hs)
    assert replies[0] == (Opt.STRUCTURED_REPLY, Rep.ACK, b"")
    assert go_flags(replies) & TransmissionFlag.SEND_DF
    assert hs.structured_replies and not hs.extended_headers
    assert hs.export is not None and hs.export.flags & TransmissionFlag.SEND_DF


@pytest.mark.parametrize("opt", [Opt.STRUCTURED_REPLY, Opt.EXTENDED_HEADERS])
def test_data_with_reply_style_options_is_err_invalid(opt: Opt) -> None:
    """ "The client MUST NOT send any additional data with the option, and the server SHOULD
    reject a request that includes data with NBD_REP_ERR_INVALID.\""""
    hs = session(START + option(opt, b"xyz"))
    [(o, rep, msg)] = replies_of(hs)
    assert (o, rep) == (opt, Rep.ERR_INVALID) and msg
    assert not hs.structured_replies and not hs.extended_headers


def test_structured_reply_after_extended_headers_is_ext_header_reqd() -> None:
    """NBD_REP_ERR_EXT_HEADER_REQD "is also used to indicate that the server is unable to
    downgrade to structured replies ... if extended headers have already been enabled"."""
    hs = session(START + option(Opt.EXTENDED_HEADERS) + option(Opt.STRUCTURED_REPLY))
    replies = replies_of(hs)
    assert replies[0] == (Opt.EXTENDED_HEADERS, Rep.ACK, b"")
    assert replies[1][:2] == (Opt.STRUCTURED_REPLY, Rep.ERR_EXT_HEADER_REQD)
    assert hs.extended_headers and not hs.structured_replies


def test_export_name_after_extended_headers_is_a_violation() -> None:
    """ "Once extended headers are successfully requested, a client MUST NOT use
    NBD_OPT_EXPORT_NAME"; EXPORT_NAME has no error reply, so the server hangs up."""
    hs = ServerHandshake(ALL.get, all_exports)
    hs.data_to_send()
    with pytest.raises(ProtocolViolation, match="EXTENDED_HEADERS"):
        hs.receive_data(START + option(Opt.EXTENDED_HEADERS) + option(Opt.EXPORT_NAME, b"disk"))
    assert hs.state is HandshakeState.CLOSED


def test_info_then_go_agree_on_negotiated_flags() -> None:
    """ "If there are no intervening option requests between a successful NBD_OPT_INFO ... and
    an NBD_OPT_GO with the same parameters ..., then the server MUST reply with the same set of
    information, such as transmission flags"."""
    data = info_data("disk", Info.BLOCK_SIZE)
    outcome = converse(
        START + option(Opt.STRUCTURED_REPLY) + option(Opt.INFO, data) + option(Opt.GO, data)
    )
    infos = [r.payload for r in outcome.replies if r.rep == Rep.INFO]
    assert len(infos) == 4 and infos[:2] == infos[2:]


# --- metadata contexts -----------------------------------------------------------------------


def test_list_meta_context_byte_for_byte() -> None:
    """NBD_REP_META_CONTEXT: "32 bits, NBD metadata context ID" (SHOULD be zero when listing)
    then the name; the list ends with NBD_REP_ACK."""
    outcome = converse(START + option(Opt.LIST_META_CONTEXT, meta_data("disk", "base:")))
    assert outcome.sent == GREETING + bytes.fromhex(
        "0003e889045565a9" "00000009" "00000004" "00000013" "00000000"
    ) + b"base:allocation" + bytes.fromhex("0003e889045565a9" "00000009" "00000001" "00000000")


def test_set_meta_context_selects_for_the_go_export_only() -> None:
    """BLOCK_STATUS needs SET_META_CONTEXT that "referred to the same export name that was
    ultimately selected for transmission phase"."""
    sr = option(Opt.STRUCTURED_REPLY)
    same = session(
        START + sr + option(Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation"))
        + option(Opt.GO, info_data("disk"))
    )
    assert list(same.meta_contexts.values()) == ["base:allocation"]
    other = session(
        START + sr + option(Opt.SET_META_CONTEXT, meta_data("", "base:allocation"))
        + option(Opt.GO, info_data("disk"))
    )
    assert other.state is HandshakeState.TRANSMISSION and other.meta_contexts == {}


def test_set_meta_context_ids_are_unique_and_failure_clears() -> None:
    """ "one for each selected metadata context, each with a unique metadata context ID";
    "Issuing this command replaces all previously-set metadata contexts (including when this
    command fails)"."""
    sr = option(Opt.STRUCTURED_REPLY)
    good = option(Opt.SET_META_CONTEXT, meta_data("disk", "base:allocation"))
    hs = session(START + sr + good + good)
    ids = [
        struct.unpack_from(">I", p)[0] for _o, rep, p in replies_of(hs) if rep == Rep.META_CONTEXT
    ]
    assert len(ids) == 2 and ids[0] != ids[1]
    bad = option(Opt.SET_META_CONTEXT, meta_data("disk", "nocolon"))
    hs = session(START + sr + good + bad + option(Opt.GO, info_data("disk")))
    assert hs.meta_contexts == {}


def test_meta_query_without_colon_is_err_invalid() -> None:
    """A query "MUST start with a namespace and a colon"; "For requests that are semantically
    invalid (such as lacking the required colon ...), the server MAY fail the request with
    NBD_REP_ERR_INVALID"."""
    hs = session(START + option(Opt.LIST_META_CONTEXT, meta_data("disk", "allocation")))
    assert replies_of(hs)[0][1] == Rep.ERR_INVALID


@pytest.mark.parametrize(
    "data",
    [
        b"",
        struct.pack(">I", 10) + b"disk",  # name runs past the data
        meta_data("disk")[:-1],  # count truncated
        meta_data("disk", "base:allocation")[:-1],  # query truncated
        meta_data("disk", "base:allocation") + b"\0",  # trailing byte
        struct.pack(">I", 0) + struct.pack(">I", 0xFFFFFFFF),  # count past the data
        struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 2) + b"\xff\xfe",
    ],
)
def test_syntactically_invalid_meta_requests(data: bytes) -> None:
    """ "If the option request is syntactically invalid ..., the server MUST fail the request with
    NBD_REP_ERR_INVALID." Negotiation continues."""
    hs = session(START + option(Opt.LIST_META_CONTEXT, data) + option(Opt.GO, info_data("disk")))
    replies = replies_of(hs)
    assert replies[0][:2] == (Opt.LIST_META_CONTEXT, Rep.ERR_INVALID) and replies[0][2]
    assert hs.state is HandshakeState.TRANSMISSION


@pytest.mark.parametrize("opt", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_query_count_bound_one_past(opt: Opt) -> None:
    """Bound: at most ``max_meta_queries`` queries; one more is NBD_REP_ERR_TOO_BIG ("the server
    MAY fail with NBD_REP_ERR_TOO_BIG if too many queries are requested")."""
    limit = 4
    sr = option(Opt.STRUCTURED_REPLY)
    at = session(
        START + sr + option(opt, meta_data("disk", *["base:allocation"] * limit)),
        max_meta_queries=limit,
    )
    assert replies_of(at)[-1][1] == Rep.ACK
    past = session(
        START + sr + option(opt, meta_data("disk", *["base:allocation"] * (limit + 1))),
        max_meta_queries=limit,
    )
    last = replies_of(past)[-1]
    assert last[1] == Rep.ERR_TOO_BIG and b"limit of 4" in last[2]


# --- block sizes -----------------------------------------------------------------------------


def test_block_size_required_export() -> None:
    """ERR_BLOCK_SIZE_REQD: "The server MUST NOT send this error if size constraints were
    requested with NBD_INFO_BLOCK_SIZE"; "A server sending an NBD_REP_ERR_BLOCK_SIZE_REQD error
    SHOULD ensure it first sends an NBD_INFO_BLOCK_SIZE information reply"."""
    hs = session(START + option(Opt.GO, info_data("direct")))
    replies = replies_of(hs)
    assert [r[1] for r in replies] == [Rep.INFO, Rep.INFO, Rep.ERR_BLOCK_SIZE_REQD]
    assert replies[1][2] == struct.pack(">HIII", Info.BLOCK_SIZE, 4096, 4096, 32 << 20)
    assert hs.state is HandshakeState.NEGOTIATING
    hs = session(START + option(Opt.GO, info_data("direct", Info.BLOCK_SIZE)))
    assert replies_of(hs)[-1][1] == Rep.ACK and hs.state is HandshakeState.TRANSMISSION


def test_block_size_required_export_name_disconnects() -> None:
    """A server with non-default constraints "MAY refuse to go into transmission phase with a
    client that uses NBD_OPT_EXPORT_NAME (via a hard disconnect)"."""
    hs = session(START + option(Opt.EXPORT_NAME, b"direct"))
    assert hs.state is HandshakeState.CLOSED and hs.data_to_send() == b""


# --- chunk encoders: hand-assembled bytes ----------------------------------------------------

SR = ChunkEncoder(extended=False)
EXT = ChunkEncoder(extended=True)
COOKIE = 0x0102030405060708


@pytest.mark.parametrize(
    ("encoded", "expected"),
    [
        (SR.none(COOKIE, 0), "668e33ef 0001 0000 0102030405060708 00000000"),
        (
            SR.offset_data(COOKIE, 0, 0x1000, 4, done=False),
            "668e33ef 0000 0001 0102030405060708 0000000c 0000000000001000",
        ),
        (
            SR.offset_hole(COOKIE, 0, 0x2000, 0x200, done=True),
            "668e33ef 0001 0002 0102030405060708 0000000c 0000000000002000 00000200",
        ),
        (
            SR.error(COOKIE, 0, NbdErrno.EIO, "ab"),
            "668e33ef 0001 8001 0102030405060708 00000008 00000005 0002 6162",
        ),
        (
            SR.error(COOKIE, 0, NbdErrno.EIO, "", error_offset=0x10, done=False),
            "668e33ef 0000 8002 0102030405060708 0000000e 00000005 0000 0000000000000010",
        ),
        (
            SR.block_status(COOKIE, 0, 1, [(0x1000, 3), (0x200, 0)], done=True),
            "668e33ef 0001 0005 0102030405060708 00000014 00000001"
            " 00001000 00000003 00000200 00000000",
        ),
        (
            EXT.none(COOKIE, 0x1234),
            "6e8a278c 0001 0000 0102030405060708 0000000000001234 0000000000000000",
        ),
        (
            EXT.block_status(COOKIE, 0x1234, 2, [(1 << 33, 3)], done=True),
            "6e8a278c 0001 0006 0102030405060708 0000000000001234 0000000000000018"
            " 00000002 00000001 0000000200000000 0000000000000003",
        ),
        (
            EXT.error(COOKIE, 7, NbdErrno.EINVAL, "x"),
            "6e8a278c 0001 8001 0102030405060708 0000000000000007 0000000000000007"
            " 00000016 0001 78",
        ),
    ],
)
def test_chunk_layout(encoded: bytes, expected: str) -> None:
    """Structured chunk: magic 0x668e33ef, u16 flags, u16 type, u64 cookie, u32 length; extended
    chunk: magic 0x6e8a278c, u16 flags, u16 type, u64 cookie, u64 offset ("MUST match the
    *offset* of the client's request"), u64 length; payloads as in "Structured reply types"."""
    assert encoded == bytes.fromhex(expected.replace(" ", ""))


def test_error_message_is_clipped_to_4096_bytes() -> None:
    """ERROR *message length* "MUST NOT exceed the 4096 bytes string length limit"."""
    chunk = SR.error(1, 0, NbdErrno.EIO, "é" * 5000)
    (msglen,) = struct.unpack_from(">H", chunk, 24)
    assert msglen <= 4096 and chunk[26:].decode()


def test_encoders_refuse_illegal_chunks() -> None:
    """OFFSET_HOLE *hole size* "MUST be nonzero"; ERROR *error* "MUST be nonzero"; a status chunk
    holds "one or more descriptors"."""
    with pytest.raises(ValueError):
        SR.offset_hole(1, 0, 0, 0, done=True)
    with pytest.raises(ValueError):
        SR.error(1, 0, 0, "x")
    with pytest.raises(ValueError):
        SR.block_status(1, 0, 1, [], done=True)


# --- extended requests -----------------------------------------------------------------------


def test_decode_extended_request_from_spec_layout() -> None:
    """C: 32 bits 0x21e41c71, 16 bits flags, 16 bits type, 64 bits cookie, 64 bits offset,
    64 bits payload/effect length."""
    raw = bytes.fromhex("21e41c71 0021 0001 0000000000000009 0000000140000000 0000000000000200"
                        .replace(" ", ""))
    request = decode_extended_request(raw)
    assert (request.flags, request.command, request.cookie) == (0x21, Cmd.WRITE, 9)
    assert (request.offset, request.length) == (5 << 30, 512)
    assert encode_extended_request(request) == raw
    assert extended_payload_length(request) == 512
    assert extended_payload_length(Request(1, Cmd.TRIM, 0, 0, 1 << 40)) == 0


def test_compact_magic_after_extended_headers_is_a_violation() -> None:
    raw = struct.pack(">IHHQQQ", 0x25609513, 0, 0, 1, 0, 512)
    with pytest.raises(ProtocolViolation, match="compact header"):
        decode_extended_request(raw)


EXT_EXPORT = ExportInfo(
    "big",
    6 << 30,
    transmission_flags_for(read_only=False, can_cache=True, can_fast_zero=True)
    | TransmissionFlag.SEND_DF,
)


def test_extended_write_needs_payload_len() -> None:
    """ "The command NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN in this mode"."""
    with pytest.raises(RequestError, match="PAYLOAD_LEN") as info:
        check_request(Request(1, Cmd.WRITE, 0, 0, 512), EXT_EXPORT, extended=True)
    assert info.value.nbd_errno is NbdErrno.EINVAL
    check_request(Request(1, Cmd.WRITE, CmdFlag.PAYLOAD_LEN, 0, 512), EXT_EXPORT, extended=True)


@pytest.mark.parametrize("command", [Cmd.READ, Cmd.TRIM, Cmd.BLOCK_STATUS, Cmd.FLUSH])
def test_payload_len_elsewhere_is_einval(command: Cmd) -> None:
    """PAYLOAD_LEN on other commands "will trigger an NBD_EINVAL error unless the command
    documents an optional payload form ... and the server has implemented that form"; it is
    never valid in compact mode ("the client MUST NOT use the NBD_CMD_FLAG_PAYLOAD_LEN flag")."""
    request = Request(1, command, CmdFlag.PAYLOAD_LEN, 0, 512)
    for extended in (True, False):
        with pytest.raises(RequestError) as info:
            check_request(request, EXT_EXPORT, extended=extended, meta_contexts=1)
        assert info.value.nbd_errno is NbdErrno.EINVAL


@pytest.mark.parametrize("command", [Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.CACHE, Cmd.BLOCK_STATUS])
def test_64_bit_effect_lengths_are_accepted(command: Cmd) -> None:
    check_request(Request(1, command, 0, 0, 5 << 30), EXT_EXPORT, extended=True, meta_contexts=1)


@pytest.mark.parametrize(
    ("command", "flag", "needed"),
    [
        (Cmd.READ, CmdFlag.DF, TransmissionFlag.SEND_DF),
        (Cmd.WRITE_ZEROES, CmdFlag.FAST_ZERO, TransmissionFlag.SEND_FAST_ZERO),
    ],
)
def test_gated_flags(command: Cmd, flag: CmdFlag, needed: TransmissionFlag) -> None:
    """DF: "MUST NOT be set unless the transmission flags include NBD_FLAG_SEND_DF"; FAST_ZERO:
    "If the server did not advertise NBD_FLAG_SEND_FAST_ZERO, then it ... SHOULD fail with
    NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set"."""
    request = Request(1, command, flag, 0, 512)
    check_request(request, EXT_EXPORT)
    without = ExportInfo("x", EXT_EXPORT.size, EXT_EXPORT.flags & ~needed)
    with pytest.raises(RequestError) as info:
        check_request(request, without)
    assert info.value.nbd_errno is NbdErrno.EINVAL


def test_block_status_req_one_valid_only_with_contexts() -> None:
    request = Request(1, Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 4096)
    check_request(request, EXT_EXPORT, meta_contexts=1)
    with pytest.raises(RequestError, match="SET_META_CONTEXT"):
        check_request(request, EXT_EXPORT)


def test_fast_zero_needs_write_zeroes() -> None:
    """SEND_FAST_ZERO: the server "MUST set this transmission flag to 0 if
    NBD_FLAG_SEND_WRITE_ZEROES is not set"."""
    flags = transmission_flags_for(read_only=True, can_fast_zero=True, can_cache=True)
    assert not flags & TransmissionFlag.SEND_FAST_ZERO and flags & TransmissionFlag.SEND_CACHE
    flags = transmission_flags_for(read_only=False, can_write_zeroes=False, can_fast_zero=True)
    assert not flags & TransmissionFlag.SEND_FAST_ZERO
