"""The lane on the wire: a client pipelining reads and writes, some the lane's and some
Python's (512 KiB writes, whose payload does not fit the receive buffer; requests that
overlap one in flight on the other path), with replies from both queues sharing one socket
while it is full, gets every reply whole and every byte right."""

from __future__ import annotations

import os
import random
import struct
import threading
from pathlib import Path

import pytest

from . import _rawclient as raw
from ._util import MiB, StartServer, is_nbdkit

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="nbd-uring's --lane"),
]

KiB = 1024


def _collect(client: raw.Client, reads: dict[int, tuple[int, int]], total: int) -> dict[int, bytes]:
    """Every reply, in whatever order; READ data reassembled per cookie."""
    data: dict[int, bytearray] = {}
    done: set[int] = set()
    while len(done) < total:
        chunk = client.read_message()
        assert chunk.error == 0, (chunk.cookie, chunk.error)
        if chunk.cookie in reads and chunk.magic == raw.STRUCTURED_MAGIC:
            offset, length = reads[chunk.cookie]
            buf = data.setdefault(chunk.cookie, bytearray(length))
            if chunk.type == raw.TYPE_OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", chunk.payload)
                buf[at - offset : at - offset + len(chunk.payload) - 8] = chunk.payload[8:]
            else:
                assert chunk.type in (raw.TYPE_OFFSET_HOLE, raw.TYPE_NONE), chunk.type
        elif chunk.cookie in reads:
            data[chunk.cookie] = bytearray(chunk.payload)
        if chunk.done:
            done.add(chunk.cookie)
    return {cookie: bytes(buf) for cookie, buf in data.items()}


@pytest.mark.parametrize("lane", ["--lane", "--no-lane"])
@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_pipelined_reads_and_writes_come_back_whole(
    start_nbd_server: StartServer, tmp_path: Path, lane: str, structured: bool
) -> None:
    size = 96 * MiB
    path = tmp_path / "disk.img"
    content = bytearray(random.Random(7).randbytes(64 * MiB))
    path.write_bytes(bytes(content) + bytes(size - len(content)))
    server = start_nbd_server(path, extra_args=(lane,))
    client = raw.connect(server.address, structured=structured, timeout=30)
    rng = random.Random(11)
    requests: list[tuple[int, int, int, bytes]] = []  # command, offset, length, payload
    for _ in range(400):
        if rng.random() < 0.2:
            length = 4 * KiB * rng.choice([1, 2, 4, 16, 128])
            offset = 64 * MiB + 4 * KiB * rng.randrange(0, (32 * MiB - length) // (4 * KiB))
            requests.append((raw.CMD_WRITE, offset, length, rng.randbytes(length)))
        else:
            length = rng.choice([4 * KiB, 16 * KiB, 60 * KiB, 256 * KiB, 1 * MiB])
            offset = 4 * KiB * rng.randrange(0, (64 * MiB - length) // (4 * KiB))
            requests.append((raw.CMD_READ, offset, length, b""))
    reads = {
        cookie: (offset, length)
        for cookie, (cmd, offset, length, _) in enumerate(requests, 1)
        if cmd == raw.CMD_READ
    }
    client.read_lengths.update({cookie: length for cookie, (_, length) in reads.items()})

    def send() -> None:
        # From another thread, so the replies (about 100 MiB) are read while requests go out.
        for cookie, (cmd, offset, length, payload) in enumerate(requests, 1):
            header = struct.pack(">IHHQQI", raw.REQUEST_MAGIC, 0, cmd, cookie, offset, length)
            client.sock.sendall(header + payload)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        got = _collect(client, reads, len(requests))
    finally:
        sender.join()
    for cookie, (offset, length) in reads.items():
        assert got[cookie] == content[offset : offset + length], f"read {cookie} at {offset}"
    client.disconnect()
    fd = os.open(path, os.O_RDONLY)
    try:
        expected: dict[int, bytes] = {}
        for cmd, offset, _length, payload in requests:
            if cmd == raw.CMD_WRITE:
                for i in range(0, len(payload), 4 * KiB):
                    expected[offset + i] = payload[i : i + 4 * KiB]
        for offset, block in expected.items():
            assert os.pread(fd, len(block), offset) == block
    finally:
        os.close(fd)
