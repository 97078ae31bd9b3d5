"""The ``[registry]`` table: parsed and checked like every other table, printed by `damselfly config`,
handed to the device daemon intact, and replaced in part by a command's ``--hosts-dir``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from p2p.hosts import RegistrySettings
from snapshotter.config import Config, parse, registry_settings, to_toml
from snapshotter.errors import ConfigError


def test_the_registry_table_defaults_to_containerds_hosts_tree() -> None:
    assert Config().registry == RegistrySettings("/etc/containerd/certs.d", False, "")
    assert (
        '[registry]\nconfig_path = "/etc/containerd/certs.d"\nuse_proxy_env = false\nproxy = ""'
        in to_toml(Config())
    )


def test_the_registry_table_parses_prints_back_and_crosses_to_the_daemon() -> None:
    cfg = parse(
        '[registry]\nconfig_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\nuse_proxy_env = true\n'
    )
    r = cfg.registry
    assert r.roots() == ["/etc/containerd/certs.d", "/etc/docker/certs.d"] and r.use_proxy_env
    assert parse(to_toml(cfg)) == cfg
    assert RegistrySettings.from_json(r.to_json()) == r  # what serve hands the daemon (--registry)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[registry]\nconfig_path = "certs.d"',
            "registry.config_path must hold absolute paths, not 'certs.d'",
        ),
        ('[registry]\nproxy = "proxy:3128"', "registry.proxy must be an http:// or https:// URL"),
        ("[registry]\nuse_proxy_env = 1", "registry.use_proxy_env must be a bool, not int"),
        ('[registry]\nmirrors = ["x"]', "unknown key 'registry.mirrors'"),
    ],
)
def test_bad_registry_settings_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"config x\.toml") as e:
        parse(text, "x.toml")
    assert message in str(e.value)


def test_hosts_dir_replaces_the_config_path(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[registry]\nconfig_path = "/srv/certs.d"\nproxy = "http://p:3128"\n')
    assert registry_settings(config, None) == RegistrySettings("/srv/certs.d", False, "http://p:3128")
    assert registry_settings(config, "/other") == RegistrySettings("/other", False, "http://p:3128")
    with pytest.raises(ConfigError, match="--hosts-dir"):
        registry_settings(config, "relative")


def test_damselfly_config_prints_the_registry_table(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[registry]\nconfig_path = "/srv/certs.d"\n')
    damselfly = Path(sys.executable).with_name("damselfly")
    out = subprocess.run(
        [str(damselfly), "config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert parse(out).registry.config_path == "/srv/certs.d"
