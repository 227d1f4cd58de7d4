"""Running the daemon for real: config file, access control, limits, captive mode, socket
activation, pidfile, metrics, clean shutdown."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ._util import REPO_ROOT, MiB, Server, StartServer, free_tcp_port, is_nbdkit, make_sparse
from .test_malformed import (
    OPT_GO,
    OPT_REPLY_MAGIC,
    RawClient,
    expect_closed,
    recv_exact,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="nbd-uring's own daemon options"),
]

REP_ERR_POLICY = (1 << 31) + 2
OPT_LIST = 3
REP_SERVER = 2
REP_ACK = 1


def nbd_uring(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "nbd_uring", *args],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )


def connect_from(server: Server, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(server.address)
    return sock


def raw_from(server: Server, source: str) -> RawClient:
    client = RawClient(server)
    client.sock.close()
    client.sock = connect_from(server, source)
    return client


def go_reply(client: RawClient, name: bytes) -> tuple[int, bytes]:
    client.greeting()
    client.send_option(OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">H", 0))
    while True:
        magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(client.sock, 20))
        assert magic == OPT_REPLY_MAGIC
        payload = recv_exact(client.sock, length)
        if rtype == REP_ACK or rtype & (1 << 31):
            return rtype, payload


def list_exports(client: RawClient) -> list[bytes]:
    client.greeting()
    client.send_option(OPT_LIST, b"")
    names = []
    while True:
        _magic, _opt, rtype, length = struct.unpack(">QIII", recv_exact(client.sock, 20))
        payload = recv_exact(client.sock, length)
        if rtype == REP_ACK:
            return names
        assert rtype == REP_SERVER
        (n,) = struct.unpack(">I", payload[:4])
        names.append(payload[4 : 4 + n])


def test_server_allow_list_refuses_other_addresses(start_nbd_server: StartServer) -> None:
    """Only 127.0.0.2 may connect: a client from 127.0.0.1 is closed before the greeting,
    one from 127.0.0.2 is served, and the refusal is logged."""
    server = start_nbd_server(tcp=True, extra_args=("--allow", "127.0.0.2/32"))
    refused = connect_from(server, "127.0.0.1")
    expect_closed(refused)
    allowed = raw_from(server, "127.0.0.2").handshake()
    allowed.write(0, b"ok" * 100)
    assert allowed.read(0, 200) == b"ok" * 100
    allowed.disconnect()
    assert "address not in the server's allow list" in server.stderr_text()


def test_allow_list_refuses_a_loopback_alias(start_nbd_server: StartServer) -> None:
    """--allow 127.0.0.1: a client from the alias 127.0.0.2 is closed before the greeting and
    the log names its address; 127.0.0.1 is served."""
    server = start_nbd_server(tcp=True, extra_args=("--allow", "127.0.0.1"))
    refused = connect_from(server, "127.0.0.2")
    port = refused.getsockname()[1]
    expect_closed(refused)
    served = raw_from(server, "127.0.0.1").handshake()
    served.disconnect()
    wait_for_log(server, f"127.0.0.2:{port}: refused: address not in the server's allow list")


def test_max_connections(start_nbd_server: StartServer) -> None:
    server = start_nbd_server(extra_args=("--max-connections", "2"))
    a = RawClient(server).handshake()
    b = RawClient(server).handshake()
    c = RawClient(server)
    expect_closed(c.sock)
    a.disconnect()
    deadline = time.monotonic() + 10
    while True:  # the server notices a's departure asynchronously
        d = RawClient(server)
        try:
            d.handshake()
            break
        except Exception:
            d.close()
            assert time.monotonic() < deadline, "slot never freed"
            time.sleep(0.05)
    d.disconnect()
    b.disconnect()
    assert "limit of 2 connections" in server.stderr_text()


CONFIG = """\
[server]
unix = "{sock}"
handshake-timeout = 5

[exports.public]
path = "{public}"
description = "for everyone"

