"""The power-cut test's guest side (see test_power_cut.py): two boots on one virtio disk.

``python power_cut_guest.py write OUTDIR`` (boot 1): mkfs.ext4 /dev/vda, mount it, serve one
sparse file per case from one nbd-uring process (a configuration file, one export per case with
its own durability level), and run one client per case, all at once. Every reply is logged in
``OUTDIR/acks-CASE.log`` (on the 9p share, flushed and fsynced record by record) with what it
promised. Once every case has enough replies, the guest resets itself with sysrq-b right after
the ``flush-only`` case's next FLUSH reply is logged: no sync, no unmount, the server running
and writes in flight on every connection.

``python power_cut_guest.py check OUTDIR`` (boot 2): mount /dev/vda (the journal is replayed),
read every export file, compare each promised block with the acks, fsck, and write
``OUTDIR/verdict.json``.

Ack log records, one line each, written only after the reply was read from the socket:

* ``W SERIAL BLOCK FUA`` -- the write of payload(case, BLOCK, SERIAL) was replied to (FUA 0/1).
* ``F N`` -- a FLUSH was replied to; it was sent after the first N ``W`` records of this log.

What is promised (the block must hold that write, or a later write to it: serials grow per
case and a client never has two writes to one block in flight at once):

* a FUA write's reply: that write;
* a FLUSH reply: every write of the first N ``W`` records;
* ``sync`` durability, and the ``unsafe`` control: every replied write. The control serves in
  ``flush`` mode and sends neither FUA nor FLUSH, so its promises are false: it shows that the
  reset drops the guest's page cache and that the check notices.

Any fdatasync of a file makes every write to it completed so far durable, so in the ``mix``
case a FUA write also covers the plain writes before it, and a FLUSH the FUA writes: a server
whose FLUSH (or FUA) did nothing could still pass there. Hence the cases that use one mechanism
each: ``flush-only`` (plain writes and FLUSH), ``fua-only`` (plain and FUA writes, promises for
the FUA ones) and ``sync`` (plain writes only, every reply promised).
"""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent
NBD_URING = str(BIN / "nbd-uring")
DISK = "/dev/vda"
MNT = Path("/mnt/powercut")
BLOCK = 4096
BLOCKS = 1024  # 4 MiB per export: small enough that blocks are rewritten
QD = 8
MIN_REPLIES = 150  # per case, before the reset may happen
MIN_SECONDS = 4.0  # of workload before the reset may happen
MAX_SECONDS = 90.0  # reset anyway (and say so) if the workload is this slow
IO_TIMEOUT = 60.0

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_GO = 7
REP_ACK = 1
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_WRITE, CMD_FLUSH = 1, 3
CMD_FLAG_FUA = 1


@dataclass(frozen=True)
class Case:
    name: str
    ident: int
    durability: str
    fua_every: int  # every n-th write has FUA (0: never)
    flush_every: int  # a FLUSH after every n-th write (0: never)
    promise_every_reply: bool
    asserted: bool  # the host asserts nothing promised was lost


CASES = [
    Case("mix", 1, "flush", 5, 16, False, True),
    Case("flush-only", 2, "flush", 0, 16, False, True),
    Case("fua-only", 3, "flush", 4, 0, False, True),
    Case("sync", 4, "sync", 0, 0, True, True),
    Case("writeback", 5, "writeback", 5, 16, False, False),
    Case("unsafe", 6, "flush", 0, 0, True, False),
]
TRIGGER = "flush-only"  # the case whose FLUSH replies may trigger the reset
SOCKET = "/tmp/powercut.sock"


