"""A/B: two nbd-uring builds (or one build with two sets of flags) under the same fio workload.

Each round starts A's server and B's server in turn (the order alternates every round), warms
the file, runs fio's nbd engine against it, and reads the server's CPU time from /proc. The
medians of IOPS and of server CPU per operation, and B's ratio to A, are what to quote: this
machine is noisy, so a change is kept only when it wins over several interleaved rounds.

    python -m bench.ab TREE_A TREE_B [--rounds 6] [--runtime 3] [--args-b=--no-lane] -- FIO_ARGS

A tree is a checkout with its own ``.venv`` (``python3 -m venv --system-site-packages
TREE/.venv && TREE/.venv/bin/pip install -e TREE``); both may be the same tree.
"""

from __future__ import annotations

import argparse
import json
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from .servers import cpu_seconds, free_port


def _run(
    tree: Path, extra: list[str], fio: list[str], runtime: float, file: Path
) -> tuple[float, float]:
    """One fio run against a fresh server from ``tree``: (IOPS, server CPU µs per operation)."""
    port = free_port()
    server = subprocess.Popen(
        [str(tree / ".venv" / "bin" / "python"), "-m", "nbd_uring", "serve", str(file),
         "-b", "127.0.0.1", "--port", str(port), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"the server from {tree} did not start") from None
                time.sleep(0.02)
        subprocess.run(["dd", f"if={file}", "of=/dev/null", "bs=4M", "status=none"], check=True)
        before = cpu_seconds(server.pid)
        out = subprocess.run(
            ["fio", "--name=ab", f"--runtime={runtime}", "--time_based=1", "--invalidate=0",
             "--group_reporting=1", "--thread=1", "--randrepeat=0", "--norandommap=1",
             "--output-format=json", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/", *fio],
            capture_output=True, text=True, timeout=runtime + 60, check=True,
        )
        used = cpu_seconds(server.pid) - before
    finally:
        server.kill()
        server.wait()
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    ops = job["read"]["total_ios"] + job["write"]["total_ios"]
    return job["read"]["iops"] + job["write"]["iops"], used / max(ops, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="tree A")
    ap.add_argument("b", type=Path, help="tree B")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run")
    ap.add_argument("--file", type=Path, default=Path("/var/tmp/nbd-uring-bench/ab-1g.img"))
    ap.add_argument("--args-a", default="", help="extra server flags for A")
    ap.add_argument("--args-b", default="", help="extra server flags for B")
    args, fio = ap.parse_known_args(argv)
    fio = [x for x in fio if x != "--"]
    if not fio:
        ap.error("give fio's workload after --, e.g. -- --rw=randread --bs=4k --iodepth=32")
    if not args.file.exists() or args.file.stat().st_size != 1 << 30:
        args.file.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["fio", "--name=make", f"--filename={args.file}", "--size=1G", "--rw=write",
             "--bs=1M", "--output=/dev/null"], check=True,
        )
    sides = {"A": (args.a, shlex.split(args.args_a)), "B": (args.b, shlex.split(args.args_b))}
    results: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            tree, extra = sides[name]
            results[name].append(_run(tree, extra, fio, args.runtime, args.file))
    medians = {}
    for name, runs in results.items():
        iops = [x for x, _ in runs]
        cpu = statistics.median(c for _, c in runs)
        medians[name] = (statistics.median(iops), cpu)
        print(
            f"{name}: IOPS median {medians[name][0]:.0f} (min {min(iops):.0f}, max "
            f"{max(iops):.0f}), server CPU {cpu:.2f} µs/op"
        )
    (ia, ca), (ib, cb) = medians["A"], medians["B"]
    print(f"B/A: IOPS {ib / ia:.3f}, CPU per op {cb / ca:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
