#!/usr/bin/env python3
"""Benchmark: 4 KiB random reads through fio's nbd engine, nbd-uring vs nbdkit.

Both servers export the same fully written (not sparse) 1 GiB file from a temporary
directory, on loopback TCP. Before every fio run the page cache is warmed by reading the whole
file, so the comparison measures the servers, not the disk. Runs are interleaved
(uring, nbdkit, uring, nbdkit, ...) for --rounds rounds; the script prints the median IOPS of
each server, the ratio nbd-uring/nbdkit, and the CPU seconds each server process used
(user+system, from /proc/PID/stat).

    python bench/fio_vs_nbdkit.py [--rounds 3] [--runtime 10] [--iodepth 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20
START_TIMEOUT = 30.0


@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    uri: str
    iops: list[float] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        # the command name (field 2) may contain spaces: split after its closing paren
        fields = stat[stat.rindex(")") + 2 :].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
        return (utime + stime) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Wait until something accepts connections on 127.0.0.1:port (for nbdkit)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")


def make_file(path: Path, size: int) -> None:
    """Write ``size`` bytes of incompressible data (every block allocated, not sparse)."""
    chunk = os.urandom(4 * MiB)
    with path.open("wb") as f:
        for i in range(size // len(chunk)):
            # vary each chunk a little so no two blocks are identical
            f.write(i.to_bytes(8, "little") + chunk[8:])
        f.write(chunk[: size % len(chunk)])
        f.flush()
        os.fsync(f.fileno())


def warm_cache(path: Path) -> None:
    """The equivalent of ``cat FILE > /dev/null``."""
    with path.open("rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def start_nbd_uring(path: Path, log: Path) -> Running:
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nbd_uring",
                "serve",
                str(path),
                "--port",
                str(port),
                "--print-uri",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    try:
        wait_for_port(proc, port, START_TIMEOUT)
    except RuntimeError:
        proc.kill()
        proc.wait(timeout=15)
        sys.exit(f"nbd-uring did not start:\n{log.read_text()}")
    return Running("nbd-uring", proc, f"nbd://127.0.0.1:{port}/")


def start_nbdkit(path: Path, log: Path) -> Running:
    port = free_port()
    with log.open("wb") as err:
        proc = subprocess.Popen(
            [
                "nbdkit",
                "--exit-with-parent",
                "-f",
                "-p",
                str(port),
                "-i",
                "127.0.0.1",
                "file",
                str(path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        wait_for_port(proc, port, START_TIMEOUT)
    except RuntimeError:
        proc.kill()
        proc.wait(timeout=15)
        sys.exit(f"nbdkit did not start:\n{log.read_text()}")
    return Running("nbdkit", proc, f"nbd://127.0.0.1:{port}/")


def run_fio(uri: str, args: argparse.Namespace, size: int) -> float:
    """One fio randread run against ``uri``; returns its IOPS."""
    cmd = [
        "fio",
        "--name=randread",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--rw=randread",
        "--bs=4k",
        f"--iodepth={args.iodepth}",
        f"--runtime={args.runtime}",
        "--time_based",
        f"--size={size}",
        "--invalidate=0",
        "--output-format=json",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.runtime + 120, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"fio failed ({proc.returncode}) against {uri}:\n{proc.stderr}")
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    job = result["jobs"][0]
    if job["error"]:
        sys.exit(f"fio reported error {job['error']} against {uri}")
    return float(job["read"]["iops"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio run")
    parser.add_argument("--iodepth", type=int, default=32)
    parser.add_argument("--size-mib", type=int, default=1024, help="export size in MiB")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = parser.parse_args(argv)

    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (scripts/install-deps.sh installs it)")

    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="nbdu-bench-") as tmp:
        path = Path(tmp) / "disk.img"
        print(f"writing {args.size_mib} MiB test file ...", file=sys.stderr)
        make_file(path, size)

        servers = [
            start_nbd_uring(path, Path(tmp) / "nbd-uring.log"),
            start_nbdkit(path, Path(tmp) / "nbdkit.log"),
        ]
        cpu = {s.name: 0.0 for s in servers}
        try:
            for rnd in range(1, args.rounds + 1):
                for s in servers:
                    warm_cache(path)
                    before = s.cpu_seconds()
                    iops = run_fio(s.uri, args, size)
                    cpu[s.name] += s.cpu_seconds() - before
                    s.iops.append(iops)
                    print(f"round {rnd}: {s.name:9s} {iops:10.0f} IOPS", file=sys.stderr)
        finally:
            for s in servers:
                s.stop()

    med = {s.name: statistics.median(s.iops) for s in servers}
    ratio = med["nbd-uring"] / med["nbdkit"] if med["nbdkit"] else float("nan")
    print(
        f"fio nbd randread bs=4k iodepth={args.iodepth} runtime={args.runtime}s, "
        f"{args.rounds} rounds, {args.size_mib} MiB file, page cache warm"
    )
    print(f"{'server':10s} {'median IOPS':>12s} {'CPU s (all runs)':>17s} {'CPU us/IO':>10s}")
    for s in servers:
        total_ios = sum(s.iops) * args.runtime
        per_io = cpu[s.name] / total_ios * 1e6 if total_ios else float("nan")
        print(f"{s.name:10s} {med[s.name]:12.0f} {cpu[s.name]:17.2f} {per_io:10.2f}")
    print(f"ratio nbd-uring/nbdkit: {ratio:.2f}")
    if args.json:
        print(
            json.dumps(
                {
                    "median_iops": med,
                    "iops": {s.name: s.iops for s in servers},
                    "cpu_seconds": cpu,
                    "ratio": ratio,
                }
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
