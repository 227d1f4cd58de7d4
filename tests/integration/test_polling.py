"""--poll-us: after answering a lone client the reader polls its socket briefly instead of
sleeping. Polling must never change what is answered, with one client or with several."""

from __future__ import annotations

import random

import pytest

from ._libnbd import connect
from ._util import KiB, StartServer

pytestmark = [pytest.mark.integration, pytest.mark.requires("nbd")]


@pytest.mark.parametrize("poll_us", ["0", "1000"])
def test_queue_depth_one_reads_and_writes(start_nbd_server: StartServer, poll_us: str) -> None:
    """One request at a time (the case polling is for): each read returns the last write."""
    server = start_nbd_server(extra_args=("--poll-us", poll_us))
    rng = random.Random(7)
    shadow = bytearray(256 * KiB)
    with connect(server.uri) as h:
        for _ in range(300):
            off = rng.randrange(0, 64) * 4 * KiB
            if rng.random() < 0.5:
                data = rng.randbytes(4 * KiB)
                h.pwrite(data, off)
                shadow[off : off + len(data)] = data
            else:
                assert h.pread(4 * KiB, off) == bytes(shadow[off : off + 4 * KiB])


def test_polling_client_beside_a_second_one(start_nbd_server: StartServer) -> None:
    """A long poll on one connection does not hold up another: with two clients connected
    nobody polls, and both are answered, alternating request by request."""
    server = start_nbd_server(extra_args=("--poll-us", "10000"))
    with connect(server.uri) as a, connect(server.uri) as b:
        for i in range(100):
            a.pwrite(bytes([i]) * 512, 0)
            b.pwrite(bytes([i + 1]) * 512, 4096)
            assert b.pread(512, 0) == bytes([i]) * 512
            assert a.pread(512, 4096) == bytes([i + 1]) * 512
