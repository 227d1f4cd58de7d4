"""Helpers for the integration tests: start/stop an NBD server subprocess, run client tools.

The server under test is nbd-uring by default. ``NBD_URING_TEST_SERVER=nbdkit`` runs the same
tests against nbdkit's file plugin instead, which is how the tests themselves are validated
against a known-good server.
"""

from __future__ import annotations

import hashlib
import os
import random
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Block size constraints nbd-uring advertises (NBD_INFO_BLOCK_SIZE).
BLOCK_MIN = 1
BLOCK_PREFERRED = 4096
BLOCK_MAX = 32 * MiB

#: How long a server may take to start listening, and to exit after SIGTERM.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
#: A test whose servers are still up after this long is considered hung (see conftest).
WATCHDOG_SECONDS = 180.0
#: Default timeout for a client tool subprocess.
TOOL_TIMEOUT = 120.0

#: Size of the default test export: big enough for the 64 MiB copies and the
#: oversized-request tests (a 64 MiB READ must be rejected for its length, not its range).
DEFAULT_SIZE = 128 * MiB

NBD_URING = "nbd-uring"
NBDKIT = "nbdkit"


def server_kind() -> str:
    kind = os.environ.get("NBD_URING_TEST_SERVER", NBD_URING).strip().lower() or NBD_URING
    if kind in {"nbd-uring", "nbd_uring", "uring"}:
        return NBD_URING
    if kind == NBDKIT:
        return NBDKIT
    raise pytest.UsageError(f"NBD_URING_TEST_SERVER={kind!r}: expected 'nbd-uring' or 'nbdkit'")


def is_nbdkit() -> bool:
    return server_kind() == NBDKIT


