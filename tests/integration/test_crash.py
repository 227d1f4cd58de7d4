"""Kill -9 the server under load, restart it on the same file, and read back.

A client keeps 16 writes in flight (some FUA, a FLUSH every 16 replies) on blocks chosen so that
no two in-flight writes overlap, and records what each block must hold: the last write replied
to, or a write still in flight when the server died. The server is SIGKILLed at a random moment
(seeded, bounded count). In ``flush`` and ``sync`` modes every replied-to byte must read back
(the page cache survives a process crash); in ``writeback`` mode the test reports what was lost.
"""

from __future__ import annotations

import random
import select
import struct
import threading
import time
from pathlib import Path

import pytest

from ._util import Server, StartServer, is_nbdkit, make_sparse
from .test_malformed import CMD_FLAG_FUA, CMD_FLUSH, CMD_WRITE, RawClient, recv_exact

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="uses nbd-uring's --durability"),
]

BLOCK = 4096
BLOCKS = 2048
ROUNDS = 3
QD = 16


def payload(round_: int, serial: int) -> bytes:
    head = struct.pack(">IIQ", 0xC0FFEE, round_, serial)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def hammer(
    client: RawClient,
    round_: int,
    rng: random.Random,
    deadline: float,
    state: dict[int, set[bytes]],
) -> int:
    """Write until ``deadline`` or until the server dies; returns the number of replies."""
    in_flight: dict[int, tuple[int, bytes]] = {}
    flushes: set[int] = set()
    busy: set[int] = set()
    serial = replies = 0
    sock = client.sock
    while True:
        alive = time.monotonic() < deadline
        while alive and len(in_flight) + len(flushes) < QD:
            block = rng.randrange(BLOCKS)
            if block in busy:
                continue
            serial += 1
            data = payload(round_, serial)
            flags = CMD_FLAG_FUA if serial % 5 == 0 else 0
            try:
                cookie = client.request(CMD_WRITE, block * BLOCK, BLOCK, flags=flags, payload=data)
            except OSError:
                return replies
            in_flight[cookie] = (block, data)
            busy.add(block)
            state.setdefault(block, {bytes(BLOCK)}).add(data)  # may or may not have landed
            if serial % 16 == 0:
                try:
                    flushes.add(client.request(CMD_FLUSH, 0, 0))
                except OSError:
                    return replies
        if not in_flight and not flushes:
            return replies
        ready, _, _ = select.select([sock], [], [], 5)
        if not ready:
            return replies
        try:
            magic, error, cookie = struct.unpack(">IIQ", recv_exact(sock, 16))
        except Exception:
            return replies
        assert magic == 0x67446698 and error == 0, (magic, error)
        replies += 1
        if cookie in flushes:
            flushes.discard(cookie)
            continue
        block, data = in_flight.pop(cookie)
        busy.discard(block)
        state[block] = {data}  # replied: this is what the block must hold from now on


def kill_later(server: Server, when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))
    server.kill()


@pytest.mark.parametrize("durability", ["flush", "sync", "writeback"])
def test_kill_9_loses_nothing_that_was_replied_to(
    start_nbd_server: StartServer, tmp_path: Path, durability: str
) -> None:
    rng = random.Random(f"crash-{durability}")
    path = make_sparse(tmp_path / "crash.img", BLOCKS * BLOCK)
    state: dict[int, set[bytes]] = {}
    lost: list[int] = []
    total_replies = 0
    for round_ in range(ROUNDS):
        server = start_nbd_server(path, extra_args=("--durability", durability))
        client = RawClient(server).handshake()
        kill_at = time.monotonic() + rng.uniform(0.2, 0.6)
        deadline = kill_at + 10.0

        t = threading.Thread(target=kill_later, args=(server, kill_at))
        t.start()
        total_replies += hammer(client, round_, rng, deadline, state)
        t.join()
        client.close()
    assert total_replies > 0

    server = start_nbd_server(path)
    reader = RawClient(server).handshake()
    for block, allowed in sorted(state.items()):
        got = reader.read(block * BLOCK, BLOCK)
        if got not in allowed:
            lost.append(block)
    reader.disconnect()
    if durability == "writeback":
        print(f"writeback: {len(lost)} of {len(state)} blocks lost across {ROUNDS} kills")
    else:
        assert not lost, f"{len(lost)} replied-to blocks did not survive kill -9: {lost[:10]}"
    assert total_replies > 100