[exports.private]
path = "{private}"
allow = ["127.0.0.2"]
max-connections = 1
"""


class Endpoint:
    """Where RawClient connects, for a server started outside the fixtures."""

    def __init__(self, port: int) -> None:
        self.address = ("127.0.0.1", port)

    def connect_raw(self, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(self.address, timeout=timeout)


def test_config_file_exports_and_per_export_policy(tmp_path: Path) -> None:
    """Two exports from a TOML file; the private one (allowed only from 127.0.0.2, one
    connection at a time) is refused with ERR_POLICY and hidden from LIST for 127.0.0.1."""
    public = make_sparse(tmp_path / "public.img", 4 * MiB)
    private = make_sparse(tmp_path / "private.img", 8 * MiB)
    port = free_tcp_port()
    cfg = tmp_path / "nbd-uring.toml"
    cfg.write_text(
        CONFIG.replace('unix = "{sock}"\n', f'bind = "127.0.0.1"\nport = {port}\n').format(
            public=public, private=private
        )
    )
    assert nbd_uring("check-config", str(cfg)).stdout.startswith(f"{cfg}: OK (2 export(s)")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbd_uring", "serve", "--config", str(cfg), "--print-uri", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"nbd://127.0.0.1:")
        server: Server = Endpoint(port)  # type: ignore[assignment]
        rtype, payload = go_reply(RawClient(server), b"private")
        assert rtype == REP_ERR_POLICY and b"not available to 127.0.0.1" in payload
        assert list_exports(RawClient(server)) == [b"public"]
        assert list_exports(raw_from(server, "127.0.0.2")) == [b"public", b"private"]
        first = raw_from(server, "127.0.0.2").handshake(b"private")
        assert first.size == 8 * MiB
        rtype, payload = go_reply(raw_from(server, "127.0.0.2"), b"private")
        assert rtype == REP_ERR_POLICY and b"limit of 1 connections" in payload
        pub = RawClient(server).handshake(b"public")
        assert pub.size == 4 * MiB
        pub.disconnect()
        first.disconnect()
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    assert "NBD_OPT_GO refused with NBD_REP_ERR_POLICY: export 'private' is not available to " \
        "127.0.0.1" in log
    assert "refused with NBD_REP_ERR_POLICY: export 'private' has reached its limit" in log


def test_check_config_points_at_the_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nport = 10809\n\n[exports.a]\npath = "/x"\nsize = "huge"\n')
    result = nbd_uring("check-config", str(cfg))
    assert result.returncode == 1
    assert f"{cfg}:6: size: expected a size" in result.stderr


def test_run_captive_mode(tmp_path: Path) -> None:
    """--run starts the command with $uri once the server listens, and exits with its
    status (nbdkit's captive mode)."""
    disk = make_sparse(tmp_path / "d.img", 3 * MiB)
    sock = tmp_path / "s.sock"
    ok = nbd_uring("serve", str(disk), "--unix", str(sock), "--run",
                   'nbdinfo --size "$uri" && test -S "$unixsocket"')
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(3 * MiB)
    failed = nbd_uring("serve", str(disk), "--unix", str(sock), "--run", "exit 7")
    assert failed.returncode == 7
    assert not sock.exists()


def test_pidfile_written_when_ready_and_removed(tmp_path: Path) -> None:
    disk = make_sparse(tmp_path / "d.img", MiB)
    pidfile = tmp_path / "nbd.pid"
    sock = tmp_path / "s.sock"
    result = nbd_uring("serve", str(disk), "--unix", str(sock), "--pidfile", str(pidfile),
                       "--run", f'cat {pidfile}')
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) > 1
    assert not pidfile.exists()


def test_socket_activation_with_libnbd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """libnbd starts the server itself with LISTEN_PID/LISTEN_FDS (systemd's protocol)."""
    nbd = pytest.importorskip("nbd")
    disk = make_sparse(tmp_path / "d.img", 5 * MiB)
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    h = nbd.NBD()
    h.connect_systemd_socket_activation([sys.executable, "-m", "nbd_uring", "serve", str(disk)])
    assert h.get_size() == 5 * MiB
    h.pwrite(b"socket-activated", 4096)
    assert h.pread(16, 4096) == b"socket-activated"
    h.shutdown()
    del h  # libnbd reaps the server it started


