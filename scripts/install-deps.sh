#!/usr/bin/env bash
# Install the system packages nbd-uring builds against and tests with (Debian/Ubuntu).
# Idempotent: when every package is already installed it does nothing (no apt-get update).
set -euo pipefail

PACKAGES=(
    build-essential     # C compiler for the cffi extension
    liburing-dev        # io_uring headers and library
    python3-dev
    python3-venv
    python3-libnbd      # `import nbd` for the integration tests (system python3 only)
    libnbd-bin          # nbdinfo, nbdcopy, nbdsh
    nbdkit              # reference server for the tests and the benchmark
    qemu-utils          # qemu-img, qemu-io, qemu-nbd
    qemu-block-extra    # qemu-nbd --aio=io_uring for the benchmark (a Recommends of qemu-utils)
    fio                 # fio with the nbd ioengine
    nbd-server
    nbd-client
    systemd             # systemd-socket-activate for the socket-activation test
    openssl             # certificates made by tests/integration/test_tls.py
    # tests/kernel: the kernel NBD client in a qemu TCG guest (which also downloads Debian's
    # kernel package with apt-get download, into /var/cache/nbd-uring-vm)
    qemu-system-x86     # qemu-system-x86_64
    busybox-static      # the guest's initramfs
    kmod                # depmod for the unpacked kernel modules, modprobe in the guest
    e2fsprogs           # mkfs.ext4, fsck.ext4
)

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
else
    SUDO=(sudo)
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
    if [[ "$status" != "installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all ${#PACKAGES[@]} packages already installed"
    exit 0
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
