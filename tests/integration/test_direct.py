"""``nbd-uring serve FILE --direct``: O_DIRECT, NBD_INFO_BLOCK_SIZE minimum 512 / preferred
4096, NBD_REP_ERR_BLOCK_SIZE_REQD for a client that does not ask for block sizes, and an export
whose size is not a multiple of 512 still reads and writes to its last byte."""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._libnbd import connect
from ._util import (
    MiB,
    StartServer,
    is_nbdkit,
    make_sparse,
    run,
    sha256_file,
    write_random_file,
)
from .test_malformed import (
    OPT_GO,
    OPT_REPLY_MAGIC,
    REP_FLAG_ERROR,
    REP_INFO,
    RawClient,
    recv_exact,
)
from .test_nbdinfo import nbdinfo_json, only_export

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="--direct is nbd-uring's option"),
]

ODD_SIZE = MiB + 1000
"""The last 1000 bytes lie past the last whole 512-byte block."""
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
INFO_BLOCK_SIZE = 3
DIRECT = ("--direct",)


@pytest.fixture
def direct_dir() -> Iterator[Path]:
    """A directory on a file system that supports O_DIRECT (tmpfs may not: /var/tmp)."""
    with tempfile.TemporaryDirectory(prefix="nbd-uring-direct-", dir="/var/tmp") as d:
        try:
            os.close(os.open(os.path.join(d, "probe"), os.O_RDWR | os.O_CREAT | os.O_DIRECT))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                pytest.skip("/var/tmp does not support O_DIRECT")
            raise
        yield Path(d)


@pytest.mark.requires("nbdinfo")
def test_nbdinfo_shows_direct_block_sizes(start_nbd_server: StartServer, direct_dir: Path) -> None:
    """NBD_INFO_BLOCK_SIZE: minimum 512 (the logical block O_DIRECT needs), preferred 4096;
    the size stays exact (not rounded to the block size)."""
    server = start_nbd_server(write_random_file(direct_dir / "d.img", ODD_SIZE), extra_args=DIRECT)
    export = only_export(nbdinfo_json(server.uri))
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 4096
    assert export["export-size"] == ODD_SIZE


@pytest.mark.requires("nbd")
def test_libnbd_reads_and_writes_including_the_tail(
    start_nbd_server: StartServer, direct_dir: Path
) -> None:
    """libnbd (which asks for block sizes by default) reads and writes aligned ranges and the
    unaligned tail; the file holds exactly what was written and does not grow."""
    path = write_random_file(direct_dir / "d.img", ODD_SIZE)
    expect = bytearray(path.read_bytes())
    server = start_nbd_server(path, extra_args=DIRECT)
    # strict=False: libnbd would refuse the tail's unaligned length on its own side.
    with connect(server.uri, strict=False) as h:
        assert h.get_request_block_size()
        assert h.get_block_size(0) == 512  # LIBNBD_SIZE_MINIMUM
        assert h.get_size() == ODD_SIZE
        assert h.pread(4096, 0) == expect[:4096]
        for offset, length in [(0, 4096), (512, 512), (64 * 1024, 128 * 1024)]:
            data = os.urandom(length)
            h.pwrite(data, offset)
            expect[offset : offset + length] = data
            assert h.pread(length, offset) == data
        for offset in (MiB, MiB - 4096, 0):
            data = os.urandom(ODD_SIZE - offset)
            h.pwrite(data, offset)
            expect[offset:] = data
            assert h.pread(ODD_SIZE - offset, offset) == data
        h.flush()
    assert path.read_bytes() == expect


def test_go_without_block_size_request_is_refused(
    start_nbd_server: StartServer, direct_dir: Path
) -> None:
    """Spec: a server that needs block sizes honoured answers NBD_OPT_GO without an
    NBD_INFO_BLOCK_SIZE request with NBD_REP_ERR_BLOCK_SIZE_REQD, and "SHOULD ensure it first
    sends an NBD_INFO_BLOCK_SIZE information reply"."""
    server = start_nbd_server(write_random_file(direct_dir / "d.img", ODD_SIZE), extra_args=DIRECT)
    client = RawClient(server)
    try:
        client.greeting()
        client.send_option(OPT_GO, struct.pack(">I", 0) + struct.pack(">H", 0))
        replies: list[tuple[int, bytes]] = []
        while True:
            magic, option, rtype, length = struct.unpack(">QIII", recv_exact(client.sock, 20))
            assert (magic, option) == (OPT_REPLY_MAGIC, OPT_GO)
            replies.append((rtype, recv_exact(client.sock, length)))
            if rtype & REP_FLAG_ERROR or rtype == 1:
                break
        infos = [p for t, p in replies if t == REP_INFO]
        block = [p for p in infos if struct.unpack(">H", p[:2])[0] == INFO_BLOCK_SIZE]
        assert len(block) == 1, replies
        assert struct.unpack(">HIII", block[0])[1:3] == (512, 4096)
        assert replies[-1][0] == REP_ERR_BLOCK_SIZE_REQD, replies
    finally:
        client.close()


@pytest.mark.requires("qemu-img")
def test_qemu_img_convert_round_trip(
    start_nbd_server: StartServer, direct_dir: Path, tmp_path: Path
) -> None:
    """qemu-img writes an image into the direct export and reads it back exactly.

    The size is a multiple of 512 but not of 4096: qemu 7.2 cannot use an export whose size
    is not a multiple of the minimum block size (its block layer counts 512-byte sectors and
    it asserts in nbd_client_co_block_status), so the unaligned tail is left to libnbd."""
    size = 4 * MiB + 512
    image = write_random_file(tmp_path / "src.raw", size, seed=7)
    server = start_nbd_server(make_sparse(direct_dir / "d.img", size), extra_args=DIRECT)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), server.uri])
    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(out)])
    assert sha256_file(out) == sha256_file(image)
    cmp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), server.uri])
    assert "Images are identical" in cmp.stdout
    assert sha256_file(direct_dir / "d.img") == sha256_file(image)
