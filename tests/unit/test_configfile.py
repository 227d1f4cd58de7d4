"""The TOML configuration file: what it accepts, and errors that point at the right line."""

from __future__ import annotations

import pytest

from nbd_uring.config import Durability, Ordering
from nbd_uring.configfile import ConfigError, load_config

GOOD = """\
[server]
bind = "127.0.0.1"
port = 10810
handshake-timeout = 5
max-connections = 100
allow = ["127.0.0.0/8"]

[exports.disk]
path = "/srv/disk.img"
size = "1G"
create = true
durability = "writeback"
writeback-limit = "8M"

[exports."with space"]
path = "/srv/other.img"
read-only = true
ordering = "kernel"
allow = ["::1", "10.1.0.0/16"]
"""


def test_a_full_file_loads() -> None:
    cfg = load_config(GOOD, "good.toml")
    assert (cfg.bind, cfg.port, cfg.unix_path) == ("127.0.0.1", 10810, None)
    assert cfg.handshake_timeout_s == 5.0 and cfg.max_connections == 100
    disk, other = cfg.exports
    assert (disk.name, disk.size, disk.create, disk.durability) == (
        "disk", 1 << 30, True, Durability.WRITEBACK,
    )
    assert disk.writeback_limit == 8 << 20
    assert (other.name, other.read_only, other.ordering) == ("with space", True, Ordering.KERNEL)
    assert other.allow == ("::1", "10.1.0.0/16")


def test_direct_key() -> None:
    cfg = load_config('[exports.a]\npath = "/x"\ndirect = true\n[exports.b]\npath = "/y"\n')
    assert [e.direct for e in cfg.exports] == [True, False]


def test_unix_only_when_no_tcp_is_given() -> None:
    cfg = load_config('[server]\nunix = "/tmp/s.sock"\n[exports.a]\npath = "/x"\n')
    assert (cfg.unix_path, cfg.port, cfg.bind) == ("/tmp/s.sock", None, None)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('[server]\nport = 1\n[exports.a]\npath = "/x"\nsise = "1G"\n', 5, "'sise'"),
        ('[server]\nport = "ten"\n[exports.a]\npath = "/x"\n', 2, "port: expected a port number"),
        ('[exports.a]\npath = "/x"\ndurability = "fast"\n', 3, "sync | flush | writeback"),
        ('[exports.a]\npath = "/x"\nsize = "lots"\n', 3, "expected a size"),
        ('[exports.a]\nsize = "1G"\n', 1, "has no path"),
        ('[exports.a]\npath = "/x"\nallow = ["300.1.1.1"]\n', 1, "300.1.1.1"),
        ('[server]\nport = 1\n\n[exprots.a]\npath = "/x"\n', 4, "unknown section 'exprots'"),
        ('[server]\nport = 1\n', None, "no exports"),
        ('[server]\nport = = 1\n', 2, "Invalid"),
        ('[exports.a]\npath = "/x"\ncreate = true\n', 1, "--create needs --size"),
    ],
)
def test_errors_name_the_line(text: str, line: int | None, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text, "bad.toml")
    assert info.value.line == line, str(info.value)
    assert words in str(info.value)
    assert str(info.value).startswith(f"bad.toml:{line}: " if line else "bad.toml: ")


def test_in_flight_caps() -> None:
    cfg = load_config(
        '[server]\nmax-bytes-in-flight = "64M"\nmax-requests-in-flight = 32\n'
        '[exports.a]\npath = "/x"\n'
    )
    assert (cfg.max_bytes_in_flight, cfg.max_in_flight) == (64 << 20, 32)
    defaults = load_config('[exports.a]\npath = "/x"\n')
    assert (defaults.max_bytes_in_flight, defaults.max_in_flight) == (128 << 20, 256)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ('max-bytes-in-flight = "1M"', "at least one 32 MiB request"),
        ("max-requests-in-flight = 0", "at least 1"),
    ],
)
def test_in_flight_caps_too_small(setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(f'\n[server]\n{setting}\n[exports.a]\npath = "/x"\n', "bad.toml")
    assert info.value.line == 3 and words in str(info.value)  # the setting's own line


def test_unix_socket_permissions() -> None:
    cfg = load_config(
        '[server]\nunix = "/run/s.sock"\nunix-mode = "0660"\nunix-group = "daemon"\n'
        '[exports.a]\npath = "/x"\n'
    )
    assert (cfg.unix_mode, cfg.unix_group) == (0o660, "daemon")
    literal = load_config('[server]\nunix = "/s"\nunix-mode = 0o640\nunix-group = 0\n'
                          '[exports.a]\npath = "/x"\n')
    assert (literal.unix_mode, literal.unix_group) == (0o640, "0")
    assert load_config('[server]\nunix = "/s"\n[exports.a]\npath = "/x"\n').unix_mode is None


@pytest.mark.parametrize(
    ("setting", "line", "words"),
    [
        ('unix-mode = "0999"', 4, "not an octal permission mode"),
        ('unix-mode = "01777"', 4, "not an octal permission mode"),
        ("unix-mode = 420", 4, "(420 is decimal)"),
        ("unix-mode = 660", 4, "expected an octal mode"),
        ("unix-mode = 0o1777", 4, "expected an octal mode"),
        ('unix-group = "no-such-group-here"', 4, "no such group: 'no-such-group-here'"),
        ("unix-group = true", 4, "expected a group name or number"),
    ],
)
def test_unix_socket_permission_errors_name_the_line(setting: str, line: int, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(f'\n[server]\nunix = "/s"\n{setting}\n[exports.a]\npath = "/x"\n', "b.toml")
    assert info.value.line == line and words in str(info.value), str(info.value)


def test_unix_mode_without_a_unix_socket_names_its_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config('[server]\nport = 1\nunix-mode = "0600"\n[exports.a]\npath = "/x"\n', "b")
    assert info.value.line == 3 and "need a Unix socket" in str(info.value)


def test_poll_us() -> None:
    cfg = load_config('[server]\npoll-us = 0\n[exports.a]\npath = "/x"\n')
    assert cfg.poll_us == 0
    assert load_config('[exports.a]\npath = "/x"\n').poll_us == 50
    with pytest.raises(ConfigError) as info:
        load_config('\n[server]\npoll-us = 20000\n[exports.a]\npath = "/x"\n', "bad.toml")
    assert info.value.line == 2 and "poll-us" in str(info.value)
