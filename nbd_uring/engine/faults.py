"""Fault and delay injection for debugging and tests (like nbdkit's delay and error filters).

A rule is written ``OP[@START-END][:delay=DURATION][:error=ERRNO][:prob=P]``:

- ``OP``: ``read``, ``write``, ``flush``, ``trim``, ``zero`` or ``any``;
- ``@START-END``: only requests overlapping these bytes (sizes like ``4k``, ``1M``; END excluded);
- ``delay=``: hold the operation back this long before it reaches the disk (``250ms``, ``2s``);
- ``error=``: fail it with this errno (``EIO``, ``ENOSPC``, or a number) instead of doing it;
- ``prob=``: apply the rule to this fraction of matching requests (default 1).

A delayed operation still holds its place in the ordering: overlapping requests wait for it.
"""

from __future__ import annotations

import random

from nbd_uring.config import FaultRule


class FaultInjector:
    """Decides, per operation, how long to hold it back and whether to fail it."""

    def __init__(self, rules: tuple[FaultRule, ...], seed: int | None = None) -> None:
        self.rules = rules
        self._random = random.Random(seed)

    def decide(self, op: str, offset: int, length: int) -> tuple[float, int]:
        delay, error = 0.0, 0
        for rule in self.rules:
            if rule.matches(op, offset, length) and (
                rule.probability >= 1.0 or self._random.random() < rule.probability
            ):
                delay = max(delay, rule.delay_s)
                error = error or rule.error
        return delay, error
