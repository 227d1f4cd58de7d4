"""Arrival-order serialisation of overlapping requests (the design concept's synchronisation).

io_uring runs independent SQEs concurrently (io-wq), so a later request could otherwise overtake
an earlier one on the same bytes. Every request is admitted here in the order it was read from
any connection; it starts at once unless it conflicts with an earlier request still queued or
running, in which case it starts when the last of those finishes. Reads conflict only with
writes; writes (and discards, zeroing) conflict with everything that overlaps.

Ranges are indexed by fixed-size granules in a dict, so finding the overlaps of a request costs
a few dict lookups however many requests are in flight. A request spanning very many granules
(a whole-disk TRIM) is kept on a short list of its own that every admission scans instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nbd_uring.engine.lane import LaneExport

GRANULE_SHIFT = 20
MAX_GRANULES = 64


class Admission:
    """One admitted request: its range, what it waits for and who waits for it."""

    __slots__ = ("_run", "blockers", "dependents", "end", "exclusive", "start")

    def __init__(
        self, start: int, end: int, exclusive: bool, run: Callable[[], None] | None
    ) -> None:
        self.start = start
        self.end = end
        self.exclusive = exclusive
        self._run: Callable[[], None] | None = run
        self.blockers = 0
        self.dependents: list[Admission] | tuple[()] = ()
        """Requests waiting for this one; an empty tuple (no list allocated) while none."""

    @property
    def started(self) -> bool:
        return self._run is None

    def defer(self, run: Callable[[], None]) -> None:
        """Set what :meth:`begin` runs, for an entry admitted with ``run=None`` that turned out
        to be blocked (the caller starts an unblocked one itself, with no closure)."""
        self._run = run

    def begin(self) -> None:
        run, self._run = self._run, None
        if run is not None:
            run()


class OverlapTracker:
    """Bookkeeping only: it calls ``run`` when a request may start, and nothing else.

    :meth:`admit` registers a request and never runs it, so the caller holds the entry before
    anything can complete; the caller starts it when ``blockers`` is zero.
    """

    def __init__(self, lane: LaneExport | None = None) -> None:
        self._granules: dict[int, list[Admission]] = {}
        self._large: list[Admission] = []
        self.active = 0
        self.lane = lane
        """The export's lane, whose reads and writes are not admitted here: it is told what
        is admitted (and takes nothing that would conflict), and a request admitted here
        waits for the lane's conflicting ones in flight."""
        self.exclusive_active = 0

    def admit(
        self, start: int, length: int, exclusive: bool, run: Callable[[], None] | None
    ) -> Admission:
        """Admit a request for ``[start, start+length)``, behind every conflicting one."""
        end = start + (length if length > 0 else 1)
        entry = Admission(start, end, exclusive, run)
        lane = self.lane
        if lane is not None:
            # Tell the lane first (it takes nothing conflicting from here on), then wait for
            # what it has in flight that conflicts.
            state = lane.state
            state.python_active = self.active + 1
            if exclusive:
                self.exclusive_active += 1
                state.exclusive = 1
            if state.inflight and lane.wait(start, end, exclusive, lambda: _lane_done(entry)):
                entry.blockers += 1
        elif exclusive:
            self.exclusive_active += 1
        first, last = start >> GRANULE_SHIFT, (end - 1) >> GRANULE_SHIFT
        if first == last:
            # The common case: one granule, whose list holds each entry once (no dedup needed).
            lst = self._granules.get(first)
            if lst is None:
                self._granules[first] = [entry]
            else:
                for other in lst:
                    if (exclusive or other.exclusive) and other.start < end and start < other.end:
                        _depend(entry, other)
                lst.append(entry)
            for other in self._large:
                if (exclusive or other.exclusive) and other.start < end and start < other.end:
                    _depend(entry, other)
            self.active += 1
            return entry
        seen: set[Admission] = set()
        large = last - first >= MAX_GRANULES
        if large:
            candidates: list[Admission] = [e for lst in self._granules.values() for e in lst]
        else:
            candidates = []
            for g in range(first, last + 1):
                lst = self._granules.get(g)
                if lst:
                    candidates.extend(lst)
        candidates.extend(self._large)
        for other in candidates:
            if (exclusive or other.exclusive) and other.start < end and start < other.end:
                if other not in seen:
                    seen.add(other)
                    _depend(entry, other)
        if large:
            self._large.append(entry)
        else:
            for g in range(first, last + 1):
                self._granules.setdefault(g, []).append(entry)
        self.active += 1
        return entry

    def release(self, entry: Admission) -> None:
        """The request is finished: forget it and start whatever was waiting only for it."""
        first, last = entry.start >> GRANULE_SHIFT, (entry.end - 1) >> GRANULE_SHIFT
        if last - first >= MAX_GRANULES:
            self._large.remove(entry)
        else:
            granules = self._granules
            for g in range(first, last + 1):
                lst = granules[g]
                lst.remove(entry)
                if not lst:
                    del granules[g]
        self.active -= 1
        if entry.exclusive:
            self.exclusive_active -= 1
        lane = self.lane
        if lane is not None:
            state = lane.state
            state.python_active = self.active
            if not self.exclusive_active:
                state.exclusive = 0
        for dependent in entry.dependents:
            dependent.blockers -= 1
            if dependent.blockers == 0:
                dependent.begin()
        entry.dependents = ()


def _lane_done(entry: Admission) -> None:
    """The lane reads ``entry`` waited for have completed."""
    entry.blockers -= 1
    if entry.blockers == 0:
        entry.begin()


def _depend(entry: Admission, other: Admission) -> None:
    """``entry`` waits for ``other``."""
    deps = other.dependents
    if deps:
        deps.append(entry)
    else:
        other.dependents = [entry]
    entry.blockers += 1
