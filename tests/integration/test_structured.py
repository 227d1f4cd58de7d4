"""Structured replies, metadata contexts and NBD_CMD_BLOCK_STATUS against the real server.

Raw-socket tests use ``_rawclient`` (packed by hand from the spec); interop tests use libnbd,
nbdinfo, nbdcopy and qemu-img. Each conformance test quotes the rule of ``doc/proto.md`` it checks.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path

import pytest

from . import _rawclient as rc
from ._util import MiB, Server, StartServer, run

pytestmark = pytest.mark.integration

SIZE = 8 * MiB
# Data at [1 MiB, 2 MiB) and [4 MiB, 4 MiB + 4 KiB); holes elsewhere.
DATA_RANGES = ((1 * MiB, 1 * MiB), (4 * MiB, 4096))


def layout_file(path: Path, size: int = SIZE) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, length in DATA_RANGES:
            f.seek(offset)
            f.write(bytes((offset // 4096 + i) % 251 + 1 for i in range(length)))
    return path


def expected_map(offset: int, length: int) -> list[tuple[int, bool]]:
    """(length, is_hole) runs of the layout file over [offset, offset + length)."""
    edges = sorted({0, SIZE, *(o for o, _ in DATA_RANGES), *(o + n for o, n in DATA_RANGES)})
    runs: list[tuple[int, bool]] = []
    for a, b in itertools.pairwise(edges):
        lo, hi = max(a, offset), min(b, offset + length)
        if lo < hi:
            hole = not any(o <= a < o + n for o, n in DATA_RANGES)
            runs.append((hi - lo, hole))
    return runs


@pytest.fixture
def layout(tmp_path: Path, start_nbd_server: StartServer) -> Server:
    return start_nbd_server(layout_file(tmp_path / "layout.img"))


# --- structured replies: READ ---------------------------------------------------------------


def test_send_df_only_after_structured_replies(layout: Server) -> None:
    """NBD_FLAG_SEND_DF: "The server MUST set this transmission flag to 1 if the NBD_CMD_READ
    request supports the NBD_CMD_FLAG_DF flag, and MUST leave this flag clear if neither
    structured replies nor extended headers have been negotiated."
    """
    plain = rc.connect(layout.address)
    assert not plain.flags & rc.T_SEND_DF
    plain.disconnect()
    sr = rc.connect(layout.address, structured=True)
    assert sr.flags & rc.T_SEND_DF
    sr.disconnect()


def test_read_without_negotiation_uses_simple_replies(layout: Server) -> None:
    """ "without client negotiation, the server MUST use only simple replies"."""
    c = rc.connect(layout.address)
    [reply] = c.command(rc.CMD_READ, MiB, 4096)
    assert reply.simple and reply.magic == rc.SIMPLE_MAGIC
    assert reply.payload == layout.path.read_bytes()[MiB : MiB + 4096]
    c.disconnect()


def test_sparse_read_sends_holes_as_offset_hole(layout: Server) -> None:
    """OFFSET_HOLE "represents that the contents of *hole size* bytes ... read as all zeroes";
    content chunks "MUST NOT overlap", lie within the request, and on success "MUST ... cover
    the entire region"; only the final chunk carries NBD_REPLY_FLAG_DONE.
    """
    c = rc.connect(layout.address, structured=True)
    chunks = c.command(rc.CMD_READ, 0, 4 * MiB)
    kinds = [(ch.type, len(ch.payload)) for ch in chunks]
    assert kinds == [
        (rc.TYPE_OFFSET_HOLE, 12),
        (rc.TYPE_OFFSET_DATA, 8 + MiB),
        (rc.TYPE_OFFSET_HOLE, 12),
    ]
    assert [ch.done for ch in chunks] == [False, False, True]
    assert all(ch.magic == rc.STRUCTURED_MAGIC for ch in chunks)
    data = rc.assemble_read(chunks, 0, 4 * MiB)
    assert data == layout.path.read_bytes()[: 4 * MiB]
    c.disconnect()


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (MiB - 100, 200), (MiB + 7, 3 * MiB), (4 * MiB - 512, 8192), (SIZE - 1, 1)],
)
def test_unaligned_structured_reads_match_the_file(
    layout: Server, offset: int, length: int
) -> None:
    c = rc.connect(layout.address, structured=True)
    assert c.read(offset, length) == layout.path.read_bytes()[offset : offset + length]
    c.disconnect()


def test_df_read_sends_one_content_chunk(layout: Server) -> None:
    """NBD_CMD_FLAG_DF: "the server MUST send at most one content chunk ... If the area being
    read contains both data and a hole, the server MUST use NBD_REPLY_TYPE_OFFSET_DATA with the
    zeroes explicitly present", and "MUST support unfragmented reads" up to 65,536 bytes.
    """
    c = rc.connect(layout.address, structured=True)
    offset = MiB - 32768
    chunks = c.command(rc.CMD_READ, offset, 65536, flags=rc.FLAG_DF)
    content = [ch for ch in chunks if ch.type in (rc.TYPE_OFFSET_DATA, rc.TYPE_OFFSET_HOLE)]
    assert len(content) == 1 and content[0].type == rc.TYPE_OFFSET_DATA
    assert (
        rc.assemble_read(chunks, offset, 65536) == layout.path.read_bytes()[offset : offset + 65536]
    )
    c.disconnect()


def test_read_error_is_an_error_chunk_with_a_message(layout: Server) -> None:
    """ "If structured replies are negotiated, the server ... MUST NOT use a simple reply for
    NBD_CMD_READ (even for the case of an early NBD_EINVAL due to bad flags)"; "The server
    SHOULD prefer sending errors via a structured reply, as the error can then be accompanied by
    a string payload to present to a human user."
    """
    c = rc.connect(layout.address, structured=True)
    for flags, offset in ((0, SIZE), (rc.FLAG_NO_HOLE, 0)):
        [chunk] = c.command(rc.CMD_READ, offset, 4096, flags=flags)
        assert not chunk.simple and chunk.type == rc.TYPE_ERROR and chunk.done
        error, message = chunk.error_chunk()
        assert error == rc.EINVAL
        assert "NBD_CMD_READ" in message
    c.disconnect()


def test_write_error_message_and_simple_success(layout: Server) -> None:
    """With structured replies the server "MAY use either a simple reply or a structured reply
    to all other requests" (those without payload); errors still carry a message.
    """
    c = rc.connect(layout.address, structured=True)
    [ok] = c.command(rc.CMD_WRITE, 0, 512, payload=b"x" * 512)
    assert ok.simple and ok.error == 0
    [bad] = c.command(rc.CMD_WRITE, SIZE, 512, payload=b"x" * 512)
    assert bad.type == rc.TYPE_ERROR
    error, message = bad.error_chunk()
    assert error == 28 and "beyond end" in message  # NBD_ENOSPC
    c.disconnect()


# --- metadata contexts ---------------------------------------------------------------------


def test_list_meta_context_without_queries_lists_base_allocation(layout: Server) -> None:
    """ "If zero queries are sent, then the server MUST return all the metadata contexts that
    are available"; "The metadata context ID in these replies is reserved and SHOULD be set to
    zero"."""
    c = rc.handshake_only(layout.address)
    replies = c.meta(rc.OPT_LIST_META, [])
    assert [(r.rep, r.data) for r in replies] == [
        (rc.REP_META_CONTEXT, b"\0\0\0\0base:allocation"),
        (rc.REP_ACK, b""),
    ]
    c.sock.close()


