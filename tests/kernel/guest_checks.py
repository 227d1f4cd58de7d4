"""Checks that run as root inside the qemu guest (see vm.py), one boot for all of them.

Usage (in the guest): ``python guest_checks.py RESULTS.json CHECK...``. Each check runs in turn;
its outcome (ok, seconds, error text) is appended to the results file, which the pytest tests
on the host read. Commands and their output go to stdout (the job log).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
NBD_URING = str(BIN / "nbd-uring")
WORK = Path("/tmp/nbdu")
MNT = Path("/mnt/nbdu")
IMAGE_SIZE = 256 << 20
PORT = 10809
MiB = 1 << 20

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def log(text: str) -> None:
    print(text, flush=True)


def sh(
    *cmd: str, timeout: float = 300, check: bool = True, quiet: bool = False
) -> subprocess.CompletedProcess[str]:
    log("+ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    out = (proc.stdout + proc.stderr).strip()
    if out and not (quiet and proc.returncode == 0):
        log(out[-4000:])
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}: {out[-1500:]}")
    return proc


def new_image(name: str, size: int = IMAGE_SIZE, mode: int = 0o644) -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / name
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    path.chmod(mode)
    return path


# -- servers ------------------------------------------------------------------------------


@contextmanager
def nbd_uring_server(image: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``nbd-uring serve`` until the block ends; it must then exit 0 on SIGTERM."""
    errlog = open(WORK / f"serve-{image.name}.log", "w")
    cmd = [NBD_URING, "serve", str(image), "--print-uri", "-v", *args]
    log("+ " + " ".join(cmd) + " &")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri:
            raise AssertionError(f"the server did not start: {_read(errlog.name)}")
        log(f"  serving {uri}")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        errlog.close()
        text = _read(errlog.name)
        if "Traceback" in text:
            raise AssertionError(f"the server logged a traceback:\n{text[-3000:]}")
        if rc != 0:
            raise AssertionError(f"the server exited {rc}:\n{text[-3000:]}")


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


@contextmanager
def nbd_client(*args: str, device: str = "/dev/nbd0") -> Iterator[str]:
    """Connect ``device`` with Debian's nbd-client (netlink) and disconnect it afterwards."""
    load_nbd()
    sh("nbd-client", *args, device, timeout=60)
    try:
        wait_for_size(device)
        yield device
    finally:
        sh("nbd-client", "-d", device, timeout=60)
        wait_released(device)


def wait_for_size(device: str, timeout: float = 30) -> int:
    size_file = Path("/sys/block") / Path(device).name / "size"
    deadline = time.monotonic() + timeout
    while True:
        sectors = int(size_file.read_text())
        if sectors:
            return sectors * 512
        if time.monotonic() > deadline:
            raise AssertionError(f"{device} still has size 0 after {timeout} s")
        time.sleep(0.05)