def log(text: str) -> None:
    print(f"[{time.monotonic():9.2f}] {text}", flush=True)


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    log("+ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if out:
        log(out[-3000:])
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {out[-1500:]}")
    return proc


def payload(case: Case, block: int, serial: int) -> bytes:
    head = struct.pack(">4sIIQ", b"PCUT", case.ident, block, serial)
    return (head * (BLOCK // len(head) + 1))[:BLOCK]


def image(case: Case) -> Path:
    return MNT / f"{case.name}.img"


def ack_log(out: Path, case: Case) -> Path:
    return out / f"acks-{case.name}.log"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(n - len(buf))
        if not got:
            raise EOFError(f"server closed the connection ({len(buf)} of {n} bytes)")
        buf += got
    return bytes(buf)


def connect(path: str, export: str) -> socket.socket:
    """Fixed newstyle, NO_ZEROES, NBD_OPT_GO on ``export``; simple replies."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(IO_TIMEOUT)
    sock.connect(path)
    magic, opt_magic, _ = struct.unpack(">QQH", recv_exact(sock, 18))
    assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT), (hex(magic), hex(opt_magic))
    sock.sendall(struct.pack(">I", 3))
    name = export.encode()
    go = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(go)) + go)
    while True:
        magic, _, rtype, length = struct.unpack(">QIII", recv_exact(sock, 20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        data = recv_exact(sock, length)
        assert not rtype & (1 << 31), f"NBD_OPT_GO failed: {rtype:#x} {data!r}"
        if rtype == REP_ACK:
            return sock


# -- boot 1 -------------------------------------------------------------------------------


@dataclass
class Client:
    case: Case
    sock: socket.socket
    log_fd: int
    replies: int = 0  # W records logged
    errors: list[str] = field(default_factory=list)

    def record(self, line: str) -> None:
        os.write(self.log_fd, line.encode())
        os.fsync(self.log_fd)


class Workload:
    def __init__(self, clients: list[Client]) -> None:
        self.clients = clients
        self.start = time.monotonic()
        self.failed = threading.Event()
        self.lock = threading.Lock()

    def ready(self) -> bool:
        return time.monotonic() - self.start >= MIN_SECONDS and all(
            c.replies >= MIN_REPLIES for c in self.clients
        )

    def reset(self, why: str) -> None:
        with self.lock:  # one reset; the other threads may be anywhere
            summary = ", ".join(f"{c.case.name}: {c.replies} replies" for c in self.clients)
            log(f"sysrq-b ({why}) after {time.monotonic() - self.start:.1f} s; {summary}")
            with open("/proc/sysrq-trigger", "w") as f:
                f.write("b")
            time.sleep(60)  # not reached
            raise AssertionError("sysrq-b did not reset the guest")

    def run_client(self, client: Client, seed: str) -> None:
        try:
            self._loop(client, random.Random(seed))
        except BaseException as exc:
            client.errors.append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            self.failed.set()

    def _loop(self, client: Client, rng: random.Random) -> None:
        case, sock = client.case, client.sock
        in_flight: dict[int, tuple[int, int, bool]] = {}  # cookie -> block, serial, fua
        flushes: dict[int, int] = {}  # cookie -> W records logged when it was sent
        busy: set[int] = set()
        serial = cookie = 0
        while not self.failed.is_set():
            while len(in_flight) + len(flushes) < QD:
                block = rng.randrange(BLOCKS)
                if block in busy:
                    continue
                serial += 1
                cookie += 1
                fua = bool(case.fua_every) and serial % case.fua_every == 0
                header = struct.pack(
                    ">IHHQQI", REQUEST_MAGIC, CMD_FLAG_FUA if fua else 0, CMD_WRITE,
                    cookie, block * BLOCK, BLOCK,
                )
                sock.sendall(header + payload(case, block, serial))
                in_flight[cookie] = (block, serial, fua)
                busy.add(block)
                if case.flush_every and serial % case.flush_every == 0:
                    cookie += 1
                    sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_FLUSH, cookie, 0, 0))
                    flushes[cookie] = client.replies
            magic, error, got = struct.unpack(">IIQ", recv_exact(sock, 16))
            assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
            assert error == 0, f"{case.name}: request {got} failed with error {error}"
            if got in flushes:
                client.record(f"F {flushes.pop(got)}\n")
                if case.name == TRIGGER and self.ready():
                    self.reset("right after a FLUSH reply")
                continue
            block, ser, fua = in_flight.pop(got)
            busy.discard(block)
            client.record(f"W {ser} {block} {int(fua)}\n")
            client.replies += 1


def write_phase(out: Path) -> int:
    sh("modprobe", "-a", "virtio_blk", "ext4", "crc32c_generic")
    sh("mkfs.ext4", "-q", "-F", DISK)
    MNT.mkdir(parents=True, exist_ok=True)
    sh("mount", DISK, str(MNT))
    for case in CASES:
        with open(image(case), "wb") as f:
            f.truncate(BLOCKS * BLOCK)
        ack_log(out, case).unlink(missing_ok=True)
    os.sync()  # the empty files exist before the test; what follows is never synced
    sh("sh", "-c", "cat /proc/sys/vm/dirty_expire_centisecs /proc/sys/vm/dirty_background_ratio")

    config = out / "serve.toml"
    config.write_text(
        f'[server]\nunix = "{SOCKET}"\n'
        + "".join(
            f'\n[exports."{c.name}"]\npath = "{image(c)}"\ndurability = "{c.durability}"\n'
            for c in CASES
        )
    )
    cmd = [NBD_URING, "serve", "-c", str(config), "--print-uri", "-v"]
    log("+ " + " ".join(cmd) + " &")
    errlog = open(out / "serve.log", "w")
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True)
    assert server.stdout is not None
    uri = server.stdout.readline().strip()
    assert uri, "the server did not start (see serve.log)"
    log(f"serving {uri}: " + ", ".join(f"{c.name} ({c.durability})" for c in CASES))

    clients = []
    for case in CASES:
        fd = os.open(ack_log(out, case), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        clients.append(Client(case, connect(SOCKET, case.name), fd))
    work = Workload(clients)
    threads = [
        threading.Thread(target=work.run_client, args=(c, f"power-cut-{c.case.name}"), daemon=True)
        for c in clients
    ]
    for t in threads:
        t.start()
    log("workload started")
    if work.failed.wait(MAX_SECONDS):
        for c in clients:
            for e in c.errors:
                log(f"{c.case.name}: {e}")
        (out / "boot1-error.txt").write_text(
            "\n".join(f"{c.case.name}: {e}" for c in clients for e in c.errors)
        )
        return 1
    work.reset(f"timeout: not ready after {MAX_SECONDS:.0f} s")
    return 1


# -- boot 2 -------------------------------------------------------------------------------


def promised(lines: list[str], case: Case) -> tuple[dict[int, int], dict[str, int]]:
    """Block -> the serial it must hold at least, from one ack log; and counts."""
    writes: list[tuple[int, int]] = []  # (block, serial) of W records, in order
    must: dict[int, int] = {}
    counts = {"replies": 0, "fua_replies": 0, "flush_replies": 0}

    def promise(block: int, serial: int) -> None:
        must[block] = max(must.get(block, 0), serial)

    for line in lines:
        word = line.split()
        if word[0] == "W":
            serial, block, fua = int(word[1]), int(word[2]), word[3] == "1"
            writes.append((block, serial))
            counts["replies"] += 1
            counts["fua_replies"] += fua
            if fua or case.promise_every_reply:
                promise(block, serial)
        elif word[0] == "F":
            counts["flush_replies"] += 1
            for block, serial in writes[: int(word[1])]:
                promise(block, serial)
        else:
            raise AssertionError(f"bad ack record {line!r}")
    return must, counts


def holds(data: bytes, case: Case, block: int) -> int | None:
    """The serial of the write whose payload fills ``data`` entirely, or None (zeros, other)."""
    magic, ident, blk, serial = struct.unpack_from(">4sIIQ", data)
    if magic != b"PCUT" or ident != case.ident or blk != block:
        return None
    return serial if data == payload(case, block, serial) else None


def check_case(out: Path, case: Case) -> dict[str, object]:
    text = ack_log(out, case).read_text() if ack_log(out, case).exists() else ""
    lines = text.splitlines(keepends=True)
    complete = [ln for ln in lines if ln.endswith("\n")]  # a torn last record promised nothing
    must, counts = promised(complete, case)
    data = image(case).read_bytes() if image(case).exists() else b""
    lost: list[dict[str, object]] = []
    for block, serial in sorted(must.items()):
        chunk = data[block * BLOCK : (block + 1) * BLOCK]
        found = holds(chunk, case, block) if len(chunk) == BLOCK else None
        if found is None or found < serial:
            what = "zeros" if chunk == bytes(len(chunk)) else (
                f"serial {found}" if found is not None else "other data"
            )
            lost.append({"block": block, "promised": serial, "found": what})
    return {
        "case": case.name,
        "durability": case.durability,
        "asserted": case.asserted,
        **counts,
        "promised_blocks": len(must),
        "lost_blocks": len(lost),
        "lost_examples": lost[:10],
        "file_size": len(data),
    }


def check_phase(out: Path) -> int:
    sh("modprobe", "-a", "virtio_blk", "ext4", "crc32c_generic")
    MNT.mkdir(parents=True, exist_ok=True)
    sh("mount", DISK, str(MNT))
    sh("sh", "-c", "dmesg | grep -i 'ext4\\|jbd2' | tail -n 5", check=False)
    try:
        verdict: dict[str, object] = {"cases": [check_case(out, c) for c in CASES]}
    finally:
        sh("umount", str(MNT))
    fsck = sh("fsck.ext4", "-f", "-n", DISK, check=False)
    verdict["fsck_status"] = fsck.returncode
    verdict["fsck_output"] = (fsck.stdout + fsck.stderr)[-2000:]
    (out / "verdict.json").write_text(json.dumps(verdict, indent=1))
    for c in verdict["cases"]:  # type: ignore[attr-defined]
        log(json.dumps(c))
    return 0


def main(argv: list[str]) -> int:
    phase, out = argv[0], Path(argv[1])
    log(f"power cut, phase {phase}")
    return write_phase(out) if phase == "write" else check_phase(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
