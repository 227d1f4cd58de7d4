"""Fixtures that run the server under test as a subprocess for real NBD clients."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ._util import (
    DEFAULT_SIZE,
    WATCHDOG_SECONDS,
    MiB,
    Server,
    StartServer,
    make_sparse,
    start_server,
    write_random_file,
)


@pytest.fixture
def start_nbd_server(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartServer]:
    """Factory: start a server on a file (a new sparse one under tmp_path unless given).

    Every server started is stopped with SIGTERM at teardown, and the teardown fails unless it
    exited with status 0, without a traceback, and had not died during the test. Servers the
    test killed on purpose (``Server.kill``) are exempt.
    """
    servers: list[Server] = []
    sockdir = tmp_path_factory.mktemp("sock", numbered=True)

    # A hung server must not hang the suite: libnbd calls block without a timeout. After
    # WATCHDOG_SECONDS the watchdog SIGKILLs the test's servers (so blocked clients see EOF)
    # and the teardown fails the test.
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        for s in servers:
            if s.alive():
                s.proc.kill()

    watchdog = threading.Timer(WATCHDOG_SECONDS, expire)
    watchdog.daemon = True
    watchdog.start()

    def start(
        path: Path | None = None,
        *,
        size: int = DEFAULT_SIZE,
        read_only: bool = False,
        export_name: str = "",
        tcp: bool = False,
        description: str | None = None,
        extra_args: tuple[str, ...] = (),
        config: Path | None = None,
    ) -> Server:
        if path is None:
            path = config or make_sparse(tmp_path / f"disk{len(servers)}.img", size)
        server = start_server(
            tmp_path,
            path,
            read_only=read_only,
            export_name=export_name,
            tcp=tcp,
            sockdir=sockdir,
            description=description,
            extra_args=extra_args,
            config=config,
        )
        servers.append(server)
        return server

    yield start

    watchdog.cancel()
    if expired.is_set():
        for s in servers:
            s.killed = True
            s.kill()
        pytest.fail(f"test hung: watchdog killed the server(s) after {WATCHDOG_SECONDS}s")
    errors: list[str] = []
    for server in servers:
        try:
            server.stop(check=True)
        except AssertionError as exc:  # collect, so every server gets stopped
            errors.append(str(exc))
        except pytest.fail.Exception as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("server did not shut down cleanly:\n" + "\n\n".join(errors))


@pytest.fixture
def server(start_nbd_server: StartServer) -> Server:
    """The server under test on a Unix socket, serving a 128 MiB sparse file."""
    return start_nbd_server()


@pytest.fixture
def tcp_server(start_nbd_server: StartServer) -> Server:
    """The server under test on TCP 127.0.0.1 (port 0: a free port), 128 MiB sparse file."""
    return start_nbd_server(tcp=True)


@pytest.fixture(params=["unix", "tcp"])
def any_server(request: pytest.FixtureRequest, start_nbd_server: StartServer) -> Server:
    """The server under test, once on a Unix socket and once on TCP."""
    return start_nbd_server(tcp=request.param == "tcp")


@pytest.fixture(scope="session")
def random_64m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 64 MiB file of pseudo-random data, shared by the copy tests (read-only)."""
    return write_random_file(tmp_path_factory.mktemp("data") / "random-64m.bin", 64 * MiB)
