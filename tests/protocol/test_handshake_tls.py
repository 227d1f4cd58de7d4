"""STARTTLS in the sans-I/O handshake: the STARTTLS state, FORCEDTLS and SELECTIVETLS policy.

The TLS handshake itself is the caller's; here ``tls_started()`` stands for its success. Each
test quotes the sentence of ``doc/proto.md`` ("TLS support") it checks.
"""

import dataclasses

import pytest

from nbd_uring.protocol import (
    ExportInfo,
    HandshakeState,
    Opt,
    ProtocolViolation,
    Rep,
    ServerHandshake,
)

from ._helpers import (
    DEFAULT,
    DISK,
    EXPORTS,
    FIXED,
    GREETING,
    NO_ZEROES,
    OptionReply,
    client_flags,
    info_data,
    option,
    parse_replies,
)

START = client_flags(FIXED | NO_ZEROES)
SECRET = dataclasses.replace(DISK, name="secret", tls_required=True)
SELECTIVE = {e.name: e for e in (DISK, DEFAULT, SECRET)}


def _handshake(
    *, required: bool = False, exports: dict[str, ExportInfo] = EXPORTS
) -> ServerHandshake:
    hs = ServerHandshake(
        exports.get, lambda: list(exports.values()), tls_available=True, tls_required=required
    )
    assert hs.data_to_send() == GREETING
    return hs


def _replies(hs: ServerHandshake, data: bytes) -> list[OptionReply]:
    hs.receive_data(data)
    return parse_replies(hs.data_to_send())


def _upgrade(hs: ServerHandshake, before: bytes = b"") -> None:
    """Send STARTTLS, check its ACK and the STARTTLS state, then report the TLS handshake done."""
    replies = _replies(hs, START + before + option(Opt.STARTTLS))
    assert replies[-1] == OptionReply(Opt.STARTTLS, Rep.ACK, b"")
    assert hs.state is HandshakeState.STARTTLS
    assert hs.unused_data == b""
    hs.tls_started()
    assert hs.state is HandshakeState.NEGOTIATING
    assert hs.tls


def test_starttls_is_acked_and_stops_for_the_tls_handshake() -> None:
    """ "If the server is willing to use TLS, it MUST reply with NBD_REP_ACK. ... the server
    MUST NOT send any more data until TLS negotiation has finished": the state stops reading.
    """
    hs = _handshake()
    hs.receive_data(START + option(Opt.STARTTLS))
    assert parse_replies(hs.data_to_send()) == [OptionReply(Opt.STARTTLS, Rep.ACK, b"")]
    assert hs.state is HandshakeState.STARTTLS
    assert not hs.tls
    hs.receive_data(b"more")
    assert hs.data_to_send() == b""
    assert hs.state is HandshakeState.STARTTLS


def test_plaintext_pipelined_after_starttls_is_reported() -> None:
    """The client "MUST NOT send any further data until TLS negotiation completes": whatever
    arrives behind the STARTTLS option is handed to the caller, which closes the connection."""
    hs = _handshake()
    garbage = option(Opt.GO, info_data("disk"))
    hs.receive_data(START + option(Opt.STARTTLS) + garbage)
    assert hs.state is HandshakeState.STARTTLS
    assert hs.unused_data == garbage


def test_negotiation_after_tls_goes_on_to_transmission() -> None:
    hs = _handshake()
    _upgrade(hs)
    replies = _replies(hs, option(Opt.GO, info_data("disk")))
    assert [r.rep for r in replies] == [Rep.INFO, Rep.ACK]
    assert hs.state is HandshakeState.TRANSMISSION
    assert hs.export is not None and hs.export.name == "disk"


def test_starttls_a_second_time_is_err_invalid() -> None:
    """ "If the server receives NBD_OPT_STARTTLS while TLS is already negotiated, it MUST
    reply with NBD_REP_ERR_INVALID"."""
    hs = _handshake()
    _upgrade(hs)
    (only,) = _replies(hs, option(Opt.STARTTLS))
    assert only.rep == Rep.ERR_INVALID and b"already" in only.payload
    assert hs.state is HandshakeState.NEGOTIATING


def test_tls_started_outside_starttls_is_a_bug() -> None:
    hs = _handshake()
    with pytest.raises(RuntimeError):
        hs.tls_started()


def test_tls_required_without_tls_available_is_refused() -> None:
    with pytest.raises(ValueError):
        ServerHandshake(EXPORTS.get, list, tls_required=True)


def test_negotiated_state_is_discarded_at_starttls() -> None:
    """Options negotiated in plaintext may have been tampered with, so the server discards
    them: structured replies, extended headers and meta contexts must be asked for again."""
    hs = _handshake()
    meta = (
        b"\x00\x00\x00\x04disk"
        + b"\x00\x00\x00\x01"
        + b"\x00\x00\x00\x0fbase:allocation"
    )
    before = option(Opt.EXTENDED_HEADERS) + option(Opt.SET_META_CONTEXT, meta)
    _upgrade(hs, before)
    _replies(hs, option(Opt.GO, info_data("disk")))
    assert hs.state is HandshakeState.TRANSMISSION
    assert not hs.extended_headers
    assert not hs.structured_replies
    assert hs.meta_contexts == {}


