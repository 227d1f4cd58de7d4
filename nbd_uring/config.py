"""Server and export settings as frozen values; every layer may import this module."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PORT = 10809
DEFAULT_BIND = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """One export: a file or block device and how it is offered."""

    path: str
    name: str = ""
    description: str = ""
    read_only: bool = False
    size: int | None = None
    create: bool = False

    def __post_init__(self) -> None:
        if len(self.name.encode()) > 4096:
            raise ValueError("export names are limited to 4096 bytes by the NBD protocol")
        if self.size is not None and self.size < 0:
            raise ValueError(f"export size must not be negative: {self.size}")
        if self.create and self.size is None:
            raise ValueError("--create needs --size")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where to listen and what to serve. Bytes are the unit of every size here."""

    exports: tuple[ExportConfig, ...]
    bind: str | None = DEFAULT_BIND
    port: int | None = DEFAULT_PORT
    unix_path: str | None = None
    handshake_timeout_s: float = 10.0
    max_in_flight: int = 256
    max_bytes_in_flight: int = 128 * 1024 * 1024
    ring_entries: int = 256

    def __post_init__(self) -> None:
        if not self.exports:
            raise ValueError("at least one export is needed")
        names = [e.name for e in self.exports]
        if len(set(names)) != len(names):
            raise ValueError(f"export names must be unique: {names}")
        if self.port is None and self.unix_path is None:
            raise ValueError("nothing to listen on: give a TCP port or a Unix socket path")
        if self.max_bytes_in_flight < 32 * 1024 * 1024:
            raise ValueError("max_bytes_in_flight must hold at least one 32 MiB request")
