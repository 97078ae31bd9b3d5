"""The ``[p2p]`` table: parsed and checked like every other table, printed by `damselfly config` in a
form that reads back to the same settings, and handed to the device daemon intact."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2p.settings import P2PSettings
from snapshotter.config import Config, parse, to_toml
from snapshotter.errors import ConfigError

FLEET = """
[p2p]
enabled = true
listen = "198.18.0.10:7001"
peers = ["198.18.0.10:7001", "198.18.0.11:7001", "[2001:db8::1]:7001"]
seeds = ["198.18.0.11:7001"]
secret_file = "/etc/damselfly/peer.secret"
fanout = 2
registries = ["registry.example:5000"]
"""


def test_the_p2p_table_parses_and_prints_back_to_the_same_settings() -> None:
    cfg = parse(FLEET)
    p = cfg.p2p
    assert (
        p.enabled
        and p.fanout == 2
        and p.registries == ["registry.example:5000"]
        and p.node_id == "198.18.0.10:7001"
    )
    assert p.peers[2] == "[2001:db8::1]:7001"
    again = parse(to_toml(cfg))
    assert again == cfg
    assert P2PSettings.from_json(p.to_json()) == p  # what serve hands the daemon it starts


def test_defaults_are_off_and_print_every_key() -> None:
    text = to_toml(Config())
    assert "[p2p]\nenabled = false\n" in text
    for key in ("listen", "peers = []", "fanout = 2", "registries = []", "upload_limit", "secret_file"):
        assert key in text


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('enabled = true\nlisten = "198.18.0.1:7001"\n', "secret_file is required"),
        ('enabled = true\nlisten = "0.0.0.0:7001"\nsecret_file = "/s"\n', "advertise must name"),
        ('peers = ["198.18.0.1"]\n', r"peers\[0\] must be IP:PORT"),
        ("peers = [1, 2]\n", "must be a list of strings"),
        ('peers = "198.18.0.1:7001"\n', "must be a list of strings"),
        ("fanout = 0\n", "fanout must be at least 1"),
        ("timeout = 0\n", "timeout must be positive"),
        ('tls_cert = "/c.pem"\n', "go together"),
        ("colour = 1\n", "unknown key 'p2p.colour'"),
    ],
)
def test_bad_p2p_settings_are_refused_with_the_key_named(table: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        parse("[p2p]\n" + table)


def test_damselfly_config_prints_the_p2p_table_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(FLEET)
    out = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert parse(out).p2p == parse(FLEET).p2p
