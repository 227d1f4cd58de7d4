"""The kernel NBD client's generic netlink family ("nbd"), through pyroute2.

The kernel takes already-negotiated stream sockets (``NBD_ATTR_SOCKETS``, one per connection)
plus what the handshake would have told it: size, block size and the transmission flags. The
socket fds are plain numbers here: the kernel looks them up in the calling process's fd table
(``sockfd_lookup``) and keeps its own reference, so the caller may close its copies afterwards.

Every call is blocking; Trio code runs them with ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, genlmsg, nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic import AsyncGenericNetlinkSocket, GenericNetlinkSocket

# include/uapi/linux/nbd-netlink.h
NBD_GENL_FAMILY_NAME = "nbd"
NBD_GENL_VERSION = 1

NBD_CMD_CONNECT = 1
NBD_CMD_DISCONNECT = 2
NBD_CMD_RECONFIGURE = 3
NBD_CMD_STATUS = 5

NBD_CFLAG_DESTROY_ON_DISCONNECT = 1 << 0
NBD_CFLAG_DISCONNECT_ON_CLOSE = 1 << 1

DEVICE_PATH = re.compile(r"(?:/dev/)?(?:nbd)?(\d+)")


class KernelError(Exception):
    """The kernel NBD client refused or cannot be reached; ``str()`` is meant for the user."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_


class ModuleNotLoaded(KernelError):
    """The ``nbd`` generic netlink family does not exist: the module is not loaded."""


class _NbdMessage(genlmsg):  # type: ignore[misc]
    prefix = "NBD_ATTR_"
    nla_map = (
        ("NBD_ATTR_UNSPEC", "none"),
        ("NBD_ATTR_INDEX", "uint32"),
        ("NBD_ATTR_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_BLOCK_SIZE_BYTES", "uint64"),
        ("NBD_ATTR_TIMEOUT", "uint64"),
        ("NBD_ATTR_SERVER_FLAGS", "uint64"),
        ("NBD_ATTR_CLIENT_FLAGS", "uint64"),
        ("NBD_ATTR_SOCKETS", "sockets"),
        ("NBD_ATTR_DEAD_CONN_TIMEOUT", "uint64"),
        ("NBD_ATTR_DEVICE_LIST", "device_list"),
        ("NBD_ATTR_BACKEND_IDENTIFIER", "asciiz"),
    )

    class sockets(nla):  # type: ignore[misc]
        nla_map = (
            ("NBD_SOCK_ITEM_UNSPEC", "none"),
            ("NBD_SOCK_ITEM", "sock_item"),
        )

        class sock_item(nla):  # type: ignore[misc]
            nla_map = (
                ("NBD_SOCK_UNSPEC", "none"),
                ("NBD_SOCK_FD", "uint32"),
            )

    class device_list(nla):  # type: ignore[misc]
        nla_map = (
            ("NBD_DEVICE_ITEM_UNSPEC", "none"),
            ("NBD_DEVICE_ITEM", "device_item"),
        )

        class device_item(nla):  # type: ignore[misc]
            nla_map = (
                ("NBD_DEVICE_UNSPEC", "none"),
                ("NBD_DEVICE_INDEX", "uint32"),
                ("NBD_DEVICE_CONNECTED", "uint8"),
            )


class _AsyncNbdSocket(AsyncGenericNetlinkSocket):  # type: ignore[misc]
    # pyroute2 logs a missing family at error level; we raise ModuleNotLoaded instead.
    module_err_level = "debug"


class _NbdSocket(GenericNetlinkSocket):  # type: ignore[misc]
    async_class = _AsyncNbdSocket


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    index: int
    connected: bool

    @property
    def path(self) -> str:
        return device_path(self.index)


def device_path(index: int) -> str:
    return f"/dev/nbd{index}"


def parse_device(text: str) -> int:
    """``/dev/nbd3``, ``nbd3`` or ``3`` → 3."""
    m = DEVICE_PATH.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not an NBD device: {text!r} (expected /dev/nbdN)")
    return int(m.group(1))


def _error(exc: NetlinkError, what: str) -> KernelError:
    code = exc.code
    if code == errno.EPERM or code == errno.EACCES:
        return KernelError(f"{what}: permission denied (needs root, or CAP_SYS_ADMIN)", code)
    if code == errno.EBUSY:
        return KernelError(f"{what}: the device is already connected", code)
    if code == errno.EINVAL:
        return KernelError(f"{what}: the kernel refused the request (EINVAL)", code)
    reason = errno.errorcode.get(code, str(code))
    return KernelError(f"{what}: {exc.args[1] if len(exc.args) > 1 else reason} ({reason})", code)


