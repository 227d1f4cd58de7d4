"""The benchmark runner: ``python -m bench`` (or ``bench/run``).

Starts every selected server once on the same pre-written file, then for each round runs every
workload against every server (and fio's io_uring engine on the file itself, the ceiling),
rotating the server order each round so that no server always goes first or last. The page cache
is flushed of dirty pages and warmed right before each fio run. Results go to
``bench/results/<date>/`` as JSON, Markdown and PNG; a full run also refreshes
``bench/latest.md`` and ``bench/latest.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from . import report
from .servers import (
    CLK_TCK,
    SERVER_NAMES,
    Server,
    ensure_matplotlib,
    ensure_tools,
    tool_version,
)
from .workloads import QUICK_WORKLOADS, WORKLOADS, Workload, select

CEILING = "ceiling"
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_FILE_DIR = Path("/var/tmp/nbd-uring-bench")
MiB = 1 << 20


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


# --------------------------------------------------------------------------------------------
# the data file


def prepare_file(path: Path, size: int) -> None:
    """Create ``path`` fully written (no holes) with ``size`` bytes, unless it already is."""
    if path.exists() and path.stat().st_size == size and path.stat().st_blocks * 512 >= size:
        return
    log(f"writing {size // MiB} MiB to {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MiB)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


_libc: ctypes.CDLL | None = None


def _resident_fraction(fd: int, size: int) -> float:
    """Fraction of the file's pages in the page cache (mincore); 0.0 if it cannot tell."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc = _libc
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0.0
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            pages = (size + page - 1) // page
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                return 0.0
            resident = sum(b & 1 for b in vec.raw)
            return resident / pages
        finally:
            libc.munmap(addr, size)
    except (OSError, AttributeError):
        return 0.0


def warm_file(path: Path) -> float:
    """Write back dirty pages, then make sure every page of ``path`` is cached.

    Returns the resident fraction found before warming (for the record).
    """
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
        before = _resident_fraction(fd, size)
        if before < 1.0:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            buf = memoryview(bytearray(16 * MiB))
            while os.readv(fd, [buf]):
                pass
        return before
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# fio


def fio_argv(w: Workload, target: str, runtime: float, out: Path) -> list[str]:
    argv = [
        "fio",
        "--name=bench",
        f"--runtime={runtime}",
        "--time_based=1",
        "--invalidate=0",
        "--group_reporting=1",
        "--thread=1",
        "--randrepeat=0",
        "--norandommap=1",
        "--output-format=json",
        f"--output={out}",
        *w.fio_args(),
    ]
    if target.startswith("nbd://"):
        argv += ["--ioengine=nbd", f"--uri={target}"]
    else:
        argv += ["--ioengine=io_uring", f"--filename={target}", "--direct=0"]
    return argv


def parse_fio(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = json.loads(text[text.index("{") :])
    job = data["jobs"][0]
    ops = 0
    bw = 0.0
    iops = 0.0
    p99 = 0.0
    for d in ("read", "write"):
        part = job[d]
        ops += int(part["total_ios"])
        bw += float(part["bw_bytes"])
        iops += float(part["iops"])
        pct = part.get("clat_ns", {}).get("percentile", {})
        if part["total_ios"] and pct:
            p99 = max(p99, float(pct.get("99.000000", 0.0)) / 1000.0)
    return {
        "iops": iops,
        "mib_s": bw / MiB,
        "ops": ops,
        "p99_us": p99,
        "runtime_s": float(job["job_runtime"]) / 1000.0 if "job_runtime" in job else None,
        "fio_error": int(job.get("error", 0)),
        # The client's own CPU, % of one CPU, averaged over its jobs (group reporting): near
        # 100, fio is the bottleneck and no server could go faster on this machine.
        "fio_cpu_pct": float(job.get("usr_cpu", 0.0)) + float(job.get("sys_cpu", 0.0)),
    }


def busy_cpu_seconds() -> float:
    """User+nice+system time of the whole machine (/proc/stat), in seconds.

    irq/softirq time is left out: loopback TCP does much of its work in softirq context, which
    the kernel does not charge to the processes involved.
    """
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    return (fields[0] + fields[1] + fields[2]) / CLK_TCK


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_one(
    w: Workload, target: str, server: Server | None, runtime: float, workdir: Path, file: Path
) -> dict[str, Any]:
    resident = warm_file(file)
    out = workdir / "fio.json"
    out.unlink(missing_ok=True)
    argv = fio_argv(w, server.uri if server else str(file), runtime, out)
    cpu0 = server.cpu() if server else 0.0
    busy0, fio0 = busy_cpu_seconds(), children_cpu_seconds()
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=runtime + 25 + 0.2 * w.numjobs
        )
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired:
        rc, err = -1, "fio timed out"
    wall = time.monotonic() - t0
    if server:
        server.settle()
    cpu1 = server.cpu() if server else 0.0
    busy, fio_cpu = busy_cpu_seconds() - busy0, children_cpu_seconds() - fio0
    # CPU used by anything other than this server and fio while the run lasted: other
    # benchmarks, builds, ... on the same machine. Large values make the run unreliable.
    other = max(0.0, busy - fio_cpu - (cpu1 - cpu0))
    rec: dict[str, Any] = {
        "resident_before": round(resident, 4),
        "wall_s": round(wall, 3),
        "fio_cpu_s": round(fio_cpu, 3),
        "other_cpu_cores": round(other / wall, 3) if wall > 0 else None,
    }
    if rc != 0 or not out.exists():
        rec["error"] = f"fio exit {rc}: {err.strip()[-600:]}"
        return rec
    try:
        rec.update(parse_fio(out))
    except (ValueError, KeyError, IndexError) as e:
        rec["error"] = f"cannot parse fio output: {e!r}"
        return rec
    if rec["fio_error"]:
        rec["error"] = f"fio job error {rec['fio_error']}: {err.strip()[-600:]}"
    if server:
        cpu = cpu1 - cpu0
        rec["cpu_s"] = round(cpu, 3)
        rec["cpu_s_per_mop"] = round(cpu / (rec["ops"] / 1e6), 3) if rec["ops"] else None
    return rec


