"""The ``nbd_uring serve`` command line: URI printing, file creation, signals, export names.

These exercise nbd-uring's own CLI, so they are skipped when NBD_URING_TEST_SERVER=nbdkit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ._util import (
    REPO_ROOT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    GiB,
    MiB,
    StartServer,
    _read_line,
    expected_uri,
    is_nbdkit,
    run,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="tests nbd-uring's own command line"),
]


def spawn(args: list[str], tmp_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m nbd_uring serve ARGS --print-uri``; return it and its URI line."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    log = (tmp_path / "cli.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbd_uring", "serve", *args, "--print-uri"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
    )
    log.close()
    line = _read_line(proc, START_TIMEOUT)
    if line is None:
        proc.kill()
        proc.wait(STOP_TIMEOUT)
        pytest.fail(f"no URI printed:\n{(tmp_path / 'cli.log').read_text()}")
    assert line is not None
    return proc, line


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    rc = proc.wait(STOP_TIMEOUT)
    assert proc.stdout is not None
    rest = proc.stdout.read()
    proc.stdout.close()
    assert rest == b"", f"more than one line on stdout: {rest!r}"
    return rc


def test_print_uri_unix(start_nbd_server: StartServer) -> None:
    """--print-uri with --unix prints exactly nbd+unix:///?socket=PATH (and the export name in
    the path when one is set)."""
    s = start_nbd_server(size=1 * MiB)
    assert s.uri == expected_uri("", unix=s.unix, port=None)
    named = start_nbd_server(size=1 * MiB, export_name="vol1")
    assert named.uri == expected_uri("vol1", unix=named.unix, port=None)


@pytest.mark.requires("nbdinfo")
def test_print_uri_tcp_port_0(start_nbd_server: StartServer) -> None:
    """--port 0 binds a free port on 127.0.0.1 and --print-uri reports it as
    nbd://127.0.0.1:PORT/; the URI works for a client."""
    s = start_nbd_server(size=1 * MiB, tcp=True)
    assert s.port is not None and s.port > 0
    assert s.uri == f"nbd://127.0.0.1:{s.port}/"
    run(["nbdinfo", "--size", s.uri], timeout=30)


@pytest.mark.requires("nbdinfo")
def test_create_sparse_file(tmp_path: Path) -> None:
    """FILE --size --create creates a sparse file of that size (no blocks allocated) and
    serves it; SIGINT then exits with status 0."""
    path = tmp_path / "new.img"
    proc, uri = spawn([str(path), "--size", "64M", "--create", "--port", "0"], tmp_path)
    try:
        assert path.stat().st_size == 64 * MiB
        assert path.stat().st_blocks * 512 < 1 * MiB, "created file is not sparse"
        size = run(["nbdinfo", "--size", uri], timeout=30).stdout.strip()
        assert int(size) == 64 * MiB
    finally:
        rc = stop(proc, signal.SIGINT)
    assert rc == 0, (tmp_path / "cli.log").read_text()


@pytest.mark.requires("nbdinfo")
def test_scratch_export_without_file(tmp_path: Path) -> None:
    """With no FILE the server exports a 1 GiB scratch disk and exits 0 on SIGTERM."""
    sock = tmp_path / "x.sock"
    if len(str(sock)) > 100:
        pytest.skip("tmp_path too long for a Unix socket")
    proc, uri = spawn(["--unix", str(sock)], tmp_path)
    try:
        assert uri == f"nbd+unix:///?socket={sock}"
        info = json.loads(run(["nbdinfo", "--json", "--no-content", uri], timeout=30).stdout)
        assert info["exports"][0]["export-size"] == 1 * GiB
    finally:
        rc = stop(proc)
    assert rc == 0, (tmp_path / "cli.log").read_text()


def test_missing_file_fails_cleanly(tmp_path: Path) -> None:
    """Serving a file that does not exist (without --create) fails with a message on stderr
    and a non-zero status, not a traceback."""
    proc = run(
        [sys.executable, "-m", "nbd_uring", "serve", str(tmp_path / "nope.img"), "--port", "0"],
        timeout=30,
        check=False,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip(), "no error message"
