"""nbd-uring attach/detach/list on the host, which has no nbd module: the clear errors, and
the parts that need no kernel (argument checks, device names)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nbd_uring.config import ExportConfig
from nbd_uring.kernel import AttachConfig, parse_device

NBD_LOADED = Path("/sys/module/nbd").exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nbd_uring", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.mark.skipif(NBD_LOADED, reason="the nbd module is loaded on this host")
@pytest.mark.parametrize("args", [["attach", "{image}"], ["detach", "/dev/nbd0"], ["list"]])
def test_module_missing_is_a_clear_error(tmp_path: Path, args: list[str]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 65536)
    proc = _cli(*(a.format(image=image) for a in args))
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "'nbd' module is not loaded" in proc.stderr
    assert "modprobe nbd" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("text", "index"), [("/dev/nbd0", 0), ("nbd12", 12), ("3", 3), (" /dev/nbd7 ", 7)]
)
def test_parse_device(text: str, index: int) -> None:
    assert parse_device(text) == index


@pytest.mark.parametrize("text", ["/dev/sda", "nbd", "/dev/nbd-1", ""])
def test_parse_device_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not an NBD device"):
        parse_device(text)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"connections": 0}, "connections"),
        ({"connections": 65}, "connections"),
        ({"block_size": 1000}, "block size"),
        ({"block_size": 256}, "block size"),
        ({"block_size": 1 << 16}, "block size"),
        ({"timeout_s": -1}, "timeouts"),
    ],
)
def test_attach_config_rejects(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttachConfig(export=ExportConfig(path="x"), **kwargs)  # type: ignore[arg-type]


def test_attach_bad_arguments_fail_before_the_kernel(tmp_path: Path) -> None:
    proc = _cli("attach", str(tmp_path / "x.img"), "--connections", "0")
    assert proc.returncode == 1
    assert "connections must be between 1 and 64" in proc.stderr
