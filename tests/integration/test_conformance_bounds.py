"""The server's bounds (docs/bounds.md), each tested at the limit and one past it, plus the
remaining commands and flags of issue 4: FAST_ZERO, NO_HOLE, CACHE, STARTTLS.

Every test runs against the real server over a Unix socket with the hand-written
``_rawclient``. After each refusal the test checks that the server still serves a fresh client.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from nbd_uring.protocol import MAX_META_QUERIES, MAX_OPTION_LENGTH, MAX_OPTIONS

from . import _rawclient as rc
from ._util import MiB, Server, StartServer

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 32 * MiB
MAX_DISCARD = 256 * MiB


def still_serving(server: Server) -> None:
    c = rc.connect(server.address)
    assert len(c.read(0, 512)) == 512
    c.disconnect()


# --- handshake timeout ------------------------------------------------------------------------


def test_handshake_timeout_one_byte_short(start_nbd_server: StartServer) -> None:
    """Bound: a client must finish negotiating within --handshake-timeout. A client that sends
    all of NBD_OPT_GO but its last byte is dropped when the time is up; one that sends it all in
    time is served."""
    server = start_nbd_server(extra_args=("--handshake-timeout", "0.5"))
    c = rc.handshake_only(server.address)
    go = struct.pack(">QII", rc.IHAVEOPT, rc.OPT_GO, 6) + struct.pack(">IH", 0, 0)
    c.sock.sendall(go[:-1])
    start = time.monotonic()
    assert c.closed_by_server()
    assert 0.3 < time.monotonic() - start < 5
    c.sock.close()
    c = rc.handshake_only(server.address)
    c.sock.sendall(go)
    assert c.read_option_reply().rep == rc.REP_INFO
    assert c.read_option_reply().rep == rc.REP_ACK
    c.disconnect()


# --- option length and option count -----------------------------------------------------------


def test_option_length_at_the_limit_and_one_past(server: Server) -> None:
    """Bound: option data of MAX_OPTION_LENGTH bytes is read (an unknown option gets
    NBD_REP_ERR_UNSUP and negotiation goes on); one byte more is treated as a denial of service
    and the connection is dropped before the data is read."""
    c = rc.handshake_only(server.address)
    [reply] = c.option(0x4242, b"\0" * MAX_OPTION_LENGTH)
    assert reply.rep == rc.REP_ERR_UNSUP
    assert c.go()[-1].rep == rc.REP_ACK
    c.disconnect()
    c = rc.handshake_only(server.address)
    c.sock.sendall(struct.pack(">QII", rc.IHAVEOPT, 0x4242, MAX_OPTION_LENGTH + 1))
    assert c.closed_by_server()
    c.sock.close()
    still_serving(server)


def test_option_count_at_the_limit_and_one_past(server: Server) -> None:
    """Bound: MAX_OPTIONS options (the GO included) are accepted before an export is chosen; the
    option after that many is a denial of service and the connection is dropped."""
    c = rc.handshake_only(server.address)
    for _ in range(MAX_OPTIONS - 1):
        assert c.option(rc.OPT_LIST)[-1].rep == rc.REP_ACK
    assert c.go()[-1].rep == rc.REP_ACK
    c.disconnect()
    c = rc.handshake_only(server.address)
    for _ in range(MAX_OPTIONS):
        assert c.option(rc.OPT_LIST)[-1].rep == rc.REP_ACK
    c.sock.sendall(struct.pack(">QII", rc.IHAVEOPT, rc.OPT_LIST, 0))
    assert c.closed_by_server()
    c.sock.close()
    still_serving(server)


# --- request length ---------------------------------------------------------------------------


def test_read_length_at_the_limit_and_one_past(server: Server) -> None:
    """Bound: READ of the advertised maximum payload (32 MiB) is served; one byte more is
    refused with EINVAL and the connection goes on."""
    c = rc.connect(server.address)
    assert len(c.read(0, MAX_PAYLOAD)) == MAX_PAYLOAD
    [reply] = c.command(rc.CMD_READ, 0, MAX_PAYLOAD + 1)
    assert reply.error == rc.EINVAL and reply.payload == b""
    assert len(c.read(0, 512)) == 512
    c.disconnect()


def test_write_length_one_past_is_skipped_and_discard_limit_disconnects(server: Server) -> None:
    """Bound: a WRITE of 32 MiB + 1 is refused with EINVAL and its payload skipped, keeping the
    stream in sync; a WRITE announcing more than the discard limit (256 MiB) is not worth
    draining, and the connection is dropped ("either the server or the client MAY initiate a hard
    disconnect if a payload length ... would be large enough to be deemed a denial of service")."""
    c = rc.connect(server.address)
    [reply] = c.command(rc.CMD_WRITE, 0, MAX_PAYLOAD + 1, payload=b"\1" * (MAX_PAYLOAD + 1))
    assert reply.error == rc.EINVAL
    assert c.read(0, 512) == bytes(512)
    c.disconnect()
    c = rc.connect(server.address)
    c.request(rc.CMD_WRITE, 0, MAX_DISCARD + 1)
    assert c.closed_by_server()
    c.sock.close()
    still_serving(server)


# --- meta-context queries -------------------------------------------------------------------


def test_meta_context_queries_at_the_limit_and_one_past(server: Server) -> None:
    """Bound: MAX_META_QUERIES queries per NBD_OPT_LIST/SET_META_CONTEXT; one more gets
    NBD_REP_ERR_TOO_BIG ("the server MAY fail with NBD_REP_ERR_TOO_BIG if too many queries are
    requested") and negotiation goes on."""
    c = rc.handshake_only(server.address)
    at = c.meta(rc.OPT_LIST_META, ["base:allocation"] * MAX_META_QUERIES)
    assert [r.rep for r in at] == [rc.REP_META_CONTEXT, rc.REP_ACK]
    [past] = c.meta(rc.OPT_LIST_META, ["base:allocation"] * (MAX_META_QUERIES + 1))
    assert past.rep == rc.REP_ERR_TOO_BIG and past.data
    assert c.go()[-1].rep == rc.REP_ACK
    c.disconnect()


# --- the rest of the commands and flags -------------------------------------------------------


def test_starttls_is_refused_by_policy(server: Server) -> None:
    """NOTLS mode: "the server MUST reply to NBD_OPT_STARTTLS with NBD_REP_ERR_POLICY or
    NBD_REP_ERR_UNSUP" (we answer ERR_POLICY with a message) and negotiation goes on."""
    c = rc.handshake_only(server.address)
    [reply] = c.option(rc.OPT_STARTTLS)
    assert reply.rep == rc.REP_ERR_POLICY and reply.data
    assert c.go()[-1].rep == rc.REP_ACK
    c.disconnect()


def test_cache_is_advertised_and_harmless(server: Server) -> None:
    """NBD_CMD_CACHE: "there MUST NOT be any difference in semantics compared to if the client
    had not used this command"; "if it advertised the command, the server MUST reject any command
    flags it does not recognize"."""
    c = rc.connect(server.address)
    assert c.flags & rc.T_SEND_CACHE
    c.command(rc.CMD_WRITE, 0, 4, payload=b"abcd")
    [ok] = c.command(rc.CMD_CACHE, 0, 8 * MiB)
    assert ok.error == 0
    [bad] = c.command(rc.CMD_CACHE, 0, 4096, flags=rc.FLAG_NO_HOLE)
    assert bad.error == rc.EINVAL
    assert c.read(0, 4) == b"abcd"
    c.disconnect()


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_write_zeroes_no_hole_keeps_the_range_allocated(server: Server) -> None:
    """NO_HOLE: "the area MUST be fully provisioned"; WRITE_ZEROES "MUST ensure that the data
    reads back as zero"; without NO_HOLE the server MAY punch a hole."""
    c = rc.connect(server.address)
    c.command(rc.CMD_WRITE, 0, MiB, payload=b"\xee" * MiB)
    c.command(rc.CMD_FLUSH)
    [r] = c.command(rc.CMD_WRITE_ZEROES, 0, MiB, flags=rc.FLAG_NO_HOLE)
    assert r.error == 0
    assert c.read(0, MiB) == bytes(MiB)
    assert _allocated(server.path) >= MiB
    [r] = c.command(rc.CMD_WRITE_ZEROES, 0, MiB)
    assert r.error == 0 and c.read(0, MiB) == bytes(MiB)
    c.disconnect()


def test_fast_zero(server: Server) -> None:
    """FAST_ZERO: SEND_FAST_ZERO is advertised with SEND_WRITE_ZEROES; with the flag the server
    "MUST fail quickly with NBD_ENOTSUP unless the request can be serviced in less time than a
    corresponding NBD_CMD_WRITE, and SHOULD NOT alter the contents of the export when returning
    an NBD_ENOTSUP failure". Punching a hole or FALLOC_FL_ZERO_RANGE is fast; writing zeroes is
    not (the engine test covers the ENOTSUP path)."""
    c = rc.connect(server.address)
    assert c.flags & rc.T_SEND_FAST_ZERO
    for flags in (rc.FLAG_FAST_ZERO, rc.FLAG_FAST_ZERO | rc.FLAG_NO_HOLE):
        c.command(rc.CMD_WRITE, 0, 8192, payload=b"\x77" * 8192)
        [r] = c.command(rc.CMD_WRITE_ZEROES, 0, 8192, flags=flags)
        if r.error == 0:
            assert c.read(0, 8192) == bytes(8192)
        else:
            assert r.error == rc.ENOTSUP
            assert c.read(0, 8192) == b"\x77" * 8192
    c.disconnect()