@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        (["base:"], ["base:allocation"]),
        (["base:allocation"], ["base:allocation"]),
        (["qemu:dirty-bitmap:x", "x-foo:bar"], []),
        (["base:nope"], []),
    ],
)
def test_list_meta_context_queries(layout: Server, queries: list[str], listed: list[str]) -> None:
    """``base:`` "MUST support this as a wildcard during NBD_OPT_LIST_META_CONTEXT"; "the server
    MUST ignore query strings belonging to an unknown namespace"; an unrecognised ``base:``
    leaf "MUST [be ignored] rather than report an error"; "If none of the query strings find any
    metadata contexts, the server MUST send a single reply of type NBD_REP_ACK."
    """
    c = rc.handshake_only(layout.address)
    replies = c.meta(rc.OPT_LIST_META, queries)
    assert [r.data[4:].decode() for r in replies[:-1]] == listed
    assert replies[-1].rep == rc.REP_ACK
    c.sock.close()


def test_syntactically_invalid_meta_request_is_err_invalid(layout: Server) -> None:
    """ "If the option request is syntactically invalid (such as a query length that would
    require reading beyond the original length given in the option header), the server MUST fail
    the request with NBD_REP_ERR_INVALID." Negotiation goes on afterwards."""
    c = rc.handshake_only(layout.address)
    data = struct.pack(">I", 0) + struct.pack(">I", 1) + struct.pack(">I", 100) + b"base:"
    [reply] = c.option(rc.OPT_LIST_META, data)
    assert reply.rep == rc.REP_ERR_INVALID and reply.data
    assert c.go()[-1].rep == rc.REP_ACK
    c.disconnect()


