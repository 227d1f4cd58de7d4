"""TLS settings in the TOML file and on the command line: values, line-numbered errors, and
certificate files loaded at check time."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbd_uring.config import ExportConfig, ServerConfig, TlsMode
from nbd_uring.configfile import ConfigError, load_config


def _server(cert: Path, key: Path, extra: str = "") -> str:
    return f'[server]\ntls = "on"\ntls-cert = "{cert}"\ntls-key = "{key}"\n{extra}'


def test_tls_settings_load(pem: tuple[Path, Path]) -> None:
    cert, key = pem
    text = _server(cert, key, f'tls-ca = "{cert}"\ntls-verify-peer = true\n') + (
        '[exports.open]\npath = "/x"\n'
        '[exports.secret]\npath = "/y"\ntls = "require"\nallow-tls-names = ["client1"]\n'
    )
    cfg = load_config(text)
    assert (cfg.tls, cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (
        TlsMode.ON, str(cert), str(key), str(cert),
    )
    assert cfg.tls_verify_peer
    public, secret = cfg.exports
    assert not public.tls_required and not cfg.export_needs_tls(public)
    assert secret.tls_required and secret.allow_tls_names == ("client1",)
    assert cfg.export_needs_tls(secret)


def test_require_mode_makes_every_export_need_tls(pem: tuple[Path, Path]) -> None:
    cert, key = pem
    text = _server(cert, key).replace('"on"', '"require"') + '[exports.a]\npath = "/x"\n'
    cfg = load_config(text)
    assert cfg.tls is TlsMode.REQUIRE and cfg.export_needs_tls(cfg.exports[0])


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('[server]\ntls = "maybe"\n[exports.a]\npath = "/x"\n', 2, "off | on | require"),
        ('[server]\ntls = "on"\n[exports.a]\npath = "/x"\n', 1, "certificate and key"),
        ('[server]\ntls-verify-peer = 1\n[exports.a]\npath = "/x"\n', 2, "true or false"),
        ('[server]\ntls-cert = "/c"\n[exports.a]\npath = "/x"\n', 1, "TLS is off"),
        ('[exports.a]\npath = "/x"\ntls = "require"\n', 3, "needs TLS on the server"),
        ('[exports.a]\npath = "/x"\ntls = "yes"\n', 3, "on | require"),
        ('[exports.a]\npath = "/x"\nallow-tls-names = "c1"\n', 3, "common names"),
        ('[exports.a]\npath = "/x"\n\nallow-tls-names = ["c1"]\n', 4, "needs TLS"),
    ],
)
def test_tls_errors_name_the_line(text: str, line: int | None, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(text, "tls.toml")
    assert info.value.line == line, str(info.value)
    assert words in str(info.value)


def test_tls_names_need_verified_peers(pem: tuple[Path, Path]) -> None:
    cert, key = pem
    text = _server(cert, key) + '[exports.a]\npath = "/x"\nallow-tls-names = ["c1"]\n'
    with pytest.raises(ConfigError) as info:
        load_config(text, "tls.toml")
    assert info.value.line == 7 and "tls-verify-peer" in str(info.value)


def test_missing_and_broken_files_point_at_their_key(
    pem: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = pem
    exports = '[exports.a]\npath = "/x"\n'
    with pytest.raises(ConfigError) as info:
        load_config(_server(tmp_path / "none.pem", key) + exports, "tls.toml")
    assert info.value.line == 3 and "No such file" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(_server(cert, tmp_path / "none.pem") + exports, "tls.toml")
    assert info.value.line == 4 and "key" in str(info.value)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        load_config(_server(junk, key) + exports, "tls.toml")
    assert info.value.line == 3 and "cannot load TLS certificate" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(_server(cert, key, f'tls-ca = "{junk}"\n') + exports, "tls.toml")
    assert info.value.line == 5 and "CA" in str(info.value)
    with pytest.raises(ConfigError) as info:  # a key that does not match the certificate
        load_config(_server(key, cert) + exports, "tls.toml")
    assert info.value.line == 3


def test_server_config_validates_tls_combinations() -> None:
    export = ExportConfig(path="/x")
    with pytest.raises(ValueError, match="certificate and key"):
        ServerConfig(exports=(export,), tls=TlsMode.REQUIRE, tls_cert="/c")
    with pytest.raises(ValueError, match="CA"):
        ServerConfig(exports=(export,), tls=TlsMode.ON, tls_cert="/c", tls_key="/k",
                     tls_verify_peer=True)  # fmt: skip
    with pytest.raises(ValueError, match="certificate, key given but TLS is off"):
        ServerConfig(exports=(export,), tls_cert="/c", tls_key="/k")
    with pytest.raises(ValueError, match="TLS is off"):
        ServerConfig(exports=(ExportConfig(path="/x", tls_required=True),))
