"""The config file's defaults and size keys: nothing but sockets under /run by default, sizes written
as "10G", and the limits that keep a socket path usable."""

from __future__ import annotations

import dataclasses
import subprocess
import tomllib
from pathlib import Path

import pytest

from scripts.demolib.serve import damselfly_argv
from snapshotter import config
from snapshotter.errors import ConfigError
from snapshotter.units import parse_size


def _paths(value: object, where: str = "") -> list[tuple[str, str]]:
    """Every string that is an absolute path in a parsed TOML document, with its key."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths(v, f"{where}{k}.")]
    if isinstance(value, list):
        return [p for v in value for p in _paths(v, where)]
    if isinstance(value, str) and value.startswith("/"):
        return [(where.rstrip("."), value)]
    return []


def test_damselfly_config_prints_no_path_under_run_but_sockets() -> None:
    out = subprocess.run([*damselfly_argv(), "config"], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = tomllib.loads(out.stdout)
    under_run = [(k, v) for k, v in _paths(doc) if v == "/run" or v.startswith("/run/")]
    assert sorted(under_run) == [  # sockets only: ours, the CRI proxy's, containerd's CRI endpoint
        ("cri.containerd", "/run/containerd/containerd.sock"),
        ("cri.listen", "/run/damselfly/cri.sock"),
        ("snapshotter.address", "/run/damselfly/snapshotter.sock"),
    ]
    assert doc["device"]["state_dir"] == "/var/lib/damselfly/device"  # cache, FUSE mount, control socket
    assert doc["device"]["cache_limit"] == 10 << 30


def test_the_default_state_dir_is_on_disk_next_to_the_snapshots() -> None:
    cfg = config.Config()
    assert Path(cfg.device.state_dir).parent == Path(cfg.snapshotter.root)
    assert cfg.device.cache_limit == config.DEFAULT_CACHE_LIMIT > 0


@pytest.mark.parametrize(
    ("text", "value"),
    [("10G", 10 << 30), ("512M", 512 << 20), ("64KiB", 64 << 10), ("1t", 1 << 40), ("4096", 4096)],
)
def test_size_keys_take_numbers_and_size_strings(text: str, value: int) -> None:
    cfg = config.parse(f'[device]\ncache_limit = "{text}"\nbackground_rate = "{text}"\n')
    assert cfg.device.cache_limit == value and cfg.device.background_rate == value
    assert config.parse(f"[device]\ncache_limit = {value}\n").device.cache_limit == value
    assert config.parse(config.to_toml(cfg)) == cfg  # printed in bytes, read back the same
    assert parse_size(text) == value


def test_unit_size_as_a_size_string_is_still_checked() -> None:
    assert config.parse('[device]\nunit_size = "1M"\n').device.unit_size == 1 << 20
    with pytest.raises(ConfigError, match="power of two"):
        config.parse('[device]\nunit_size = "3K"\n')


@pytest.mark.parametrize("text", ["10X", "G", "", "1.5G", "-1G", "ten"])
def test_a_bad_size_is_refused_with_the_key_named(text: str) -> None:
    with pytest.raises(ConfigError, match=r"device\.cache_limit: .* is not a size"):
        config.parse(f'[device]\ncache_limit = "{text}"\n')


def test_a_string_for_a_key_that_is_not_a_size_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"device\.read_timeout must be a float, not str"):
        config.parse('[device]\nread_timeout = "30"\n')


def test_a_snapshotter_socket_path_too_long_for_a_unix_socket_is_refused() -> None:
    long = "/run/" + "d" * 120 + "/snapshotter.sock"
    with pytest.raises(ConfigError, match="unix socket path holds at most 107"):
        config.parse(f'[snapshotter]\naddress = "{long}"\n')


def test_device_settings_carry_size_strings_through_json() -> None:
    section = config.DeviceSection.from_json('{"cache_limit": "2G", "state_dir": "/srv/s"}')
    assert section == dataclasses.replace(config.DeviceSection(), cache_limit=2 << 30, state_dir="/srv/s")