class NbdNetlink:
    """One generic netlink socket bound to the ``nbd`` family. Use as a context manager."""

    def __init__(self) -> None:
        self._sock: Any = _NbdSocket()
        try:
            self._sock.bind(NBD_GENL_FAMILY_NAME, _NbdMessage)
        except NetlinkError as exc:
            self._sock.close()
            if exc.code == errno.ENOENT:
                raise ModuleNotLoaded(
                    "the kernel's NBD client is not available: the 'nbd' module is not loaded "
                    "(run `modprobe nbd` as root; inside a container the host must load it)",
                    exc.code,
                ) from None
            raise _error(exc, "cannot reach the kernel's NBD netlink family") from None
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> NbdNetlink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, cmd: int, attrs: list[Any], what: str) -> list[Any]:
        msg = _NbdMessage()
        msg["cmd"] = cmd
        msg["version"] = NBD_GENL_VERSION
        msg["attrs"] = attrs
        try:
            return list(
                self._sock.nlm_request(
                    msg, msg_type=self._sock.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK
                )
            )
        except NetlinkError as exc:
            raise _error(exc, what) from None

    def connect(
        self,
        socket_fds: Sequence[int],
        *,
        size: int,
        block_size: int,
        server_flags: int,
        index: int | None = None,
        timeout_s: int = 0,
        dead_conn_timeout_s: int | None = None,
        client_flags: int = 0,
        backend: str | None = None,
    ) -> int:
        """NBD_CMD_CONNECT; returns the device index (the kernel picks one if ``index`` is None)."""
        attrs: list[Any] = [
            ("NBD_ATTR_SIZE_BYTES", size),
            ("NBD_ATTR_BLOCK_SIZE_BYTES", block_size),
            ("NBD_ATTR_SERVER_FLAGS", server_flags),
            ("NBD_ATTR_TIMEOUT", timeout_s),
            ("NBD_ATTR_CLIENT_FLAGS", client_flags),
            ("NBD_ATTR_SOCKETS", {"attrs": _socket_items(socket_fds)}),
        ]
        if index is not None:
            attrs.insert(0, ("NBD_ATTR_INDEX", index))
        if dead_conn_timeout_s is not None:
            attrs.append(("NBD_ATTR_DEAD_CONN_TIMEOUT", dead_conn_timeout_s))
        if backend is not None:
            attrs.append(("NBD_ATTR_BACKEND_IDENTIFIER", backend))
        what = f"cannot attach {device_path(index) if index is not None else 'a device'}"
        for reply in self._request(NBD_CMD_CONNECT, attrs, what):
            found = reply.get_attr("NBD_ATTR_INDEX")
            if found is not None:
                return int(found)
        if index is not None:
            return index
        raise KernelError(f"{what}: the kernel did not say which device it chose")

    def reconfigure(self, index: int, socket_fds: Sequence[int]) -> None:
        """NBD_CMD_RECONFIGURE: hand fresh sockets to a device whose connections died."""
        attrs: list[Any] = [
            ("NBD_ATTR_INDEX", index),
            ("NBD_ATTR_SOCKETS", {"attrs": _socket_items(socket_fds)}),
        ]
        self._request(NBD_CMD_RECONFIGURE, attrs, f"cannot reconfigure {device_path(index)}")

    def disconnect(self, index: int) -> None:
        self._request(
            NBD_CMD_DISCONNECT,
            [("NBD_ATTR_INDEX", index)],
            f"cannot detach {device_path(index)}",
        )

    def status(self, index: int | None = None) -> list[DeviceStatus]:
        """NBD_CMD_STATUS for one device, or every device when ``index`` is None."""
        attrs: list[Any] = [] if index is None else [("NBD_ATTR_INDEX", index)]
        what = "cannot list NBD devices" if index is None else f"no status for {device_path(index)}"
        found: list[DeviceStatus] = []
        for reply in self._request(NBD_CMD_STATUS, attrs, what):
            devices = reply.get_attr("NBD_ATTR_DEVICE_LIST")
            if devices is None:
                continue
            for item in devices.get_attrs("NBD_DEVICE_ITEM"):
                found.append(
                    DeviceStatus(
                        index=int(item.get_attr("NBD_DEVICE_INDEX")),
                        connected=bool(item.get_attr("NBD_DEVICE_CONNECTED")),
                    )
                )
        return sorted(found, key=lambda d: d.index)


def _socket_items(socket_fds: Sequence[int]) -> list[Any]:
    if not socket_fds:
        raise ValueError("at least one socket is needed")
    return [("NBD_SOCK_ITEM", {"attrs": [("NBD_SOCK_FD", fd)]}) for fd in socket_fds]
