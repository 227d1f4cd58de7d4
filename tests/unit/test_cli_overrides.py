"""Command-line options override the configuration file's [server] settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbd_uring.cli import _config_from_file, build_parser
from nbd_uring.config import ServerConfig

FILE = """\
[server]
bind = "127.0.0.1"
port = 10810
max-connections = 100
idle-timeout = 60
unix = "/run/file.sock"
unix-mode = "0660"

[exports.a]
path = "/x"
"""


def config_for(tmp_path: Path, *options: str) -> ServerConfig:
    path = tmp_path / "c.toml"
    path.write_text(FILE)
    return _config_from_file(build_parser().parse_args(["serve", "--config", str(path), *options]))


def test_file_settings_apply_without_options(tmp_path: Path) -> None:
    cfg = config_for(tmp_path)
    assert (cfg.port, cfg.max_connections, cfg.idle_timeout_s) == (10810, 100, 60.0)
    assert (cfg.unix_path, cfg.unix_mode, cfg.unix_group) == ("/run/file.sock", 0o660, None)


def test_options_override_the_file(tmp_path: Path) -> None:
    cfg = config_for(
        tmp_path, "--max-connections", "5", "--idle-timeout", "2", "--port", "0",
        "--unix", "/run/cli.sock", "--unix-mode", "0600", "--unix-group", "daemon",
        "--max-requests-in-flight", "8",
    )
    assert (cfg.port, cfg.max_connections, cfg.idle_timeout_s) == (0, 5, 2.0)
    assert (cfg.unix_path, cfg.unix_mode, cfg.unix_group) == ("/run/cli.sock", 0o600, "daemon")
    assert cfg.max_in_flight == 8
    assert cfg.exports[0].name == "a"


def test_unix_only_override_drops_tcp(tmp_path: Path) -> None:
    cfg = config_for(tmp_path, "--unix", "/run/cli.sock")
    assert (cfg.port, cfg.bind, cfg.unix_path) == (None, None, "/run/cli.sock")


def test_a_bad_override_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such group"):
        config_for(tmp_path, "--unix-group", "no-such-group-here")
