"""The TOML configuration file: text in, :class:`ServerConfig` out, errors with line numbers.

    [server]
    bind = "127.0.0.1"            # TCP address; omit port and bind for Unix only
    port = 10809
    unix = "/run/nbd-uring.sock"
    unix-mode = "0660"            # the socket's permission bits (octal: "0660" or 0o660)
    unix-group = "disk"           # and its group (name or number)
    handshake-timeout = 10        # seconds
    idle-timeout = 600            # seconds without a request before a client is dropped
    max-connections = 1000
    poll-us = 50                  # poll a lone client's socket this long before sleeping
    lane = true                   # plain READs and WRITEs answered in C (false: all in Python)
    allow = ["127.0.0.0/8", "::1"]
    metrics = "127.0.0.1:9109"
    tls = "on"                    # off | on | require (FORCEDTLS: no plaintext options)
    tls-cert = "/etc/nbd-uring/server-cert.pem"
    tls-key = "/etc/nbd-uring/server-key.pem"
    tls-ca = "/etc/nbd-uring/ca-cert.pem"
    tls-verify-peer = true        # clients need a certificate signed by tls-ca
    max-bytes-in-flight = "128M"  # per connection; past it the server stops reading the socket
    max-requests-in-flight = 256  # per connection, likewise

    [exports.disk]                # the export's name; [exports.""] is the default export
    path = "/srv/disk.img"
    size = "10G"
    create = true
    read-only = false
    description = "scratch disk"
    durability = "flush"          # sync | flush | writeback
    ordering = "strict"           # strict | kernel
    writeback-limit = "64M"
    allow = ["10.0.0.0/8"]
    max-connections = 16
    tls = "require"               # this export only after STARTTLS (needs [server] tls)
    allow-tls-names = ["client1"] # client certificate CNs allowed (implies tls = "require")

Only ``tomllib`` (stdlib) is used; unknown keys are errors, so a typo never goes unnoticed.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nbd_uring.config import (
    Durability,
    ExportConfig,
    Ordering,
    ServerConfig,
    TlsMode,
    group_id,
    parse_mode,
)

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([bkmgtp]?)(?:i?b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class ConfigError(ValueError):
    """A configuration problem, located in the file when possible."""

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source = source
        self.line = line
        self.message = message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True, slots=True)
class _Key:
    convert: Callable[[Any], Any]
    field: str


def size_value(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"expected a size such as 1048576 or \"64M\", got {value!r}")


def _typed(kind: type, what: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"expected {what}, got {value!r}")
        return value

    return check


def _seconds(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ValueError(f"expected a positive number of seconds, got {value!r}")


def _networks(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of addresses or CIDR networks, got {value!r}")
    return tuple(value)


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of certificate common names, got {value!r}")
    return tuple(value)


def _mode(value: Any) -> int:
    if isinstance(value, str):
        return parse_mode(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value  # an octal literal (0o660): load_config checks that it was written so
    raise ValueError(f'expected an octal mode such as "0660" or 0o660, got {value!r}')


def _group(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str) and value:
        group_id(value)
        return value
    raise ValueError(f"expected a group name or number, got {value!r}")


def _export_tls(value: Any) -> bool:
    if value in ("on", "require"):
        return bool(value == "require")
    raise ValueError(f"expected on | require, got {value!r}")


def _enum(kind: type[Durability] | type[Ordering] | type[TlsMode]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        try:
            return kind(value)
        except ValueError:
            choices = " | ".join(m.value for m in kind)
            raise ValueError(f"expected one of {choices}, got {value!r}") from None

    return convert


_port = _typed(int, "a port number")
_SERVER_KEYS: Mapping[str, _Key] = {
    "bind": _Key(_typed(str, "an address"), "bind"),
    "port": _Key(_port, "port"),
    "unix": _Key(_typed(str, "a socket path"), "unix_path"),
    "unix-mode": _Key(_mode, "unix_mode"),
    "unix-group": _Key(_group, "unix_group"),
    "handshake-timeout": _Key(_seconds, "handshake_timeout_s"),
    "idle-timeout": _Key(_seconds, "idle_timeout_s"),
    "poll-us": _Key(_typed(int, "a number of microseconds"), "poll_us"),
    "lane": _Key(_typed(bool, "true or false"), "lane"),
    "max-connections": _Key(_typed(int, "a number"), "max_connections"),
    "allow": _Key(_networks, "allow"),
    "metrics": _Key(_typed(str, "HOST:PORT"), "metrics"),
    "tls": _Key(_enum(TlsMode), "tls"),
    "tls-cert": _Key(_typed(str, "a PEM certificate path"), "tls_cert"),
    "tls-key": _Key(_typed(str, "a PEM key path"), "tls_key"),
    "tls-ca": _Key(_typed(str, "a PEM CA certificate path"), "tls_ca"),
    "tls-verify-peer": _Key(_typed(bool, "true or false"), "tls_verify_peer"),
    "max-bytes-in-flight": _Key(size_value, "max_bytes_in_flight"),
    "max-requests-in-flight": _Key(_typed(int, "a number"), "max_in_flight"),
}
_ONE_KEY_ERRORS = frozenset(
    {"unix-mode", "unix-group", "max-bytes-in-flight", "max-requests-in-flight"}
)
_EXPORT_KEYS: Mapping[str, _Key] = {
    "path": _Key(_typed(str, "a file or device path"), "path"),
    "size": _Key(size_value, "size"),
    "create": _Key(_typed(bool, "true or false"), "create"),
    "read-only": _Key(_typed(bool, "true or false"), "read_only"),
    "description": _Key(_typed(str, "text"), "description"),
    "durability": _Key(_enum(Durability), "durability"),
    "ordering": _Key(_enum(Ordering), "ordering"),
    "writeback-limit": _Key(size_value, "writeback_limit"),
    "allow": _Key(_networks, "allow"),
    "max-connections": _Key(_typed(int, "a number"), "max_connections"),
    "inline-writes": _Key(_typed(bool, "true or false"), "inline_writes"),
    "direct": _Key(_typed(bool, "true or false"), "direct"),
    "tls": _Key(_export_tls, "tls_required"),
    "allow-tls-names": _Key(_names, "allow_tls_names"),
}


class _Locator:
    """Finds the line of a table or key, since tomllib reports positions only for syntax."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def table(self, *path: str) -> int | None:
        """The line of ``[a.b]``, else of the first table nested under it."""
        head = r"^\s*\[\s*" + r"\s*\.\s*".join(_key_pattern(p) for p in path)
        for tail in (r"\s*\]", r"\s*\."):
            pattern = re.compile(head + tail)
            for number, line in enumerate(self.lines, 1):
                if pattern.match(line):
                    return number
        return None

    def key(self, table: tuple[str, ...], key: str) -> int | None:
        start = self.table(*table) or 0
        pattern = re.compile(r"^\s*" + _key_pattern(key) + r"\s*=")
        for number in range(start + 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if number > start + 1 and re.match(r"^\s*\[", line):
                break
            if pattern.match(line):
                return number
        return start or None


def _key_pattern(name: str) -> str:
    escaped = re.escape(name)
    return f"(?:{escaped}|\"{escaped}\"|'{escaped}')"


def _section(
    data: Any,
    keys: Mapping[str, _Key],
    where: tuple[str, ...],
    locate: _Locator,
    source: str,
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(source, locate.table(*where), f"[{'.'.join(where)}] must be a table")
    out: dict[str, Any] = {}
    for key, value in data.items():
        spec = keys.get(key)
        if spec is None:
            known = ", ".join(keys)
            raise ConfigError(
                source, locate.key(where, key), f"unknown setting {key!r} (known: {known})"
            )
        try:
            out[spec.field] = spec.convert(value)
        except ValueError as exc:
            raise ConfigError(source, locate.key(where, key), f"{key}: {exc}") from None
    return out


def load_config(text: str, source: str = "<config>") -> ServerConfig:
    """Parse and validate a whole configuration file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise ConfigError(source, int(m.group(1)) if m else None, str(exc)) from None
    locate = _Locator(text)
    unknown = set(data) - {"server", "exports"}
    if unknown:
        name = sorted(unknown)[0]
        line = locate.table(name) or locate.key((), name)
        raise ConfigError(
            source, line, f"unknown section {name!r} (expected [server], [exports.NAME])"
        )
    server = _section(data.get("server", {}), _SERVER_KEYS, ("server",), locate, source)
    _check_mode_literal(data.get("server", {}), locate, source)
    exports_data = data.get("exports", {})
    if not isinstance(exports_data, dict) or not exports_data:
        raise ConfigError(source, None, "no exports: add at least one [exports.NAME] table")
    exports = []
    for name, table in exports_data.items():
        where = ("exports", name)
        fields = _section(table, _EXPORT_KEYS, where, locate, source)
        if "path" not in fields:
            raise ConfigError(source, locate.table(*where), f"export {name!r} has no path")
        _check_export_tls(fields, server, where, locate, source)
        try:
            exports.append(ExportConfig(name=name, **fields))
        except ValueError as exc:
            raise ConfigError(source, locate.table(*where), f"export {name!r}: {exc}") from None
    if "unix_path" in server and "port" not in server and "bind" not in server:
        server["port"] = server["bind"] = None
    try:
        config = ServerConfig(exports=tuple(exports), **server)
    except ValueError as exc:
        # A message about one setting ("max-requests-in-flight must be ...") points at it; one
        # about how settings combine points at [server].
        key = str(exc).split(" ", 1)[0].rstrip(":")
        line = locate.key(("server",), key) if key in _ONE_KEY_ERRORS else locate.table("server")
        raise ConfigError(source, line, str(exc)) from None
    if config.tls is not TlsMode.OFF:
        _check_tls_files(config, locate, source)
    return config


def _check_mode_literal(data: dict[str, Any], locate: _Locator, source: str) -> None:
    """``unix-mode = 660`` is decimal in TOML (0o1224): only a string or 0o literal is clear."""
    if not isinstance(data.get("unix-mode"), int):
        return
    line = locate.key(("server",), "unix-mode")
    text = locate.lines[line - 1] if line else ""
    if not re.search(r"=\s*0o", text):
        decimal = data["unix-mode"]
        raise ConfigError(
            source,
            line,
            f'unix-mode: write the mode in octal, "0660" or 0o660 ({decimal} is decimal)',
        )


def _check_export_tls(
    fields: dict[str, Any],
    server: dict[str, Any],
    where: tuple[str, ...],
    locate: _Locator,
    source: str,
) -> None:
    """Point at the export key that needs a TLS setting [server] lacks."""
    for key, field in (("tls", "tls_required"), ("allow-tls-names", "allow_tls_names")):
        if fields.get(field) and server.get("tls", TlsMode.OFF) is TlsMode.OFF:
            raise ConfigError(
                source, locate.key(where, key), f"{key} needs TLS on the server ([server] tls)"
            )
    if fields.get("allow_tls_names") and not server.get("tls_verify_peer"):
        raise ConfigError(
            source,
            locate.key(where, "allow-tls-names"),
            "allow-tls-names needs verified client certificates ([server] tls-verify-peer)",
        )


def _check_tls_files(config: ServerConfig, locate: _Locator, source: str) -> None:
    """Load the certificate, key and CA now, so check-config catches what serve would."""
    from nbd_uring.server.tls import TlsConfigError, server_context

    try:
        server_context(config)
    except TlsConfigError as exc:
        key = exc.setting.replace("_", "-")
        raise ConfigError(source, locate.key(("server",), key), str(exc)) from None


def load_config_file(path: str) -> ServerConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(path, None, exc.strerror or str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not UTF-8 text: {exc}") from None
    return load_config(text, path)