def test_set_meta_context_needs_structured_replies(layout: Server) -> None:
    """SET_META_CONTEXT "MUST NOT be requested unless structured replies or extended headers
    have been negotiated first. If a client attempts to do so, a server SHOULD send
    NBD_REP_ERR_INVALID"."""
    c = rc.handshake_only(layout.address)
    [reply] = c.meta(rc.OPT_SET_META, ["base:allocation"])
    assert reply.rep == rc.REP_ERR_INVALID
    c.sock.close()


def test_set_meta_context_ids_and_replacement_on_failure(layout: Server) -> None:
    """SET_META_CONTEXT "replaces all previously-set metadata contexts (including when this
    command fails)"; each selected context has "a unique metadata context ID"; ``base:`` alone
    "the server MUST ignore this form during NBD_OPT_SET_META_CONTEXT"; zero queries "MUST select
    no metadata contexts"; BLOCK_STATUS without a selected context gets EINVAL ("Servers SHOULD
    reply with NBD_EINVAL")."""
    c = rc.handshake_only(layout.address)
    c.option(rc.OPT_STRUCTURED_REPLY)
    c.structured = True
    first = c.meta(rc.OPT_SET_META, ["base:allocation", "base:allocation", "base:"])
    assert [r.rep for r in first] == [rc.REP_META_CONTEXT, rc.REP_ACK]
    second = c.meta(rc.OPT_SET_META, ["base:allocation"])
    ids = [struct.unpack_from(">I", r.data)[0] for r in (first[0], second[0])]
    assert ids[0] != ids[1]
    assert c.meta(rc.OPT_SET_META, [])[-1].rep == rc.REP_ACK and not c.contexts
    assert c.meta(rc.OPT_SET_META, ["base:allocation"])[-1].rep == rc.REP_ACK
    # A failing SET (unknown export) still clears the selection.
    assert c.meta(rc.OPT_SET_META, ["base:allocation"], name="nope")[-1].rep == rc.REP_ERR_UNKNOWN
    assert c.go()[-1].rep == rc.REP_ACK
    [reply] = c.command(rc.CMD_BLOCK_STATUS, 0, 4096)
    assert reply.type == rc.TYPE_ERROR and reply.error_chunk()[0] == rc.EINVAL
    c.disconnect()


# --- BLOCK_STATUS -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"), [(0, SIZE), (MiB + 512, 3 * MiB), (4 * MiB + 4096, 4096), (0, 1)]
)
def test_block_status_matches_the_file_layout(layout: Server, offset: int, length: int) -> None:
    """ "the server MUST respond with one status type reply chunk per metadata context"; holes
    are NBD_STATE_HOLE|NBD_STATE_ZERO (3), data 0; extents are nonzero, consecutive and (our
    choice) never run past the request, so never past the export."""
    c = rc.connect(layout.address, structured=True, contexts=("base:allocation",))
    [ctx_id] = c.contexts
    [chunk] = c.command(rc.CMD_BLOCK_STATUS, offset, length)
    assert chunk.type == rc.TYPE_BLOCK_STATUS and chunk.done
    got_id, extents = rc.parse_block_status(chunk)
    assert got_id == ctx_id
    assert extents == [(n, 3 if hole else 0) for n, hole in expected_map(offset, length)]
    c.disconnect()


