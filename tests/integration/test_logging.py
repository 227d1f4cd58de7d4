"""The log names the client, the export, the request, the errno and why: one line per
connection event and per error."""

from __future__ import annotations

import struct

import pytest

from ._util import StartServer, is_nbdkit
from .test_malformed import RawClient, recv_exact
from .test_operations import go_reply, wait_for_log

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(is_nbdkit(), reason="nbd-uring's own log"),
]

REP_ERR_UNKNOWN = (1 << 31) + 6
NBD_EIO = 5
NBD_EINVAL = 22


def test_refused_options_and_failed_requests_are_logged(start_nbd_server: StartServer) -> None:
    server = start_nbd_server(
        tcp=True, export_name="disk", extra_args=("--fault", "read@0-4k:error=EIO")
    )
    rtype, _ = go_reply(RawClient(server), b"nope")
    assert rtype == REP_ERR_UNKNOWN
    wait_for_log(server, "NBD_OPT_GO refused with NBD_REP_ERR_UNKNOWN: export 'nope' does not")

    client = RawClient(server).handshake(b"disk")
    cookie = client.request(0, 512, 1024)  # NBD_CMD_READ inside the failing range
    _magic, error, got = struct.unpack(">IIQ", recv_exact(client.sock, 16))
    assert (error, got) == (NBD_EIO, cookie)
    size = client.size
    beyond = client.request(0, size, 512)  # NBD_CMD_READ past the end: refused, never run
    _magic, error, got = struct.unpack(">IIQ", recv_exact(client.sock, 16))
    assert (error, got) == (NBD_EINVAL, beyond)
    port = client.sock.getsockname()[1]
    client.disconnect()
    wait_for_log(server, f"127.0.0.1:{port} export 'disk': connection closed")
    log = server.stderr_text()
    failed = [line for line in log.splitlines() if f"cookie={cookie:#x}" in line]
    assert len(failed) == 1, log
    # client address, export, request, errno, why
    for words in (f"127.0.0.1:{port} export 'disk'", "NBD_CMD_READ offset=512 length=1024",
                  "(EIO)", "Input/output error"):
        assert words in failed[0], failed[0]
    assert f"127.0.0.1:{port}: export 'disk' chosen" in log
    assert (
        f"127.0.0.1:{port} export 'disk': NBD_CMD_READ cookie={beyond:#x} offset={size} "
        f"length=512 refused with EINVAL: NBD_CMD_READ beyond end of export"
    ) in log
