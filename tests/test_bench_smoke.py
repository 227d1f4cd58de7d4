"""Smoke test of the benchmark runner (bench/): a tiny run against nbd-uring only.

Checks that ``python -m bench --quick`` runs end to end and writes a result with the expected
shape. It never asserts anything about speed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_bench_quick_nbd_uring(requires: Callable[..., str], tmp_path: Path) -> None:
    requires("fio")
    out = tmp_path / "results"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--servers",
            "nbd-uring",
            "--runtime",
            "1",
            "--size",
            "64M",
            "--file",
            str(tmp_path / "disk.img"),
            "--out",
            str(out),
            "--no-latest",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # 0 = every fio run succeeded, 1 = some run failed (listed in "errors"); anything else is
    # a crash of the runner itself
    assert proc.returncode in (0, 1), proc.stderr
    [result_json] = out.glob("*/results.json")
    result = json.loads(result_json.read_text())
    assert {"meta", "config", "workloads", "runs", "summary", "errors"} <= result.keys()
    assert result["config"]["servers"] == ["nbd-uring"]
    assert set(result["summary"]) == set(result["config"]["workloads"])
    for row in result["summary"].values():
        assert {"title", "metric", "results", "best_peer", "ratio_to_best_peer"} <= row.keys()
        assert {"nbd-uring", "ceiling"} <= row["results"].keys()
    for run in result["runs"]:
        assert {"round", "workload", "server"} <= run.keys()
        if "error" not in run:
            assert {"iops", "mib_s", "ops", "p99_us"} <= run.keys()
            if run["server"] == "nbd-uring":
                assert "cpu_s_per_mop" in run
    assert (result_json.parent / "results.md").read_text().startswith("# nbd-uring benchmark")
