"""nbdinfo (libnbd) sees the export exactly as advertised during the handshake."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ._util import (
    BLOCK_MAX,
    BLOCK_MIN,
    BLOCK_PREFERRED,
    MiB,
    Server,
    StartServer,
    is_nbdkit,
    run,
)

pytestmark = [pytest.mark.integration, pytest.mark.requires("nbdinfo")]


def nbdinfo_json(uri: str) -> dict[str, Any]:
    out = run(["nbdinfo", "--json", "--no-content", uri], timeout=30).stdout
    info: dict[str, Any] = json.loads(out)
    return info


def only_export(info: dict[str, Any]) -> dict[str, Any]:
    exports = info["exports"]
    assert len(exports) == 1, exports
    export: dict[str, Any] = exports[0]
    return export


def test_nbdinfo_read_write_export(any_server: Server) -> None:
    """A writable export reports its exact size, fixed newstyle, every write-side capability
    (flush, FUA, trim, zero, multi-conn), not read-only, and the advertised block sizes
    (minimum 1, preferred 4096, maximum 32 MiB), over both Unix socket and TCP."""
    info = nbdinfo_json(any_server.uri)
    assert info["protocol"] == "newstyle-fixed"
    export = only_export(info)
    assert export["export-size"] == 128 * MiB
    assert export["is_read_only"] is False
    assert export["can_flush"] is True
    assert export["can_fua"] is True
    assert export["can_trim"] is True
    assert export["can_zero"] is True
    assert export["can_multi_conn"] is True
    assert export["block_size_minimum"] == BLOCK_MIN
    assert export["block_size_preferred"] == BLOCK_PREFERRED
    assert export["block_size_maximum"] == BLOCK_MAX
    assert export["export-name"] == ""


def test_nbdinfo_read_only_export(start_nbd_server: StartServer) -> None:
    """--read-only sets NBD_FLAG_READ_ONLY: clients see the export as read-only."""
    server = start_nbd_server(size=3 * MiB + 512, read_only=True)
    export = only_export(nbdinfo_json(server.uri))
    assert export["is_read_only"] is True
    assert export["export-size"] == 3 * MiB + 512


def test_nbdinfo_export_name_and_description(start_nbd_server: StartServer) -> None:
    """A named export is reachable under its name (NBD_OPT_GO with NBD_INFO_NAME) and
    carries the configured description (NBD_INFO_DESCRIPTION)."""
    server = start_nbd_server(size=1 * MiB, export_name="disk-one", description="Disk One")
    assert server.uri.rstrip("/").split("?")[0].endswith("/disk-one"), server.uri
    export = only_export(nbdinfo_json(server.uri))
    assert export["export-name"] == "disk-one"
    assert export["export-size"] == 1 * MiB
    assert export.get("description") == "Disk One", export


def test_nbdinfo_size_not_multiple_of_block(start_nbd_server: StartServer) -> None:
    """An odd-sized file is exported with its exact byte size, not rounded."""
    server = start_nbd_server(size=12345)
    export = only_export(nbdinfo_json(server.uri))
    assert export["export-size"] == 12345


def test_nbdinfo_list(start_nbd_server: StartServer) -> None:
    """NBD_OPT_LIST returns the export's name."""
    if is_nbdkit():
        pytest.skip("nbdkit's file plugin lists no fixed export name")
    server = start_nbd_server(size=1 * MiB, export_name="listed")
    out = run(["nbdinfo", "--list", "--json", "--no-content", server.uri], timeout=30).stdout
    names = [e["export-name"] for e in json.loads(out)["exports"]]
    assert names == ["listed"]


def test_nbdinfo_wrong_export_name_refused(start_nbd_server: StartServer) -> None:
    """Asking for an export name the server does not have fails the handshake cleanly
    (NBD_REP_ERR_UNKNOWN), and the server keeps serving the right name afterwards."""
    if is_nbdkit():
        pytest.skip("nbdkit's file plugin serves any export name")
    server = start_nbd_server(size=1 * MiB, export_name="right")
    wrong = server.uri.replace("/right", "/wrong")
    proc = run(["nbdinfo", "--json", "--no-content", wrong], timeout=30, check=False)
    assert proc.returncode != 0
    assert only_export(nbdinfo_json(server.uri))["export-name"] == "right"