def wait_released(device: str, timeout: float = 30) -> None:
    pid_file = Path("/sys/block") / Path(device).name / "pid"
    deadline = time.monotonic() + timeout
    while pid_file.exists() or int((pid_file.parent / "size").read_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{device} was not released within {timeout} s")
        time.sleep(0.05)


# -- what every device goes through -------------------------------------------------------


def ext4_cycle(device: str, files: int = 300) -> None:
    """mkfs, write files with known checksums, sync, umount, fsck, mount, verify, umount."""
    sh("mkfs.ext4", "-q", "-F", device)
    MNT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(device + str(files))
    sums: dict[str, str] = {}
    sh("mount", device, str(MNT))
    try:
        for i in range(files):
            data = rng.randbytes(rng.randrange(1, 48 * 1024))
            name = f"d{i % 10}/f{i}"
            (MNT / name).parent.mkdir(exist_ok=True)
            (MNT / name).write_bytes(data)
            sums[name] = hashlib.sha256(data).hexdigest()
        sh("sync")
    finally:
        sh("umount", str(MNT))
    sh("fsck.ext4", "-f", "-n", device)
    sh("mount", device, str(MNT))
    try:
        sh("sh", "-c", "echo 3 > /proc/sys/vm/drop_caches")
        bad = [n for n, s in sums.items() if _sha256(MNT / n) != s]
        assert not bad, f"{len(bad)} of {files} files read back wrong, e.g. {bad[:3]}"
    finally:
        sh("umount", str(MNT))
    log(f"  ext4 on {device}: {files} files verified")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def discard_reads_zeros(device: str, offset: int = 200 * MiB, length: int = 4 * MiB) -> None:
    """Fill a range with data, blkdiscard it, read it back (O_DIRECT): all zeros."""
    data = random.Random(offset).randbytes(length)
    fd = os.open(device, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert _read_direct(device, offset, length) == data, "data written before the discard is wrong"
    sh("blkdiscard", "-o", str(offset), "-l", str(length), device)
    back = _read_direct(device, offset, length)
    nonzero = len(back) - back.count(0)
    assert nonzero == 0, f"{nonzero} non-zero bytes in the discarded range"
    log(f"  blkdiscard {length} bytes at {offset}: reads back as zeros")


def _read_direct(device: str, offset: int, length: int) -> bytes:
    import mmap

    buf = mmap.mmap(-1, length)
    fd = os.open(device, os.O_RDONLY | os.O_DIRECT)
    try:
        n = os.preadv(fd, [buf], offset)
    finally:
        os.close(fd)
    assert n == length, f"short read: {n} of {length}"
    return bytes(buf)


def device_cycle(device: str) -> None:
    ext4_cycle(device)
    discard_reads_zeros(device)


# -- checks -------------------------------------------------------------------------------


@check
def attach_without_module() -> None:
    """Before `modprobe nbd`: attach, list and detach fail with the clear sentence."""
    image = new_image("nomod.img", 16 * MiB)
    assert not Path("/sys/module/nbd").exists(), "nbd is already loaded"
    for args in (["attach", str(image)], ["list"]):
        proc = sh(NBD_URING, *args, check=False)
        assert proc.returncode == 1, f"{args[0]}: exit {proc.returncode}"
        assert "'nbd' module is not loaded" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


def load_nbd() -> None:
    # The kernel's own module requests would run /sbin/modprobe outside our chroot: load here.
    if not Path("/sys/module/nbd").exists():
        sh("modprobe", "-a", "ext4", "crc32c_generic")
        sh("modprobe", "nbd", "nbds_max=8")


@check
def nbd_client_tcp() -> None:
    image = new_image("tcp.img")
    with nbd_uring_server(image, "--port", str(PORT)):
        with nbd_client("127.0.0.1", str(PORT), "-N", "", "-b", "4096") as dev:
            device_cycle(dev)


@check
def nbd_client_unix() -> None:
    image = new_image("unix.img")
    sock = WORK / "nbd.sock"
    with nbd_uring_server(image, "--unix", str(sock)):
        with nbd_client("-u", str(sock), "-N", "") as dev:
            device_cycle(dev)


@check
def nbd_client_multiconn() -> None:
    image = new_image("multi.img")
    with nbd_uring_server(image, "--port", str(PORT)):
        with nbd_client("127.0.0.1", str(PORT), "-N", "", "-C", "4", "-b", "4096") as dev:
            device_cycle(dev)


def _flushes(device: str) -> int:
    fields = (Path("/sys/block") / Path(device).name / "stat").read_text().split()
    return int(fields[15])  # flush requests completed (Documentation/block/stat.rst)


@check
def fio_verify() -> None:
    """fio with crc32c verification: random writes then reads, fsync=1, and O_DSYNC (FUA)."""
    image = new_image("fio.img")
    common = ["--filename=/dev/nbd0", "--direct=1", "--ioengine=io_uring", "--verify=crc32c",
              "--verify_fatal=1", "--group_reporting", "--randrepeat=1"]
    with nbd_uring_server(image, "--port", str(PORT)):
        with nbd_client("127.0.0.1", str(PORT), "-N", "") as dev:
            fua = Path("/sys/block/nbd0/queue/fua").read_text().strip()
            assert fua == "1", f"the kernel does not see FUA (queue/fua={fua})"
            rand = ["--name=randwrite", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                    "--size=32m", "--offset=0"]
            sh("fio", *common, *rand)
            sh("fio", *common, *rand, "--verify_only")  # read it all back once more
            before = _flushes(dev)
            sh("fio", *common, "--name=fsync", "--rw=randwrite", "--bs=16k", "--iodepth=1",
               "--size=4m", "--offset=64m", "--fsync=1")
            flushed = _flushes(dev) - before
            assert flushed > 0, "fsync=1 sent no flush to the device"
            sh("fio", *common, "--name=dsync", "--rw=write", "--bs=64k", "--iodepth=4",
               "--size=8m", "--offset=96m", "--sync=dsync")
            log(f"  fio: verified; {flushed} flushes from fsync=1")


def _attach(*args: str) -> str:
    proc = sh(NBD_URING, "attach", *args, timeout=60)
    device = proc.stdout.strip()
    assert re.fullmatch(r"/dev/nbd\d+", device), f"attach printed {device!r}"
    return device


def _list() -> dict[str, str]:
    out = sh(NBD_URING, "list", "--all").stdout
    return dict(line.split("\t") for line in out.splitlines())


def _attach_processes() -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmdline = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"attach" in cmdline and any(b"nbd-uring" in a for a in cmdline):
                found.append(int(p.name))
    return found


@check
def attach_one_connection() -> None:
    """Foreground attach, 1 connection: ext4 cycle; detach ends the serving process (exit 0)."""
    load_nbd()
    image = new_image("attach1.img")
    errlog = open(WORK / "attach1.log", "w")
    cmd = [NBD_URING, "attach", "--foreground", "-v", str(image)]
    log("+ " + " ".join(cmd) + " &")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True)
    try:
        assert proc.stdout is not None
        device = proc.stdout.readline().strip()
        assert device.startswith("/dev/nbd"), f"attach printed {device!r}: {_read(errlog.name)}"
        assert wait_for_size(device) == IMAGE_SIZE
        assert _list().get(device) == "connected"
        device_cycle(device)
        sh(NBD_URING, "detach", device)
        rc = proc.wait(timeout=30)
        assert rc == 0, f"attach exited {rc}: {_read(errlog.name)}"
        assert _list().get(device) == "disconnected"
        wait_released(device)
    finally:
        if proc.poll() is None:
            proc.kill()
        errlog.close()
    text = _read(errlog.name)
    assert "Traceback" not in text, text


@check
def attach_four_connections() -> None:
    """Background attach on a chosen device, 4 connections, 4 KiB blocks; detach releases it."""
    load_nbd()
    image = new_image("attach4.img")
    device = _attach("-C", "4", "-b", "4096", "--device", "/dev/nbd3", str(image))
    assert device == "/dev/nbd3", device
    assert wait_for_size(device) == IMAGE_SIZE
    bs = Path("/sys/block/nbd3/queue/logical_block_size").read_text().strip()
    assert bs == "4096", f"logical block size {bs}"
    assert _list().get(device) == "connected"
    assert _attach_processes(), "no serving process in the background"
    # A second attach to the same device is refused with a clear error.
    busy = sh(NBD_URING, "attach", "--device", device, str(image), check=False)
    assert busy.returncode == 1 and "already" in busy.stderr, busy.stderr
    device_cycle(device)
    sh(NBD_URING, "detach", device)
    wait_released(device)
    assert _list().get(device) == "disconnected"
    deadline = time.monotonic() + 20
    while _attach_processes():
        assert time.monotonic() < deadline, "the serving process outlived the detach"
        time.sleep(0.1)


@check
def attach_read_only_sigterm() -> None:
    """A read-only attach serves reads and refuses writes; SIGTERM to it detaches the device."""
    load_nbd()
    image = new_image("ro.img", 16 * MiB)
    data = random.Random(7).randbytes(MiB)
    with open(image, "r+b") as f:
        f.write(data)
    errlog = open(WORK / "attach-ro.log", "w")
    cmd = [NBD_URING, "attach", "--foreground", "--read-only", str(image)]
    log("+ " + " ".join(cmd) + " &")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errlog, text=True)
    try:
        assert proc.stdout is not None
        device = proc.stdout.readline().strip()
        assert device.startswith("/dev/nbd"), f"attach printed {device!r}: {_read(errlog.name)}"
        wait_for_size(device)
        ro = (Path("/sys/block") / Path(device).name / "ro").read_text().strip()
        assert ro == "1", f"{device} is not read-only (ro={ro})"
        assert _read_direct(device, 0, MiB) == data, "read-only device reads back wrong data"
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 4096, 0)
        except OSError as exc:
            log(f"  writing to {device}: {exc.strerror} (as expected)")
        else:
            raise AssertionError(f"a write to read-only {device} succeeded")
        finally:
            os.close(fd)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        assert rc == 0, f"attach exited {rc} after SIGTERM: {_read(errlog.name)}"
        wait_released(device)
    finally:
        if proc.poll() is None:
            proc.kill()
        errlog.close()
    assert "Traceback" not in _read(errlog.name), _read(errlog.name)