def run(
    cmd: list[str],
    *,
    timeout: float = TOOL_TIMEOUT,
    check: bool = True,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client tool with a timeout; on failure, fail the test with its output."""
    try:
        proc = subprocess.run(
            cmd,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd[0]} timed out after {timeout}s: {cmd!r}\nstderr: {exc.stderr!r}")
    if check and proc.returncode != 0:
        pytest.fail(
            f"{cmd[0]} exited with {proc.returncode}: {cmd!r}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def free_tcp_port() -> int:
    """A currently free loopback port (only used for nbdkit, which cannot report port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected_uri(export_name: str, *, unix: Path | None, port: int | None) -> str:
    """The URI ``--print-uri`` must print for this listener and export name."""
    name = quote(export_name, safe="")
    if unix is not None:
        return f"nbd+unix:///{name}?socket={unix}"
    return f"nbd://127.0.0.1:{port}/{name}"


@dataclass
class Server:
    """A running NBD server subprocess serving one file."""

    kind: str
    proc: subprocess.Popen[bytes]
    uri: str
    path: Path
    export_name: str
    read_only: bool
    stderr_path: Path
    unix: Path | None = None
    port: int | None = None
    argv: list[str] = field(default_factory=list)
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def address(self) -> str | tuple[str, int]:
        """Address for a raw ``socket.connect``."""
        if self.unix is not None:
            return str(self.unix)
        assert self.port is not None
        return ("127.0.0.1", self.port)

    def connect_raw(self, timeout: float = 10.0) -> socket.socket:
        family = socket.AF_UNIX if self.unix is not None else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(self.address)
        return sock

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """SIGKILL the server (simulated crash) and reap it."""
        self.killed = True
        if self.alive():
            self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        _close_pipes(self.proc)

    def stop(self, *, check: bool = True) -> int:
        """SIGTERM the server, wait for it and (if check) assert it exited cleanly."""
        if self.killed:
            return self.proc.returncode
        already_dead = not self.alive()
        if not already_dead:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT)
            _close_pipes(self.proc)
            if check:
                pytest.fail(
                    f"{self.kind} did not exit within {STOP_TIMEOUT}s of SIGTERM\n"
                    f"stderr:\n{self.stderr_text()}"
                )
            return self.proc.returncode
        _close_pipes(self.proc)
        if check:
            log = self.stderr_text()
            assert not already_dead, f"{self.kind} died during the test (rc={rc})\n{log}"
            assert rc == 0, f"{self.kind} exited with {rc} after SIGTERM\nstderr:\n{log}"
            assert "Traceback" not in log, f"{self.kind} logged a traceback:\n{log}"
        return rc


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdout is not None:
        proc.stdout.close()


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str | None:
    """Read one line from the process's stdout, or None on EOF/timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def _wait_for_pidfile(proc: subprocess.Popen[bytes], pidfile: Path, timeout: float) -> bool:
    """nbdkit writes its pidfile once it is listening: wait for it (nbdkit only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if pidfile.exists() and pidfile.read_text().strip():
            return True
        time.sleep(0.01)
    return False


def start_server(
    workdir: Path,
    path: Path,
    *,
    read_only: bool = False,
    export_name: str = "",
    tcp: bool = False,
    sockdir: Path | None = None,
    description: str | None = None,
    extra_args: tuple[str, ...] = (),
    config: Path | None = None,
) -> Server:
    """Start the server under test on ``path`` (or on the exports of a ``config`` file, for
    nbd-uring only); return once it is accepting connections."""
    kind = server_kind()
    workdir.mkdir(parents=True, exist_ok=True)
    n = len(list(workdir.glob("server-*.log")))
    stderr_path = workdir / f"server-{n}.log"
    unix: Path | None = None
    port: int | None = None
    if not tcp:
        # Keep socket paths short (sun_path is 108 bytes): tmp_path can be long.
        unix = (sockdir or workdir) / f"s{n}.sock"
        if len(str(unix)) > 100:
            raise RuntimeError(f"socket path too long: {unix}")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("PYTHONUNBUFFERED", "1")

    pidfile = workdir / f"server-{n}.pid"
    if kind == NBD_URING:
        source = ["--config", str(config)] if config is not None else [str(path)]
        argv = [sys.executable, "-m", "nbd_uring", "serve", *source, "--print-uri", "-v"]
        argv += ["--unix", str(unix)] if unix is not None else ["--port", "0"]
        if read_only:
            argv.append("--read-only")
        if export_name:
            argv += ["--export-name", export_name]
        if description is not None:
            argv += ["--description", description]
    else:
        if unix is None:
            port = free_tcp_port()
        argv = ["nbdkit", "--exit-with-parent", "-f", "-P", str(pidfile)]
        argv += ["-U", str(unix)] if unix is not None else ["-p", str(port), "-i", "127.0.0.1"]
        if read_only:
            argv.append("-r")
        argv += [
            "--filter=blocksize-policy",
            "--filter=exportname",
            "file",
            str(path),
            f"blocksize-minimum={BLOCK_MIN}",
            f"blocksize-preferred={BLOCK_PREFERRED}",
            f"blocksize-maximum={BLOCK_MAX}",
        ]
        if description is not None:
            argv.append(f"exportdesc=fixed:{description}")
    argv += list(extra_args)

    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env
        )

    def _fail(why: str) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)
        _close_pipes(proc)
        log = stderr_path.read_text(errors="replace")
        pytest.fail(f"{kind} {why}: {argv!r}\nexit status: {proc.returncode}\nstderr:\n{log}")

    if kind == NBD_URING:
        line = _read_line(proc, START_TIMEOUT)
        if line is None:
            _fail(f"did not print its URI within {START_TIMEOUT}s")
        assert line is not None
        uri = line.strip()
        if unix is None:
            port = _port_from_uri(uri)
            if port is None:
                _fail(f"printed an unparsable TCP URI {uri!r}")
    else:
        if not _wait_for_pidfile(proc, pidfile, START_TIMEOUT):
            _fail(f"did not start listening within {START_TIMEOUT}s")
        uri = expected_uri(export_name, unix=unix, port=port)

    return Server(
        kind=kind,
        proc=proc,
        uri=uri,
        path=path,
        export_name=export_name,
        read_only=read_only,
        stderr_path=stderr_path,
        unix=unix,
        port=port,
        argv=argv,
    )


def _port_from_uri(uri: str) -> int | None:
    for prefix in ("nbd://127.0.0.1:", "nbds://127.0.0.1:"):
        if uri.startswith(prefix):
            break
    else:
        return None
    rest = uri[len(prefix) :].split("/", 1)[0]
    return int(rest) if rest.isdigit() else None


def make_sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


class StartServer(Protocol):
    def __call__(
        self,
        path: Path | None = None,
        *,
        size: int = DEFAULT_SIZE,
        read_only: bool = False,
        export_name: str = "",
        tcp: bool = False,
        description: str | None = None,
        extra_args: tuple[str, ...] = (),
        config: Path | None = None,
    ) -> Server: ...


def sha256_file(path: Path, length: int | None = None) -> str:
    """sha256 of a file (or of its first ``length`` bytes)."""
    h = hashlib.sha256()
    remaining = length
    with path.open("rb") as f:
        while remaining is None or remaining > 0:
            want = MiB if remaining is None else min(MiB, remaining)
            chunk = f.read(want)
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


def write_random_file(path: Path, size: int, seed: int = 0) -> Path:
    """A file of reproducible pseudo-random bytes (fast: numpy-free, random.randbytes)."""
    rng = random.Random(seed)
    with path.open("wb") as f:
        left = size
        while left:
            n = min(4 * MiB, left)
            f.write(rng.randbytes(n))
            left -= n
    return path