# --------------------------------------------------------------------------------------------
# summary


def summarize(
    runs: list[dict[str, Any]], workloads: list[Workload], targets: list[str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for w in workloads:
        row: dict[str, Any] = {}
        for t in targets:
            ok = [
                r for r in runs if r["workload"] == w.name and r["server"] == t and "error" not in r
            ]
            if not ok:
                row[t] = None
                continue
            vals = [float(r[w.metric]) for r in ok]
            med = statistics.median(vals)
            cpus = [float(r["cpu_s_per_mop"]) for r in ok if r.get("cpu_s_per_mop") is not None]
            row[t] = {
                "metric": w.metric,
                "median": med,
                "min": min(vals),
                "max": max(vals),
                "spread_pct": (max(vals) - min(vals)) / med * 100.0 if med else None,
                "n": len(vals),
                "values": vals,
                "iops_median": statistics.median(float(r["iops"]) for r in ok),
                "mib_s_median": statistics.median(float(r["mib_s"]) for r in ok),
                "p99_us_median": statistics.median(float(r["p99_us"]) for r in ok),
                "cpu_s_per_mop": statistics.median(cpus) if cpus else None,
                "fio_cpu_pct": statistics.median(float(r.get("fio_cpu_pct", 0.0)) for r in ok),
            }
        peers = {
            t: row[t]["median"] for t in targets if t not in ("nbd-uring", CEILING) and row.get(t)
        }
        best_peer = max(peers, key=lambda k: peers[k]) if peers else None
        ratio = None
        if best_peer and row.get("nbd-uring"):
            ratio = row["nbd-uring"]["median"] / peers[best_peer]
        cpu_ratio = None
        if row.get("nbd-uring") and row.get("nbdkit"):
            a, b = row["nbd-uring"]["cpu_s_per_mop"], row["nbdkit"]["cpu_s_per_mop"]
            cpu_ratio = a / b if a is not None and b else None
        out[w.name] = {
            "title": w.title,
            "metric": w.metric,
            "numjobs": w.numjobs,
            "target_ratio": w.target,
            "results": row,
            "best_peer": best_peer,
            "ratio_to_best_peer": ratio,
            "cpu_ratio_to_nbdkit": cpu_ratio,
        }
    return out


def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    os_name = "?"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "os": os_name,
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30), 1),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark nbd-uring against nbdkit, qemu-nbd and nbd-server with fio.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="workloads: " + ", ".join(w.name for w in WORKLOADS),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: 1 round of 2 s, workloads {','.join(QUICK_WORKLOADS)}",
    )
    p.add_argument("--rounds", type=int, help="rounds (default 3; --quick: 1)")
    p.add_argument("--runtime", type=float, help="seconds per fio run (default 4; --quick: 2)")
    p.add_argument("--workloads", help="comma-separated workload names, or 'all'")
    p.add_argument(
        "--servers",
        default=",".join(SERVER_NAMES),
        help=f"comma-separated, from {','.join(SERVER_NAMES)} (default: all)",
    )
    p.add_argument(
        "--no-ceiling", action="store_true", help="skip fio's io_uring engine on the file itself"
    )
    p.add_argument("--size", default="1G", help="size of the served file (default 1G)")
    p.add_argument(
        "--file",
        type=Path,
        help=f"file to serve (default {DEFAULT_FILE_DIR}/disk-SIZE.img, kept between "
        "runs and rewritten only if its size is wrong)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=BENCH_DIR / "results",
        help="results directory; each run writes a <date> subdirectory",
    )
    p.add_argument(
        "--latest",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="copy the Markdown/PNG to bench/latest.* (default: yes unless --quick)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    runtime = args.runtime or (2.0 if args.quick else 4.0)
    try:
        workloads = select(args.workloads, QUICK_WORKLOADS if args.quick else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    servers_wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers_wanted if s not in SERVER_NAMES]
    if bad or not servers_wanted:
        print(f"error: unknown server(s) {bad}; choose from {SERVER_NAMES}", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    file = args.file or DEFAULT_FILE_DIR / f"disk-{size}.img"
    copy_latest = (not args.quick) if args.latest is None else args.latest

    missing = ensure_tools(["fio", *[s for s in servers_wanted if s != "nbd-uring"]], log)
    if not args.quick:
        ensure_matplotlib(log)
    if "fio" in missing:
        print("error: fio is missing and could not be installed", file=sys.stderr)
        return 2
    for m in missing:
        log(f"skipping {m}: not installed")
    servers_wanted = [s for s in servers_wanted if s not in missing]

    prepare_file(file, size)
    stamp = datetime.now().strftime("%Y-%m-%d_%H%M%S")
    outdir = args.out / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    max_conns = max(w.numjobs for w in workloads)
    n_targets = len(servers_wanted) + (0 if args.no_ceiling else 1)
    est = rounds * len(workloads) * n_targets * (runtime + 0.6)
    log(
        f"{rounds} round(s) x {len(workloads)} workload(s) x {n_targets} target(s) x {runtime:g} s"
        f" ≈ {est / 60:.1f} min; results in {outdir}"
    )

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        log(
            f"warning: load average is {load1:.2f} before starting; other work on this machine "
            "skews the figures (see other_cpu_cores in the results)"
        )
    runs: list[dict[str, Any]] = []
    servers: dict[str, Server] = {}
    started = datetime.now().astimezone()
    with tempfile.TemporaryDirectory(prefix="nbd-uring-bench-") as tmp:
        workdir = Path(tmp)
        try:
            for name in servers_wanted:
                srv = Server(name, file, workdir, max_connections=max_conns)
                try:
                    srv.start()
                except RuntimeError as e:
                    log(str(e))
                    runs.append(
                        {"round": 0, "workload": "-", "server": name, "error": f"start failed: {e}"}
                    )
                    continue
                servers[name] = srv
                log(f"{name} pid {srv.pid} on {srv.uri}")
            targets = list(servers) + ([] if args.no_ceiling else [CEILING])
            versions = {name: srv.version() for name, srv in servers.items()}
            versions["fio"] = tool_version(["fio", "--version"])
            for rnd in range(1, rounds + 1):
                for w in workloads:
                    k = (rnd - 1) % len(targets) if targets else 0
                    order = targets[k:] + targets[:k]
                    for t in order:
                        srv = servers.get(t)
                        if srv is not None and not srv.alive():
                            log(f"{t} died; restarting. log: {srv.log_tail(500)}")
                            srv.stop()
                            srv.start()
                        rec = run_one(w, t, srv, runtime, workdir, file)
                        rec = {"round": rnd, "workload": w.name, "server": t, **rec}
                        runs.append(rec)
                        if "error" in rec:
                            log(f"round {rnd} {w.name:24} {t:10} ERROR {rec['error']}")
                        else:
                            cpu = rec.get("cpu_s_per_mop")
                            log(
                                f"round {rnd} {w.name:24} {t:10} {rec['iops']:10.0f} IOPS "
                                f"{rec['mib_s']:8.1f} MiB/s"
                                + (f"  {cpu:6.2f} CPU s/Mop" if cpu is not None else "")
                            )
        finally:
            for srv in servers.values():
                srv.stop()

    finished = datetime.now().astimezone()
    summary = summarize(runs, workloads, targets)
    result: dict[str, Any] = {
        "meta": {
            "started": started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "machine": machine_info(),
            "versions": versions,
            "loadavg_at_start": load1,
            "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        },
        "config": {
            "rounds": rounds,
            "runtime_s": runtime,
            "file_size": size,
            "file": str(file),
            "servers": list(servers),
            "ceiling": not args.no_ceiling,
            "workloads": [w.name for w in workloads],
            "server_commands": {name: srv.argv for name, srv in servers.items()},
        },
        "workloads": {
            w.name: {
                "title": w.title,
                "fio": w.fio_args(),
                "metric": w.metric,
                "target_ratio": w.target,
            }
            for w in workloads
        },
        "runs": runs,
        "summary": summary,
        "errors": [r for r in runs if "error" in r],
    }
    json_path = outdir / "results.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md = report.markdown(result)
    md_path = outdir / "results.md"
    md_path.write_text(md)
    png_path = outdir / "results.png"
    chart_ok = report.chart(result, png_path, log)
    log(f"wrote {json_path}, {md_path}" + (f", {png_path}" if chart_ok else ""))
    if copy_latest:
        shutil.copyfile(md_path, BENCH_DIR / "latest.md")
        if chart_ok:
            shutil.copyfile(png_path, BENCH_DIR / "latest.png")
        log("updated bench/latest.md" + (" and bench/latest.png" if chart_ok else ""))
    print(md)
    return 1 if result["errors"] else 0
