"""The overlap tracker and the FLUSH epochs, as pure bookkeeping (no ring)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from nbd_uring.engine.durability import FlushEpochs
from nbd_uring.engine.ordering import GRANULE_SHIFT, MAX_GRANULES, Admission, OverlapTracker


def _conflict(a: tuple[int, int, bool], b: tuple[int, int, bool]) -> bool:
    return (a[2] or b[2]) and a[0] < b[1] and b[0] < a[1]


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("admit"),
            st.integers(0, 1 << 24),
            st.sampled_from([1, 512, 4096, 1 << 20, 3 << 20, (MAX_GRANULES + 2) << GRANULE_SHIFT]),
            st.booleans(),
        ),
        st.tuples(st.just("release"), st.integers(0, 1000), st.just(0), st.just(False)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_tracker_matches_a_naive_model(script: list[tuple[str, int, int, bool]]) -> None:
    """After every step, a request has started exactly when no earlier unfinished request
    conflicts with it (reads share, writes exclude), whatever the sizes involved."""
    tracker = OverlapTracker()
    active: list[tuple[Admission, tuple[int, int, bool]]] = []
    started: set[int] = set()
    ids: dict[Admission, int] = {}
    serial = 0
    for kind, a, b, exclusive in script:
        if kind == "admit":
            serial += 1
            number = serial
            entry = tracker.admit(a, b, exclusive, lambda n=number: started.add(n))
            ids[entry] = number
            active.append((entry, (a, a + b, exclusive)))
            if entry.blockers == 0:
                entry.begin()
        elif active:
            entry, _rng = active.pop(a % len(active))
            tracker.release(entry)
        for i, (entry, rng) in enumerate(active):
            blocked = any(_conflict(rng, other) for _e, other in active[:i])
            assert (ids[entry] in started) == (not blocked)
            assert entry.started == (not blocked)
    assert tracker.active == len(active)


def test_reads_share_and_writes_wait() -> None:
    tracker = OverlapTracker()
    log: list[str] = []
    r1 = tracker.admit(0, 4096, False, lambda: log.append("r1"))
    r2 = tracker.admit(1024, 4096, False, lambda: log.append("r2"))
    w = tracker.admit(2048, 10, True, lambda: log.append("w"))
    r3 = tracker.admit(2050, 1, False, lambda: log.append("r3"))
    other = tracker.admit(1 << 30, 4096, True, lambda: log.append("other"))
    for e in (r1, r2, w, r3, other):
        if e.blockers == 0:
            e.begin()
    assert log == ["r1", "r2", "other"]
    tracker.release(r2)
    assert log == ["r1", "r2", "other"]
    tracker.release(r1)
    assert log == ["r1", "r2", "other", "w"]
    tracker.release(w)
    assert log[-1] == "r3"


def test_flush_waits_for_earlier_writes_only() -> None:
    epochs = FlushEpochs()
    ready: list[str] = []
    w1 = epochs.write_started()
    epochs.flush(lambda: ready.append("f1"))
    w2 = epochs.write_started()
    epochs.flush(lambda: ready.append("f2"))
    assert ready == []
    epochs.write_finished(w2)
    assert ready == []
    epochs.write_finished(w1)
    assert ready == ["f1", "f2"]


def test_flush_with_nothing_outstanding_is_ready_at_once() -> None:
    epochs = FlushEpochs()
    ready: list[int] = []
    epochs.flush(lambda: ready.append(1))
    w = epochs.write_started()
    epochs.flush(lambda: ready.append(2))
    assert ready == [1]
    epochs.write_finished(w)
    assert ready == [1, 2]
    assert epochs.writes_outstanding == 0
