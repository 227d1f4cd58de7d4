"""Durability levels and the bookkeeping that lets FLUSH wait for exactly the right writes.

A FLUSH is no barrier (the design concept's option 3): it waits only for the writes received
before it, on any connection, and requests that arrive after it start at once. Writes are
counted per *epoch*; every FLUSH closes the current epoch, and becomes ready once no write of
its epoch or an earlier one is still outstanding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from nbd_uring.config import Durability, Ordering

__all__ = ["Durability", "FlushEpochs", "Ordering"]


class FlushEpochs:
    """Tracks outstanding writes by epoch and tells each FLUSH when its writes are done."""

    def __init__(self) -> None:
        self._epoch = 0
        self._outstanding: dict[int, int] = {}
        self._waiting: deque[tuple[int, Callable[[], None]]] = deque()

    def write_started(self) -> int:
        """Count a write received now; returns the token to hand to :meth:`write_finished`."""
        epoch = self._epoch
        self._outstanding[epoch] = self._outstanding.get(epoch, 0) + 1
        return epoch

    def write_finished(self, epoch: int) -> None:
        left = self._outstanding[epoch] - 1
        if left:
            self._outstanding[epoch] = left
            return
        del self._outstanding[epoch]
        self._wake()

    def flush(self, ready: Callable[[], None]) -> None:
        """Call ``ready`` once every write started before this call has finished."""
        epoch = self._epoch
        self._epoch += 1
        self._waiting.append((epoch, ready))
        self._wake()

    @property
    def writes_outstanding(self) -> int:
        return sum(self._outstanding.values())

    def _wake(self) -> None:
        # Epochs are created in increasing order, so the dict's first key is the oldest.
        oldest = next(iter(self._outstanding), self._epoch)
        while self._waiting and self._waiting[0][0] < oldest:
            _epoch, ready = self._waiting.popleft()
            ready()
