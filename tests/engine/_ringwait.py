"""Waiting for a real ring in tests: submit, then reap on eventfd wake-ups until done."""

from __future__ import annotations

import select
import time
from collections.abc import Callable

from nbd_uring.engine.ring import Ring


def run_until(ring: Ring, done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    ring.submit()
    deadline = time.monotonic() + timeout_s
    while not done():
        left = deadline - time.monotonic()
        assert left > 0, f"timed out with {ring.in_flight} operations in flight"
        select.select([ring.eventfd], [], [], left)
        ring.reap()


def drain(ring: Ring, timeout_s: float = 10.0) -> None:
    """Until every operation submitted so far has completed."""
    run_until(ring, lambda: not ring.in_flight, timeout_s)
