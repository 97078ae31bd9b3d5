"""The damselfly config file: one TOML file, every key with a default.

Default path `DEFAULT_PATH` (``/etc/damselfly/config.toml``); a missing default file means "all
defaults", a missing file named explicitly is an error. Unknown keys and wrong types are refused
(`ConfigError`), so a typo never silently falls back to a default. `damselfly config` prints the
effective config (`to_toml`), which is itself a valid config file::

    log_level = "info"            # debug, info, warning, error
    log_format = "text"           # text, or json: one object per line (serve and the device daemon)

    [snapshotter]
    root = "/var/lib/damselfly"                       # metadata.db and snapshots/<id>/
    address = "/run/damselfly/snapshotter.sock"       # the gRPC socket containerd's proxy_plugins names

    [device]
    state_dir = "/var/lib/damselfly/device"           # the device daemon's state (cache, FUSE, control)
    read_timeout = 30.0                               # seconds before a device read fails with EIO
    fail_cooldown = 5.0                               # a unit or registry that failed fails reads at once
    background_delay = 5.0                            # seconds before a blob's full download starts
    background_rate = 0                               # bytes/s per blob for it (0: unlimited)
    cache_limit = 10737418240                         # bytes the node cache may take on disk ("10G"; 0: none)
    unit_size = 65536                                 # the node cache's fetch unit (power of two, >= 4096)
    metrics_address = ""                              # host:port of the daemon's own /metrics (empty: off)

    [remote]
    enabled = true                # converted layers become remote snapshots (false: containerd unpacks)
    plain_http = false            # HTTP for every registry (default: HTTP for loopback registries only)
    check_timeout = 5.0           # seconds for the reachability check of a layer at Prepare
    unreachable_cooldown = 30.0   # a registry that failed the check is not asked again for this long

    [registry]                    # how every command reaches registries (docs/registries.md)
    config_path = "/etc/containerd/certs.d"   # containerd's hosts.toml tree: mirrors, CAs, client certs
    use_proxy_env = false         # honour HTTPS_PROXY, HTTP_PROXY and NO_PROXY
    proxy = ""                    # an HTTP(S) proxy for every registry request (wins over the environment)

    [metrics]
    address = ""                  # host:port for Prometheus' /metrics: serve's + the daemon's (empty: off)

    [cri]                         # the CRI image-service proxy: Kubernetes pull secrets for lazy reads
    enabled = false               # serve runtime.v1.ImageService on `listen`, forwarded to `containerd`
    listen = "/run/damselfly/cri.sock"                # the kubelet's --image-service-endpoint
    containerd = "/run/containerd/containerd.sock"    # containerd's CRI socket (its gRPC address)

    [p2p]                         # the peer network (docs/p2p.md; keys: p2p.settings.P2PSettings)
    enabled = false               # serve peers and fetch from them (false: only the registry)
    listen = "0.0.0.0:8470"       # the peer server's IP:PORT
    advertise = ""                # IP:PORT peers reach this node at (its id in every tree)
    peers = []                    # static members, "IP:PORT" each (this node's own may be among them)
    dns = ""                      # a name whose SRV or A/AAAA records are members
    fanout = 2                    # children per node in each blob's tree
    secret_file = ""              # the cluster secret (0600): every peer request is signed with it
    ...                           # seeds, registries, upload_limit, timeout, TLS: `damselfly config`

Sizes (`SIZE_KEYS`) are a number of bytes or a string with a binary unit (``"10G"``, ``"64K"``);
`damselfly config` prints them in bytes.

Nothing but sockets is under ``/run`` by default: the device daemon's state — its node blob cache above
all, which holds every attached image's bytes — is on disk next to the snapshots (``/run`` is a tmpfs
on most hosts, and the cache would fill memory). The control socket sits in the state directory
(`snapshotter.device.paths.Paths`); a socket path longer than a ``sockaddr_un`` holds is refused for
the snapshotter's address (containerd connects to it) and reached through ``/proc/self/fd`` for the
device daemon's (`snapshotter.device.control`).

Add a key by adding a field with its default to the section's dataclass; parsing, printing and the
checks follow from the dataclass.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2p.hosts import RegistrySettings
from p2p.settings import DEFAULT_COOLDOWN, DEFAULT_UNIT_SIZE, P2PSettings

from .errors import ConfigError
from .units import parse_size

DEFAULT_PATH = Path("/etc/damselfly/config.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
#: The device daemon's state directory: on disk, next to `SnapshotterSection.root`.
DEFAULT_STATE_DIR = "/var/lib/damselfly/device"
#: The node cache's default limit, 10 GiB. overlaybd's cache defaults to 4 GB (`cacheSizeGB`), but it
#: holds only the ranges read on demand: overlaybd's background download lands outside it. Ours holds
#: the full copy of every attached image as well, so it is sized for a few images at once (the demo's
#: 1.1 GB image takes 565 MB), and stays a small share of a node's disk.
DEFAULT_CACHE_LIMIT = 10 << 30
#: Keys whose value is a size: an integer number of bytes, or a string like "10G" (`units.parse_size`).
SIZE_KEYS = frozenset({"device.cache_limit", "device.unit_size", "device.background_rate"})
#: The longest path a ``sockaddr_un`` holds (108 bytes with the terminating NUL).
MAX_SOCKET_PATH = 107
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class SnapshotterSection:
    root: str = "/var/lib/damselfly"
    address: str = "/run/damselfly/snapshotter.sock"


@dataclass(frozen=True)
class DeviceSection:
    """The device daemon's settings: the ``[device]`` table, what `damselfly device-daemon` runs with,
    and what `serve` hands a daemon it starts (`to_json`/`from_json`). The one place of their defaults."""

    state_dir: str = DEFAULT_STATE_DIR
    read_timeout: float = 30.0
    fail_cooldown: float = DEFAULT_COOLDOWN
    background_delay: float = 5.0
    background_rate: int = 0
    #: Bytes the node cache (``<state_dir>/cache``) may take on disk; 0: no limit (`p2p.cache`).
    cache_limit: int = DEFAULT_CACHE_LIMIT
    unit_size: int = DEFAULT_UNIT_SIZE
    #: ``host:port`` the daemon serves its own ``/metrics`` on (empty: off; `snapshotter.device.metrics`).
    metrics_address: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "--settings") -> DeviceSection:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(where, f"not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(where, "the device settings are a JSON object")
        section: DeviceSection = _build(cls, data, "device.", where)
        _check(Config(device=section), where)
        return section


@dataclass(frozen=True)
class RemoteSection:
    enabled: bool = True
    plain_http: bool = False
    check_timeout: float = 5.0
    unreachable_cooldown: float = 30.0
    prefetch: bool = True


@dataclass(frozen=True)
class MetricsSection:
    address: str = ""


@dataclass(frozen=True)
class CriSection:
    enabled: bool = False
    listen: str = "/run/damselfly/cri.sock"
    containerd: str = "/run/containerd/containerd.sock"


@dataclass(frozen=True)
class Config:
    log_level: str = "info"
    log_format: str = "text"
    snapshotter: SnapshotterSection = field(default_factory=SnapshotterSection)
    device: DeviceSection = field(default_factory=DeviceSection)
    remote: RemoteSection = field(default_factory=RemoteSection)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    cri: CriSection = field(default_factory=CriSection)
    p2p: P2PSettings = field(default_factory=P2PSettings)


def _build(cls: type[Any], data: dict[str, Any], where: str, path: str) -> Any:
    """Instantiate dataclass `cls` from `data`, refusing unknown keys and values of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(path, f"unknown key {where + unknown[0]!r} (known: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(path, f"[{name}] must be a table, not {type(value).__name__}")
            values[name] = _build(type(default), value, f"{name}.", path)
        elif f"{where}{name}" in SIZE_KEYS and type(value) is str:
            try:
                values[name] = parse_size(value)
            except ValueError as e:
                raise ConfigError(path, f"{where}{name}: {e}") from None
        elif type(default) is float and type(value) is int:
            values[name] = float(value)  # TOML writes 30 for 30.0
        elif type(default) is list and (
            type(value) is not list or not all(type(x) is str for x in value) or len(value) > 4096
        ):
            raise ConfigError(path, f"{where}{name} must be a list of strings (at most 4096)")
        elif type(value) is not type(default):
            raise ConfigError(
                path, f"{where}{name} must be a {type(default).__name__}, not {type(value).__name__}"
            )
        else:
            values[name] = value
    return cls(**values)


def _check(config: Config, path: str) -> Config:
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(path, f"log_level {config.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if config.log_format not in LOG_FORMATS:
        raise ConfigError(path, f"log_format {config.log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    for name, value in (
        ("snapshotter.root", config.snapshotter.root),
        ("snapshotter.address", config.snapshotter.address),
        ("device.state_dir", config.device.state_dir),
        ("cri.listen", config.cri.listen),
        ("cri.containerd", config.cri.containerd),
    ):
        if not value.startswith("/"):
            raise ConfigError(path, f"{name} must be an absolute path, not {value!r}")
    if len(config.snapshotter.address.encode()) > MAX_SOCKET_PATH:
        raise ConfigError(
            path,
            f"snapshotter.address is {len(config.snapshotter.address.encode())} bytes long; a unix socket "
            f"path holds at most {MAX_SOCKET_PATH} (containerd could not connect): choose a shorter one",
        )
    for name, number in (
        ("device.read_timeout", config.device.read_timeout),
        ("device.fail_cooldown", config.device.fail_cooldown),
        ("device.background_delay", config.device.background_delay),
        ("device.background_rate", config.device.background_rate),
        ("device.cache_limit", config.device.cache_limit),
        ("remote.check_timeout", config.remote.check_timeout),
        ("remote.unreachable_cooldown", config.remote.unreachable_cooldown),
    ):
        if number < 0:
            raise ConfigError(path, f"{name} must not be negative, not {number!r}")
    if config.device.read_timeout == 0 or config.remote.check_timeout == 0:
        raise ConfigError(path, "device.read_timeout and remote.check_timeout must be positive")
    unit = config.device.unit_size
    if unit < 4096 or unit & (unit - 1):
        raise ConfigError(path, f"device.unit_size must be a power of two of at least 4096, not {unit}")
    problems = config.p2p.problems() + config.registry.problems()
    if problems:
        raise ConfigError(path, problems[0])
    for name, address in (
        ("metrics.address", config.metrics.address),
        ("device.metrics_address", config.device.metrics_address),
    ):
        host, sep, port = address.rpartition(":")
        if address and (not sep or not host or not port.isdigit() or not 0 < int(port) < 65536):
            raise ConfigError(path, f"{name} must be host:port (like 127.0.0.1:9464), not {address!r}")
    return config


def parse(text: str, path: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, f"not valid TOML: {e}") from e
    config: Config = _build(Config, data, "", path)
    return _check(config, path)


def registry_settings(path: Path | None = None, hosts_dir: str | None = None) -> RegistrySettings:
    """The ``[registry]`` table of the config at `path` (`load`'s rules), `hosts_dir` (a command's
    ``--hosts-dir``) replacing its config_path: what the CLI commands that talk to registries use."""
    settings = load(path).registry
    if hosts_dir is not None:
        settings = dataclasses.replace(settings, config_path=hosts_dir)
        problems = settings.problems()
        if problems:
            raise ConfigError("--hosts-dir", problems[0], "name absolute directories")
    return settings


def load(path: Path | None = None) -> Config:
    """The config at `path`; with None, `DEFAULT_PATH` if it exists, else the defaults."""
    if path is None:
        if not DEFAULT_PATH.exists():
            return Config()
        path = DEFAULT_PATH
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read it: {e.strerror or e}") from e
    return parse(text, str(path))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(x) for x in value) + "]"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        escaped = "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped)
        return f'"{escaped}"'
    raise TypeError(f"no TOML form for {type(value).__name__}")


def to_toml(config: Config) -> str:
    """The config as a TOML document that `parse` reads back to an equal `Config`."""
    top: list[str] = []
    tables: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            tables.append(f"\n[{f.name}]")
            tables += [f"{g.name} = {_toml_value(getattr(value, g.name))}" for g in dataclasses.fields(value)]
        else:
            top.append(f"{f.name} = {_toml_value(value)}")
    return "\n".join(top + tables) + "\n"