def test_systemd_socket_activate_and_sd_notify(tmp_path: Path) -> None:
    """systemd-socket-activate passes a listening socket; the server serves it."""
    if not Path("/usr/bin/systemd-socket-activate").exists():
        pytest.skip("systemd-socket-activate is not installed")
    disk = make_sparse(tmp_path / "d.img", 2 * MiB)
    sock = tmp_path / "act.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), sys.executable, "-m", "nbd_uring",
         "serve", str(disk), "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        out = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///?socket={sock}"],
                             capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.strip() == str(2 * MiB)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_socket_activation_with_several_sockets_and_sd_notify(tmp_path: Path) -> None:
    """systemd-socket-activate hands over a Unix and a TCP socket (LISTEN_FDS=2): both are
    served; NOTIFY_SOCKET gets READY=1 once listening and STOPPING=1 at SIGTERM, exit 0."""
    if not Path("/usr/bin/systemd-socket-activate").exists():
        pytest.skip("systemd-socket-activate is not installed")
    disk = make_sparse(tmp_path / "d.img", 2 * MiB)
    sock = tmp_path / "act.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(15)
    port = free_tcp_port()
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(sock), "-l", f"127.0.0.1:{port}",
         "-E", f"NOTIFY_SOCKET={tmp_path / 'notify.sock'}", "-E", f"PYTHONPATH={REPO_ROOT}",
         sys.executable, "-m", "nbd_uring", "serve", str(disk), "-v"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        for uri in (f"nbd://127.0.0.1:{port}/", f"nbd+unix:///?socket={sock}"):
            out = subprocess.run(["nbdinfo", "--size", uri],
                                 capture_output=True, text=True, timeout=60, check=True)
            assert out.stdout.strip() == str(2 * MiB)
        assert notify.recv(4096) == b"READY=1"
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        assert notify.recv(4096) == b"STOPPING=1"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert proc.stderr is not None
    assert "serving 2 inherited socket(s)" in proc.stderr.read().decode()


def test_metrics_endpoint(start_nbd_server: StartServer) -> None:
    port = free_tcp_port()
    server = start_nbd_server(extra_args=("--metrics", f"127.0.0.1:{port}"))
    client = RawClient(server).handshake()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'nbd_uring_connections{export=""} 1.0' in text
    client.disconnect()



