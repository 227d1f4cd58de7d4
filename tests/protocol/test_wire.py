"""Wire constants and the fixed-size transmission codecs, checked against hand-packed bytes."""

import struct

import pytest

from nbd_uring.protocol import (
    IHAVEOPT,
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_SIZE,
    SIMPLE_REPLY_SIZE,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    NbdErrno,
    Opt,
    ProtocolViolation,
    Rep,
    ReplyType,
    Request,
    TransmissionFlag,
    decode_request,
    encode_request,
    encode_simple_reply,
    payload_length,
)


def test_magic_numbers() -> None:
    """Magic values as given in doc/proto.md (request, simple/structured reply, option reply,
    and the reserved extended-header values).
    """
    assert NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert OPTION_REPLY_MAGIC == 0x3E889045565A9
    assert NBD_REQUEST_MAGIC == 0x25609513
    assert NBD_SIMPLE_REPLY_MAGIC == 0x67446698
    assert NBD_STRUCTURED_REPLY_MAGIC == 0x668E33EF
    assert NBD_EXTENDED_REQUEST_MAGIC == 0x21E41C71
    assert NBD_EXTENDED_REPLY_MAGIC == 0x6E8A278C


@pytest.mark.parametrize(
    ("enum", "expected"),
    [
        (HandshakeFlag, {"FIXED_NEWSTYLE": 1, "NO_ZEROES": 2}),
        (ClientFlag, {"FIXED_NEWSTYLE": 1, "NO_ZEROES": 2}),
        (
            TransmissionFlag,
            {
                "HAS_FLAGS": 0,
                "READ_ONLY": 1,
                "SEND_FLUSH": 2,
                "SEND_FUA": 3,
                "ROTATIONAL": 4,
                "SEND_TRIM": 5,
                "SEND_WRITE_ZEROES": 6,
                "SEND_DF": 7,
                "CAN_MULTI_CONN": 8,
                "SEND_RESIZE": 9,
                "SEND_CACHE": 10,
                "SEND_FAST_ZERO": 11,
                "BLOCK_STATUS_PAYLOAD": 12,
            },
        ),
        (
            CmdFlag,
            {"FUA": 0, "NO_HOLE": 1, "DF": 2, "REQ_ONE": 3, "FAST_ZERO": 4, "PAYLOAD_LEN": 5},
        ),
    ],
)
def test_flag_bits(enum: type[HandshakeFlag], expected: dict[str, int]) -> None:
    """Flag fields "are numbered in network byte order": bit n has value 1 << n."""
    if enum in (HandshakeFlag, ClientFlag):
        assert {m.name: m.value for m in enum} == expected
    else:
        assert {m.name: m.value for m in enum} == {k: 1 << v for k, v in expected.items()}


def test_enumerated_values() -> None:
    """Option, reply, info, command, chunk and error values from the "Values" section."""
    assert [(o.name, o.value) for o in Opt] == [
        ("EXPORT_NAME", 1),
        ("ABORT", 2),
        ("LIST", 3),
        ("PEEK_EXPORT", 4),
        ("STARTTLS", 5),
        ("INFO", 6),
        ("GO", 7),
        ("STRUCTURED_REPLY", 8),
        ("LIST_META_CONTEXT", 9),
        ("SET_META_CONTEXT", 10),
        ("EXTENDED_HEADERS", 11),
    ]
    assert [r.value for r in Rep if not r.is_error] == [1, 2, 3, 4]
    assert [r.value - 2**31 for r in Rep if r.is_error] == list(range(1, 11))
    assert Rep.ERR_UNSUP == 2**31 + 1
    assert Rep.ERR_UNKNOWN == 2**31 + 6
    assert [(i.name, i.value) for i in Info] == [
        ("EXPORT", 0),
        ("NAME", 1),
        ("DESCRIPTION", 2),
        ("BLOCK_SIZE", 3),
    ]
    assert [c.name for c in Cmd] == [
        "READ",
        "WRITE",
        "DISC",
        "FLUSH",
        "TRIM",
        "CACHE",
        "WRITE_ZEROES",
        "BLOCK_STATUS",
        "RESIZE",
    ]
    assert [c.value for c in Cmd] == list(range(9))
    assert {t.name: t.value for t in ReplyType} == {
        "NONE": 0,
        "OFFSET_DATA": 1,
        "OFFSET_HOLE": 2,
        "BLOCK_STATUS": 5,
        "BLOCK_STATUS_EXT": 6,
        "ERROR": 2**15 + 1,
        "ERROR_OFFSET": 2**15 + 2,
    }
    assert {e.name: e.value for e in NbdErrno} == {
        "EPERM": 1,
        "EIO": 5,
        "ENOMEM": 12,
        "EINVAL": 22,
        "ENOSPC": 28,
        "EOVERFLOW": 75,
        "ENOTSUP": 95,
        "ESHUTDOWN": 108,
    }


