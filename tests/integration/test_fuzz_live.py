"""Live fuzzer: mutated NBD sessions thrown at the running server over a Unix socket.

Seed sessions (valid handshakes followed by requests, compact and extended) are mutated with a
fixed-seed RNG: byte flips, boundary values in 32/64-bit fields, insertions, deletions,
duplications and truncations. Each mutant gets its own connection; the test reads whatever the
server answers for a short while, then hangs up. Between mutants a well-behaved client, connected
beside them the whole time, writes a fresh pattern and reads it back. The run is bounded in count
and in time, and at the end the server must still accept new clients and, at teardown, exit
cleanly with no traceback in its log (the fixture checks that).
"""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest

from . import _rawclient as rc
from ._util import MiB, Server, StartServer

pytestmark = pytest.mark.integration

SEED = 20261125
MAX_CASES = 200
MAX_SECONDS = 15.0
EXPORT_SIZE = 128 * MiB
BYSTANDER_AT = EXPORT_SIZE - MiB  # seeds never address this last MiB


def _opt(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", rc.IHAVEOPT, opt, len(data)) + data


def _go(name: bytes = b"", infos: tuple[int, ...] = (3,)) -> bytes:
    data = struct.pack(">I", len(name)) + name
    return _opt(rc.OPT_GO, data + struct.pack(f">H{len(infos)}H", len(infos), *infos))


def _meta(opt: int, *queries: bytes) -> bytes:
    data = struct.pack(">II", 0, len(queries))
    for q in queries:
        data += struct.pack(">I", len(q)) + q
    return _opt(opt, data)


def _req(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", rc.REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def _ext(cmd: int, offset: int, length: int, flags: int = 0, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQQ", rc.EXT_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def seeds() -> list[bytes]:
    flags = struct.pack(">I", 3)
    compact = (
        _req(rc.CMD_WRITE, 4096, 512, cookie=2) + b"\xab" * 512
        + _req(rc.CMD_READ, 0, 8192, cookie=3)
        + _req(rc.CMD_TRIM, 0, 4096, cookie=4)
        + _req(rc.CMD_WRITE_ZEROES, 8192, 4096, rc.FLAG_NO_HOLE, cookie=5)
        + _req(rc.CMD_FLUSH, 0, 0, cookie=6)
        + _req(rc.CMD_CACHE, 0, 65536, cookie=7)
    )
    return [
        flags + _go() + compact + _req(rc.CMD_DISC, 0, 0),
        flags + _opt(rc.OPT_LIST) + _opt(rc.OPT_INFO, b"\0\0\0\0\0\0") + _go(),
        flags + _opt(rc.OPT_STRUCTURED_REPLY) + _meta(rc.OPT_LIST_META)
        + _meta(rc.OPT_SET_META, b"base:allocation", b"base:") + _go() + compact
        + _req(rc.CMD_BLOCK_STATUS, 0, MiB, cookie=8)
        + _req(rc.CMD_READ, 0, 65536, rc.FLAG_DF, cookie=9),
        flags + _opt(rc.OPT_EXTENDED_HEADERS) + _meta(rc.OPT_SET_META, b"base:allocation")
        + _go()
        + _ext(rc.CMD_WRITE, 0, 512, rc.FLAG_PAYLOAD_LEN, cookie=2) + b"\xcd" * 512
        + _ext(rc.CMD_READ, 0, 4096, cookie=3)
        + _ext(rc.CMD_BLOCK_STATUS, 0, 64 * MiB, rc.FLAG_REQ_ONE, cookie=4)
        + _ext(rc.CMD_TRIM, 0, MiB, rc.FLAG_PAYLOAD_LEN, cookie=5) + b"\0" * 16,
        flags + _opt(rc.OPT_STARTTLS) + _opt(rc.OPT_ABORT),
        struct.pack(">I", 0) + _opt(rc.OPT_EXPORT_NAME) + compact,
    ]


_BOUNDARY32 = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x10000, 0x2000000, 0x2000001]
_BOUNDARY64 = [0, 1, (1 << 63), (1 << 64) - 1, EXPORT_SIZE, EXPORT_SIZE - 1]


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not buf:
            break
        kind = rng.randrange(7)
        pos = rng.randrange(len(buf))
        if kind == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[pos] = rng.randrange(256)
        elif kind == 2 and pos + 4 <= len(buf):
            buf[pos : pos + 4] = struct.pack(">I", rng.choice(_BOUNDARY32))
        elif kind == 3 and pos + 8 <= len(buf):
            buf[pos : pos + 8] = struct.pack(">Q", rng.choice(_BOUNDARY64))
        elif kind == 4:
            buf[pos:pos] = rng.randbytes(rng.randint(1, 32))
        elif kind == 5:
            del buf[pos : pos + rng.randint(1, 32)]
        else:
            end = min(len(buf), pos + rng.randint(1, 64))
            buf[pos:pos] = buf[pos:end]
    if rng.random() < 0.2:
        del buf[rng.randrange(len(buf) + 1) :]
    return bytes(buf)


def throw(server: Server, session: bytes) -> None:
    """One mutant: connect, read the greeting, send the session, read answers, hang up."""
    assert isinstance(server.address, str)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(0.25)
    try:
        s.connect(server.address)
        s.recv(18)
        s.sendall(session)
        deadline = time.monotonic() + 0.25
        while time.monotonic() < deadline:
            if not s.recv(65536):
                break
    except (TimeoutError, ConnectionError, BrokenPipeError):
        pass
    finally:
        s.close()


def test_live_fuzz_server_stays_up_and_correct(start_nbd_server: StartServer) -> None:
    server = start_nbd_server(size=EXPORT_SIZE)
    rng = random.Random(SEED)
    bystander = rc.connect(server.address, structured=True, contexts=("base:allocation",))
    pool = seeds()
    started = time.monotonic()
    cases = 0
    while cases < MAX_CASES and time.monotonic() - started < MAX_SECONDS:
        seed = rng.choice(pool)
        throw(server, mutate(rng, seed) if cases else seed)
        cases += 1
        # The well-behaved neighbour: write a fresh pattern and read it back.
        pattern = rng.randbytes(4096)
        offset = BYSTANDER_AT + (cases % 256) * 4096
        [w] = bystander.command(rc.CMD_WRITE, offset, 4096, payload=pattern, cookie=cases)
        assert w.error == 0, f"case {cases}: bystander write failed"
        assert bystander.read(offset, 4096) == pattern, f"case {cases}: bystander read back"
    assert cases >= 50, f"only {cases} cases ran in {MAX_SECONDS}s"
    [flush] = bystander.command(rc.CMD_FLUSH)
    assert flush.error == 0
    bystander.disconnect()
    assert server.alive()
    fresh = rc.connect(server.address, extended=True)
    assert len(fresh.read(0, 512)) == 512
    fresh.disconnect()
