"""Unix-socket permissions (--unix-mode, --unix-group): the kernel enforces them, so the tests
connect as another user (nobody) and see it refused or served."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd_uring.server import serve

from ._util import MiB, Server, is_nbdkit, make_sparse, start_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="nbd-uring's own options"),
]

# As nobody:nogroup with no supplementary groups: connect, print the errno (0: served, and
# the greeting starts with NBDMAGIC).
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(e.errno)
else:
    print(0 if s.recv(8) == b"NBDMAGIC" else -1)
"""


def as_nobody() -> list[str]:
    """The command prefix that runs a command as nobody (root directly, else through
    passwordless sudo); skips the rest of the test when neither is possible."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    if os.geteuid() == 0:
        return AS_NOBODY
    sudo = shutil.which("sudo")
    if sudo and subprocess.run([sudo, "-n", "true"], capture_output=True).returncode == 0:
        return [sudo, "-n", *AS_NOBODY]
    pytest.skip("connecting as another user needs root or passwordless sudo")


def connect_as_nobody(path: Path) -> int:
    out = subprocess.run(
        [*as_nobody(), "/usr/bin/python3", "-c", CONNECT, str(path)],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return int(out.stdout.strip())


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A socket directory anyone may traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nbdu-perm-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def serve_with(tmp_path: Path, sockdir: Path, *args: str) -> Server:
    disk = make_sparse(tmp_path / "d.img", 4 * MiB)
    return start_server(tmp_path, disk, sockdir=sockdir, extra_args=args)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("0600", errno.EACCES), ("0666", 0), ("0o660", errno.EACCES)],
)
def test_unix_mode_is_applied_and_enforced_by_the_kernel(
    tmp_path: Path, open_dir: Path, mode: str, expected: int
) -> None:
    """The socket has exactly the mode asked for; nobody (other) is refused with EACCES
    unless the mode lets others write, and then gets the greeting."""
    server = serve_with(tmp_path, open_dir, "--unix-mode", mode)
    try:
        assert server.unix is not None
        st = server.unix.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == int(mode.removeprefix("0o"), 8)
        assert connect_as_nobody(server.unix) == expected
    finally:
        server.stop(check=True)


def test_unix_group_lets_its_members_in(tmp_path: Path, open_dir: Path) -> None:
    """0660 owned by group nogroup: nobody:nogroup is served (nbdinfo too); with group
    daemon instead, nobody is refused."""
    if os.geteuid() != 0:
        pytest.skip("giving the socket to a group the server is not in needs root")
    server = serve_with(tmp_path, open_dir, "--unix-mode", "0660", "--unix-group", "nogroup")
    try:
        assert server.unix is not None
        st = server.unix.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 65534)
        assert connect_as_nobody(server.unix) == 0
        if shutil.which("nbdinfo"):
            out = subprocess.run(
                [*as_nobody(), "nbdinfo", "--size", f"nbd+unix:///?socket={server.unix}"],
                capture_output=True, text=True, timeout=60, check=True,
            )
            assert out.stdout.strip() == str(4 * MiB)
    finally:
        server.stop(check=True)
    other = serve_with(tmp_path, open_dir, "--unix-mode", "0660", "--unix-group", "daemon")
    try:
        assert other.unix is not None
        assert other.unix.stat().st_gid == 1
        assert connect_as_nobody(other.unix) == errno.EACCES
    finally:
        other.stop(check=True)


def test_socket_is_never_open_wider_than_the_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the moment the mode is set, the socket file has no permission bits and is not yet
    listening (a connect is refused): there is no window in which the umask's mode applies.
    It is set in a private directory (0700) next to the path, so nobody can swap the file in
    between, and the directory is gone afterwards."""
    path = tmp_path / "w.sock"
    seen: list[tuple[int, int]] = []
    where: list[str] = []
    chmod = os.chmod

    def watching_chmod(target: str, mode: int, **kwargs: object) -> None:
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(target)
            result = 0
        except OSError as exc:
            result = exc.errno or 0
        finally:
            probe.close()
        seen.append((stat.S_IMODE(os.stat(target).st_mode), result))
        parent = os.path.dirname(target)
        where.append(f"{os.path.basename(parent)[:11]} {stat.S_IMODE(os.stat(parent).st_mode):o}")
        chmod(target, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "chmod", watching_chmod)
    old_umask = os.umask(0)  # the widest umask: without care the socket would be 0777
    try:
        sock = serve._listen_unix(str(path), 0o600, None)
        left = os.umask(0)
    finally:
        os.umask(old_umask)
    try:
        # root ignores permission bits, so the refusal seen is "not listening yet".
        assert seen == [(0, errno.ECONNREFUSED)]
        assert where == [".nbd-uring- 700"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w.sock"]
        assert left == 0, "the umask was not restored"
    finally:
        sock.close()
        path.unlink()


def test_a_group_that_cannot_be_given_fails_and_leaves_no_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refuse)
    path = tmp_path / "g.sock"
    with pytest.raises(OSError, match=r"cannot give .* to group 'daemon': Operation not"):
        serve._listen_unix(str(path), 0o660, "daemon")
    assert list(tmp_path.iterdir()) == []  # no socket, no private directory


def test_check_config_reports_unix_socket_settings(tmp_path: Path) -> None:
    from .test_operations import nbd_uring

    cfg = tmp_path / "u.toml"
    cfg.write_text('[server]\nunix = "/run/x.sock"\nunix-mode = 660\n[exports.a]\npath = "/x"\n')
    bad = nbd_uring("check-config", str(cfg))
    assert bad.returncode == 1 and f"{cfg}:3: unix-mode: expected an octal mode" in bad.stderr
    cfg.write_text('[server]\nunix = "/run/x.sock"\nunix-mode = "0660"\nunix-group = "daemon"\n'
                   '[exports.a]\npath = "/x"\n')
    good = nbd_uring("check-config", str(cfg))
    assert good.returncode == 0, good.stderr

