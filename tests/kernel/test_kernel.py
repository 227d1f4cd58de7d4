"""The Linux kernel's NBD client against nbd-uring, in a qemu TCG guest (see vm.py).

One guest boot runs every check in guest_checks.py in turn (about three minutes under TCG);
each test here reports one check. Outside CI these tests skip when qemu or the other tools are
missing, or when not root; under CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import in_ci

from . import vm

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

GUEST_CHECKS = Path(__file__).with_name("guest_checks.py")
# Order matters: the first runs before the nbd module is loaded.
CHECKS = [
    "attach_without_module",
    "nbd_client_tcp",
    "nbd_client_unix",
    "nbd_client_multiconn",
    "fio_verify",
    "attach_one_connection",
    "attach_four_connections",
    "attach_read_only_sigterm",
    "attach_not_root",
]
GUEST_TOOLS = ["nbd-client", "mkfs.ext4", "fsck.ext4", "fio", "blkdiscard", "setpriv", "modprobe"]
GUEST_TIMEOUT_S = 450  # the 8-minute budget for the kernel tests, boot included


def _unavailable() -> str | None:
    missing = vm.missing_tools() + [t for t in GUEST_TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing {', '.join(missing)} (scripts/install-deps.sh installs them)"
    if os.geteuid() != 0:
        return "the guest shares the host's / and must run as root"
    return None


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = _unavailable()
    if reason is not None:
        if in_ci():
            pytest.fail(f"kernel tests cannot run: {reason} (CI=true)")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("guest")
    results = out / "results.json"
    job = f"exec {sys.executable} {GUEST_CHECKS} {results} {' '.join(CHECKS)}\n"
    run = vm.run(job, out=out, timeout_s=GUEST_TIMEOUT_S)
    found = {r["name"]: r for r in json.loads(results.read_text())} if results.exists() else {}
    print(f"guest: {run.seconds:.1f} s, job status {run.status}, output in {out}")
    return {"results": found, "log": run.log, "console": run.console, "out": out}


def _section(log: str, name: str) -> str:
    start = log.find(f"==== {name}\n")
    end = log.find(f"==== {name}: ", start)
    return log[start : end + 200] if start != -1 else log[-4000:]


@pytest.mark.parametrize("name", CHECKS)
def test_kernel_client(guest: dict[str, Any], name: str) -> None:
    result = guest["results"].get(name)
    if result is None:
        pytest.fail(f"{name} did not run; job log tail:\n{guest['log'][-4000:]}")
    print(f"{name}: {result['seconds']:.1f} s in the guest")
    if not result["ok"]:
        pytest.fail(
            f"{name}: {result['error']}\n--- its log:\n{_section(guest['log'], name)[-6000:]}"
            f"\n--- console tail:\n{guest['console'][-2000:]}"
        )