def test_options_after_tls_negotiate_normally() -> None:
    hs = _handshake()
    _upgrade(hs, option(Opt.EXTENDED_HEADERS))
    replies = _replies(hs, option(Opt.STRUCTURED_REPLY) + option(Opt.GO, info_data("disk")))
    assert [r.rep for r in replies] == [Rep.ACK, Rep.INFO, Rep.ACK]
    assert hs.structured_replies and not hs.extended_headers


# --- FORCEDTLS -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opt, data",
    [
        (Opt.LIST, b""),
        (Opt.INFO, info_data("disk")),
        (Opt.GO, info_data("disk")),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.EXTENDED_HEADERS, b""),
        (Opt.LIST_META_CONTEXT, b"\x00\x00\x00\x04disk\x00\x00\x00\x00"),
        (99, b"xyz"),
    ],
)
def test_forcedtls_refuses_every_option_before_starttls(opt: int, data: bytes) -> None:
    """FORCEDTLS: the server "MUST reply to any option apart from NBD_OPT_STARTTLS ... with
    NBD_REP_ERR_TLS_REQD" until TLS is negotiated; LIST in particular reveals nothing."""
    hs = _handshake(required=True)
    (only,) = _replies(hs, START + option(opt, data))
    assert only.option == opt
    assert only.rep == Rep.ERR_TLS_REQD
    assert b"TLS" in only.payload
    assert hs.state is HandshakeState.NEGOTIATING


def test_forcedtls_abort_still_works() -> None:
    hs = _handshake(required=True)
    (only,) = _replies(hs, START + option(Opt.ABORT))
    assert only.rep == Rep.ACK
    assert hs.state is HandshakeState.CLOSED


def test_forcedtls_export_name_before_tls_disconnects() -> None:
    """NBD_OPT_EXPORT_NAME has no error reply: the server "MUST terminate the session"."""
    hs = _handshake(required=True)
    hs.receive_data(START + option(Opt.EXPORT_NAME, b"disk"))
    assert hs.data_to_send() == b""
    assert hs.state is HandshakeState.CLOSED
    assert hs.close_reason is not None and "TLS" in hs.close_reason


def test_forcedtls_after_tls_lists_and_serves() -> None:
    hs = _handshake(required=True)
    _upgrade(hs, option(Opt.LIST))
    listing = _replies(hs, option(Opt.LIST))
    assert [r.rep for r in listing] == [Rep.SERVER, Rep.SERVER, Rep.ACK]
    hs.receive_data(option(Opt.EXPORT_NAME, b"disk"))
    assert hs.state is HandshakeState.TRANSMISSION


def test_forcedtls_violations_still_close() -> None:
    hs = _handshake(required=True)
    with pytest.raises(ProtocolViolation):
        hs.receive_data(START + option(Opt.LIST, magic=0x1234))


# --- SELECTIVETLS (per-export) ---------------------------------------------------------------


def test_selective_export_is_hidden_from_plaintext_list() -> None:
    """SELECTIVETLS: TLS-only exports are left out of the plaintext NBD_OPT_LIST."""
    hs = _handshake(exports=SELECTIVE)
    names = [r.payload[4:] for r in _replies(hs, START + option(Opt.LIST)) if r.rep == Rep.SERVER]
    assert b"secret" not in b"".join(names)
    assert len(names) == 2
    hs.receive_data(option(Opt.STARTTLS))
    hs.data_to_send()
    hs.tls_started()
    names = [r.payload[4:] for r in _replies(hs, option(Opt.LIST)) if r.rep == Rep.SERVER]
    assert len(names) == 3 and any(n.startswith(b"secret") for n in names)


@pytest.mark.parametrize("opt", [Opt.INFO, Opt.GO])
def test_selective_export_needs_tls_for_info_and_go(opt: Opt) -> None:
    """ "NBD_REP_ERR_TLS_REQD ... In the case of NBD_OPT_INFO and NBD_OPT_GO this unwillingness
    MAY (depending on the TLS mode) be limited to the export in question."""
    hs = _handshake(exports=SELECTIVE)
    (refused,) = _replies(hs, START + option(opt, info_data("secret")))
    assert refused.rep == Rep.ERR_TLS_REQD
    ok = _replies(hs, option(Opt.INFO, info_data("disk")))
    assert [r.rep for r in ok] == [Rep.INFO, Rep.ACK]
    hs.receive_data(option(Opt.STARTTLS))
    hs.data_to_send()
    hs.tls_started()
    replies = _replies(hs, option(opt, info_data("secret")))
    assert [r.rep for r in replies] == [Rep.INFO, Rep.ACK]


def test_selective_export_name_before_tls_disconnects() -> None:
    hs = _handshake(exports=SELECTIVE)
    hs.receive_data(START + option(Opt.EXPORT_NAME, b"secret"))
    assert hs.state is HandshakeState.CLOSED
    assert hs.close_reason is not None and "requires TLS" in hs.close_reason


def test_selective_plain_export_works_without_tls() -> None:
    hs = _handshake(exports=SELECTIVE)
    hs.receive_data(START + option(Opt.EXPORT_NAME, b"disk"))
    assert hs.state is HandshakeState.TRANSMISSION
