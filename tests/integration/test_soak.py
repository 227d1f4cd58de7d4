"""Soak: busy clients that verify every read beside hundreds of idle connections, for a
bounded time (``NBD_URING_SOAK_SECONDS``, default 20), with the server's RSS flat."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest

from ._libnbd import connect as libnbd_connect
from ._load import CMD_READ, connect, header, negotiate, raise_nofile, read_reply, rss_kib
from ._util import KiB, MiB, StartServer, is_nbdkit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.requires("nbd"),
    pytest.mark.skipif(is_nbdkit(), reason="measures nbd-uring's memory"),
]

BUSY = 64
IDLE = 500
REGION = 2 * MiB
"""Each busy client owns one region of the export, so it can check every read exactly."""


def soak_seconds() -> float:
    return float(os.environ.get("NBD_URING_SOAK_SECONDS", "20"))


class Busy(threading.Thread):
    """Random writes and reads in its own region, every read checked against a shadow copy."""

    def __init__(self, uri: str, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.base = index * REGION
        self.rng = random.Random(index)
        self.stop = stop
        self.ops = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        shadow = bytearray(REGION)
        try:
            with libnbd_connect(self.uri) as h:
                while not self.stop.is_set():
                    length = self.rng.choice((4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB))
                    offset = self.rng.randrange(0, REGION - length, 512)
                    if self.rng.random() < 0.5:
                        data = self.rng.randbytes(length)
                        h.pwrite(data, self.base + offset)
                        shadow[offset : offset + length] = data
                    else:
                        got = h.pread(length, self.base + offset)
                        if got != shadow[offset : offset + length]:
                            raise AssertionError(f"read at {self.base + offset} mismatched")
                    if self.rng.random() < 0.01:
                        h.flush()
                    self.ops += 1
        except BaseException as exc:
            self.error = exc


def test_soak_busy_and_idle_clients(start_nbd_server: StartServer) -> None:
    """64 busy clients and 500 idle ones: no errors, every read right, idle connections
    still served at the end, and RSS at the end within a few MiB of RSS after warm-up."""
    raise_nofile(BUSY + IDLE + 256)
    duration = soak_seconds()
    server = start_nbd_server(size=BUSY * REGION)
    idle: list[socket.socket] = []
    stop = threading.Event()
    busy = [Busy(server.uri, i, stop) for i in range(BUSY)]
    try:
        for _ in range(IDLE):
            sock = connect(server)
            negotiate(sock)
            idle.append(sock)
        started = time.monotonic()
        for worker in busy:
            worker.start()
        samples: list[tuple[float, int]] = []
        warm_at = started + min(5.0, duration / 4)
        warm: int | None = None
        while time.monotonic() - started < duration:
            time.sleep(1.0)
            assert server.alive(), f"server exited:\n{server.stderr_text()[-3000:]}"
            samples.append((time.monotonic() - started, rss_kib(server.pid)))
            if warm is None and time.monotonic() >= warm_at:
                warm = samples[-1][1]
            assert all(w.error is None for w in busy), next(w.error for w in busy if w.error)
        end = rss_kib(server.pid)
    finally:
        stop.set()
        for worker in busy:
            worker.join(timeout=30)
    errors = [w.error for w in busy if w.error is not None]
    if errors:
        raise errors[0]
    ops = sum(w.ops for w in busy)
    # The idle connections were left alone, not dropped: each still answers a READ.
    for i, sock in enumerate(idle[:: IDLE // 10]):
        sock.sendall(header(CMD_READ, i, 0, 4096))
        assert read_reply(sock, 4096)[:2] == (i, 0)
    for sock in idle:
        sock.close()
    assert warm is not None
    series = " ".join(f"{t:.0f}s:{kib // 1024}" for t, kib in samples)
    print(
        f"\nsoak {duration:.0f} s, {BUSY} busy + {IDLE} idle clients: {ops} requests "
        f"({ops / duration:.0f}/s); server RSS after warm-up {warm // 1024} MiB, at the end "
        f"{end // 1024} MiB; MiB over time: {series}"
    )
    assert end - warm < 24 * 1024, f"RSS grew from {warm} KiB to {end} KiB"
    assert ops > BUSY * 10
