"""Figures for the ordering and durability rules (issue 5), with fio's nbd engine.

    python bench/ordering_durability.py [--rounds 3] [--runtime 8]

Runs, interleaved round by round on one 1 GiB file (page cache warmed before each run):
- 4k random read QD32 with ``--ordering strict`` vs ``kernel`` (the tracker's cost);
- p50/p99 latency of 4k random reads QD1 on one connection, idle vs while a second connection
  writes with a FLUSH after every write (FLUSH must not stall unrelated I/O);
- 4k random write QD32 in each ``--durability`` mode, and in ``sync`` mode with ``--fua link``
  vs ``--fua dsync`` (every write takes the FUA path there);
- the overlap tracker's own cost per admit+release with thousands of requests in flight.
Prints medians and ratios; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILE_SIZE = 1 << 30


def start_server(path: Path, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbd_uring",
            "serve",
            str(path),
            "--port",
            "0",
            "--print-uri",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    uri = proc.stdout.readline().decode().strip()
    if not uri:
        raise RuntimeError(f"server did not start: {args}")
    return proc, uri


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def warm(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(16 << 20):
            pass


def fio(uri: str, runtime: int, *jobs: list[str]) -> list[dict[str, object]]:
    argv = [
        "fio",
        "--output-format=json",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--invalidate=0",
        f"--runtime={runtime}",
        "--time_based",
        "--size=1g",
        "--group_reporting=0",
    ]
    for i, job in enumerate(jobs):
        argv += [f"--name=job{i}", *job]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=runtime * 4 + 60)
    data = json.loads(out.stdout[out.stdout.index("{") :])
    return list(data["jobs"])


def iops(job: dict[str, object], rw: str) -> float:
    return float(job[rw]["iops"])  # type: ignore[index]


def percentile_us(job: dict[str, object], rw: str, p: str) -> float:
    return float(job[rw]["clat_ns"]["percentile"][p]) / 1000  # type: ignore[index]


def tracker_cost() -> str:
    from nbd_uring.engine.ordering import OverlapTracker

    lines = []
    for in_flight in (10, 1000, 10000):
        tracker = OverlapTracker()
        entries = [tracker.admit(i * 8192, 4096, True, lambda: None) for i in range(in_flight)]
        n = 50000
        t0 = time.perf_counter()
        for i in range(n):
            e = tracker.admit((in_flight + i % 1000) * 8192 + 4096, 4096, i % 2 == 0, lambda: None)
            e.begin()
            tracker.release(e)
        dt = (time.perf_counter() - t0) / n
        lines.append(f"| {in_flight} | {dt * 1e6:.2f} µs |")
        del entries
    return "\n".join(["| requests in flight | admit + release |", "|---|---|", *lines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nbdu-bench-", dir="/var/tmp") as tmp:
        path = Path(tmp) / "disk.img"
        with path.open("wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(FILE_SIZE >> 20):
                f.write(block)
        results: dict[str, list[float]] = {}

        def record(key: str, value: float) -> None:
            results.setdefault(key, []).append(value)

        read32 = ["--rw=randread", "--bs=4k", "--iodepth=32"]
        write32 = ["--rw=randwrite", "--bs=4k", "--iodepth=32"]
        probe = ["--rw=randread", "--bs=4k", "--iodepth=1"]
        flusher = [
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=1",
            "--fsync=1",
            "--offset=512m",
            "--size=512m",
        ]
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr)
            for ordering in ("strict", "kernel"):
                proc, uri = start_server(path, "--ordering", ordering)
                warm(path)
                record(
                    f"randread 4k QD32, {ordering}", iops(fio(uri, args.runtime, read32)[0], "read")
                )
                stop(proc)
            proc, uri = start_server(path)
            warm(path)
            idle = fio(uri, args.runtime, probe)[0]
            busy = fio(uri, args.runtime, probe, flusher)[0]
            for label, job in (("idle", idle), ("with FLUSH after every write", busy)):
                record(f"read QD1 p50 µs, {label}", percentile_us(job, "read", "50.000000"))
                record(f"read QD1 p99 µs, {label}", percentile_us(job, "read", "99.000000"))
            stop(proc)
            for mode, extra in (
                ("flush", []),
                ("writeback", []),
                ("sync", ["--fua", "link"]),
                ("sync", ["--fua", "dsync"]),
            ):
                proc, uri = start_server(path, "--durability", mode, *extra)
                warm(path)
                label = f"randwrite 4k QD32, {mode}" + (f" {extra[1]}" if extra else "")
                record(label, iops(fio(uri, args.runtime, write32)[0], "write"))
                stop(proc)
    print(f"\n{args.rounds} rounds of {args.runtime} s, medians (min-max)\n")
    print("| measurement | median | spread |\n|---|---|---|")
    for key, values in results.items():
        print(
            f"| {key} | {statistics.median(values):,.0f} | {min(values):,.0f}-{max(values):,.0f} |"
        )
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"\nstrict/kernel IOPS ratio: "
        f"{med['randread 4k QD32, strict'] / med['randread 4k QD32, kernel']:.3f}"
    )
    print(
        "p99 busy/idle: "
        f"{med['read QD1 p99 µs, with FLUSH after every write'] / med['read QD1 p99 µs, idle']:.2f}"
    )
    print(
        f"sync link/dsync: "
        f"{med['randwrite 4k QD32, sync link'] / med['randwrite 4k QD32, sync dsync']:.2f}"
    )
    print("\n" + tracker_cost())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
