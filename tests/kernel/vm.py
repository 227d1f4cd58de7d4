"""Run a script as root inside a qemu TCG guest booted from Debian's own kernel.

The host may have no ``nbd`` module (and no usable KVM), so the kernel tests boot Debian's stock
kernel under TCG. The guest's root file system is the host's ``/``, shared read-only over
virtio-9p under an overlay with a tmpfs upper layer: every tool, the venv and the work tree are
at the same paths as on the host, and nothing the guest writes reaches the host, except in the
one writable share (the run's output folder). The guest has no network device; its servers and
clients meet on its loopback.

The cache (kernel package, its unpacked modules, the uncompressed ``vmlinux`` and an initramfs
of busybox-static plus the modules needed to reach the host) is built on first use, outside
the repository: ``$NBD_URING_VM_CACHE``, else ``/var/cache/nbd-uring-vm`` for root, else
``$XDG_CACHE_HOME/nbd-uring-vm``.

Usable from the command line too::

    python -m tests.kernel.vm prepare
    python -m tests.kernel.vm run 'modprobe nbd && ls /dev/nbd*'
"""

from __future__ import annotations

import fcntl
import lzma
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
KERNEL_META_PACKAGE = "linux-image-amd64"
# What /init loads before it can mount the host, in dependency order (modules.dep decides).
BOOT_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
CACHE_FORMAT = "5"  # bump when the layout or /init changes
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NO_STATUS = -1  # GuestRun.status of a guest that ended without the job's status file

# The guest's /init (busybox sh). Kernel command line words nbdu_*=... arrive as variables.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /lower /t /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# isa-debug-exit: qemu exits at once; reboot is the fallback (-no-reboot).
bye() { printf '\000' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null; reboot -f; }
fail() { echo "nbdu-init: $*"; bye; }
for m in $(cat /modules.list); do insmod "/modules/$m" || fail "insmod $m"; done
for i in 1 2 3 4 5 6 7 8 9 10; do
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower \
        && break
    sleep 0.2
done
grep -q ' /lower 9p ' /proc/mounts || fail "cannot mount the host's root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /t
mkdir -p /t/upper /t/work
mount -t overlay overlay \
    -o lowerdir=/lower,upperdir=/t/upper,workdir=/t/work,index=off,xino=off,redirect_dir=off \
    /newroot || fail "overlay"
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts devpts $R/dev/pts
mount -t tmpfs tmpfs $R/dev/shm
# A work tree under /tmp (a CI clone, say) stays visible under the guest's own /tmp.
if [ -n "$nbdu_keep" ]; then
    mkdir -p /t/keep && mount --bind "$R$nbdu_keep" /t/keep || fail "keep $nbdu_keep"
fi
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
if [ -n "$nbdu_keep" ]; then
    mkdir -p "$R$nbdu_keep" && mount --bind /t/keep "$R$nbdu_keep" || fail "keep $nbdu_keep"
fi
mount -t tmpfs -o mode=0755 tmpfs $R/run
mkdir -p "$R$nbdu_out" "$R/lib/modules/$(uname -r)"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 out "$R$nbdu_out" || fail "out share"
mount --bind "$R$nbdu_modules" "$R/lib/modules/$(uname -r)" || fail "modules"
ip link set lo up
hostname nbdu-guest
echo "nbdu-init: running the job"
chroot $R /usr/bin/env -i PATH=@PATH@ HOME=/root LANG=C.UTF-8 CI="$nbdu_ci" \
    /bin/sh -c "cd '$nbdu_out' && exec /bin/sh ./job.sh" </dev/null >"$R$nbdu_out/log" 2>&1
