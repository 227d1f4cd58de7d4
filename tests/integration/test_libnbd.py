"""Protocol semantics checked through libnbd's Python binding (python3-libnbd)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from ._libnbd import connect, nbd, nbd_errno, wait_all
from ._util import KiB, MiB, Server, StartServer

pytestmark = [pytest.mark.integration, pytest.mark.requires("nbd")]


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def file_bytes(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def test_64_requests_in_flight(server: Server) -> None:
    """64 aio_pwrite in flight on one connection (varied sizes and offsets) all complete;
    then 64 aio_pread in flight all return exactly the data written to their range; then 64
    mixed reads and writes on disjoint ranges complete with the right data. Replies may come
    back in any order, so this proves handles are matched to the right request and buffer."""
    n = 64
    blocks = [(i * 256 * KiB + (i % 7) * 512, 4 * KiB * (1 + i % 16)) for i in range(n)]
    data = [pattern(i, size) for i, (_, size) in enumerate(blocks)]
    with connect(server.uri) as h:
        cookies = [
            h.aio_pwrite(nbd.Buffer.from_bytearray(d), off)
            for d, (off, _) in zip(data, blocks, strict=True)
        ]
        assert h.aio_in_flight() > 1
        wait_all(h, cookies)

        bufs = [nbd.Buffer(size) for _, size in blocks]
        cookies = [h.aio_pread(b, off) for b, (off, _) in zip(bufs, blocks, strict=True)]
        wait_all(h, cookies)
        for i, b in enumerate(bufs):
            assert bytes(b.to_bytearray()) == data[i], f"read {i} returned wrong data"

        # mixed: rewrite the even blocks while reading the odd ones
        new = {i: pattern(1000 + i, blocks[i][1]) for i in range(0, n, 2)}
        reads = {i: nbd.Buffer(blocks[i][1]) for i in range(1, n, 2)}
        cookies = []
        for i in range(n):
            off = blocks[i][0]
            if i in new:
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(new[i]), off))
            else:
                cookies.append(h.aio_pread(reads[i], off))
        wait_all(h, cookies)
        for i, b in reads.items():
            assert bytes(b.to_bytearray()) == data[i]
        h.flush()
        for i, d in new.items():
            assert h.pread(len(d), blocks[i][0]) == d
    for i, d in new.items():
        assert file_bytes(server.path, blocks[i][0], len(d)) == d


def test_large_requests_up_to_max_block(server: Server) -> None:
    """Single reads and writes of exactly the advertised maximum (32 MiB) succeed."""
    data = pattern(5, 32 * MiB)
    with connect(server.uri) as h:
        assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MiB
        h.pwrite(data, 4096)
        assert h.pread(32 * MiB, 4096) == data


def test_multi_conn_writes_visible_after_flush(server: Server) -> None:
    """CAN_MULTI_CONN: four connections to one export; data written on one connection and
    flushed there is seen by reads on the other three, in every direction."""
    handles = []
    try:
        for _ in range(4):
            cm = connect(server.uri)
            handles.append((cm, cm.__enter__()))
        for i, (_, writer) in enumerate(handles):
            assert writer.can_multi_conn()
            data = pattern(100 + i, 64 * KiB)
            off = i * MiB + 512
            writer.pwrite(data, off)
            writer.flush()
            for j, (_, reader) in enumerate(handles):
                if j != i:
                    assert reader.pread(len(data), off) == data, (i, j)
    finally:
        for cm, _ in reversed(handles):
            cm.__exit__(None, None, None)


def test_fua_write(server: Server) -> None:
    """A write with NBD_CMD_FLAG_FUA succeeds, reads back, and is in the backing file by the
    time the reply arrives."""
    data = pattern(7, 128 * KiB)
    with connect(server.uri) as h:
        assert h.can_fua()
        h.pwrite(data, 3 * MiB + 100, nbd.CMD_FLAG_FUA)
        assert file_bytes(server.path, 3 * MiB + 100, len(data)) == data
        assert h.pread(len(data), 3 * MiB + 100) == data


def test_trim_and_zero_read_back_zero(server: Server) -> None:
    """TRIM and WRITE_ZEROES (with and without NO_HOLE, with FUA) make their ranges read back
    as zeroes, on this and a second connection, without touching the bytes around them."""
    data = pattern(9, 1 * MiB)
    zero64k = bytes(64 * KiB)
    with connect(server.uri) as h, connect(server.uri) as other:
        h.pwrite(data, 0)
        h.trim(64 * KiB, 64 * KiB)
        h.zero(64 * KiB, 256 * KiB)
        h.zero(64 * KiB, 512 * KiB, nbd.CMD_FLAG_NO_HOLE)
        h.zero(4 * KiB + 1, 768 * KiB - 1, nbd.CMD_FLAG_FUA)
        h.flush()
        for reader in (h, other):
            got = reader.pread(1 * MiB, 0)
            assert got[: 64 * KiB] == data[: 64 * KiB]
            assert got[64 * KiB : 128 * KiB] == zero64k
            assert got[128 * KiB : 256 * KiB] == data[128 * KiB : 256 * KiB]
            assert got[256 * KiB : 320 * KiB] == zero64k
            assert got[512 * KiB : 576 * KiB] == zero64k
            assert got[768 * KiB - 1 : 772 * KiB] == bytes(4 * KiB + 1)
            assert got[772 * KiB :] == data[772 * KiB :]
    assert file_bytes(server.path, 64 * KiB, 64 * KiB) == zero64k


def test_read_only_export_refuses_writes(start_nbd_server: StartServer) -> None:
    """On a --read-only export every write-type command (WRITE, WRITE_ZEROES, TRIM) fails with
    EPERM, reads still work, and the backing file is unchanged."""
    server = start_nbd_server(size=1 * MiB, read_only=True)
    before = file_bytes(server.path, 0, 1 * MiB)
    with connect(server.uri, strict=False) as h:
        assert h.is_read_only()
        with pytest.raises(nbd.Error) as exc:
            h.pwrite(b"x" * 512, 0)
        assert nbd_errno(exc.value) == "EPERM", exc.value.string
        for call in (lambda: h.zero(512, 0), lambda: h.trim(512, 0)):
            with pytest.raises(nbd.Error) as exc:
                call()
            assert nbd_errno(exc.value) in {"EPERM", "EINVAL"}, exc.value.string
        assert h.pread(512, 0) == before[:512]
    assert file_bytes(server.path, 0, 1 * MiB) == before


def test_out_of_range_requests(start_nbd_server: StartServer) -> None:
    """Requests beyond the end of the export get errors and no side effects: WRITE and
    WRITE_ZEROES past the end -> ENOSPC, READ past the end -> EINVAL; the connection keeps
    working afterwards and the file is not extended."""
    size = 1 * MiB
    server = start_nbd_server(size=size)
    with connect(server.uri, strict=False) as h:
        with pytest.raises(nbd.Error) as exc:
            h.pwrite(b"y" * 4096, size - 2048)
        assert nbd_errno(exc.value) == "ENOSPC", exc.value.string
        with pytest.raises(nbd.Error) as exc:
            h.zero(4096, size)
        assert nbd_errno(exc.value) == "ENOSPC", exc.value.string
        with pytest.raises(nbd.Error) as exc:
            h.pread(4096, size - 512)
        assert nbd_errno(exc.value) == "EINVAL", exc.value.string
        with pytest.raises(nbd.Error) as exc:
            h.pread(1, 1 << 62)
        assert nbd_errno(exc.value) == "EINVAL", exc.value.string
        # the last byte is still addressable and the connection still in sync
        h.pwrite(b"z", size - 1)
        assert h.pread(1, size - 1) == b"z"
    assert server.path.stat().st_size == size
