"""Server and export settings as frozen values; every layer may import this module."""

from __future__ import annotations

import enum
import errno
import grp
import ipaddress
import re
from dataclasses import dataclass

DEFAULT_PORT = 10809
DEFAULT_BIND = "127.0.0.1"
DEFAULT_POLL_US = 50


class Durability(enum.Enum):
    """When a write's reply may be sent."""

    SYNC = "sync"
    """Every write is on stable storage before its reply, as if FUA were always set."""
    FLUSH = "flush"
    """Writes are durable when FUA or FLUSH asks; replies follow completed I/O."""
    WRITEBACK = "writeback"
    """Writes are replied to once received; I/O errors surface at the next FLUSH."""


class Ordering(enum.Enum):
    STRICT = "strict"
    """Overlapping requests run in arrival order across all connections."""
    KERNEL = "kernel"
    """Everything goes straight to the ring; the kernel decides (the seed's NOTE, opt-in)."""


class TlsMode(enum.Enum):
    """The spec's TLS modes, by what a plaintext client may still do."""

    OFF = "off"
    """NOTLS: STARTTLS gets NBD_REP_ERR_POLICY."""
    ON = "on"
    """STARTTLS upgrades; plaintext clients are served too (except exports requiring TLS)."""
    REQUIRE = "require"
    """FORCEDTLS: nothing but STARTTLS and ABORT before TLS."""


# Fault rules (``--fault``); the syntax is documented in nbd_uring.engine.faults.
OPS = ("read", "write", "flush", "trim", "zero")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class FaultSyntaxError(ValueError):
    pass


def _bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+)([bkmgt]?)", text.strip().lower())
    if m is None:
        raise FaultSyntaxError(f"not a byte offset: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|us)?", text.strip().lower())
    if m is None:
        raise FaultSyntaxError(f"not a duration: {text!r} (try 250ms or 2s)")
    scale = {"ms": 1e-3, "us": 1e-6}.get(m.group(2) or "s", 1.0)
    return float(m.group(1)) * scale


def _errno(text: str) -> int:
    if text.isdigit():
        return int(text)
    value = getattr(errno, text.upper(), None)
    if not isinstance(value, int):
        raise FaultSyntaxError(f"unknown errno name: {text!r}")
    return value


@dataclass(frozen=True, slots=True)
class FaultRule:
    op: str
    start: int = 0
    end: int | None = None
    delay_s: float = 0.0
    error: int = 0
    probability: float = 1.0

    @classmethod
    def parse(cls, text: str) -> FaultRule:
        head, *options = text.split(":")
        op, _, span = head.partition("@")
        op = op.strip().lower()
        if op not in (*OPS, "any"):
            raise FaultSyntaxError(f"unknown operation {op!r}: use one of {', '.join(OPS)}, any")
        start, end = 0, None
        if span:
            lo, sep, hi = span.partition("-")
            if not sep:
                raise FaultSyntaxError(f"range must be START-END: {span!r}")
            start, end = _bytes(lo), _bytes(hi)
            if end <= start:
                raise FaultSyntaxError(f"empty range: {span!r}")
        fields: dict[str, str] = {}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in ("delay", "error", "prob"):
                raise FaultSyntaxError(f"unknown option {option!r}: use delay=, error=, prob=")
            fields[key] = value
        probability = float(fields.get("prob", "1"))
        if not 0.0 <= probability <= 1.0:
            raise FaultSyntaxError(f"prob must be between 0 and 1: {probability}")
        rule = cls(
            op=op,
            start=start,
            end=end,
            delay_s=_seconds(fields["delay"]) if "delay" in fields else 0.0,
            error=_errno(fields["error"]) if "error" in fields else 0,
            probability=probability,
        )
        if not rule.delay_s and not rule.error:
            raise FaultSyntaxError(f"rule {text!r} neither delays nor fails anything")
        return rule

    def matches(self, op: str, offset: int, length: int) -> bool:
        if self.op != "any" and self.op != op:
            return False
        if self.end is None or op == "flush":
            return True
        return offset < self.end and self.start < offset + max(length, 1)


@dataclass(frozen=True, slots=True)
class ExportConfig:
    """One export: a file or block device and how it is offered."""

    path: str
    name: str = ""
    description: str = ""
    read_only: bool = False
    size: int | None = None
    create: bool = False
    ordering: Ordering = Ordering.STRICT
    durability: Durability = Durability.FLUSH
    writeback_limit: int = 64 * 1024 * 1024
    faults: tuple[FaultRule, ...] = ()
    fault_seed: int | None = None
    fua_dsync: bool = False
    inline_writes: bool = False
    direct: bool = False
    """Open with O_DIRECT; clients must then honour the advertised minimum block size."""
    allow: tuple[str, ...] = ()
    """Client networks (CIDR or address) allowed to use this export; empty means anyone."""
    max_connections: int | None = None
    tls_required: bool = False
    """Listed and usable only after STARTTLS (SELECTIVETLS for this export)."""
    allow_tls_names: tuple[str, ...] = ()
    """Client certificate subject common names (CN) allowed to use this export; empty means
    any client. Non-empty implies ``tls_required`` and needs verified client certificates."""

    def __post_init__(self) -> None:
        for name in self.allow_tls_names:
            if not name or "\0" in name:
                raise ValueError(f"allowed TLS name {name!r} must be a non-empty common name")
        for network in self.allow:
            ipaddress.ip_network(network, strict=False)
        if len(self.name.encode()) > 4096:
            raise ValueError("export names are limited to 4096 bytes by the NBD protocol")
        if self.size is not None and self.size < 0:
            raise ValueError(f"export size must not be negative: {self.size}")
        if self.create and self.size is None:
            raise ValueError("--create needs --size")


