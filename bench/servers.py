"""Starting, locating, measuring and stopping the NBD servers under test.

Every server listens on a loopback TCP port and serves the same file. CPU time is read from
/proc: utime+stime of the server process (all its threads, io_uring workers included) plus its
children's (nbd-server forks one child per connection; reaped children land in cutime+cstime).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

#: Debian package that provides each peer's executable.
APT_PACKAGES = {
    "fio": "fio",
    "nbdkit": "nbdkit",
    "qemu-nbd": "qemu-utils",
    "nbd-server": "nbd-server",
}

SERVER_NAMES = ("nbd-uring", "nbdkit", "qemu-nbd", "nbd-server")
PEERS = ("nbdkit", "qemu-nbd", "nbd-server")

#: nbd-server's worker pool (max_threads; its default is 4).
NBD_SERVER_THREADS = 8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ensure_matplotlib(log: Callable[[str], None]) -> None:
    """The chart needs matplotlib: apt-get install Debian's when it cannot be imported (a
    virtualenv made with --system-site-packages, as scripts/test.sh makes, sees it)."""
    if importlib.util.find_spec("matplotlib") is None:
        _apt_install(["python3-matplotlib"], log)
        importlib.invalidate_caches()


def ensure_tools(tools: list[str], log: Callable[[str], None]) -> list[str]:
    """apt-get install the packages of any missing tool; return the tools still missing."""
    missing = [t for t in tools if shutil.which(t) is None]
    packages = sorted({APT_PACKAGES[t] for t in missing if t in APT_PACKAGES})
    _apt_install(packages, log)
    return [t for t in tools if shutil.which(t) is None]


def _apt_install(packages: list[str], log: Callable[[str], None]) -> None:
    if packages and shutil.which("apt-get"):
        log(f"installing {' '.join(packages)} with apt-get")
        prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
            proc = subprocess.run(prefix + argv, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                log(f"{' '.join(argv)} failed: {proc.stderr.strip()[-500:]}")
                break


def nbd_uring_python() -> str:
    """A Python that can import nbd_uring: this one, else the repository's .venv."""
    if importlib.util.find_spec("nbd_uring") is not None:
        return sys.executable
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def tool_version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0].strip() if text else "?"


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: fields start after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return kids
    for task in tasks:
        try:
            kids.extend(int(x) for x in (task / "children").read_text().split())
        except OSError:
            continue
    return kids


def cpu_seconds(pid: int) -> float:
    """utime+stime of ``pid`` and its live descendants, plus its reaped children's."""
    total = 0
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # after the name: state(0) ... utime(11) stime(12) cutime(13) cstime(14)
    total += sum(int(fields[i]) for i in (11, 12, 13, 14))
    stack = _children(pid)
    seen: set[int] = set()
    while stack:
        child = stack.pop()
        if child in seen:
            continue
        seen.add(child)
        cf = _stat_fields(child)
        if cf is None:
            continue
        total += int(cf[11]) + int(cf[12])
        stack.extend(_children(child))
    return total / CLK_TCK


def _listening_pid(port: int) -> int | None:
    """The pid of the process holding the loopback listening socket on ``port``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in targets:
                    return int(entry.name)
        except OSError:
            continue
    return None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.recv(8)  # every server greets first; wait for it so the export is really up
        return True
    except OSError:
        return False


@dataclass
class Server:
    """One server under test, started on a free loopback port."""

    name: str
    file: Path
    workdir: Path
    max_connections: int = 64
    port: int = 0
    pid: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    export: str = ""
    argv: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/{self.export}"

    def version(self) -> str:
        if self.name == "nbd-uring":
            return tool_version([nbd_uring_python(), "-m", "nbd_uring", "--version"])
        if self.name == "nbd-server":
            return tool_version(["nbd-server", "-V"])
        return tool_version([self.name, "--version"])

    def command(self) -> list[str]:
        f = str(self.file)
        if self.name == "nbd-uring":
            return [
                nbd_uring_python(),
                "-m",
                "nbd_uring",
                "serve",
                f,
                "-b",
                "127.0.0.1",
                "--port",
                str(self.port),
            ]
        if self.name == "nbdkit":
            return ["nbdkit", "-f", "-p", str(self.port), "-i", "127.0.0.1", "file", f]
        if self.name == "qemu-nbd":
            shared = max(16, self.max_connections)
            return [
                "qemu-nbd",
                "--aio=io_uring",
                "--cache=writeback",
                f"--shared={shared}",
                "-t",
                "-b",
                "127.0.0.1",
                "-p",
                str(self.port),
                "--image-opts",
                f"driver=raw,file.driver=file,file.filename={f},file.locking=off",
            ]
        if self.name == "nbd-server":
            self.export = "bench"
            conf = self.workdir / f"nbd-server-{self.port}.conf"
            conf.write_text(
                "[generic]\n"
                f"    port = {self.port}\n"
                "    listenaddr = 127.0.0.1\n"
                f"    max_threads = {NBD_SERVER_THREADS}\n"
                "    allowlist = false\n"
                "[bench]\n"
                f"    exportname = {f}\n"
            )
            # -d would keep it in the foreground but serve a single connection and exit, so it
            # daemonizes and is found through its listening socket instead.
            return ["nbd-server", "-C", str(conf)]
        raise ValueError(f"unknown server {self.name}")

    def start(self) -> None:
        self.port = free_port()
        self.argv = self.command()
        self.log_path = self.workdir / f"{self.name}-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.name == "nbd-server":
                pid = _listening_pid(self.port)
                if pid is not None and _port_open(self.port):
                    self.pid = pid
                    return
            else:
                if self.proc.poll() is not None:
                    break
                if _port_open(self.port):
                    self.pid = self.proc.pid
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def alive(self) -> bool:
        if self.pid <= 0:
            return False
        fields = _stat_fields(self.pid)
        return fields is not None and fields[0] not in ("Z", "X")

    def cpu(self) -> float:
        return cpu_seconds(self.pid) if self.pid > 0 else 0.0

    def settle(self, timeout: float = 2.0) -> None:
        """Wait for per-connection children (nbd-server) to exit so their CPU is counted."""
        if self.name != "nbd-server" or self.pid <= 0:
            return
        deadline = time.monotonic() + timeout
        while _children(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:] if self.log_path else ""
        except OSError:
            return ""

    def stop(self) -> None:
        pids = [self.pid] if self.pid > 0 else []
        if self.proc is not None and self.proc.pid not in pids:
            pids.append(self.proc.pid)
        for pid in pids:
            kids = _children(pid)
            for p in [pid, *kids]:
                try:
                    os.kill(p, signal.SIGTERM)
                except OSError:
                    pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.pid > 0 and self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pid > 0 and self.alive():
            try:
                os.kill(self.pid, signal.SIGKILL)
            except OSError:
                pass
        self.pid = 0
        self.proc = None
