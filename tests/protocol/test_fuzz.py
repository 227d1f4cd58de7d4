"""Hypothesis: whatever a client sends, the core parses it or raises ProtocolViolation.

Invariant (h11's fuzz harness, restated): no matter what bytes arrive, ServerHandshake makes
progress or raises ProtocolViolation, never anything else; it never holds more than one option
header plus ``max_option_length`` bytes; and the outcome does not depend on how the bytes are
split. Request headers give a Request, a RequestError or a ProtocolViolation, never anything else.
"""

import itertools
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from nbd_uring.protocol import (
    IHAVEOPT,
    REQUEST_SIZE,
    Cmd,
    ExportInfo,
    HandshakeState,
    Opt,
    ProtocolViolation,
    Rep,
    RequestError,
    TransmissionFlag,
    check_request,
    decode_extended_request,
    decode_request,
    extended_payload_length,
)

from ._helpers import GREETING, Outcome, feed, info_data, parse_replies

MAX_OPTION_LENGTH = 256

option_numbers = st.one_of(st.sampled_from(list(Opt)), st.integers(0, 2**32 - 1))


@st.composite
def option_bytes(draw: st.DrawFn) -> bytes:
    """One option, mostly well framed, with data that is sometimes a valid INFO/GO body."""
    opt = draw(st.one_of(st.sampled_from(list(Opt)), option_numbers))
    data = draw(
        st.one_of(
            st.binary(max_size=64),
            st.builds(
                info_data,
                st.sampled_from(["disk", "", "nope", "d\u00e9"]),
                *[st.integers(0, 5)] * 3,
            ),
        )
    )
    if draw(st.integers(0, 9)):
        return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data
    length = draw(st.integers(0, 2**32 - 1))
    magic = draw(st.one_of(st.just(IHAVEOPT), st.integers(0, 2**64 - 1)))
    return struct.pack(">QII", magic, opt, length) + data


client_streams = st.one_of(
    st.binary(max_size=512),
    st.builds(
        lambda flags, options, tail: struct.pack(">I", flags) + b"".join(options) + tail,
        st.one_of(st.sampled_from([3, 1, 2, 0]), st.sampled_from([3]), st.integers(0, 2**32 - 1)),
        st.lists(option_bytes(), max_size=8),
        st.binary(max_size=64),
    ),
)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=400, deadline=None)
@given(client_streams, st.lists(st.integers(0, 2**16), max_size=8))
def test_handshake_never_raises_anything_but_protocol_violation(
    client: bytes, cuts: list[int]
) -> None:
    def run(pieces: list[bytes]) -> Outcome:
        return feed(pieces, max_option_length=MAX_OPTION_LENGTH, max_options=6)

    whole = run([client] if client else [])
    pieces = run(split_at(client, cuts))
    bytewise = run([client[i : i + 1] for i in range(len(client))])
    assert whole == pieces == bytewise
    for outcome in (whole, pieces, bytewise):
        assert outcome.max_buffered <= 16 + MAX_OPTION_LENGTH
    assert whole.sent.startswith(GREETING)
    if whole.violation is not None:
        assert whole.state is HandshakeState.CLOSED
    if whole.state is HandshakeState.TRANSMISSION:
        assert whole.export is not None
    else:
        assert whole.export is None
        assert whole.unused == b""
    if whole.state is not HandshakeState.TRANSMISSION or whole.sent.endswith(
        struct.pack(">QIII", 0x3E889045565A9, Opt.GO, Rep.ACK, 0)
    ):
        for r in parse_replies(whole.sent[len(GREETING) :]):
            assert r.rep != Rep.ERR_TLS_REQD
            if r.rep & 2**31:
                r.payload.decode("utf-8")


EXPORT = ExportInfo(
    "disk",
    1 << 20,
    TransmissionFlag(0x1FFF) & ~TransmissionFlag.READ_ONLY,
    min_block=512,
)
READ_ONLY = ExportInfo("ro", 12345, TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY)


@st.composite
def request_headers(draw: st.DrawFn) -> bytes:
    magic = draw(st.one_of(st.just(0x25609513), st.integers(0, 2**32 - 1)))
    flags = draw(st.one_of(st.integers(0, 0x3F), st.integers(0, 0xFFFF)))
    command = draw(st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF)))
    cookie = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.one_of(st.integers(0, 1 << 21), st.integers(0, 2**64 - 1)))
    length = draw(st.one_of(st.integers(0, 1 << 21), st.integers(0, 2**32 - 1)))
    return struct.pack(">IHHQQI", magic, flags, command, cookie, offset, length)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(request_headers(), st.binary(min_size=REQUEST_SIZE, max_size=REQUEST_SIZE)))
