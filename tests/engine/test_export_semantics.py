"""Ordering, FLUSH and durability rules of an Export, on a real ring and a real file.

Delays come from the fault injector (ring timeouts), so each ordering is forced, not hoped for.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbd_uring.config import Durability, FaultRule, Ordering
from nbd_uring.engine.buffers import Buffer, BufferPool
from nbd_uring.engine.export import Export
from nbd_uring.engine.faults import FaultInjector
from nbd_uring.engine.ring import Ring

from ._ringwait import run_until

DELAY = "150ms"


@pytest.fixture
def ring() -> Iterator[Ring]:
    with Ring(64) as r:
        yield r


def make_export(
    ring: Ring, tmp_path: Path, *rules: str, **kwargs: object
) -> Export:
    faults = FaultInjector(tuple(FaultRule.parse(r) for r in rules), seed=1) if rules else None
    exp = Export(
        ring,
        str(tmp_path / "disk.img"),
        size=8 << 20,
        create=True,
        faults=faults,
        **kwargs,  # type: ignore[arg-type]
    )
    os.pwrite(exp.fd, b"\x00" * 65536, 0)
    return exp



class Recorder:
    """Collects completions in the order they happen."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def __call__(self, name: str) -> Callable[[int], None]:
        return lambda err: self.events.append((name, err))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.events]


pool = BufferPool()


def data(byte: int, length: int = 4096) -> Buffer:
    buf = pool.acquire(length)
    buf.view[:] = bytes([byte]) * length
    return buf


@pytest.mark.parametrize("ordering", [Ordering.STRICT, Ordering.KERNEL])
def test_read_after_delayed_overlapping_write(
    ring: Ring, tmp_path: Path, ordering: Ordering
) -> None:
    """Strict: a read received after an overlapping write sees that write, every time.
    Kernel (the seed's NOTE): the read goes straight to io-wq and overtakes the delayed write."""
    exp = make_export(ring, tmp_path, f"write@0-4k:delay={DELAY}", ordering=ordering)
    rec = Recorder()
    exp.write(0, data(0xAA), rec("write"))
    out = pool.acquire(4096)
    exp.read(0, out.view, rec("read"))
    run_until(ring, lambda: len(rec.events) == 2)
    if ordering is Ordering.STRICT:
        assert rec.names == ["write", "read"]
        assert out.view.tobytes() == b"\xaa" * 4096
    else:
        assert rec.names == ["read", "write"]
        assert out.view.tobytes() == b"\x00" * 4096


@pytest.mark.parametrize("ordering", [Ordering.STRICT, Ordering.KERNEL])
def test_overlapping_writes_land_in_arrival_order(
    ring: Ring, tmp_path: Path, ordering: Ordering
) -> None:
    exp = make_export(ring, tmp_path, f"write@0-1:delay={DELAY}", ordering=ordering)
    rec = Recorder()
    exp.write(0, data(0x01, 8192), rec("first"))
    exp.write(4096, data(0x02), rec("second"))
    run_until(ring, lambda: len(rec.events) == 2)
    landed = os.pread(exp.fd, 4096, 4096)
    if ordering is Ordering.STRICT:
        assert rec.names == ["first", "second"]
        assert landed == b"\x02" * 4096
    else:
        assert rec.names == ["second", "first"]
        assert landed == b"\x01" * 4096


def test_unrelated_requests_do_not_wait(ring: Ring, tmp_path: Path) -> None:
    exp = make_export(ring, tmp_path, f"write@0-4k:delay={DELAY}")
    rec = Recorder()
    exp.write(0, data(0xAA), rec("slow write"))
    out = pool.acquire(4096)
    exp.read(8192, out.view, rec("read elsewhere"))
    exp.write(1 << 20, data(0xBB), rec("write elsewhere"))
    run_until(ring, lambda: len(rec.events) == 3)
    assert rec.names[-1] == "slow write"


def test_flush_waits_for_exactly_the_earlier_writes(ring: Ring, tmp_path: Path) -> None:
    """A delayed earlier write holds the FLUSH back; a later (longer-delayed) write does not;
    unrelated I/O issued after the FLUSH completes before it."""
    exp = make_export(
        ring, tmp_path, f"write@0-4k:delay={DELAY}", "write@1M-2M:delay=400ms"
    )
    rec = Recorder()
    exp.write(0, data(0x11), rec("earlier write"))
    exp.flush(rec("flush"))
    exp.write(1 << 20, data(0x22), rec("later write"))
    out = pool.acquire(4096)
    exp.read(65536, out.view, rec("read"))
    run_until(ring, lambda: len(rec.events) == 4)
    assert rec.names == ["read", "earlier write", "flush", "later write"]
    assert all(err == 0 for _n, err in rec.events)


def test_delayed_flush_is_no_barrier(ring: Ring, tmp_path: Path) -> None:
    exp = make_export(ring, tmp_path, f"flush:delay={DELAY}")
    rec = Recorder()
    exp.write(0, data(0x33), rec("write"))
    run_until(ring, lambda: len(rec.events) == 1)
    exp.flush(rec("flush"))
    exp.write(4096, data(0x44), rec("write after flush"))
    out = pool.acquire(4096)
    exp.read(0, out.view, rec("read after flush"))
    run_until(ring, lambda: len(rec.events) == 4)
    assert rec.names[-1] == "flush"