REQUEST_CASES = [
    (
        Request(cookie=0, command=Cmd.READ, flags=0, offset=0, length=512),
        "25609513000000000000000000000000000000000000000000000200",
    ),
    (
        Request(
            cookie=0xDEADBEEF_CAFEF00D, command=Cmd.WRITE, flags=CmdFlag.FUA, offset=4096, length=1
        ),
        "2560951300010001deadbeefcafef00d000000000000100000000001",
    ),
    (
        Request(cookie=2**64 - 1, command=0xFFFF, flags=0xFFFF, offset=2**64 - 1, length=2**32 - 1),
        "25609513ffffffffffffffffffffffffffffffffffffffffffffffff",
    ),
]


@pytest.mark.parametrize(("request_", "wire"), REQUEST_CASES)
def test_request_round_trip(request_: Request, wire: str) -> None:
    """C: 32 bits magic; 16 bits command flags; 16 bits type; 64 bits cookie; 64 bits offset;
    32 bits length.
    """
    raw = bytes.fromhex(wire)
    assert len(raw) == REQUEST_SIZE
    assert encode_request(request_) == raw
    for form in (raw, bytearray(raw), memoryview(raw)):
        assert decode_request(form) == request_


def test_request_fua_property() -> None:
    assert decode_request(bytes.fromhex(REQUEST_CASES[1][1])).fua
    assert not decode_request(bytes.fromhex(REQUEST_CASES[0][1])).fua


@pytest.mark.parametrize("magic", [0, 0x12560953, 0x25609514, NBD_SIMPLE_REPLY_MAGIC])
def test_bad_request_magic_is_a_violation(magic: int) -> None:
    """ "Either side MAY initiate a hard disconnect if it detects a violation by the other party
    of a mandatory condition"; a header without NBD_REQUEST_MAGIC cannot be framed. 0x12560953 is
    the historic request magic, reserved and "must not be used".
    """
    header = struct.pack(">IHHQQI", magic, 0, 0, 1, 0, 0)
    with pytest.raises(ProtocolViolation, match=f"bad request magic {magic:#010x}"):
        decode_request(header)


def test_extended_request_magic_names_the_cause() -> None:
    header = struct.pack(">IHHQQI", NBD_EXTENDED_REQUEST_MAGIC, 0, 0, 1, 0, 0)
    with pytest.raises(ProtocolViolation, match="extended headers were not negotiated"):
        decode_request(header)


@pytest.mark.parametrize("size", [0, 27, 29, 32])
def test_decode_request_needs_exactly_28_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="28 bytes"):
        decode_request(bytes(size))


@pytest.mark.parametrize(
    ("cookie", "error", "wire"),
    [
        (0, 0, "67446698000000000000000000000000"),
        (0x0102030405060708, 22, "67446698000000160102030405060708"),
        (2**64 - 1, NbdErrno.ESHUTDOWN, "674466980000006cffffffffffffffff"),
    ],
)
def test_encode_simple_reply(cookie: int, error: int, wire: str) -> None:
    """S: 32 bits, 0x67446698, magic; S: 32 bits, error (MAY be zero); S: 64 bits, cookie. "the
    server MUST use the same value for handle as was sent by the client".
    """
    raw = encode_simple_reply(cookie, error)
    assert raw == bytes.fromhex(wire)
    assert len(raw) == SIMPLE_REPLY_SIZE


def test_encode_simple_reply_defaults_to_success() -> None:
    assert encode_simple_reply(5) == encode_simple_reply(5, 0)


@pytest.mark.parametrize("command", [*Cmd, 99])
def test_only_write_carries_a_payload(command: int) -> None:
    """C: "(length bytes of data if the request is of type NBD_CMD_WRITE)"."""
    request = Request(cookie=1, command=command, flags=0, offset=0, length=4096)
    assert payload_length(request) == (4096 if command == Cmd.WRITE else 0)