def test_request_headers_decode_or_fail_cleanly(header: bytes) -> None:
    try:
        request = decode_request(header)
    except ProtocolViolation:
        return
    for export in (EXPORT, READ_ONLY):
        try:
            check_request(request, export)
        except RequestError as exc:
            assert exc.message
            continue
        assert request.offset + request.length <= export.size or request.command in (
            Cmd.DISC,
            Cmd.FLUSH,
        )


@st.composite
def extended_headers(draw: st.DrawFn) -> bytes:
    magic = draw(st.one_of(st.just(0x21E41C71), st.integers(0, 2**32 - 1)))
    flags = draw(st.one_of(st.integers(0, 0x3F), st.integers(0, 0xFFFF)))
    command = draw(st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFF)))
    cookie = draw(st.integers(0, 2**64 - 1))
    offset = draw(st.one_of(st.integers(0, 1 << 21), st.integers(0, 2**64 - 1)))
    length = draw(st.one_of(st.integers(0, 1 << 21), st.integers(0, 2**64 - 1)))
    return struct.pack(">IHHQQQ", magic, flags, command, cookie, offset, length)


@settings(max_examples=1000, deadline=None)
@given(
    st.one_of(extended_headers(), st.binary(min_size=32, max_size=32)),
    st.integers(0, 2),
)
def test_extended_headers_decode_or_fail_cleanly(header: bytes, contexts: int) -> None:
    """Extended requests: a Request, a RequestError or a ProtocolViolation, nothing else; an
    accepted request never reaches past the export, and the payload that follows is announced
    only with NBD_CMD_FLAG_PAYLOAD_LEN (and is bounded by the maximum payload when accepted)."""
    try:
        request = decode_extended_request(header)
    except ProtocolViolation:
        return
    for export in (EXPORT, READ_ONLY):
        try:
            check_request(request, export, extended=True, meta_contexts=contexts)
        except RequestError as exc:
            assert exc.message
            continue
        plen = extended_payload_length(request)
        assert plen == 0 or (request.command == Cmd.WRITE and plen <= export.max_block)
        assert request.offset + request.length <= export.size or request.command in (
            Cmd.DISC,
            Cmd.FLUSH,
        )


meta_queries = st.lists(
    st.one_of(
        st.sampled_from(["base:allocation", "base:", "base:x", "qemu:dirty-bitmap:a", "nocolon"]),
        st.text(max_size=12),
    ),
    max_size=6,
)


@st.composite
def meta_options(draw: st.DrawFn) -> bytes:
    opt = draw(st.sampled_from([Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]))
    name = draw(st.sampled_from([b"disk", b"", b"nope"]))
    queries = [q.encode() for q in draw(meta_queries)]
    data = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    data += b"".join(struct.pack(">I", len(q)) + q for q in queries)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] + draw(st.binary(max_size=8))
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(meta_options(), max_size=5))
def test_meta_context_options_always_get_a_final_reply(sr: bool, options: list[bytes]) -> None:
    """Every meta-context option ends in exactly one ACK or error reply, the ids of one SET are
    unique, and a GO afterwards still enters transmission."""
    client = struct.pack(">I", 3)
    if sr:
        client += struct.pack(">QII", IHAVEOPT, Opt.STRUCTURED_REPLY, 0)
    go = info_data("disk")
    client += b"".join(options) + struct.pack(">QII", IHAVEOPT, Opt.GO, len(go)) + go
    outcome = feed([client], max_options=16)
    assert outcome.violation is None
    assert outcome.state is HandshakeState.TRANSMISSION
    replies = parse_replies(outcome.sent[len(GREETING) :])
    finals = [r for r in replies if r.rep == Rep.ACK or r.rep & 2**31]
    assert len(finals) == len(options) + 1 + int(sr)
    ids: list[int] = []
    for r in replies:
        if r.rep == Rep.META_CONTEXT:
            if r.option == Opt.SET_META_CONTEXT:
                ids.append(struct.unpack_from(">I", r.payload)[0])
            else:
                assert r.payload[:4] == b"\0\0\0\0"
            r.payload[4:].decode("utf-8")
    assert len(ids) == len(set(ids))