def wait_for_log(server: Server, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.stderr_text():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{server.stderr_text()}"
        time.sleep(0.02)


def test_sigterm_drains_in_flight_requests(start_nbd_server: StartServer) -> None:
    """SIGTERM with a write in flight: the write is answered (and on disk), a request that
    arrives during the drain gets ESHUTDOWN, a client still negotiating gets
    NBD_REP_ERR_SHUTDOWN, and the server exits 0 once the connection is done."""
    server = start_nbd_server(size=8 * MiB, extra_args=("--fault", "write@0-4k:delay=3s"))
    negotiating = RawClient(server)
    negotiating.greeting()
    client = RawClient(server).handshake()
    write = client.request(1, 0, 4096, payload=b"D" * 4096)  # NBD_CMD_WRITE, held 3 s
    server.proc.send_signal(15)
    wait_for_log(server, "SIGTERM received, shutting down")
    late = client.request(0, 65536, 512)  # NBD_CMD_READ during the drain
    negotiating.send_option(OPT_GO, struct.pack(">IH", 0, 0))
    _magic, _opt, rtype, _length = struct.unpack(">QIII", recv_exact(negotiating.sock, 20))
    assert rtype == (1 << 31) + 7  # NBD_REP_ERR_SHUTDOWN
    replies = {}
    for _ in range(2):
        _magic, error, cookie = struct.unpack(">IIQ", recv_exact(client.sock, 16))
        replies[cookie] = error
    assert replies == {write: 0, late: 108}  # NBD_ESHUTDOWN
    expect_closed(client.sock)
    assert server.proc.wait(timeout=15) == 0
    server.killed = True  # stopped here on purpose: the fixture has nothing left to stop
    assert "Traceback" not in server.stderr_text()
    with server.path.open("rb") as f:
        assert f.read(4096) == b"D" * 4096


def test_sigterm_exit_is_bounded_when_a_request_never_finishes(
    start_nbd_server: StartServer,
) -> None:
    """A READ held 60 s by a fault rule and --shutdown-timeout 1: SIGTERM still ends the
    process with status 0 within the shutdown timeout plus the ring's 10 s grace for I/O the
    kernel has not finished, and the log says why it stopped waiting."""
    server = start_nbd_server(
        extra_args=("--fault", "read:delay=60s", "--shutdown-timeout", "1")
    )
    client = RawClient(server).handshake()
    client.request(0, 0, 512)  # NBD_CMD_READ, held 60 s
    wait_for_log(server, "transmission begins")
    time.sleep(0.2)  # the request reaches the server
    start = time.monotonic()
    server.proc.send_signal(15)
    assert server.proc.wait(timeout=30) == 0
    assert time.monotonic() - start < 20
    server.killed = True  # stopped here on purpose
    log = server.stderr_text()
    assert "clients still connected after 1 s: closing them" in log
    assert "Traceback" not in log
    client.close()


def test_metrics_count_what_fio_did(start_nbd_server: StartServer) -> None:
    """Scraped after a fio run of exactly 256 4k writes then 256 4k reads, the counters say
    so, bytes and latency histogram included."""
    port = free_tcp_port()
    server = start_nbd_server(tcp=True, extra_args=("--metrics", f"127.0.0.1:{port}"))
    for rw in ("write", "read"):
        subprocess.run(
            ["fio", "--name=m", "--ioengine=nbd", f"--uri={server.uri}", f"--rw={rw}",
             "--bs=4k", "--size=1m", "--iodepth=8", "--invalidate=0"],
            capture_output=True, text=True, timeout=60, check=True,
        )
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for command in ("read", "write"):
        labels = f'command="{command}",export=""'
        assert f"nbd_uring_requests_total{{{labels}}} 256.0" in text, text
        assert f"nbd_uring_bytes_total{{{labels}}} 1.048576e+06" in text, text
        assert f'nbd_uring_request_latency_seconds_count{{{labels}}} 256.0' in text
    assert 'nbd_uring_requests_in_flight{export=""} 0.0' in text


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in:\n{text}")


def test_metrics_scraped_during_a_fio_run(start_nbd_server: StartServer, tmp_path: Path) -> None:
    """While a (rate-limited) fio job runs, a scrape shows part of its reads counted and the
    connection open; after it, the count is exactly the I/Os fio reports."""
    port = free_tcp_port()
    server = start_nbd_server(tcp=True, extra_args=("--metrics", f"127.0.0.1:{port}"))
    out = tmp_path / "fio.json"
    fio = subprocess.Popen(
        ["fio", "--name=m", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randread",
         "--bs=4k", "--size=4m", "--iodepth=4", "--rate_iops=200", "--time_based",
         "--runtime=3", "--invalidate=0", "--output-format=json", f"--output={out}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    reads = 'nbd_uring_requests_total{command="read",export=""}'
    try:
        deadline = time.monotonic() + 20
        while True:
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            if reads in text and metric(text, reads) >= 50:
                break
            assert time.monotonic() < deadline and fio.poll() is None, text
            time.sleep(0.1)
        assert fio.poll() is None, "the scrape came after fio had finished"
        assert metric(text, 'nbd_uring_connections{export=""}') == 1
        assert metric(text, 'nbd_uring_requests_in_flight{export=""}') >= 0
        during = metric(text, reads)
        assert fio.wait(timeout=60) == 0, fio.stderr.read() if fio.stderr else ""
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    total = json.loads(out.read_text())["jobs"][0]["read"]["total_ios"]
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert during < total
    assert metric(text, reads) == total
    assert metric(text, 'nbd_uring_bytes_total{command="read",export=""}') == total * 4096
    assert metric(text, 'nbd_uring_request_latency_seconds_count{command="read",export=""}') == (
        total
    )


def test_metrics_show_a_flush_waiting_for_an_earlier_write(
    start_nbd_server: StartServer,
) -> None:
    """A WRITE held 2 s by a fault rule, then a FLUSH: while the write is held the FLUSH is
    counted as waiting; once both are answered the gauge is back to 0."""
    port = free_tcp_port()
    server = start_nbd_server(
        extra_args=("--metrics", f"127.0.0.1:{port}", "--fault", "write@0-4k:delay=2s")
    )
    url = f"http://127.0.0.1:{port}/metrics"
    gauge = 'nbd_uring_flushes_waiting{export=""}'
    client = RawClient(server).handshake()
    write = client.request(1, 0, 4096, payload=b"W" * 4096)  # NBD_CMD_WRITE, held 2 s
    flush = client.request(3, 0, 0)  # NBD_CMD_FLUSH
    deadline = time.monotonic() + 10
    while metric(urllib.request.urlopen(url, timeout=10).read().decode(), gauge) != 1:
        assert time.monotonic() < deadline, "the FLUSH was never counted as waiting"
        time.sleep(0.05)
    replies = {}
    for _ in range(2):
        _magic, error, cookie = struct.unpack(">IIQ", recv_exact(client.sock, 16))
        replies[cookie] = error
    assert replies == {write: 0, flush: 0}
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert metric(text, gauge) == 0
    assert metric(text, 'nbd_uring_requests_total{command="flush",export=""}') == 1
    client.disconnect()


def test_idle_timeout_closes_only_idle_connections(start_nbd_server: StartServer) -> None:
    """--idle-timeout 1: a client that sends nothing for a second is closed; one whose request
    is still being served (held 2 s) is not, and gets its reply."""
    server = start_nbd_server(
        extra_args=("--idle-timeout", "1", "--fault", "read@0-1:delay=2s")
    )
    idle = RawClient(server).handshake()
    busy = RawClient(server).handshake()
    cookie = busy.request(0, 0, 512)  # NBD_CMD_READ, held 2 s by the fault rule
    expect_closed(idle.sock, timeout=10)
    _magic, error, got = struct.unpack(">IIQ", recv_exact(busy.sock, 16))
    assert (error, got) == (0, cookie)
    recv_exact(busy.sock, 512)
    busy.disconnect()
    wait_for_log(server, "no request for 1 s (idle timeout)")


def test_scratch_export_is_removed_at_exit(tmp_path: Path) -> None:
    """The default scratch disk lives in a temporary folder that is gone after the server
    exits, whether it stopped on its own (--run) or on SIGTERM (during startup too)."""
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(scratch_root))
    sock = tmp_path / "s.sock"
    argv = [sys.executable, "-m", "nbd_uring", "serve", "--unix", str(sock)]
    done = subprocess.run([*argv, "--run", 'nbdinfo --size "$uri"'], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(1 << 30)
    assert list(scratch_root.iterdir()) == []
    for delay in (0.05, 0.5, 1.5):
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.terminate()
        proc.wait(timeout=30)
        assert list(scratch_root.iterdir()) == [], f"left behind after SIGTERM at {delay} s"


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ("max-requests-in-flight = 0", "max-requests-in-flight must be at least 1"),
        ('max-bytes-in-flight = "1M"', "max-bytes-in-flight must hold at least one 32 MiB"),
        ('tls = "on"', "tls on needs a server certificate and key"),
    ],
)
def test_check_config_reports_other_server_settings(
    tmp_path: Path, setting: str, words: str
) -> None:
    """check-config validates what serve would: in-flight caps and TLS too."""
    cfg = tmp_path / "s.toml"
    cfg.write_text(f'[server]\nport = 1\n{setting}\n[exports.a]\npath = "/x"\n')
    bad = nbd_uring("check-config", str(cfg))
    line = 1 if setting.startswith("tls") else 3
    assert bad.returncode == 1 and f"{cfg}:{line}: {words}" in bad.stderr, bad.stderr
