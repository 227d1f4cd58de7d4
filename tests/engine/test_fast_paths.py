"""The engine's fast paths keep the slow paths' rules: inline writes complete like ring
operations (at the next submit or reap, never inside the call), and the export's one-closure
read/write path still orders overlapping requests in arrival order."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_uring.engine.buffers import BufferPool
from nbd_uring.engine.export import Export
from nbd_uring.engine.ring import INLINE_WRITE_MAX, Ring

from ._ringwait import drain


@pytest.fixture
def ring() -> Iterator[Ring]:
    with Ring(16) as r:
        yield r


@pytest.fixture(params=[False, True], ids=["ring-writes", "inline-writes"])
def export(ring: Ring, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Export]:
    exp = Export(
        ring, str(tmp_path / "disk.img"), size=4 << 20, create=True, inline_writes=request.param
    )
    yield exp
    exp.close()



def test_inline_write_completes_at_submit_not_inside_the_call(ring: Ring, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        results: list[int] = []
        ring.write(fd, b"x" * 4096, 8192, results.append, inline=True)
        assert results == []
        assert ring.in_flight == 1
        assert ring.submit() == 1
        assert results == [0]
        assert ring.in_flight == 0
        assert os.pread(fd, 4096, 8192) == b"x" * 4096
    finally:
        os.close(fd)


def test_large_or_fua_writes_go_through_the_ring(ring: Ring, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        results: list[int] = []
        before = ring.inline_writes
        ring.write(fd, b"a" * (INLINE_WRITE_MAX + 4096), 0, results.append, inline=True)
        ring.write(fd, b"b" * 4096, 0, results.append, inline=True, fua=True)
        drain(ring)
        assert results == [0, 0]
        assert ring.inline_writes == before
        assert os.pread(fd, 4096, 0) == b"b" * 4096
    finally:
        os.close(fd)


def test_inline_write_error_is_an_errno(ring: Ring, tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        results: list[int] = []
        ring.write(fd, b"x" * 512, 0, results.append, inline=True)
        drain(ring)
        assert results == [9]  # EBADF: the descriptor is not open for writing
    finally:
        os.close(fd)


def test_a_long_chain_of_overlapping_writes_runs_without_recursion(
    ring: Ring, export: Export
) -> None:
    """Thousands of writes to one block each wait for the one before; inline completions run
    from submit's loop, so releasing one and starting the next never nests."""
    pool = BufferPool()
    order: list[int] = []
    count = 3000
    for i in range(count):
        buf = pool.acquire(4096)
        buf.view[:] = i.to_bytes(2, "big") * 2048
        export.write(0, buf, lambda err, i=i: order.append(i if not err else -err))
    drain(ring)
    assert order == list(range(count))
    assert os.pread(export.fd, 4096, 0) == (count - 1).to_bytes(2, "big") * 2048


def test_reads_and_writes_on_the_fast_path_keep_arrival_order(ring: Ring, export: Export) -> None:
    pool = BufferPool()
    seen: list[bytes] = []
    for i in range(50):
        w = pool.acquire(4096)
        w.view[:] = bytes([i + 1]) * 4096
        export.write(4096, w, lambda err: None)
        r = pool.acquire(8192)
        export.read(0, r.view, lambda err, r=r: seen.append(r.view[4096:].tobytes()))
    drain(ring)
    assert seen == [bytes([i + 1]) * 4096 for i in range(50)]