echo $? > "$R$nbdu_out/status"
sync
umount "$R$nbdu_out"
echo "nbdu-init: done"
bye
""".replace("@PATH@", GUEST_PATH)


_REPO = Path(__file__).resolve().parents[2]
_KEEP = str(_REPO) if _REPO.is_relative_to("/tmp") else ""
"""The work tree, when it lives under /tmp, which the guest mounts a tmpfs over."""


class VmError(Exception):
    """The guest could not be prepared or booted (not a failure of the job it ran)."""


@dataclass(frozen=True, slots=True)
class GuestImage:
    release: str
    vmlinux: Path
    initramfs: Path
    modules: Path  # the unpacked /lib/modules/<release> tree, bind-mounted in the guest


@dataclass(frozen=True, slots=True)
class GuestRun:
    status: int  # the job's exit status
    log: str  # the job's stdout and stderr
    console: str  # the guest's serial console
    seconds: float
    out: Path  # the run's output folder (the job's working directory in the guest)


def cache_dir() -> Path:
    env = os.environ.get("NBD_URING_VM_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/nbd-uring-vm")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "nbd-uring-vm"


def missing_tools() -> list[str]:
    """Host tools the runner needs that are not installed."""
    missing = [t for t in (QEMU, "dpkg-deb", "depmod", "apt-get") if shutil.which(t) is None]
    if _busybox() is None:
        missing.append("busybox (static)")
    return missing


def _busybox() -> str | None:
    for path in BUSYBOX_CANDIDATES:
        if os.path.exists(path):
            return path
    return None


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise VmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc  # type: ignore[no-any-return]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepare(cache: Path | None = None) -> GuestImage:
    """Build the guest image in the cache if it is not there yet; return where it is."""
    cache = cache or cache_dir()
    with _locked(cache / "lock"):
        stamp = cache / "ready"
        if stamp.exists():
            fmt, release = stamp.read_text().split()
            if fmt == CACHE_FORMAT:
                return _image(cache, release)
        missing = missing_tools()
        if missing:
            raise VmError(f"cannot build the guest image, missing: {', '.join(missing)}")
        deb = _download_kernel(cache)
        root = cache / "root"
        shutil.rmtree(root, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(deb), str(root)])
        releases = sorted(p.name for p in (root / "lib/modules").iterdir())
        if len(releases) != 1:
            raise VmError(f"expected one kernel release in {deb.name}, found {releases}")
        release = releases[0]
        _run(["depmod", "-b", str(root), release])
        vmlinuz = root / "boot" / f"vmlinuz-{release}"
        (cache / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        modules = root / "lib/modules" / release
        _write_initramfs(cache / "initramfs.cpio", modules)
        stamp.write_text(f"{CACHE_FORMAT} {release}\n")
        return _image(cache, release)


def _image(cache: Path, release: str) -> GuestImage:
    return GuestImage(
        release=release,
        vmlinux=cache / "vmlinux",
        initramfs=cache / "initramfs.cpio",
        modules=cache / "root/lib/modules" / release,
    )


def _download_kernel(cache: Path) -> Path:
    """``apt-get download`` the kernel package that linux-image-amd64 currently depends on."""
    override = os.environ.get("NBD_URING_VM_KERNEL_DEB")
    if override:
        return Path(override)
    dl = cache / "deb"
    dl.mkdir(parents=True, exist_ok=True)
    package = _kernel_package()
    if package is None and os.geteuid() == 0:
        _run(["apt-get", "update", "-q"])
        package = _kernel_package()
    if package is None:
        raise VmError(f"apt-cache knows no {KERNEL_META_PACKAGE}: run apt-get update")
    found = sorted(dl.glob(f"{package}_*.deb"))
    if not found:
        for old in dl.glob("*.deb"):
            old.unlink()
        _run(["apt-get", "download", "-q", package], cwd=str(dl))
        found = sorted(dl.glob(f"{package}_*.deb"))
    if not found:
        raise VmError(f"apt-get download {package} left no package in {dl}")
    return found[-1]


def _kernel_package() -> str | None:
    proc = subprocess.run(
        ["apt-cache", "depends", KERNEL_META_PACKAGE],
        capture_output=True, text=True, check=False,
    )
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Depends" and value.strip().startswith("linux-image-"):
            return value.strip()
    return None


def extract_vmlinux(vmlinuz: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage, so qemu can boot it through PVH."""
    for magic, decompress in (
        (b"\xfd7zXZ\x00", _unxz),
        (b"\x1f\x8b\x08", _gunzip),
    ):
        start = vmlinuz.find(magic)
        while start != -1:
            try:
                elf = decompress(vmlinuz[start:])
            except (lzma.LZMAError, zlib.error, EOFError):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf
            start = vmlinuz.find(magic, start + 1)
    raise VmError("no xz or gzip compressed ELF kernel found in vmlinuz")


def _unxz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)


def _gunzip(data: bytes) -> bytes:
    # One gzip member; whatever follows it in the bzImage is ignored.
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)