def test_concurrent_flushes_share_fdatasync(ring: Ring, tmp_path: Path) -> None:
    exp = make_export(ring, tmp_path)
    rec = Recorder()
    for i in range(10):
        exp.flush(rec(f"flush{i}"))
    run_until(ring, lambda: len(rec.events) == 10)
    assert exp.syncs_issued <= 2
    assert all(err == 0 for _n, err in rec.events)


def test_writeback_replies_early_and_reports_error_at_next_flush(
    ring: Ring, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exp = make_export(
        ring, tmp_path, f"write@0-4k:delay={DELAY}:error=EIO", durability=Durability.WRITEBACK
    )
    rec = Recorder()
    exp.write(0, data(0x55), rec("write"))
    assert rec.events == [("write", 0)]  # replied before the I/O even started
    exp.flush(rec("flush"))
    exp.flush(rec("second flush"))
    run_until(ring, lambda: len(rec.events) == 3)
    assert rec.events[1:] == [("flush", errno.EIO), ("second flush", 0)]
    assert "write-back of 4096 bytes at offset 0 failed" in caplog.text


def test_writeback_reads_see_pending_data(ring: Ring, tmp_path: Path) -> None:
    exp = make_export(ring, tmp_path, f"write@0-4k:delay={DELAY}", durability=Durability.WRITEBACK)
    rec = Recorder()
    exp.write(0, data(0x66), rec("write"))
    out = pool.acquire(4096)
    exp.read(0, out.view, rec("read"))
    run_until(ring, lambda: len(rec.events) == 2)
    assert out.view.tobytes() == b"\x66" * 4096


def test_writeback_limit_bounds_unwritten_bytes(ring: Ring, tmp_path: Path) -> None:
    exp = make_export(
        ring,
        tmp_path,
        f"write:delay={DELAY}",
        durability=Durability.WRITEBACK,
        writeback_limit=8192,
    )
    rec = Recorder()
    for i in range(4):
        exp.write(i * 4096, data(i), rec(f"w{i}"))
    assert rec.names == ["w0", "w1"]
    assert exp.writeback_bytes == 8192
    run_until(ring, lambda: len(rec.events) == 4)
    run_until(ring, lambda: exp.writeback_bytes == 0)


def test_sync_durability_makes_every_write_fua(ring: Ring, tmp_path: Path) -> None:
    """In sync mode a plain write takes the FUA path (write linked to fdatasync)."""
    exp = make_export(ring, tmp_path, durability=Durability.SYNC)
    calls: list[bool] = []
    real_write = ring.write

    def spy(fd: int, buf: object, offset: int, cb: Callable[[int], None], **kw: bool) -> None:
        calls.append(kw.get("fua", False))
        real_write(fd, buf, offset, cb, **kw)

    ring.write = spy  # type: ignore[method-assign]
    rec = Recorder()
    exp.write(0, data(0x77), rec("write"))
    run_until(ring, lambda: len(rec.events) == 1)
    assert calls == [True]


def test_fua_dsync_uses_rwf_dsync_instead_of_a_linked_sync(ring: Ring, tmp_path: Path) -> None:
    """--fua dsync: a FUA write is one write with RWF_DSYNC, no linked fdatasync; the data
    lands and the write succeeds."""
    exp = make_export(ring, tmp_path, fua_dsync=True)
    calls: list[dict[str, bool]] = []
    real_write = ring.write

    def spy(fd: int, buf: object, offset: int, cb: Callable[[int], None], **kw: bool) -> None:
        calls.append(kw)
        real_write(fd, buf, offset, cb, **kw)

    ring.write = spy  # type: ignore[method-assign]
    rec = Recorder()
    exp.write(8192, data(0x5A), rec("fua write"), fua=True)
    run_until(ring, lambda: len(rec.events) == 1)
    assert rec.events == [("fua write", 0)]
    assert [(kw.get("dsync"), kw.get("fua", False)) for kw in calls] == [(True, False)]
    assert os.pread(exp.fd, 4096, 8192) == b"\x5a" * 4096


def test_injected_errors_and_probability(ring: Ring, tmp_path: Path) -> None:
    exp = make_export(ring, tmp_path, "read@1M-2M:error=EIO", "trim:error=ENOSPC:prob=0")
    rec = Recorder()
    out = pool.acquire(4096)
    exp.read(1 << 20, out.view, rec("bad read"))
    exp.read(0, out.view, rec("good read"))
    exp.trim(0, 4096, rec("trim"))
    run_until(ring, lambda: len(rec.events) == 3)
    assert dict(rec.events) == {"bad read": errno.EIO, "good read": 0, "trim": 0}


@pytest.mark.parametrize(
    "text",
    ["bogus:delay=1s", "read@5-1:delay=1s", "read", "read:delay=abc", "read:error=ENOPE",
     "read:prob=2:delay=1s", "read:colour=red"],
)
def test_fault_rule_syntax_errors(text: str) -> None:
    with pytest.raises(ValueError):
        FaultRule.parse(text)
