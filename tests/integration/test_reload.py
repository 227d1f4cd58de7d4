"""SIGHUP re-reads ``--config``: exports are added, removed and changed while the clients of
the other exports keep working, and a bad file changes nothing."""

from __future__ import annotations

import random
import signal
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ._libnbd import connect, nbd
from ._util import (
    MiB,
    Server,
    StartServer,
    expected_uri,
    free_tcp_port,
    is_nbdkit,
    make_sparse,
)
from .test_malformed import (
    CMD_READ,
    CMD_WRITE,
    OPT_GO,
    OPT_REPLY_MAGIC,
    RawClient,
    expect_closed,
    recv_exact,
)
from .test_operations import list_exports

pytestmark = [
    pytest.mark.integration,
    pytest.mark.requires("nbd"),
    pytest.mark.skipif(is_nbdkit(), reason="nbd-uring's own reload"),
]

NBD_ESHUTDOWN = 108
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_INFO = 3
INFO_DESCRIPTION = 2
OPT_INFO = 6


def export_table(name: str, path: Path, extra: str = "") -> str:
    return f'[exports.{name}]\npath = "{path}"\n{extra}\n'


def uri_for(server: Server, name: str) -> str:
    return expected_uri(name, unix=server.unix, port=server.port)


def reload(server: Server, config: Path, text: str, expect: str) -> None:
    """Write ``text`` to the config file, SIGHUP, and wait for ``expect`` in the log."""
    seen = server.stderr_text().count(expect)
    config.write_text(text)
    server.proc.send_signal(signal.SIGHUP)
    wait_for_log(server, expect, seen + 1)


def wait_for_log(server: Server, text: str, count: int = 1, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while server.stderr_text().count(text) < count:
        assert server.alive(), f"server died:\n{server.stderr_text()}"
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{server.stderr_text()}"
        time.sleep(0.02)


class Worker(threading.Thread):
    """A libnbd client writing and reading back random blocks until told to stop; any
    mismatch or error is kept for the test to report."""

    def __init__(self, uri: str, size: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.size = size
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.rounds = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with connect(self.uri) as h:
                while not self.stop.is_set():
                    length = self.rng.choice((4096, 65536, 1 * MiB))
                    offset = self.rng.randrange(0, self.size - length, 512)
                    data = self.rng.randbytes(length)
                    h.pwrite(data, offset)
                    assert h.pread(length, offset) == data, f"mismatch at {offset}"
                    self.rounds += 1
        except BaseException as exc:
            self.error = exc

    def finish(self) -> int:
        self.stop.set()
        self.join(timeout=30)
        assert not self.is_alive(), "worker hung"
        if self.error is not None:
            raise self.error
        return self.rounds


def opt_reply_type(client: RawClient, name: bytes, option: int = OPT_GO) -> list[tuple[int, bytes]]:
    """Send NBD_OPT_GO/INFO for ``name``; every reply (type, payload) up to ACK or error."""
    client.greeting()
    client.send_option(option, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 2))
    replies = []
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(client.sock, 20))
        assert magic == OPT_REPLY_MAGIC
        replies.append((rtype, recv_exact(client.sock, length)))
        if rtype == 1 or rtype & (1 << 31):
            return replies


def description_of(server: Server, name: bytes) -> bytes:
    client = RawClient(server)
    try:
        for rtype, payload in opt_reply_type(client, name, OPT_INFO):
            if rtype == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_DESCRIPTION:
                return payload[2:]
        return b""
    finally:
        client.close()


def test_sighup_adds_and_removes_exports(start_nbd_server: StartServer, tmp_path: Path) -> None:
    """A libnbd client of ``keep`` writes and verifies all along. SIGHUP removes ``gone`` and
    adds ``new``: the client of ``gone`` (its READ replies unread, so still in flight) gets
    them all with the right data, a request sent after the reload gets ESHUTDOWN, then the
    connection closes and the file is closed; new clients cannot choose ``gone`` and can
    choose ``new``, which LIST shows instead."""
    keep = make_sparse(tmp_path / "keep.img", 64 * MiB)
    gone = make_sparse(tmp_path / "gone.img", 64 * MiB)
    new = make_sparse(tmp_path / "new.img", 16 * MiB)
    config = tmp_path / "reload.toml"
    config.write_text(export_table("keep", keep) + export_table("gone", gone))
    server = start_nbd_server(config=config)
    worker = Worker(uri_for(server, "keep"), 64 * MiB, 1)
    worker.start()
    deadline = time.monotonic() + 10
    while worker.rounds == 0 and worker.error is None and time.monotonic() < deadline:
        time.sleep(0.01)

    doomed = RawClient(server).handshake(b"gone")
    data = random.Random(2).randbytes(4 * MiB)
    doomed.write(0, data)
    # Eight 4 MiB READs whose replies the client does not read yet: in flight at the reload.
    reads = [doomed.request(CMD_READ, 0, 4 * MiB) for _ in range(8)]
    before = worker.rounds
    reload(
        server, config, export_table("keep", keep) + export_table("new", new),
        "reload: export 'gone' removed",
    )
    wait_for_log(server, "reload: export 'new' added")
    late = doomed.request(CMD_WRITE, 0, 4096, payload=b"L" * 4096)
    for cookie in reads:
        reply = doomed.reply(4 * MiB)
        assert (reply.cookie, reply.error) == (cookie, 0)
        assert reply.data == data
    reply = doomed.reply()
    assert (reply.cookie, reply.error) == (late, NBD_ESHUTDOWN)
    expect_closed(doomed.sock)
    wait_for_log(server, "export 'gone': closed")
    assert gone.read_bytes()[: len(data)] == data  # the late write was refused

    assert list_exports(RawClient(server)) == [b"keep", b"new"]
    rtype, _payload = opt_reply_type(RawClient(server), b"gone")[-1]
    assert rtype == REP_ERR_UNKNOWN
    with connect(uri_for(server, "new")) as h:
        assert h.get_size() == 16 * MiB
        h.pwrite(b"N" * 4096, 8192)
        assert h.pread(4096, 8192) == b"N" * 4096
    deadline = time.monotonic() + 10
    while worker.rounds < before + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.finish() >= before + 20, "the client of 'keep' stalled across the reload"


