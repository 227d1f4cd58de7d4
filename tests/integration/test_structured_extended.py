"""Extended headers (NBD_OPT_EXTENDED_HEADERS, ``extension-ext-header`` branch of the spec).

Debian 12's libnbd and qemu predate the extension, so three independent peers check it:
``_rawclient`` (our own client code, written from the spec's layout), literal byte strings
assembled by hand from the spec's field tables (so a shared misreading of the layout cannot pass
both sides), and, when ``trixie-peers`` is prepared, libnbd 1.22 / qemu 10 from Debian 13.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from . import _rawclient as rc
from ._util import GiB, MiB, Server, StartServer, run

pytestmark = pytest.mark.integration

SIZE = 6 * GiB  # larger than 2^32, so 64-bit effect lengths mean something
TRIXIE = "/work/shared/tools/trixie-peers/trixie-peers"


@pytest.fixture
def big(tmp_path: Path, start_nbd_server: StartServer) -> Server:
    path = tmp_path / "big.img"
    with path.open("wb") as f:
        f.truncate(SIZE)
        f.seek(5 * GiB)
        f.write(b"\x5a" * MiB)
    return start_nbd_server(path)


def test_negotiation_rules(big: Server) -> None:
    """After NBD_OPT_EXTENDED_HEADERS: STRUCTURED_REPLY gets NBD_REP_ERR_EXT_HEADER_REQD ("the
    server is unable to downgrade to structured replies ... if extended headers have already been
    enabled"); data with the option gets ERR_INVALID ("the server SHOULD reject a request that
    includes data"); GO still works ("the server MUST also support NBD_OPT_GO")."""
    c = rc.handshake_only(big.address)
    [bad] = c.option(rc.OPT_EXTENDED_HEADERS, b"x")
    assert bad.rep == rc.REP_ERR_INVALID
    assert c.option(rc.OPT_EXTENDED_HEADERS)[-1].rep == rc.REP_ACK
    [sr] = c.option(rc.OPT_STRUCTURED_REPLY)
    assert sr.rep == rc.REP_ERR_EXT_HEADER_REQD and sr.data
    c.extended = True
    assert c.go()[-1].rep == rc.REP_ACK
    assert c.flags & rc.T_SEND_DF
    assert not c.flags & rc.T_BLOCK_STATUS_PAYLOAD
    c.disconnect()


def test_export_name_after_extended_headers_disconnects(big: Server) -> None:
    """ "Once extended headers are successfully requested, a client MUST NOT use
    NBD_OPT_EXPORT_NAME": the option cannot carry an error, so the server hangs up."""
    c = rc.handshake_only(big.address)
    assert c.option(rc.OPT_EXTENDED_HEADERS)[-1].rep == rc.REP_ACK
    c.sock.sendall(struct.pack(">QII", rc.IHAVEOPT, rc.OPT_EXPORT_NAME, 0))
    assert c.closed_by_server()
    c.sock.close()


def test_every_reply_is_an_extended_chunk_echoing_the_offset(big: Server) -> None:
    """ "If extended headers are negotiated, all server replies MUST use an extended reply; the
    server MUST NOT use simple replies even when there is no payload"; the reply *offset* "MUST
    match the *offset* of the client's request"."""
    c = rc.connect(big.address, extended=True)
    for command, offset, length, flags, payload in (
        (rc.CMD_WRITE, 4096, 512, rc.FLAG_PAYLOAD_LEN, b"w" * 512),
        (rc.CMD_FLUSH, 0, 0, 0, b""),
        (rc.CMD_READ, 4096, 512, 0, b""),
        (rc.CMD_TRIM, 8192, 4096, 0, b""),
        (rc.CMD_READ, SIZE, 512, 0, b""),
    ):
        chunks = c.command(command, offset, length, flags=flags, payload=payload)
        assert all(ch.magic == rc.EXTENDED_MAGIC and ch.offset == offset for ch in chunks)
        assert chunks[-1].done
    c.disconnect()


def test_write_needs_payload_len(big: Server) -> None:
    """ "The command NBD_CMD_WRITE MUST use the flag NBD_CMD_FLAG_PAYLOAD_LEN in this mode": a
    WRITE without it is refused with EINVAL (no payload follows it, so the stream stays in sync).
    """
    c = rc.connect(big.address, extended=True)
    [chunk] = c.command(rc.CMD_WRITE, 0, 512)
    assert chunk.type == rc.TYPE_ERROR and chunk.error_chunk()[0] == rc.EINVAL
    assert c.read(0, 512) == bytes(512)
    c.disconnect()


def test_unexpected_payload_is_consumed_then_einval(big: Server) -> None:
    """ "a server SHOULD gracefully consume *length* bytes of payload (even if it then replies
    with an NBD_EINVAL failure because the particular command was not expecting a payload), and
    proceed with the next client command" — here a TRIM and a BLOCK_STATUS with a payload (we do
    not advertise NBD_FLAG_BLOCK_STATUS_PAYLOAD)."""
    c = rc.connect(big.address, extended=True)
    for command in (rc.CMD_TRIM, rc.CMD_BLOCK_STATUS):
        [chunk] = c.command(command, 0, 100, flags=rc.FLAG_PAYLOAD_LEN, payload=b"\xff" * 100)
        assert chunk.type == rc.TYPE_ERROR and chunk.error_chunk()[0] == rc.EINVAL
    assert c.read(5 * GiB, 16) == b"\x5a" * 16
    c.disconnect()


def test_payload_over_the_maximum_disconnects(big: Server) -> None:
    """ "A server SHOULD initiate hard disconnect if a client sets the NBD_CMD_FLAG_PAYLOAD_LEN
    flag and uses a *length* larger than a server's advertised or default maximum payload"."""
    c = rc.connect(big.address, extended=True)
    c.request(rc.CMD_WRITE, 0, 32 * MiB + 1, flags=rc.FLAG_PAYLOAD_LEN)
    assert c.closed_by_server()
    c.sock.close()


def test_64_bit_effect_lengths(big: Server) -> None:
    """Extended headers carry 64-bit lengths for TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS:
    one request may cover more than 4 GiB."""
    c = rc.connect(big.address, extended=True, contexts=("base:allocation",))
    [ctx] = c.contexts
    [status] = c.command(rc.CMD_BLOCK_STATUS, 0, SIZE)
    assert status.type == rc.TYPE_BLOCK_STATUS_EXT
    got_ctx, extents = rc.parse_block_status(status)
    assert got_ctx == ctx
    assert extents == [(5 * GiB, 3), (MiB, 0), (GiB - MiB, 3)]
    for command in (rc.CMD_CACHE, rc.CMD_WRITE_ZEROES, rc.CMD_TRIM):
        [chunk] = c.command(command, 0, 5 * GiB)
        assert chunk.type == rc.TYPE_NONE and chunk.done, chunk
    [status] = c.command(rc.CMD_BLOCK_STATUS, 0, SIZE, flags=rc.FLAG_REQ_ONE)
    assert rc.parse_block_status(status)[1] == [(5 * GiB, 3)]
    c.disconnect()


# --- a second, independent encoder: bytes assembled by hand from the spec ----------------


def test_hand_assembled_extended_session(big: Server) -> None:
    """A whole session written as literal bytes from the spec's tables, compared byte for byte.

    Client: flags FIXED_NEWSTYLE|NO_ZEROES; option EXTENDED_HEADERS (11); option GO (7) for ""
    with no info requests; then an extended READ (magic 0x21e41c71, flags 0, type 0, cookie
    0x0102030405060708, offset 5 GiB, length 16) and a FLUSH.
    """
    s = big.connect_raw()
    assert s.recv(18) == b"NBDMAGIC" + b"IHAVEOPT" + b"\x00\x03"
    s.sendall(bytes.fromhex("00000003"))
    s.sendall(bytes.fromhex("49484156454f5054" "0000000b" "00000000"))
    ack = bytes.fromhex("0003e889045565a9" "0000000b" "00000001" "00000000")
    assert _recv(s, 20) == ack
    s.sendall(bytes.fromhex("49484156454f5054" "00000007" "00000006" "00000000" "0000"))
    head = _recv(s, 20)
    assert head == bytes.fromhex("0003e889045565a9" "00000007" "00000003" "0000000c")
    info = _recv(s, 12)
    assert info[:10] == bytes.fromhex("0000" "0000000180000000")  # NBD_INFO_EXPORT, 6 GiB
    assert _recv(s, 20) == bytes.fromhex("0003e889045565a9" "00000007" "00000001" "00000000")
    # READ 16 bytes at 5 GiB (0x140000000): one OFFSET_DATA chunk with DONE.
    s.sendall(
        bytes.fromhex(
            "21e41c71" "0000" "0000" "0102030405060708" "0000000140000000" "0000000000000010"
        )
    )
    assert _recv(s, 32) == bytes.fromhex(
        "6e8a278c" "0001" "0001" "0102030405060708" "0000000140000000" "0000000000000018"
    )
    assert _recv(s, 24) == bytes.fromhex("0000000140000000") + b"\x5a" * 16
    # FLUSH: NBD_REPLY_TYPE_NONE with DONE, offset echoed (0), length 0.
    s.sendall(bytes.fromhex("21e41c71" "0000" "0003" "00000000000000aa" + "00" * 16))
    assert _recv(s, 32) == bytes.fromhex(
        "6e8a278c" "0001" "0000" "00000000000000aa" "0000000000000000" "0000000000000000"
    )
    s.sendall(bytes.fromhex("21e41c71" "0000" "0002" + "00" * 24))  # NBD_CMD_DISC
    assert s.recv(1) == b""
    s.close()


def test_hand_assembled_block_status_ext(big: Server) -> None:
    """BLOCK_STATUS_EXT payload: u32 context id, u32 descriptor count, then (u64 length,
    u64 status) descriptors; "the most-significant 32 bits of *status* MUST be all zeroes" for
    ``base:`` contexts."""
    c = rc.handshake_only(big.address)
    assert c.option(rc.OPT_EXTENDED_HEADERS)[-1].rep == rc.REP_ACK
    meta = c.meta(rc.OPT_SET_META, ["base:allocation"])
    (ctx,) = struct.unpack_from(">I", meta[0].data)
    assert c.go()[-1].rep == rc.REP_ACK
    c.sock.sendall(
        bytes.fromhex(
            "21e41c71" "0008" "0007" "0000000000000007" "0000000140000000" "0000000000200000"
        )
    )  # BLOCK_STATUS, REQ_ONE, 2 MiB at 5 GiB
    head = c.recv_exactly(32)
    assert head == bytes.fromhex(
        "6e8a278c" "0001" "0006" "0000000000000007" "0000000140000000" "0000000000000018"
    )
    body = c.recv_exactly(24)
    assert body == struct.pack(">I", ctx) + bytes.fromhex(
        "00000001" "0000000000100000" "0000000000000000"
    )
    c.disconnect()


def _recv(s: object, n: int) -> bytes:
    import socket

    assert isinstance(s, socket.socket)
    buf = b""
    while len(buf) < n:
        got = s.recv(n - len(buf))
        assert got, f"EOF after {len(buf)} of {n} bytes"
        buf += got
    return buf


# --- newer peers (Debian 13) --------------------------------------------------------------


def _trixie_ready() -> bool:
    if not shutil.which(TRIXIE) and not Path(TRIXIE).exists():
        return False
    proc = subprocess.run([TRIXIE, "status"], capture_output=True, text=True, check=False)
    return proc.returncode == 0 and "ready" in proc.stdout.lower()


@pytest.fixture
def trixie() -> str:
    if not _trixie_ready():
        pytest.skip("trixie-peers is not prepared (run trixie-peers --prepare)")
    return TRIXIE


def test_trixie_nbdinfo_negotiates_extended_headers(
    trixie: str, tmp_path: Path, start_nbd_server: StartServer
) -> None:
    """libnbd 1.22 asks for extended headers by default; nbdinfo must see them and map the
    export correctly through BLOCK_STATUS_EXT."""
    path = tmp_path / "x.img"
    with path.open("wb") as f:
        f.truncate(64 * MiB)
        f.seek(16 * MiB)
        f.write(b"\1" * MiB)
    server = start_nbd_server(path, tcp=True)
    info = json.loads(run([trixie, "run", "nbdinfo", "--json", server.uri]).stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["extended"] is True
    assert info["exports"][0]["export-size"] == 64 * MiB
    assert "base:allocation" in info["exports"][0]["contexts"]
    mapped = json.loads(run([trixie, "run", "nbdinfo", "--map", "--json", server.uri]).stdout)
    assert [(e["offset"], e["length"], e["type"]) for e in mapped] == [
        (0, 16 * MiB, 3),
        (16 * MiB, MiB, 0),
        (17 * MiB, 47 * MiB, 3),
    ]


def test_trixie_qemu_img_convert_and_compare(
    trixie: str, tmp_path: Path, start_nbd_server: StartServer
) -> None:
    """qemu 10 uses extended headers as a client too: convert out of the export and compare."""
    path = tmp_path / "q.img"
    with path.open("wb") as f:
        f.truncate(32 * MiB)
        f.seek(3 * MiB)
        f.write(bytes(range(256)) * 4096)
    server = start_nbd_server(path, tcp=True)
    out = Path("/tmp") / f"nbd-uring-trixie-{tmp_path.name}.img"
    try:
        run([trixie, "run", "qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(out)])
        assert out.read_bytes() == path.read_bytes()
        run([trixie, "run", "qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri, str(out)])
    finally:
        out.unlink(missing_ok=True)
