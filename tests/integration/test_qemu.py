"""QEMU's NBD client (qemu-img, qemu-io) works against the export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ._util import KiB, MiB, Server, StartServer, run, sha256_file, write_random_file

pytestmark = pytest.mark.integration


@pytest.mark.requires("qemu-img")
def test_qemu_img_convert_compare_info(
    start_nbd_server: StartServer, tmp_path: Path, random_64m: Path
) -> None:
    """qemu-img convert writes a raw image into the export (-n: target exists) and reads it
    back out bit-exactly; qemu-img compare finds image and export identical; qemu-img info
    reports the export's virtual size."""
    server = start_nbd_server(size=64 * MiB)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(random_64m), server.uri])

    out = tmp_path / "out.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, str(out)])
    assert sha256_file(out) == sha256_file(random_64m)

    cmp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(random_64m), server.uri])
    assert "Images are identical" in cmp.stdout

    info = json.loads(run(["qemu-img", "info", "--output=json", "-f", "raw", server.uri]).stdout)
    assert info["virtual-size"] == 64 * MiB
    assert info["format"] == "raw"


@pytest.mark.requires("qemu-img", "qemu-io")
def test_qemu_img_compare_detects_difference(start_nbd_server: StartServer, tmp_path: Path) -> None:
    """qemu-img compare is a real check here: after one byte of the export is changed
    (qemu-io write), compare reports a mismatch in the sector holding that byte."""
    server = start_nbd_server(size=4 * MiB)
    image = write_random_file(tmp_path / "img.raw", 4 * MiB, seed=7)
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), server.uri])
    ok = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), server.uri])
    assert "Images are identical" in ok.stdout, ok.stdout
    run(["qemu-io", "-f", "raw", server.uri, "-c", "write -P 0x5a 1000 1"])
    bad = run(
        ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), server.uri], check=False
    )
    assert bad.returncode == 1, (bad.returncode, bad.stdout, bad.stderr)
    assert "Content mismatch at offset 512!" in bad.stdout, bad.stdout


def qemu_io(uri: str, *commands: str) -> str:
    argv = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        argv += ["-c", c]
    proc = run(argv)
    out = proc.stdout + proc.stderr
    assert "failed" not in out.lower(), out
    assert "error" not in out.lower(), out
    return out


@pytest.mark.requires("qemu-io")
def test_qemu_io_aio_patterns(server: Server) -> None:
    """Concurrent qemu-io aio_write requests with distinct patterns, then aio_flush, read
    back with the right pattern at every offset (no request's data lands in another's
    place), and the backing file holds the same bytes."""
    # Adjacent and unaligned ranges, all in flight at once before the flush.
    writes = [
        (0xAB, 0),
        (0xCD, 64 * KiB),
        (0x11, 1 * MiB),
        (0x22, 1 * MiB + 64 * KiB),
        (0x33, 100 * MiB + 512),
    ]
    cmds = [f"aio_write -P 0x{p:02x} {off} 64k" for p, off in writes]
    cmds.append("aio_flush")
    cmds += [f"read -P 0x{p:02x} {off} 64k" for p, off in writes]
    out = qemu_io(server.uri, *cmds)
    assert out.count("read 65536/65536 bytes") == len(writes), out

    with server.path.open("rb") as f:
        f.seek(0)
        assert f.read(64 * KiB) == b"\xab" * (64 * KiB)
        f.seek(64 * KiB)
        assert f.read(64 * KiB) == b"\xcd" * (64 * KiB)
        f.seek(100 * MiB + 512)
        assert f.read(64 * KiB) == b"\x33" * (64 * KiB)


@pytest.mark.requires("qemu-io")
def test_qemu_io_zero_discard_fua(server: Server) -> None:
    """qemu-io write -z (WRITE_ZEROES), discard (TRIM) and write -f (FUA) behave: zeroed and
    discarded ranges read back as zero, FUA data reads back, neighbours are untouched."""
    qemu_io(
        server.uri,
        "write -P 0x77 0 256k",
        "write -z 64k 64k",
        "discard 128k 64k",
        "write -f -P 0x99 192k 4k",
        "flush",
        "read -P 0x77 0 64k",
        "read -P 0 64k 128k",
        "read -P 0x99 192k 4k",
        "read -P 0x77 196k 60k",
    )
