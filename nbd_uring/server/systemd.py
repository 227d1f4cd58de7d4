"""systemd integration without libsystemd: socket activation and sd_notify.

Both protocols are small and stable (sd_listen_fds(3), sd_notify(3)): inherited listening
sockets start at fd 3 when ``LISTEN_PID`` names this process, and readiness is one datagram to
``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("nbd_uring.systemd")

SD_LISTEN_FDS_START = 3


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """Sockets passed by systemd (or ``systemd-socket-activate``), in order; [] if none."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    finally:
        if unset_environment:
            for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                os.environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"inherited fd {fd} is not a stream socket")
        sockets.append(sock)
    return sockets


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to the service manager, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("sd_notify(%s) to %s failed: %s", state, address, exc)
        return False
    return True