def test_sighup_changes_settings(start_nbd_server: StartServer, tmp_path: Path) -> None:
    """A new description applies to new clients and leaves the connected one alone; a new
    size replaces the export: its connected client is drained (closed), new ones see the
    new size; a changed metrics address is logged as needing a restart, and the command
    line still overrides the file's listen settings."""
    disk = make_sparse(tmp_path / "disk.img", 32 * MiB)
    config = tmp_path / "reload.toml"
    config.write_text(export_table("disk", disk, 'description = "old"'))
    server = start_nbd_server(config=config)
    uri = uri_for(server, "disk")
    assert description_of(server, b"disk") == b"old"
    with connect(uri) as h:
        reload(
            server, config, export_table("disk", disk, 'description = "new"'),
            "reload: export 'disk' changed (description",
        )
        h.pwrite(b"x" * 4096, 0)  # still connected
        assert h.pread(4096, 0) == b"x" * 4096
        assert description_of(server, b"disk") == b"new"
        reload(
            server, config,
            '[server]\nport = 1\nmetrics = "127.0.0.1:1"\n'
            + export_table("disk", disk, 'size = "16M"'),
            "reload: export 'disk' replaced",
        )
        log = server.stderr_text()
        assert "metrics changed (None -> '127.0.0.1:1'); this needs a restart" in log
        assert "port changed" not in log  # --unix on the command line still overrides it
        wait_for_log(server, "export 'disk': closed")
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
    with connect(uri) as h:
        assert h.get_size() == 16 * MiB
        assert h.pread(4096, 0) == b"x" * 4096


def test_sighup_with_a_bad_config_keeps_the_running_one(
    start_nbd_server: StartServer, tmp_path: Path
) -> None:
    """A file that does not parse, and one that does not validate, are each logged with
    their line and change nothing: the connected client and new ones are served as before.
    An export whose file cannot be opened leaves every export as it was too."""
    disk = make_sparse(tmp_path / "disk.img", 8 * MiB)
    config = tmp_path / "reload.toml"
    good = export_table("disk", disk)
    config.write_text(good)
    server = start_nbd_server(config=config)
    uri = uri_for(server, "disk")
    with connect(uri) as h:
        h.pwrite(b"a" * 512, 0)
        reload(server, config, good + "[exports.x\n", "reload failed")
        assert f"{config}:4:" in server.stderr_text()
        reload(server, config, good + "\nbogus = 1\n", "reload failed")
        assert f"{config}:5: unknown setting 'bogus'" in server.stderr_text()
        reload(
            server, config, good + export_table("y", tmp_path / "missing.img"), "reload failed"
        )
        assert h.pread(512, 0) == b"a" * 512
    assert list_exports(RawClient(server)) == [b"disk"]
    with connect(uri) as h:
        assert h.pread(512, 0) == b"a" * 512


def test_sighup_notifies_systemd_and_metrics_follow(
    start_nbd_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sd_notify gets RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload wants) and then
    READY=1 around a reload; the metrics list the exports of the running configuration, and
    a connection to an export that changed only its description stays counted."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_path = tmp_path / "notify.sock"
    notify.bind(str(notify_path))
    notify.settimeout(15)
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
    port = free_tcp_port()
    a = make_sparse(tmp_path / "a.img", 4 * MiB)
    b = make_sparse(tmp_path / "b.img", 4 * MiB)
    config = tmp_path / "reload.toml"
    config.write_text(export_table("a", a))
    server = start_nbd_server(config=config, extra_args=("--metrics", f"127.0.0.1:{port}"))
    assert notify.recv(4096) == b"READY=1"

    def metrics() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        return urllib.request.urlopen(url, timeout=10).read().decode()

    client = RawClient(server).handshake(b"a")
    assert 'nbd_uring_connections{export="a"} 1.0' in metrics()
    reload(
        server, config, export_table("a", a, 'description = "x"') + export_table("b", b),
        "reload: export 'b' added",
    )
    assert notify.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
    assert notify.recv(4096) == b"READY=1"
    text = metrics()
    assert 'nbd_uring_connections{export="a"} 1.0' in text
    assert 'nbd_uring_connections{export="b"} 0.0' in text
    reload(server, config, export_table("b", b), "reload: export 'a' removed")
    expect_closed(client.sock)
    text = metrics()
    assert 'export="a"' not in text and 'nbd_uring_connections{export="b"} 0.0' in text
    notify.close()
