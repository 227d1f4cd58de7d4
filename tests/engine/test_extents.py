"""Export.extents (the SEEK_DATA/SEEK_HOLE map behind OFFSET_HOLE reads and BLOCK_STATUS) and
Export.zero(fast=True) (NBD_CMD_FLAG_FAST_ZERO)."""

import errno
import itertools
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_uring.engine.export import Export
from nbd_uring.engine.ring import Ring

MiB = 1 << 20


@pytest.fixture
def sparse(tmp_path: Path) -> Iterator[Export]:
    """8 MiB file: data at [1 MiB, 2 MiB) and [4 MiB, 4 MiB + 4 KiB), holes elsewhere."""
    path = tmp_path / "sparse.img"
    with path.open("wb") as f:
        f.truncate(8 * MiB)
        f.seek(1 * MiB)
        f.write(b"\x01" * MiB)
        f.seek(4 * MiB)
        f.write(b"\x02" * 4096)
    ring = Ring(8)
    export = Export(ring, str(path), read_only=True)
    yield export
    export.close()
    ring.close()


def test_whole_file_map(sparse: Export) -> None:
    assert sparse.extents(0, 8 * MiB) == [
        (MiB, True),
        (MiB, False),
        (2 * MiB, True),
        (4096, False),
        (4 * MiB - 4096, True),
    ]


def test_map_is_clipped_to_the_range(sparse: Export) -> None:
    assert sparse.extents(MiB + 512, MiB) == [(MiB - 512, False), (512, True)]
    assert sparse.extents(100, 200) == [(200, True)]
    assert sparse.extents(0, 0) == []


def test_max_extents_truncates(sparse: Export) -> None:
    runs = sparse.extents(0, 8 * MiB, max_extents=2)
    assert runs == [(MiB, True), (MiB, False)]


def test_runs_cover_the_range_exactly(sparse: Export) -> None:
    for offset, length in [(0, 8 * MiB), (3, 5 * MiB), (4 * MiB + 1, 4095), (7 * MiB, MiB)]:
        runs = sparse.extents(offset, length)
        assert sum(n for n, _ in runs) == length
        assert all(n > 0 for n, _ in runs)
        assert all(a[1] != b[1] for a, b in itertools.pairwise(runs))


def test_fast_zero_fails_with_enotsup_instead_of_writing(tmp_path: Path) -> None:
    """With ``fast=True`` the engine never falls back to writing zeroes: when neither punching
    nor FALLOC_FL_ZERO_RANGE is available it reports ENOTSUP and leaves the data alone."""
    path = tmp_path / "f.img"
    path.write_bytes(b"\x33" * 8192)
    ring = Ring(8)
    export = Export(ring, str(path))
    export._punch_ok = False
    export._zero_range_ok = False
    results: list[int] = []
    export.zero(0, 4096, results.append, fast=True)
    export.zero(4096, 4096, results.append, fast=False)
    ring.submit()
    deadline = time.monotonic() + 10
    while len(results) < 2:
        assert time.monotonic() < deadline, "zero never completed"
        select.select([ring.eventfd], [], [], 1)
        ring.reap()
        ring.submit()
    export.close()
    ring.close()
    assert results[0] == errno.ENOTSUP
    assert results[1] == 0
    assert path.read_bytes() == b"\x33" * 4096 + bytes(4096)
