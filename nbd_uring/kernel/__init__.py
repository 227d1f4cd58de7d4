"""Kernel /dev/nbdX devices backed by this server: attach, detach and list through netlink.

Importing this package needs pyroute2; nothing else in nbd_uring imports it.
"""

from nbd_uring.kernel.attach import AttachConfig, attach, check_kernel
from nbd_uring.kernel.netlink import (
    DeviceStatus,
    KernelError,
    ModuleNotLoaded,
    NbdNetlink,
    device_path,
    parse_device,
)

__all__ = [
    "AttachConfig",
    "DeviceStatus",
    "KernelError",
    "ModuleNotLoaded",
    "NbdNetlink",
    "attach",
    "check_kernel",
    "device_path",
    "parse_device",
]
