"""fio's nbd ioengine (libnbd, deep queue of async requests) with data verification."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ._util import MiB, Server, StartServer, run

pytestmark = [pytest.mark.integration, pytest.mark.requires("fio")]


def run_fio(uri: str, tmp_path: Path, *job: str, timeout: float = 120) -> dict[str, Any]:
    argv = [
        "fio",
        "--name=nbd",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--output-format=json",
        f"--output={tmp_path / 'fio.json'}",
        *job,
    ]
    proc = run(argv, timeout=timeout, check=False)
    out = (tmp_path / "fio.json").read_text() if (tmp_path / "fio.json").exists() else ""
    assert proc.returncode == 0, f"fio failed ({proc.returncode}):\n{proc.stderr}\n{out}"
    assert "verify" not in proc.stderr.lower(), proc.stderr
    result: dict[str, Any] = json.loads(out[out.index("{") :])
    return result


def test_fio_randwrite_verify_crc32c(server: Server, tmp_path: Path) -> None:
    """16 MiB of random 4 KiB writes at iodepth 16 (many requests in flight, completed out of
    order by the server), each block checksummed with crc32c and read back and verified by fio:
    exit status 0, no verify errors, and every byte written was accounted for."""
    result = run_fio(
        server.uri,
        tmp_path,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=16m",
        "--verify=crc32c",
        "--invalidate=0",
        "--do_verify=1",
        "--verify_fatal=1",
    )
    job = result["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == 16 * MiB
    # the verify phase read everything back
    assert job["read"]["io_bytes"] == 16 * MiB


def test_fio_mixed_randrw_tcp_verify(start_nbd_server: StartServer, tmp_path: Path) -> None:
    """A mixed random read/write workload with mixed block sizes (512 B to 64 KiB, unaligned
    to the 4 KiB preferred size) over TCP, verified with crc32c: no errors."""
    server = start_nbd_server(size=32 * MiB, tcp=True)
    result = run_fio(
        server.uri,
        tmp_path,
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--iodepth=32",
        "--size=32m",
        "--verify=crc32c",
        "--invalidate=0",
        "--verify_fatal=1",
    )
    assert result["jobs"][0]["error"] == 0
