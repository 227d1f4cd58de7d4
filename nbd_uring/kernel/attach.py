"""``nbd-uring attach``: serve an export in-process and hand the kernel the other ends.

No handshake happens on the wire: the server side of each socketpair starts in transmission on
the export, and the kernel learns what the handshake would have told it (size, transmission
flags) through netlink. The device lives until it is detached (``nbd-uring detach``, or a signal
to the attaching process), after which the kernel sends NBD_CMD_DISC on every connection and the
server returns.
"""

from __future__ import annotations

import logging
import mmap
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from nbd_uring.config import ExportConfig, ServerConfig
from nbd_uring.kernel.netlink import NbdNetlink, device_path

if TYPE_CHECKING:
    from nbd_uring.server import Server

log = logging.getLogger("nbd_uring.kernel")

MAX_CONNECTIONS = 64
DEFAULT_BLOCK_SIZE = 512


@dataclass(frozen=True, slots=True)
class AttachConfig:
    """What to attach and how. Timeouts are whole seconds, as the kernel takes them."""

    export: ExportConfig
    device: int | None = None
    connections: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE
    timeout_s: int = 0
    dead_conn_timeout_s: int | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.connections <= MAX_CONNECTIONS:
            raise ValueError(f"connections must be between 1 and {MAX_CONNECTIONS}")
        bs = self.block_size
        if bs < 512 or bs > mmap.PAGESIZE or bs & (bs - 1):
            raise ValueError(
                f"block size must be a power of two from 512 to {mmap.PAGESIZE}: {bs}"
            )
        if self.device is not None and self.device < 0:
            raise ValueError(f"not a device index: {self.device}")
        if self.timeout_s < 0 or (self.dead_conn_timeout_s or 0) < 0:
            raise ValueError("timeouts must not be negative")


def check_kernel() -> None:
    """Raise ``ModuleNotLoaded`` (or ``KernelError``) now, before any file is opened."""
    NbdNetlink().close()


async def attach(
    cfg: AttachConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Attach ``cfg.export`` to a kernel NBD device and serve it until the device is detached.

    Reports the device path through ``task_status`` once the kernel has accepted the sockets.
    SIGTERM or SIGINT detaches the device (a second one stops serving at once). Must run in the
    main thread (it installs signal handlers).
    """
    from nbd_uring.server import Server

    await trio.to_thread.run_sync(check_kernel)
    # Nothing listens: the sockets below are the only way in.
    server = Server(ServerConfig(exports=(cfg.export,), bind=None, port=0))
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await _attach_and_serve(server, cfg, signals, task_status)
    finally:
        server.close()


async def _attach_and_serve(
    server: Server,
    cfg: AttachConfig,
    signals: AsyncIterator[int],
    task_status: trio.TaskStatus[str],
) -> None:
    served = server.default_export
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(cfg.connections)]
    kernel_ends = [k for _s, k in pairs]
    server_ends = [trio.socket.from_stdlib_socket(s) for s, _k in pairs]
    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            await server.serve_connected(server_ends, task_status=task_status)
            log.info("all connections closed")
            nursery.cancel_scope.cancel()

        await nursery.start(serve)
        try:
            index = await trio.to_thread.run_sync(
                _connect, cfg, [k.fileno() for k in kernel_ends], served.info.size,
                int(served.info.flags),
            )
        finally:
            # The kernel holds its own references now (or failed and holds none).
            for k in kernel_ends:
                k.close()
        path = device_path(index)
        log.info("%s attached: %s, %d connection(s)", path, cfg.export.path, cfg.connections)
        task_status.started(path)
        nursery.start_soon(_detach_on_signals, signals, index, nursery.cancel_scope)


def _connect(cfg: AttachConfig, fds: list[int], size: int, flags: int) -> int:
    with NbdNetlink() as nl:
        return nl.connect(
            fds,
            size=size,
            block_size=cfg.block_size,
            server_flags=flags,
            index=cfg.device,
            timeout_s=cfg.timeout_s,
            dead_conn_timeout_s=cfg.dead_conn_timeout_s,
            backend=f"nbd-uring:{cfg.export.path}"[:128],
        )


def _disconnect(index: int) -> None:
    with NbdNetlink() as nl:
        nl.disconnect(index)


async def _detach_on_signals(
    signals: AsyncIterator[int], index: int, scope: trio.CancelScope
) -> None:
    detaching = False
    async for signum in signals:
        if detaching:
            log.warning("%s again: closing the connections now", signal.Signals(signum).name)
            scope.cancel()
            return
        log.info("%s received, detaching %s", signal.Signals(signum).name, device_path(index))
        detaching = True
        await trio.to_thread.run_sync(_disconnect, index)