def test_block_status_req_one(layout: Server) -> None:
    """REQ_ONE: "every reply chunk MUST contain exactly one descriptor, and that descriptor MUST
    NOT exceed the *length* of the original request"."""
    c = rc.connect(layout.address, structured=True, contexts=("base:allocation",))
    for offset, length in ((0, SIZE), (MiB, 4096), (MiB - 10, 20)):
        [chunk] = c.command(rc.CMD_BLOCK_STATUS, offset, length, flags=rc.FLAG_REQ_ONE)
        _, extents = rc.parse_block_status(chunk)
        assert len(extents) == 1 and 0 < extents[0][0] <= length
        assert extents[0] == (expected_map(offset, length)[0][0], 3 if offset < MiB else 0)
    c.disconnect()


def test_block_status_beyond_end_is_einval(layout: Server) -> None:
    """ "The server SHOULD return NBD_EINVAL if it receives a NBD_CMD_BLOCK_STATUS request with
    an effect length exceeding the size of the export.\""""
    c = rc.connect(layout.address, structured=True, contexts=("base:allocation",))
    [chunk] = c.command(rc.CMD_BLOCK_STATUS, SIZE - 512, 1024)
    assert chunk.type == rc.TYPE_ERROR and chunk.error_chunk()[0] == rc.EINVAL
    c.disconnect()


# --- interop: libnbd, nbdinfo, nbdcopy, qemu -----------------------------------------------


@pytest.mark.requires("nbdinfo")
def test_nbdinfo_map_matches_the_file(layout: Server) -> None:
    out = run(["nbdinfo", "--map", "--json", layout.uri]).stdout
    got = [(e["length"], e["type"] == 3) for e in json.loads(out)]
    assert got == expected_map(0, SIZE)


@pytest.mark.requires("nbd")
@pytest.mark.parametrize("structured", [True, False])
def test_libnbd_reads_with_structured_replies_on_and_off(layout: Server, structured: bool) -> None:
    import nbd

    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(layout.uri)
    try:
        assert h.get_structured_replies_negotiated() == structured
        assert h.can_df() == structured
        content = layout.path.read_bytes()
        for offset, length in ((0, SIZE), (MiB - 1, 2), (4 * MiB - 3, 8192)):
            assert h.pread(length, offset) == content[offset : offset + length]
    finally:
        h.shutdown()


@pytest.mark.requires("nbd")
def test_libnbd_pread_structured_reports_holes(layout: Server) -> None:
    import nbd

    h = nbd.NBD()
    h.connect_uri(layout.uri)
    seen: list[tuple[int, int, int]] = []

    def chunk(buf: bytes, offset: int, status: int, err: object) -> int:
        seen.append((offset, len(buf), status))
        return 0

    try:
        h.pread_structured(2 * MiB, 0, chunk)
    finally:
        h.shutdown()
    assert seen == [(0, MiB, nbd.READ_HOLE), (MiB, MiB, nbd.READ_DATA)]


@pytest.mark.requires("nbdcopy")
@pytest.mark.slow
def test_nbdcopy_of_a_sparse_1g_export_stays_sparse(
    tmp_path: Path, start_nbd_server: StartServer
) -> None:
    src = tmp_path / "sparse-1g.img"
    with src.open("wb") as f:
        f.truncate(1 << 30)
        f.seek(512 * MiB)
        f.write(b"\xab" * MiB)
    server = start_nbd_server(src, read_only=True)
    dst = tmp_path / "copy.img"
    run(["nbdcopy", server.uri, str(dst)])
    assert dst.stat().st_size == 1 << 30
    assert dst.stat().st_blocks * 512 <= 8 * MiB, "destination is not sparse"
    with dst.open("rb") as f:
        f.seek(512 * MiB)
        assert f.read(MiB) == b"\xab" * MiB


@pytest.mark.requires("qemu-img")
def test_qemu_img_map_matches_the_file(layout: Server) -> None:
    out = run(["qemu-img", "map", "--output=json", "-f", "raw", layout.uri]).stdout
    got = [(e["length"], not e["data"]) for e in json.loads(out)]
    assert got == expected_map(0, SIZE)


@pytest.mark.requires("qemu-io")
def test_qemu_io_reads_holes_as_zero(layout: Server) -> None:
    out = run(
        ["qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 1M", "-c", "read -P 0 2M 2M", layout.uri]
    ).stdout
    assert "Pattern verification failed" not in out, out
    assert os.path.exists(layout.path)
