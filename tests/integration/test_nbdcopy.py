"""nbdcopy (libnbd, many requests in flight over several connections) copies data in and out
of the export bit-exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from ._util import MiB, Server, StartServer, run, sha256_file

pytestmark = [pytest.mark.integration, pytest.mark.requires("nbdcopy")]


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdcopy_roundtrip_64m(
    start_nbd_server: StartServer, random_64m: Path, tmp_path: Path, tcp: bool
) -> None:
    """64 MiB of random data copied into the export with nbdcopy (multi-connection, parallel
    writes, flush at the end) lands in the backing file unchanged, and copying the export back
    out yields the same sha256, over a Unix socket and over TCP."""
    server = start_nbd_server(size=64 * MiB, tcp=tcp)
    want = sha256_file(random_64m)

    run(["nbdcopy", "--flush", str(random_64m), server.uri], timeout=120)
    assert sha256_file(server.path) == want, "backing file differs from what was written"

    out = tmp_path / "out.bin"
    run(["nbdcopy", server.uri, str(out)], timeout=120)
    assert out.stat().st_size == 64 * MiB
    assert sha256_file(out) == want, "data read back differs from what was written"


def test_nbdcopy_single_connection_synchronous(
    server: Server, random_64m: Path, tmp_path: Path
) -> None:
    """The same copy over one connection with one request at a time (the simplest client
    behaviour) also round-trips; the rest of the 128 MiB export reads back as zeroes."""
    run(
        [
            "nbdcopy",
            "-C",
            "1",
            "--synchronous",
            "--request-size=1048576",
            str(random_64m),
            server.uri,
        ],
        timeout=120,
    )
    out = tmp_path / "out.bin"
    run(["nbdcopy", "-C", "1", server.uri, str(out)], timeout=120)
    assert out.stat().st_size == 128 * MiB
    assert sha256_file(out, 64 * MiB) == sha256_file(random_64m)
    with out.open("rb") as f:
        f.seek(64 * MiB)
        while chunk := f.read(4 * MiB):
            assert chunk.count(0) == len(chunk), "unwritten area is not zero"