def _module_order(modules: Path, names: tuple[str, ...]) -> list[str]:
    """Paths (relative to ``modules``) of ``names`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (modules / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    by_name = {Path(t).name.split(".ko")[0].replace("-", "_"): t for t in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps[path]):  # modules.dep lists the deepest last
            visit(dep)
        order.append(path)

    for name in names:
        if name not in by_name:
            raise VmError(f"module {name} not found in {modules}/modules.dep")
        visit(by_name[name])
    return order


def _write_initramfs(target: Path, modules: Path) -> None:
    busybox = _busybox()
    assert busybox is not None
    order = _module_order(modules, BOOT_MODULES)
    w = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "modules", "lower", "t", "newroot"):
        w.directory(d)
    w.device("dev/console", 5, 1)
    w.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
    w.file("init", INIT_SCRIPT.encode(), 0o755)
    w.file("modules.list", "".join(Path(p).name + "\n" for p in order).encode(), 0o644)
    for p in order:
        w.file(f"modules/{Path(p).name}", (modules / p).read_bytes(), 0o644)
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(w.finish())
    tmp.replace(target)


class _Cpio:
    """A "newc" cpio archive, as the kernel unpacks initramfs images."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        encoded = name.encode() + b"\0"
        fields = [
            self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        ]
        self._ino += 1
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._parts.append(_pad(header + encoded))
        self._parts.append(_pad(data))

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def run(
    job: str,
    *,
    image: GuestImage | None = None,
    timeout_s: float = 600,
    memory_mb: int = 1536,
    cpus: int = 2,
    out: Path | None = None,
    drives: Sequence[Path] = (),
    allow_no_status: bool = False,
) -> GuestRun:
    """Boot the guest, run ``job`` (a /bin/sh script) as root in it, and return what happened.

    The job runs in the output folder (``out``, a new temporary folder by default), shared
    read-write with the host, so it can leave files there for the caller.

    ``drives`` are host files attached in order as raw virtio disks (``/dev/vda``, ``/dev/vdb``,
    ...) with ``cache=none``: what the guest has written to them when qemu exits is in the file.
    ``allow_no_status`` accepts a guest that ends without the job's status file (a job that
    resets the guest on purpose); the run's ``status`` is then ``NO_STATUS``.
    """
    image = image or prepare()
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="nbd-uring-vm-"))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("status", "log"):
        (out / name).unlink(missing_ok=True)
    (out / "job.sh").write_text(job)
    console = out / "console.log"
    append = " ".join(
        [
            "console=ttyS0",
            "quiet",
            "panic=-1",
            "tsc=reliable",
            "clocksource=tsc",
            "mitigations=off",
            f"nbdu_out={out}",
            f"nbdu_modules={image.modules}",
            f"nbdu_ci={os.environ.get('CI', '')}",
            f"nbdu_keep={_KEEP}",
        ]
    )
    cmd = [
        QEMU,
        "-accel", "tcg,thread=multi",
        "-cpu", "max",
        "-smp", str(cpus),
        "-m", str(memory_mb),
        "-nodefaults", "-nic", "none", "-display", "none", "-no-reboot",
        "-serial", f"file:{console}",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(image.vmlinux),
        "-initrd", str(image.initramfs),
        "-append", append,
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=out,path={out},security_model=none",
        "-device", "virtio-9p-pci,fsdev=out,mount_tag=out",
    ]
    for drive in drives:
        cmd += ["-drive", f"file={drive},format=raw,if=virtio,cache=none"]
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise VmError(
            f"the guest did not finish within {timeout_s:.0f} s; console:\n"
            + _tail(console)
            + "\njob log:\n"
            + _tail(out / "log")
        ) from None
    seconds = time.monotonic() - start
    status_file = out / "status"
    if not status_file.exists() and allow_no_status:
        return GuestRun(
            status=NO_STATUS,
            log=_tail(out / "log", chars=1 << 30),
            console=_tail(console, chars=1 << 30),
            seconds=seconds,
            out=out,
        )
    if not status_file.exists():
        raise VmError(
            f"the guest ended (qemu status {proc.returncode}: {proc.stderr.strip()}) without "
            f"running the job to its end; console:\n{_tail(console)}\n"
            f"job log:\n{_tail(out / 'log')}"
        )
    return GuestRun(
        status=int(status_file.read_text().strip() or "255"),
        log=(out / "log").read_text(errors="replace"),
        console=console.read_text(errors="replace"),
        seconds=seconds,
        out=out,
    )


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(none)"


def main(argv: list[str]) -> int:
    if argv[:1] == ["prepare"]:
        print(prepare())
        return 0
    if len(argv) == 2 and argv[0] == "run":
        result = run(argv[1])
        sys.stdout.write(result.log)
        print(f"[guest: status {result.status}, {result.seconds:.1f} s]", file=sys.stderr)
        return result.status
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
