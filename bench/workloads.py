"""The fio workloads of the benchmark (issue 7) and how they are turned into fio arguments."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """One row of the results table.

    ``metric`` is what the table reports: ``"iops"`` for small-block rows, ``"mib_s"`` for the
    1 MiB streaming rows. ``target`` is the issue's goal for nbd-uring as a ratio to the best peer
    (None where the issue sets none).
    """

    name: str
    title: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    rwmixread: int | None = None
    metric: str = "iops"
    target: float | None = None

    def fio_args(self) -> list[str]:
        args = [
            f"--rw={self.rw}",
            f"--bs={self.bs}",
            f"--iodepth={self.iodepth}",
            f"--numjobs={self.numjobs}",
        ]
        if self.rwmixread is not None:
            args.append(f"--rwmixread={self.rwmixread}")
        return args


WORKLOADS: tuple[Workload, ...] = (
    Workload("randread-4k-qd1", "randread 4k QD1", "randread", "4k", 1, target=1.5),
    Workload("randread-4k-qd32", "randread 4k QD32", "randread", "4k", 32, target=1.5),
    Workload("randwrite-4k-qd32", "randwrite 4k QD32", "randwrite", "4k", 32, target=1.5),
    Workload("randrw-64k-qd16", "randrw 70/30 64k QD16", "randrw", "64k", 16, rwmixread=70),
    Workload("read-1m-qd8", "read 1 MiB QD8", "read", "1m", 8, metric="mib_s", target=1.1),
    Workload("write-1m-qd8", "write 1 MiB QD8", "write", "1m", 8, metric="mib_s", target=1.1),
    Workload(
        "randread-4k-qd32-4conn", "randread 4k QD32, 4 conn", "randread", "4k", 32, 4, target=1.5
    ),
    Workload(
        "scale-1conn-qd8", "scaling: 1 conn QD8 (randread 4k)", "randread", "4k", 8, 1, target=1.5
    ),
    Workload(
        "scale-4conn-qd8", "scaling: 4 conn QD8 (randread 4k)", "randread", "4k", 8, 4, target=1.5
    ),
    Workload(
        "scale-16conn-qd8",
        "scaling: 16 conn QD8 (randread 4k)",
        "randread",
        "4k",
        8,
        16,
        target=1.5,
    ),
    Workload(
        "scale-64conn-qd8",
        "scaling: 64 conn QD8 (randread 4k)",
        "randread",
        "4k",
        8,
        64,
        target=1.5,
    ),
)

BY_NAME: dict[str, Workload] = {w.name: w for w in WORKLOADS}

#: What ``--quick`` runs unless ``--workloads`` says otherwise: one small-block and one
#: streaming row, so a smoke run touches both the request path and large payloads.
QUICK_WORKLOADS: tuple[str, ...] = ("randread-4k-qd32", "write-1m-qd8")


def select(names: str | None, default: tuple[str, ...] | None = None) -> list[Workload]:
    """Workloads named in a comma-separated list (``all`` or None = every workload)."""
    if names is None:
        return [BY_NAME[n] for n in default] if default else list(WORKLOADS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if wanted == ["all"]:
        return list(WORKLOADS)
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise ValueError(
            f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}"
        )
    return [BY_NAME[n] for n in wanted]
