"""Markdown table and PNG chart from a benchmark result (the dict written as results.json)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

CEILING = "ceiling"
SERVER_ORDER = ("nbd-uring", "nbdkit", "qemu-nbd", "nbd-server")
#: p99 latency (µs) above which a qemu-nbd row is flagged as a likely Nagle stall.
NAGLE_P99_US = 30_000.0
#: Average CPUs used by other processes during a run above which the run is flagged.
FOREIGN_LOAD_CORES = 0.15

QEMU_NODELAY_NOTE = (
    "qemu-nbd 7.2 never sets TCP_NODELAY on its sockets, so a reply that follows another one "
    "still unacknowledged can sit in the kernel for up to ~40 ms (Nagle's algorithm waiting for "
    "the delayed ACK). Its figures are reported as measured, stalls included."
)


def _fmt(value: float, metric: str) -> str:
    if metric == "iops":
        return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"
    return f"{value:.0f}"


def _servers(result: dict[str, Any]) -> list[str]:
    present = result["config"]["servers"]
    return [s for s in SERVER_ORDER if s in present]


def markdown(result: dict[str, Any]) -> str:
    meta, cfg, summary = result["meta"], result["config"], result["summary"]
    m = meta["machine"]
    servers = _servers(result)
    ceiling = cfg["ceiling"]
    lines: list[str] = []
    lines.append(f"# nbd-uring benchmark, {meta['started'][:10]}")
    lines.append("")
    lines.append(
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem_gib']} GiB RAM, {m['os']}, "
        f"kernel {m['kernel']}. Started {meta['started']}, finished {meta['finished']}."
    )
    lines.append("")
    lines.append(
        f"{cfg['rounds']} round(s) of {cfg['runtime_s']:g} s per fio run, servers interleaved "
        f"(order rotated every round); {cfg['file_size'] >> 20} MiB pre-written file, page cache "
        "warmed right before every run; fio's nbd engine over loopback TCP (one connection per "
        "fio job), `invalidate=0`. Values are medians; ± is the spread (max - min) / median."
    )
    lines.append("")
    versions = meta.get("versions", {})
    lines.append("Versions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()) + ".")
    lines.append("")

    # throughput table
    head = ["workload", "unit", *servers, "best peer", "nbd-uring ÷ best peer", "target"]
    if ceiling:
        head.append("ceiling (fio io_uring on file)")
    lines.append("## Throughput")
    lines.append("")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|")
    for row in summary.values():
        metric = row["metric"]
        res = row["results"]
        cells = [row["title"], "IOPS" if metric == "iops" else "MiB/s"]
        for s in servers:
            r = res.get(s)
            if not r:
                cells.append("error")
                continue
            text = _fmt(r["median"], metric)
            if r["spread_pct"] is not None and r["n"] > 1:
                text += f" ±{r['spread_pct']:.0f}%"
            if s == row["best_peer"]:
                text = f"**{text}**"
            cells.append(text)
        cells.append(row["best_peer"] or "—")
        ratio = row["ratio_to_best_peer"]
        cells.append(f"{ratio:.2f}x" if ratio is not None else "—")
        cells.append(f"≥ {row['target_ratio']:g}x" if row["target_ratio"] else "—")
        if ceiling:
            c = res.get(CEILING)
            cells.append(_fmt(c["median"], metric) if c else "error")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    # CPU table
    lines.append("## Server CPU seconds per million operations")
    lines.append("")
    lines.append(
        "utime+stime of the server process (all threads, and its children for nbd-server), "
        "sampled from /proc/PID/stat before and after each run, divided by the operations fio "
        "completed. The fio client shares the same CPUs and is not counted."
    )
    lines.append("")
    head = ["workload", *servers, "nbd-uring ÷ nbdkit"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for row in summary.values():
        res = row["results"]
        cells = [row["title"]]
        for s in servers:
            r = res.get(s)
            v = r.get("cpu_s_per_mop") if r else None
            cells.append(f"{v:.2f}" if v is not None else "—")
        cr = row["cpu_ratio_to_nbdkit"]
        cells.append(f"{cr:.2f}x" if cr is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    # client CPU table
    lines.append("## Client CPU: fio's own use, % of one CPU")
    lines.append("")
    lines.append(
        "fio's usr+sys CPU during the run (its JSON gives the average per job; shown here "
        "times the number of jobs). A single fio job near 100% is the client running flat out: "
        "no server can raise that row's figure on this machine. Client and server share 2 "
        "CPUs, so every row's total is bounded by 200% minus the server's share."
    )
    lines.append("")
    head = ["workload", "fio jobs", *servers]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for row in summary.values():
        res = row["results"]
        cells = [row["title"], str(row.get("numjobs", "—"))]
        for s in servers:
            r = res.get(s)
            v = r.get("fio_cpu_pct") if r else None
            jobs = int(row.get("numjobs") or 1)
            cells.append(f"{v * jobs:.0f}%" if v is not None else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")

    # notes
    lines.append("## Notes")
    lines.append("")
    if "qemu-nbd" in servers:
        lines.append(f"- {QEMU_NODELAY_NOTE}")
        flagged = []
        for row in summary.values():
            q = row["results"].get("qemu-nbd")
            if q and q["p99_us_median"] >= NAGLE_P99_US:
                flagged.append(f"{row['title']} (p99 {q['p99_us_median'] / 1000:.0f} ms)")
        if flagged:
            lines.append(
                "  Rows where qemu-nbd's median p99 latency is 30 ms or more: "
                + ", ".join(flagged)
                + "."
            )
    if "nbd-server" in servers:
        lines.append(
            "- nbd-server runs with a generated config (`max_threads = 8`, no splice) and "
            "forks one process per connection; its CPU includes those children."
        )
    if ceiling:
        lines.append(
            "- The ceiling is fio's io_uring engine reading/writing the file directly "
            "(same workload, same job count): no network and no server."
        )
    lines.append(
        "- All processes (fio included) share the same CPUs, so a server's own CPU use "
        "takes time away from the client."
    )
    busy = [r for r in result["runs"] if (r.get("other_cpu_cores") or 0.0) > FOREIGN_LOAD_CORES]
    if busy:
        worst = max(float(r["other_cpu_cores"]) for r in busy)
        lines.append(
            f"- **Other work was running on this machine**: in {len(busy)} of "
            f"{len(result['runs'])} runs, processes other than the server under test and fio "
            f"used more than {FOREIGN_LOAD_CORES:g} CPU on average (up to {worst:.2f} CPUs; "
            "`other_cpu_cores` in results.json). Those figures, and the spreads, are unreliable; "
            "rerun on an idle machine."
        )
    errors = result.get("errors") or []
    if errors:
        lines.append(f"- {len(errors)} run(s) failed and are left out of the medians:")
        for e in errors[:20]:
            lines.append(
                f"  - round {e['round']} {e['workload']} {e['server']}: "
                f"{str(e['error']).splitlines()[0][:200]}"
            )
    lines.append("")
    lines.append(f"Command: `{meta['command']}`")
    lines.append("")
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path, log: Callable[[str], None]) -> bool:
    """Grouped bars: throughput relative to the best peer, and CPU s/Mop. False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    summary = result["summary"]
    servers = _servers(result)
    names = list(summary)
    titles = [
        summary[n]["title"].replace("scaling: ", "").replace(" (randread 4k)", "") for n in names
    ]
    colors = {
        "nbd-uring": "#d62728",
        "nbdkit": "#1f77b4",
        "qemu-nbd": "#2ca02c",
        "nbd-server": "#9467bd",
    }
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8.0, 1.1 * len(names) + 3), 9), sharex=True)
    width = 0.8 / max(1, len(servers))
    xs = list(range(len(names)))
    top = 0.0
    for i, s in enumerate(servers):
        rel: list[float] = []
        cpu: list[float] = []
        for n in names:
            row = summary[n]
            r = row["results"].get(s)
            best = row["results"].get(row["best_peer"]) if row["best_peer"] else None
            base = best["median"] if best else (r["median"] if r else 0.0)
            rel.append(r["median"] / base if r and base else 0.0)
            v = r.get("cpu_s_per_mop") if r else None
            cpu.append(v if v is not None else 0.0)
        pos = [x - 0.4 + width * (i + 0.5) for x in xs]
        ax1.bar(pos, rel, width, label=s, color=colors.get(s))
        top = max([top, *rel])
        ax2.bar(pos, cpu, width, label=s, color=colors.get(s))
        if s == "nbd-uring":
            for x, v in zip(pos, rel, strict=True):
                if v > 0:
                    ax1.annotate(f"{v:.2f}x", (x, v), ha="center", va="bottom", fontsize=7)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.set_ylabel("throughput ÷ best peer (median)")
    ax1.set_ylim(0, max(1.0, top) * 1.22)
    ax1.legend(ncol=len(servers), loc="upper center", fontsize=8, frameon=False)
    m = result["meta"]["machine"]
    ax1.set_title(
        f"nbd-uring vs peers, fio over loopback, {result['meta']['started'][:10]}, "
        f"{m['cpus']} CPUs, kernel {m['kernel']}",
        fontsize=10,
    )
    ax2.set_ylabel("server CPU s per million ops (log)")
    ax2.set_yscale("log")
    ax2.set_xticks(xs)
    ax2.set_xticklabels(titles, rotation=35, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
