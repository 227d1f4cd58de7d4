"""Acknowledged FUA writes and flushed writes survive the server being killed with SIGKILL."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from ._libnbd import connect, nbd
from ._util import KiB, MiB, StartServer, make_sparse

pytestmark = [pytest.mark.integration, pytest.mark.requires("nbd")]


@pytest.mark.parametrize("mode", ["fua", "flush"])
def test_data_survives_sigkill(start_nbd_server: StartServer, tmp_path: Path, mode: str) -> None:
    """Data written with FUA (or written, then flushed) is acknowledged only once it is in
    the file: after `kill -9` of the server and a restart on the same file, a new connection
    reads it all back."""
    path = make_sparse(tmp_path / "durable.img", 16 * MiB)
    server = start_nbd_server(path)
    rng = random.Random(42)
    writes = [(rng.randrange(0, 16 * MiB - 64 * KiB), rng.randbytes(64 * KiB)) for _ in range(32)]
    writes.sort()  # non-overlapping check below needs distinct ranges
    chosen = []
    end = -1
    for off, data in writes:
        if off > end:
            chosen.append((off, data))
            end = off + len(data)
    with connect(server.uri) as h:
        for off, data in chosen:
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if mode == "fua" else 0)
        if mode == "flush":
            h.flush()
        server.kill()
    assert server.proc.returncode == -9

    restarted = start_nbd_server(path)
    with connect(restarted.uri) as h:
        for off, data in chosen:
            assert h.pread(len(data), off) == data, f"lost write at {off}"
