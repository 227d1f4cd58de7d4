"""TLS (NBD_OPT_STARTTLS) with real clients: libnbd (GnuTLS) tools and bindings, qemu-img, and
raw sockets with Python's ssl for what real clients never do.

Certificates are made per session with the openssl CLI in the directory layout libnbd's
``tls-certificates`` and qemu's ``tls-creds-x509`` expect (ca-cert.pem, client-cert.pem,
client-key.pem); the server gets explicit file paths.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import _rawclient as rc
from ._util import (
    REPO_ROOT,
    MiB,
    Server,
    StartServer,
    free_tcp_port,
    is_nbdkit,
    run,
    sha256_file,
    write_random_file,
)

pytestmark = pytest.mark.skipif(is_nbdkit(), reason="nbd-uring's TLS options")

nbd = pytest.importorskip("nbd")

CLOSE_BOUND = 5.0
"""Seconds within which the server must drop a client that broke the TLS upgrade."""


@dataclass(frozen=True)
class Certs:
    root: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client: Path
    """ca-cert.pem + client-cert.pem/client-key.pem (CN=client1, signed by the CA)."""
    client2: Path
    """Same CA, CN=client2."""
    foreign: Path
    """Trusts the CA, but its client certificate (CN=client1) comes from another CA."""
    anonymous: Path
    """ca-cert.pem only: verifies the server, presents no client certificate."""

    def server_args(self, mode: str = "require", *extra: str) -> tuple[str, ...]:
        return (
            "--tls", mode,
            "--tls-cert", str(self.server_cert),
            "--tls-key", str(self.server_key),
            *extra,
        )  # fmt: skip

    def verifying_args(self, *extra: str) -> tuple[str, ...]:
        return self.server_args("require", "--tls-ca", str(self.ca), "--tls-verify-peer", *extra)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _signed(
    directory: Path, stem: str, cn: str, ca: tuple[Path, Path], extensions: str
) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{stem}-{part}.pem" for part in ("cert", "key", "csr"))
    ext = directory / f"{stem}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return cert, key


def _client_dir(root: Path, name: str, ca: Path, pair: tuple[Path, Path] | None) -> Path:
    directory = root / name
    directory.mkdir()
    (directory / "ca-cert.pem").write_bytes(ca.read_bytes())
    if pair is not None:
        (directory / "client-cert.pem").write_bytes(pair[0].read_bytes())
        (directory / "client-key.pem").write_bytes(pair[1].read_bytes())
    return directory


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    root = tmp_path_factory.mktemp("tls")
    work = root / "work"
    work.mkdir()
    ca = _ca(work, "ca")
    other_ca = _ca(work, "otherca")
    server = _signed(
        work, "server", "localhost", ca,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )  # fmt: skip
    client_ext = "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    client1 = _signed(work, "client1", "client1", ca, client_ext)
    client2 = _signed(work, "client2", "client2", ca, client_ext)
    foreign = _signed(work, "foreign", "client1", other_ca, client_ext)
    return Certs(
        root=root,
        ca=ca[0],
        server_cert=server[0],
        server_key=server[1],
        client=_client_dir(root, "client1", ca[0], client1),
        client2=_client_dir(root, "client2", ca[0], client2),
        foreign=_client_dir(root, "foreign", ca[0], foreign),
        anonymous=_client_dir(root, "anonymous", ca[0], None),
    )


@dataclass(frozen=True)
class _Endpoint:
    """A server started here from a config file, with what the helpers need of a Server."""

    port: int


def _nbds(server: Server | _Endpoint, certdir: Path, export: str = "") -> str:
    return f"nbds://localhost:{server.port}/{export}?tls-certificates={certdir}"


def _tls_handle(server: Server | _Endpoint, certdir: Path, export: str = "") -> nbd.NBD:
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certdir))
    h.set_export_name(export)
    h.connect_tcp("localhost", str(server.port))
    return h


def _refused(server: Server | _Endpoint, certdir: Path | None, export: str = "") -> str:
    """Connect and use the export; the error text of the failure that must happen."""
    h = nbd.NBD()
    if certdir is None:
        h.set_tls(nbd.TLS_DISABLE)
    else:
        h.set_tls(nbd.TLS_REQUIRE)
        h.set_tls_certificates(str(certdir))
    h.set_export_name(export)
    try:
        h.connect_tcp("localhost", str(server.port))
        h.pread(512, 0)
    except nbd.Error as exc:
        return str(exc)
    pytest.fail("the server let the client in")


def _wait_for_log(server: Server, text: str, timeout: float = CLOSE_BOUND) -> str:
    deadline = time.monotonic() + timeout
    while True:
        log = server.stderr_text()
        if text in log or time.monotonic() > deadline:
            assert text in log, f"{text!r} not in the server log:\n{log}"
            return log
        time.sleep(0.05)


# --- libnbd: nbdinfo, nbdcopy, the Python bindings ------------------------------------------


def test_nbdinfo_over_tls(start_nbd_server: StartServer, certs: Certs) -> None:
    server = start_nbd_server(tcp=True, extra_args=certs.server_args())
    assert server.uri == f"nbds://127.0.0.1:{server.port}/"  # --print-uri under FORCEDTLS
    out = run(["nbdinfo", _nbds(server, certs.anonymous)]).stdout
    assert "with TLS" in out
    out = run(["nbdinfo", "--list", _nbds(server, certs.anonymous)]).stdout
    assert 'export=""' in out
    log = _wait_for_log(server, "TLS established")
    assert "TLS handshake failed" not in log


def test_nbdcopy_to_and_from_tls(
    start_nbd_server: StartServer, certs: Certs, random_64m: Path, tmp_path: Path
) -> None:
    server = start_nbd_server(tcp=True, size=64 * MiB, extra_args=certs.server_args())
    uri = _nbds(server, certs.anonymous)
    run(["nbdcopy", str(random_64m), uri])
    assert sha256_file(server.path) == sha256_file(random_64m)
    back = tmp_path / "back.img"
    run(["nbdcopy", uri, str(back)])
    assert sha256_file(back) == sha256_file(random_64m)


def test_python_libnbd_over_tls(start_nbd_server: StartServer, certs: Certs) -> None:
    server = start_nbd_server(tcp=True, extra_args=certs.server_args())
    h = _tls_handle(server, certs.anonymous)
    try:
        assert h.get_tls_negotiated()
        data = os.urandom(3 * MiB + 17)
        h.pwrite(data, 4096)
        h.flush()
        assert h.pread(len(data), 4096) == data
        # Large reads exercise ciphertext the socket cannot take at once.
        big = h.pread(32 * MiB, 0)
        assert big[4096 : 4096 + len(data)] == data
    finally:
        h.shutdown()


def test_tls_over_a_unix_socket(start_nbd_server: StartServer, certs: Certs) -> None:
    server = start_nbd_server(extra_args=certs.server_args())
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certs.anonymous))
    h.set_tls_verify_peer(False)  # no hostname to check a Unix socket against
    h.connect_unix(str(server.unix))
    try:
        assert h.get_tls_negotiated()
        h.pwrite(b"u" * 4096, 0)
        assert h.pread(4096, 0) == b"u" * 4096
    finally:
        h.shutdown()


# --- qemu ----------------------------------------------------------------------------------


def _qemu_opts(server: Server) -> str:
    return (
        f"driver=nbd,server.type=inet,server.host=localhost,server.port={server.port},"
        "tls-creds=tls0"
    )


def test_qemu_img_info_and_convert_over_tls(
    start_nbd_server: StartServer, certs: Certs, tmp_path: Path
) -> None:
    server = start_nbd_server(tcp=True, size=16 * MiB, extra_args=certs.server_args())
    creds = f"tls-creds-x509,id=tls0,endpoint=client,dir={certs.anonymous}"
    info = run(["qemu-img", "info", "--object", creds, "--image-opts", _qemu_opts(server)])
    assert "16 MiB" in info.stdout
    source = write_random_file(tmp_path / "src.img", 16 * MiB, seed=8)
    run([
        "qemu-img", "convert", "-n", "--object", creds, "-f", "raw", str(source),
        "--target-image-opts", _qemu_opts(server),
    ])  # fmt: skip
    assert sha256_file(server.path) == sha256_file(source)
    back = tmp_path / "back.img"
    run([
        "qemu-img", "convert", "--object", creds, "--image-opts", _qemu_opts(server),
        "-O", "raw", str(back),
    ])  # fmt: skip
    assert sha256_file(back) == sha256_file(source)


# --- modes: require refuses plaintext, on serves both, off refuses STARTTLS -----------------


def test_require_refuses_a_plaintext_libnbd_client(
    start_nbd_server: StartServer, certs: Certs
) -> None:
    server = start_nbd_server(tcp=True, extra_args=certs.server_args())
    assert "TLS" in _refused(server, None)
    proc = run(["nbdinfo", f"nbd://localhost:{server.port}/"], check=False)
    assert proc.returncode != 0


@pytest.mark.parametrize(
    "opt, data",
    [
        (rc.OPT_GO, struct.pack(">IH", 0, 0)),
        (rc.OPT_INFO, struct.pack(">IH", 0, 0)),
        (rc.OPT_LIST, b""),
        (rc.OPT_STRUCTURED_REPLY, b""),
    ],
)
def test_require_answers_err_tls_reqd_on_the_wire(
    start_nbd_server: StartServer, certs: Certs, opt: int, data: bytes
) -> None:
    server = start_nbd_server(tcp=True, extra_args=certs.server_args())
    c = rc.handshake_only(server.address)
    try:
        (reply,) = c.option(opt, data)
        assert reply.rep == rc.ERR + 5  # NBD_REP_ERR_TLS_REQD
        assert b"TLS" in reply.data
        (ack,) = c.option(rc.OPT_ABORT)
        assert ack.rep == rc.REP_ACK
    finally:
        c.sock.close()


def test_on_serves_plaintext_and_tls(start_nbd_server: StartServer, certs: Certs) -> None:
    server = start_nbd_server(tcp=True, extra_args=certs.server_args("on"))
    plain = run(["nbdinfo", f"nbd://localhost:{server.port}/"]).stdout
    assert "without TLS" in plain
    assert "with TLS" in run(["nbdinfo", _nbds(server, certs.anonymous)]).stdout


def test_off_refuses_starttls_by_policy(start_nbd_server: StartServer) -> None:
    server = start_nbd_server(tcp=True)
    c = rc.handshake_only(server.address)
    try:
        (reply,) = c.option(rc.OPT_STARTTLS)
        assert reply.rep == rc.REP_ERR_POLICY
        assert c.go()[-1].rep == rc.REP_ACK
    finally:
        c.sock.close()


# --- a Python ssl client: STARTTLS twice, negotiation state, transmission -------------------


def _client_context(certs: Certs, certdir: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if certdir is not None:
        context.load_cert_chain(certdir / "client-cert.pem", certdir / "client-key.pem")
    return context


def _starttls(c: rc.Client, context: ssl.SSLContext) -> None:
    (ack,) = c.option(rc.OPT_STARTTLS)
    assert ack.rep == rc.REP_ACK
    c.sock = context.wrap_socket(c.sock, server_hostname="localhost")


def test_python_ssl_client_negotiates_and_transmits(
    start_nbd_server: StartServer, certs: Certs
) -> None:
    server = start_nbd_server(tcp=True, extra_args=certs.server_args())
    c = rc.handshake_only(server.address)
    try:
        _starttls(c, _client_context(certs))
        (again,) = c.option(rc.OPT_STARTTLS)
        assert again.rep == rc.REP_ERR_INVALID  # spec: TLS already negotiated
        assert c.option(rc.OPT_STRUCTURED_REPLY)[-1].rep == rc.REP_ACK
        c.structured = True
        assert c.go()[-1].rep == rc.REP_ACK
        payload = os.urandom(1 * MiB)
        (written,) = c.command(rc.CMD_WRITE, 0, len(payload), payload=payload)
        assert written.error == 0
        assert c.read(0, len(payload)) == payload
        c.disconnect()
    finally:
        c.sock.close()


def test_state_negotiated_before_starttls_is_discarded(
    start_nbd_server: StartServer, certs: Certs
) -> None:
    """Structured replies acked in plaintext do not survive STARTTLS: after TLS and GO
    without asking again, READ gets a simple reply."""
    server = start_nbd_server(tcp=True, extra_args=certs.server_args("on"))
    c = rc.handshake_only(server.address)
    try:
        assert c.option(rc.OPT_STRUCTURED_REPLY)[-1].rep == rc.REP_ACK
        _starttls(c, _client_context(certs))
        info = [r for r in c.go() if r.rep == rc.REP_INFO and r.data[:2] == b"\0\0"]
        (_, _, flags) = struct.unpack(">HQH", info[0].data)
        assert not flags & rc.T_SEND_DF  # SEND_DF is only offered with structured replies
        c.request(rc.CMD_READ, 0, 512)
        magic = struct.unpack(">I", c.recv_exactly(4))[0]
        assert magic == rc.SIMPLE_MAGIC
    finally:
        c.sock.close()


# --- client certificates -------------------------------------------------------------------


def test_verify_peer_accepts_the_ca_signed_client(
    start_nbd_server: StartServer, certs: Certs
) -> None:
    server = start_nbd_server(tcp=True, extra_args=certs.verifying_args())
    h = _tls_handle(server, certs.client)
    try:
        h.pwrite(b"c" * 512, 0)
        assert h.pread(512, 0) == b"c" * 512
    finally:
        h.shutdown()
    _wait_for_log(server, "client certificate CN=client1")


@pytest.mark.parametrize("who", ["anonymous", "foreign"])
def test_verify_peer_refuses_missing_or_foreign_certificates(
    start_nbd_server: StartServer, certs: Certs, who: str
) -> None:
    server = start_nbd_server(tcp=True, extra_args=certs.verifying_args())
    bystander = _tls_handle(server, certs.client)
    try:
        _refused(server, getattr(certs, who))
        log = _wait_for_log(server, "TLS handshake failed")
        assert "certificate" in log.split("TLS handshake failed", 1)[1].splitlines()[0]
        bystander.pwrite(b"b" * 512, 512)
        assert bystander.pread(512, 512) == b"b" * 512
    finally:
        bystander.shutdown()
    # A well-behaved client after the refusal is served as usual.
    h = _tls_handle(server, certs.client)
    h.shutdown()


def test_tls_names_allow_and_refuse_by_common_name(
    start_nbd_server: StartServer, certs: Certs
) -> None:
    server = start_nbd_server(
        tcp=True, extra_args=certs.verifying_args("--allow-tls-name", "client1")
    )
    h = _tls_handle(server, certs.client)
    h.shutdown()
    error = _refused(server, certs.client2)
    assert "policy" in error, error
    c = rc.handshake_only(server.address)
    try:
        _starttls(c, _client_context(certs, certs.client2))
        (refusal,) = c.go()
        assert refusal.rep == rc.REP_ERR_POLICY
        assert b"not available to the TLS client CN=client2" in refusal.data
    finally:
        c.sock.close()


def test_selective_tls_export_from_a_config_file(certs: Certs, tmp_path: Path) -> None:
    """An export with ``tls = "require"`` on a ``tls = "on"`` server: hidden from plaintext
    listings and refused before TLS; the other export is served in plaintext."""
    secret = tmp_path / "secret.img"
    secret.write_bytes(b"s" * MiB)
    config = tmp_path / "tls.toml"
    port = free_tcp_port()
    config.write_text(
        f'[server]\nport = {port}\ntls = "on"\ntls-cert = "{certs.server_cert}"\n'
        f'tls-key = "{certs.server_key}"\n'
        f'[exports.public]\npath = "{tmp_path / "public.img"}"\nsize = "1M"\ncreate = true\n'
        f'[exports.secret]\npath = "{secret}"\ntls = "require"\n'
    )
    check = run([sys.executable, "-m", "nbd_uring", "check-config", str(config)])
    assert "OK (2 export(s)" in check.stdout
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbd_uring", "serve", "--config", str(config), "--print-uri"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"nbd://127.0.0.1:")
        _selective_checks(_Endpoint(port), certs)
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        proc.stdout.close()


def _selective_checks(server: _Endpoint, certs: Certs) -> None:
    plain = run(["nbdinfo", "--list", f"nbd://localhost:{server.port}/"]).stdout
    assert "public" in plain and "secret" not in plain
    assert "TLS" in _refused(server, None, "secret")
    listed = run(["nbdinfo", "--list", _nbds(server, certs.anonymous)]).stdout
    assert "public" in listed and "secret" in listed
    h = _tls_handle(server, certs.anonymous, "secret")
    try:
        assert h.pread(16, 0) == b"s" * 16
    finally:
        h.shutdown()


# --- broken upgrades: closed promptly, no CPU afterwards, others unharmed -------------------


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def _closed_within(sock: socket.socket, bound: float) -> bool:
    """Read (a TLS alert, maybe) until EOF or reset; False if still open after ``bound``."""
    deadline = time.monotonic() + bound
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


@pytest.fixture
def tls_server(start_nbd_server: StartServer, certs: Certs) -> Server:
    args = certs.server_args("on", "--handshake-timeout", "3")
    return start_nbd_server(tcp=True, extra_args=args)


@pytest.fixture
def tls_bystander(tls_server: Server, certs: Certs) -> Iterator[nbd.NBD]:
    h = _tls_handle(tls_server, certs.anonymous)
    yield h
    h.pwrite(b"ok" * 256, 0)
    assert h.pread(512, 0) == b"ok" * 256
    h.shutdown()


GO_OPTION = struct.pack(">QII", rc.IHAVEOPT, rc.OPT_GO, 6) + struct.pack(">IH", 0, 0)


@pytest.mark.parametrize(
    "garbage, logged",
    [
        (os.urandom(4096), "TLS handshake failed"),
        (GO_OPTION, "TLS handshake failed"),
        (b"\x16\x03\x01\x00\x05hello" + os.urandom(64), "TLS handshake failed"),
    ],
    ids=["random", "plaintext-option", "bad-record"],
)
def test_garbage_after_starttls_ack_is_closed_without_spinning(
    tls_server: Server, tls_bystander: nbd.NBD, garbage: bytes, logged: str
) -> None:
    c = rc.handshake_only(tls_server.address)
    try:
        (ack,) = c.option(rc.OPT_STARTTLS)
        assert ack.rep == rc.REP_ACK
        c.sock.sendall(garbage)
        assert _closed_within(c.sock, CLOSE_BOUND)
        log = _wait_for_log(tls_server, logged)
        assert f":{c.sock.getsockname()[1]}: closing connection: TLS" in log
        before = _cpu_ticks(tls_server.pid)
        time.sleep(1.0)
        assert _cpu_ticks(tls_server.pid) - before <= 5  # clock ticks: an idle server
    finally:
        c.sock.close()


def test_plaintext_pipelined_behind_starttls_is_closed(
    tls_server: Server, tls_bystander: nbd.NBD
) -> None:
    c = rc.handshake_only(tls_server.address)
    try:
        c.sock.sendall(struct.pack(">QII", rc.IHAVEOPT, rc.OPT_STARTTLS, 0) + GO_OPTION)
        assert c.read_option_reply().rep == rc.REP_ACK
        assert _closed_within(c.sock, CLOSE_BOUND)
        _wait_for_log(tls_server, "without waiting for the TLS handshake")
        before = _cpu_ticks(tls_server.pid)
        time.sleep(1.0)
        assert _cpu_ticks(tls_server.pid) - before <= 5
    finally:
        c.sock.close()


def test_silent_client_after_starttls_is_closed_at_the_handshake_timeout(
    tls_server: Server, tls_bystander: nbd.NBD
) -> None:
    c = rc.handshake_only(tls_server.address)
    try:
        start = time.monotonic()
        (ack,) = c.option(rc.OPT_STARTTLS)
        assert ack.rep == rc.REP_ACK
        before = _cpu_ticks(tls_server.pid)
        assert _closed_within(c.sock, 3.0 + CLOSE_BOUND)
        assert time.monotonic() - start >= 2.5
        assert _cpu_ticks(tls_server.pid) - before <= 10
        _wait_for_log(tls_server, "handshake not finished within")
    finally:
        c.sock.close()


def test_client_hello_then_silence_is_closed_at_the_handshake_timeout(
    tls_server: Server, certs: Certs, tls_bystander: nbd.NBD
) -> None:
    """A TLS handshake that stalls halfway is bounded by the same timeout."""
    c = rc.handshake_only(tls_server.address)
    try:
        (ack,) = c.option(rc.OPT_STARTTLS)
        assert ack.rep == rc.REP_ACK
        tls = _client_context(certs).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        c.sock.sendall(out.read())  # ClientHello, then nothing
        assert _closed_within(c.sock, 3.0 + CLOSE_BOUND)
        _wait_for_log(tls_server, "handshake not finished within")
    finally:
        c.sock.close()


def test_client_reset_during_the_tls_handshake_is_logged_not_a_crash(
    tls_server: Server, certs: Certs, tls_bystander: nbd.NBD
) -> None:
    c = rc.handshake_only(tls_server.address)
    (ack,) = c.option(rc.OPT_STARTTLS)
    assert ack.rep == rc.REP_ACK
    tls = _client_context(certs).wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    c.sock.sendall(out.read())
    time.sleep(0.2)  # the server has answered with its flight by now
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()  # RST
    log = _wait_for_log(tls_server, "connection closed")
    assert "Traceback" not in log


def test_corrupt_tls_record_in_transmission_is_closed(
    tls_server: Server, certs: Certs, tls_bystander: nbd.NBD
) -> None:
    """After the export is chosen the reader runs over the TLS transport: a record that does
    not decrypt ends that connection only, promptly and without spinning."""
    c = rc.handshake_only(tls_server.address)
    try:
        _starttls(c, _client_context(certs))
        assert c.go()[-1].rep == rc.REP_ACK
        assert c.read(0, 4096) == bytes(4096)
        raw = socket.socket(fileno=os.dup(c.sock.fileno()))
        raw.sendall(b"\x17\x03\x03\x00\x40" + os.urandom(64))  # application data, bad MAC
        assert _closed_within(raw, CLOSE_BOUND)
        before = _cpu_ticks(tls_server.pid)
        time.sleep(1.0)
        assert _cpu_ticks(tls_server.pid) - before <= 5
        raw.close()
    finally:
        c.sock.close()


# --- command line and check-config ---------------------------------------------------------


def _nbd_uring(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "nbd_uring", *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


def test_cli_refuses_incomplete_tls_settings(certs: Certs, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    result = _nbd_uring("serve", str(disk), "--size", "1M", "--create", "--tls", "require")
    assert result.returncode == 1
    assert "needs a server certificate and key" in result.stderr
    result = _nbd_uring(
        "serve", str(disk), "--size", "1M", "--create", *certs.server_args(),
        "--allow-tls-name", "client1",
    )  # fmt: skip
    assert result.returncode == 1 and "tls-verify-peer" in result.stderr
    result = _nbd_uring(
        "serve", str(disk), "--size", "1M", "--create", "--tls", "on",
        "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(certs.server_key),
    )  # fmt: skip
    assert result.returncode == 1
    assert "missing.pem: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_loads_the_certificates(certs: Certs, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    text = (
        f'[server]\ntls = "require"\ntls-cert = "{certs.server_cert}"\n'
        f'tls-key = "{certs.server_key}"\ntls-ca = "{certs.ca}"\ntls-verify-peer = true\n'
        '[exports.a]\npath = "/x"\nallow-tls-names = ["client1"]\n'
    )
    config.write_text(text)
    ok = _nbd_uring("check-config", str(config))
    assert ok.returncode == 0 and "OK (1 export(s)" in ok.stdout, ok.stderr
    config.write_text(text.replace(str(certs.server_key), str(certs.server_cert)))
    bad = _nbd_uring("check-config", str(config))
    assert bad.returncode == 1
    assert f"{config}:3: cannot load TLS certificate" in bad.stderr