@check
def attach_not_root() -> None:
    load_nbd()
    image = new_image("nonroot.img", 16 * MiB, mode=0o666)
    proc = sh("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
              NBD_URING, "attach", str(image), check=False)
    assert proc.returncode == 1, proc.returncode
    assert "permission denied" in proc.stderr and "root" in proc.stderr, proc.stderr


# -- the nbdkit ratio (not run by default) ------------------------------------------------


def _fio_randread_iops(runtime: int) -> float:
    proc = sh("fio", "--name=randread", "--filename=/dev/nbd0", "--direct=1",
              "--ioengine=io_uring", "--rw=randread", "--bs=4k", "--iodepth=16",
              "--size=128m", f"--runtime={runtime}", "--time_based", "--output-format=json",
              quiet=True)
    out = proc.stdout
    data = json.loads(out[out.index("{"):])
    return float(data["jobs"][0]["read"]["iops"])


@check
def bench_ratio() -> None:
    """fio 4k random read QD16 on /dev/nbd0, nbd-uring vs nbdkit (file plugin), interleaved."""
    load_nbd()
    image = new_image("bench.img")
    sh("dd", "if=/dev/urandom", f"of={image}", "bs=1M", "count=128", "conv=notrunc")
    runtime = int(os.environ.get("NBDU_BENCH_RUNTIME", "15"))
    rounds = int(os.environ.get("NBDU_BENCH_ROUNDS", "3"))
    results: dict[str, list[float]] = {"nbd-uring": [], "nbdkit": []}
    for _ in range(rounds):
        with nbd_uring_server(image, "--port", str(PORT)):
            with nbd_client("127.0.0.1", str(PORT), "-N", ""):
                results["nbd-uring"].append(_fio_randread_iops(runtime))
        port = str(PORT + 1)
        kit = subprocess.Popen(["nbdkit", "-f", "-p", port, "-i", "127.0.0.1", "file",
                                str(image)])
        try:
            time.sleep(1.0)
            with nbd_client("127.0.0.1", port, "-N", ""):
                results["nbdkit"].append(_fio_randread_iops(runtime))
        finally:
            kit.terminate()
            kit.wait(timeout=30)
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    ratio = med["nbd-uring"] / med["nbdkit"]
    log(f"  BENCH {json.dumps(results)} median ratio nbd-uring/nbdkit = {ratio:.2f}")
    (Path.cwd() / "bench.json").write_text(json.dumps({"iops": results, "ratio": ratio}))


def main(argv: list[str]) -> int:
    results_path = Path(argv[0])
    results: list[dict[str, object]] = []
    for name in argv[1:]:
        log(f"==== {name}")
        start = time.monotonic()
        error = None
        try:
            CHECKS[name]()
        except BaseException as exc:  # report every failure, including timeouts
            error = f"{type(exc).__name__}: {exc}"
            log(traceback.format_exc())
        seconds = time.monotonic() - start
        log(f"==== {name}: {'ok' if error is None else 'FAILED'} in {seconds:.1f} s")
        results.append({"name": name, "ok": error is None, "seconds": seconds, "error": error})
        results_path.write_text(json.dumps(results, indent=1))
        # Whatever a failed check left behind must not break the next one.
        if error is not None:
            subprocess.run(["umount", str(MNT)], capture_output=True, check=False)
            for i in range(8):
                subprocess.run(["nbd-client", "-d", f"/dev/nbd{i}"], capture_output=True,
                               check=False)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