def parse_mode(text: str) -> int:
    """``0660``, ``660`` or ``0o660``: permission bits, always octal (as chmod takes them)."""
    digits = text.strip().lower().removeprefix("0o")
    if not re.fullmatch(r"[0-7]{1,4}", digits) or int(digits, 8) > 0o777:
        raise ValueError(f"not an octal permission mode such as 0660: {text!r}")
    return int(digits, 8)


def group_id(group: str) -> int:
    """A group name or number as a gid; ValueError naming it when the system has no such group."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unix-group: no such group: {group!r}") from None


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """Where to listen and what to serve. Bytes are the unit of every size here."""

    exports: tuple[ExportConfig, ...]
    bind: str | None = DEFAULT_BIND
    port: int | None = DEFAULT_PORT
    unix_path: str | None = None
    unix_mode: int | None = None
    """Permission bits of the Unix socket (e.g. 0o660); None leaves them to the umask."""
    unix_group: str | None = None
    """Group (name or number) to own the Unix socket; None: the server's group."""
    handshake_timeout_s: float = 10.0
    max_in_flight: int = 256
    """Requests in flight per connection; past it the reader stops reading (back-pressure)."""
    max_bytes_in_flight: int = 128 * 1024 * 1024
    """READ lengths and WRITE payloads in flight per connection, replies not yet sent included."""
    ring_entries: int = 256
    max_connections: int | None = None
    idle_timeout_s: float | None = None
    poll_us: int = DEFAULT_POLL_US
    """After answering a lone client with nothing left in flight, poll its socket this long
    before sleeping in epoll: at queue depth 1 the next request usually comes sooner than a
    sleep and wake-up would take."""
    lane: bool = True
    """Plain READs and WRITEs (compact headers, no flags) are handled in C (the lane,
    ``engine/lane.py``), parse to reply, where their export and connection allow it (strict
    ordering, no faults, no TLS, no metrics; writes only with durability ``flush``); False
    keeps every request on the Python path."""
    allow: tuple[str, ...] = ()
    """Client networks allowed to connect at all; empty means anyone."""
    metrics: str | None = None
    """``HOST:PORT`` for the Prometheus metrics endpoint."""
    tls: TlsMode = TlsMode.OFF
    tls_cert: str | None = None
    """PEM server certificate (chain), for ``tls`` on or require."""
    tls_key: str | None = None
    tls_ca: str | None = None
    """PEM CA certificate(s) client certificates must be signed by (``tls_verify_peer``)."""
    tls_verify_peer: bool = False
    """Require a client certificate signed by ``tls_ca`` in the TLS handshake."""

    def __post_init__(self) -> None:
        self._check_tls()
        for network in self.allow:
            ipaddress.ip_network(network, strict=False)
        if not self.exports:
            raise ValueError("at least one export is needed")
        names = [e.name for e in self.exports]
        if len(set(names)) != len(names):
            raise ValueError(f"export names must be unique: {names}")
        if self.port is None and self.unix_path is None:
            raise ValueError("nothing to listen on: give a TCP port or a Unix socket path")
        self._check_unix()
        if self.max_bytes_in_flight < 32 * 1024 * 1024:
            raise ValueError("max-bytes-in-flight must hold at least one 32 MiB request")
        if not 0 <= self.poll_us <= 10_000:
            raise ValueError("poll-us must be between 0 and 10000 microseconds")
        if self.max_in_flight < 1:
            raise ValueError("max-requests-in-flight must be at least 1")

    def _check_unix(self) -> None:
        if self.unix_path is None and (self.unix_mode is not None or self.unix_group is not None):
            raise ValueError("unix-mode and unix-group need a Unix socket (unix)")
        if self.unix_mode is not None and not 0 <= self.unix_mode <= 0o777:
            raise ValueError(f"unix-mode must be permission bits 0000-0777, got {self.unix_mode:o}")
        if self.unix_group is not None:
            group_id(self.unix_group)

    def _check_tls(self) -> None:
        if self.tls is TlsMode.OFF:
            given = [
                name
                for name, value in (
                    ("certificate", self.tls_cert),
                    ("key", self.tls_key),
                    ("CA", self.tls_ca),
                    ("verify-peer", self.tls_verify_peer or None),
                )
                if value is not None
            ]
            if given:
                # Serving plaintext to someone who configured certificates would be a surprise.
                raise ValueError(
                    f"TLS {', '.join(given)} given but TLS is off: set tls to on or require"
                )
        if self.tls is not TlsMode.OFF and (self.tls_cert is None or self.tls_key is None):
            raise ValueError(f"tls {self.tls.value} needs a server certificate and key")
        if self.tls_verify_peer and self.tls_ca is None:
            raise ValueError("verifying client certificates needs the CA that signs them")
        for export in self.exports:
            if self.tls is TlsMode.OFF and (export.tls_required or export.allow_tls_names):
                raise ValueError(f"export {export.name!r} requires TLS, but TLS is off")
            if export.allow_tls_names and not self.tls_verify_peer:
                raise ValueError(
                    f"export {export.name!r} allows TLS names, which needs verified client "
                    "certificates (tls-verify-peer)"
                )

    def export_needs_tls(self, export: ExportConfig) -> bool:
        """Whether a plaintext client is refused this export."""
        return self.tls is TlsMode.REQUIRE or export.tls_required or bool(export.allow_tls_names)
