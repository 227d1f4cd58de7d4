"""``Export(direct=True)``: the file is open with O_DIRECT, aligned I/O goes straight through,
and the tail past the last whole block of an export whose size is not a multiple of the block
size still reads and writes (through a second descriptor without O_DIRECT)."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_uring.engine.buffers import BufferPool
from nbd_uring.engine.export import Export
from nbd_uring.engine.ring import Ring

from ._ringwait import drain

MiB = 1 << 20
ODD_SIZE = MiB + 1000
"""1 MiB + 1000: the last 1000 bytes are past the last whole 512-byte block."""
BIG_ODD_SIZE = 4 * MiB + 1000
"""Large enough that the part before the buffered tail zone (2 MiB-aligned) is O_DIRECT."""

# tmpfs (often /tmp) refuses O_DIRECT; /var/tmp is on a disk file system.
DIRECT_DIR = "/var/tmp"


def _direct_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nbd-uring-direct-", dir=DIRECT_DIR) as d:
        probe = os.path.join(d, "probe")
        try:
            os.close(os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o644))
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                pytest.skip(f"{DIRECT_DIR} does not support O_DIRECT")
            raise
        yield Path(d)


@pytest.fixture
def direct_dir() -> Iterator[Path]:
    yield from _direct_dir()


@pytest.fixture
def ring() -> Iterator[Ring]:
    with Ring(16) as r:
        yield r


@pytest.fixture(
    params=[(False, ODD_SIZE), (True, ODD_SIZE), (False, BIG_ODD_SIZE), (True, BIG_ODD_SIZE)],
    ids=["ring-writes-1M", "inline-writes-1M", "ring-writes-4M", "inline-writes-4M"],
)
def export(ring: Ring, direct_dir: Path, request: pytest.FixtureRequest) -> Iterator[Export]:
    inline, size = request.param
    path = direct_dir / "disk.img"
    path.write_bytes(os.urandom(size))
    exp = Export(ring, str(path), direct=True, inline_writes=inline)
    yield exp
    exp.close()



def read(export: Export, pool: BufferPool, offset: int, length: int) -> bytes:
    buf = pool.acquire(length)
    results: list[int] = []
    export.read(offset, buf.view, results.append)
    drain(export.ring)
    assert results == [0]
    data = bytes(buf.view)
    buf.release()
    return data


def write(export: Export, pool: BufferPool, offset: int, data: bytes, *, fua: bool = False) -> None:
    buf = pool.acquire(len(data))
    buf.view[:] = data
    results: list[int] = []
    export.write(offset, buf, results.append, fua=fua)
    drain(export.ring)
    assert results == [0]


def test_direct_export_is_open_with_o_direct(export: Export) -> None:
    assert export.direct
    assert export.block_size == 512
    assert export.size == Path(export.path).stat().st_size
    assert fcntl.fcntl(export.fd, fcntl.F_GETFL) & os.O_DIRECT
    assert not fcntl.fcntl(export._tail_fd, fcntl.F_GETFL) & os.O_DIRECT
    # Only the last, 2 MiB-aligned zone is buffered.
    assert export._tail_start == export.size - export.size % (2 * MiB)


def test_aligned_size_needs_no_tail(ring: Ring, direct_dir: Path) -> None:
    path = direct_dir / "aligned.img"
    path.write_bytes(bytes(MiB + 512))
    exp = Export(ring, str(path), direct=True)
    try:
        assert exp._tail_fd == -1
        assert exp._tail_start == exp.size == MiB + 512
    finally:
        exp.close()


def test_direct_aligned_reads_and_writes(export: Export) -> None:
    pool = BufferPool()
    expect = bytearray(Path(export.path).read_bytes())
    for offset, length in [(0, 4096), (512, 512), (4096, 64 * 1024), (MiB - 4096, 4096)]:
        assert read(export, pool, offset, length) == expect[offset : offset + length]
        data = os.urandom(length)
        write(export, pool, offset, data)
        expect[offset : offset + length] = data
        assert read(export, pool, offset, length) == data
    write(export, pool, 8192, b"f" * 4096, fua=True)
    expect[8192 : 8192 + 4096] = b"f" * 4096
    assert Path(export.path).read_bytes() == expect


@pytest.mark.parametrize(
    "offset",
    [-1000, -1512, -MiB - 1000, -64 * 1024 - 1000, -3 * MiB - 1000],
    ids=["tail-only", "block-and-tail", "1M-and-tail", "64k-and-tail", "3M-and-tail"],
)
def test_direct_unaligned_tail_round_trip(export: Export, offset: int) -> None:
    """A request that ends at the unaligned end of the export reads and writes exactly to it
    (across the direct part and the buffered tail zone), and the file does not grow."""
    pool = BufferPool()
    offset = max(0, export.size + offset)  # from the end; the whole export if smaller
    length = export.size - offset
    before = Path(export.path).read_bytes()
    assert read(export, pool, offset, length) == before[offset:]
    data = os.urandom(length)
    write(export, pool, offset, data)
    assert read(export, pool, offset, length) == data
    after = Path(export.path).read_bytes()
    assert len(after) == export.size
    assert after == before[:offset] + data
    data = os.urandom(length)
    write(export, pool, offset, data, fua=True)
    assert Path(export.path).read_bytes() == before[:offset] + data


def test_direct_zero_through_tail_writes_zeroes(export: Export) -> None:
    """Zeroing by writing zeroes (no fallocate) also reaches the unaligned tail."""
    export._punch_ok = export._zero_range_ok = False
    results: list[int] = []
    start = MiB - 4096
    export.zero(start, export.size - start, results.append)
    drain(export.ring)
    assert results == [0]
    data = Path(export.path).read_bytes()
    assert len(data) == export.size
    assert data[start:] == bytes(export.size - start)
