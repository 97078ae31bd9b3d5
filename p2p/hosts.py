"""Where a registry's requests go, and how: containerd's ``hosts.toml`` tree, read as containerd reads it.

One file serves containerd and damselfly. For a registry ``host[:port]`` the hosts directory is the
first that exists of (containerd's ``remotes/docker/config``, 1.6 and later)::

    <config_path>/<host>_<port>_/        (only for a host with a port)
    <config_path>/<host>:<port>/
    <config_path>/_default/

`RegistrySettings.config_path` may list several roots separated by ``:`` (as containerd's CRI does),
searched in order, each with all three names. In the directory, ``hosts.toml``::

    server = "https://registry.example.com"       # the origin, tried last (default: the registry itself)
    ca = "ca.crt"                                 # the server's TLS keys, as for every [host] below
    [host."https://mirror.example.com"]           # endpoints tried first, in the file's order
      capabilities = ["pull", "resolve"]          # pull: blobs, manifests by digest; resolve: tags;
                                                  # push (default: all three)
      ca = ["ca.crt", "/etc/ssl/other.pem"]       # CA files added to the system trust store; relative
                                                  # paths resolve against the hosts directory
      client = [["client.cert", "client.key"]]    # client certificates: a file (cert + key), a list of
                                                  # files, or a list of [cert, key] pairs
      skip_verify = false                         # true: no certificate verification at all
      header = { X-Team = "infra", X-Two = ["a", "b"] }   # extra request headers
      override_path = false                       # true: the URL's path is the API root (no "/v2")

Without ``hosts.toml`` the directory is read Docker's way: ``*.crt`` are CAs, ``*.cert`` client
certificates with their ``*.key``. Without a directory the registry is its own only endpoint.

Semantics follow containerd: a tag is resolved only by endpoints with ``resolve`` (and ``pull``), a
blob or a manifest by digest is read from endpoints with ``pull``, pushes go to the first endpoint with
``push``. An endpoint other than the registry itself gets ``?ns=<registry>`` on every request, so one
mirror can serve several upstreams. The path of a server or mirror URL is its API prefix (``/v2`` is
appended unless ``override_path``). The default origin is HTTPS, except for loopback registries (HTTP)
and under ``plain_http``; Docker Hub (``docker.io``) is ``https://registry-1.docker.io``.

Where damselfly is stricter: a hosts.toml that does not parse, or has a value of a wrong type or an
unknown capability, is a `HostsConfigError` naming the file and key (containerd logs it and falls back
to the certificate files); unknown keys are logged and ignored, like containerd's newer keys.

TLS (`p2p.tls.ssl_context`): the system trust store (``ssl.create_default_context``, which honours
``SSL_CERT_FILE`` and ``SSL_CERT_DIR``) plus the endpoint's ``ca`` files; its client certificates; or no
verification with ``skip_verify``. Proxies (`p2p.proxies.proxy_for`): the ``[registry] proxy`` URL for every
request, else with ``use_proxy_env`` the environment's ``HTTPS_PROXY``/``HTTP_PROXY`` except for hosts
``NO_PROXY`` names (Go's rules, containerd's: names and their subdomains, ``host:port``, IPs, CIDRs,
``*``), never for loopback hosts.

This module imports no HTTP client: `Resolver.client` imports `p2p.registry` (and httpx) only when a
client is made, so commands that start fast (`damselfly rpull`) can hold a resolver for free.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import tomllib
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import HostsConfigError, InvalidReferenceError
from .proxies import proxy_for
from .reference import DOCKER_HUB, DOCKER_HUB_API, is_loopback

if TYPE_CHECKING:
    from .registry import RegistryClient

log = logging.getLogger(__name__)

PULL, RESOLVE, PUSH = "pull", "resolve", "push"
ALL_CAPABILITIES = frozenset({PULL, RESOLVE, PUSH})
#: containerd's default hosts directory.
DEFAULT_CONFIG_PATH = "/etc/containerd/certs.d"
HOSTS_FILE = "hosts.toml"
DEFAULT_DIR = "_default"
#: Keys of a hosts.toml table (the top level has `server` and `host` too).
_HOST_KEYS = ("capabilities", "ca", "client", "skip_verify", "header", "override_path")
#: Bounds on what a hosts file may hold (a file is operator input, but a broken one must not hang us).
MAX_HOSTS_FILE = 1024 * 1024
MAX_ENDPOINTS = 64


@dataclass(frozen=True)
class RegistrySettings:
    """The ``[registry]`` table of the config file: where the hosts tree is and how proxies are chosen.

    `snapshotter.config` parses the table into it, `damselfly config` prints it, `damselfly serve` hands
    it to the device daemon (`to_json`/`from_json`). Its defaults are the one place of them."""

    #: containerd's hosts directory (``:`` separates several, searched in order).
    config_path: str = DEFAULT_CONFIG_PATH
    #: Honour HTTPS_PROXY, HTTP_PROXY and NO_PROXY (and their lower-case forms) for registry requests.
    use_proxy_env: bool = False
    #: An HTTP(S) proxy URL for every registry request (a Dragonfly dfdaemon, say); wins over the
    #: environment.
    proxy: str = ""

    def roots(self) -> list[str]:
        return [p for p in self.config_path.split(":") if p]

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty: nothing), each a sentence naming the key."""
        out: list[str] = []
        for root in self.roots():
            if not root.startswith("/"):
                out.append(f"registry.config_path must hold absolute paths, not {root!r}")
        if self.proxy:
            u = urllib.parse.urlsplit(self.proxy)
            if u.scheme not in ("http", "https") or not u.hostname:
                out.append(f"registry.proxy must be an http:// or https:// URL, not {self.proxy!r}")
        return out

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "--registry") -> RegistrySettings:
        try:
            data: Any = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            settings = cls(**data)
        except (TypeError, ValueError) as e:
            raise HostsConfigError(
                where, f"not valid registry settings: {e}", "pass the [registry] table as JSON"
            ) from None
        problems = settings.problems()
        if problems:
            raise HostsConfigError(where, problems[0], "fix the setting")
        return settings


@dataclass(frozen=True)
class HostEndpoint:
    """One place a registry's requests may go, with how to talk to it."""

    scheme: str  # "http" or "https"
    host: str  # host[:port], as in the URL
    path: str = "/v2"  # the API root (what "/v2" of the distribution spec becomes)
    capabilities: frozenset[str] = ALL_CAPABILITIES
    ca: tuple[str, ...] = ()  # CA files, absolute
    client: tuple[tuple[str, str], ...] = ()  # (certificate, key; "" when the key is in the cert file)
    skip_verify: bool = False
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    proxy: str | None = None  # set by the resolver (`proxy_for`)
    #: Where this endpoint's TLS is configured, for messages: a hosts.toml (and its table), or the
    #: file to create.
    hint: str = ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def has(self, *capabilities: str) -> bool:
        return all(c in self.capabilities for c in capabilities)

    def tls_key(self) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...], bool]:
        """What makes two endpoints' TLS contexts the same."""
        return self.ca, self.client, self.skip_verify


@dataclass(frozen=True)
class RegistryHosts:
    """A registry's endpoints in the order to try them (mirrors first, the origin last)."""

    registry: str
    endpoints: tuple[HostEndpoint, ...]
    #: The hosts.toml (or hosts directory) they came from; "" for the defaults.
    source: str = ""

    @property
    def origin(self) -> HostEndpoint:
        return self.endpoints[-1]

    def is_mirror(self, endpoint: HostEndpoint) -> bool:
        """Whether `endpoint` is another host than the registry's own (containerd then adds ``ns``)."""
        own = api_host(self.registry)
        return endpoint.host not in (own, self.registry)


def api_host(registry: str) -> str:
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


# -- reading hosts.toml ---------------------------------------------------------------------------


def host_dir_names(host: str) -> list[str]:
    """The directory names containerd tries for `host`, in order (``host_port_``, ``host:port``,
    ``_default``)."""
    names = []
    idx = host.rfind(":")
    if idx > 0 and not host.endswith("]"):
        names.append(f"{host[:idx]}_{host[idx + 1 :]}_")
    names += [host, DEFAULT_DIR]
    return names


def find_host_dir(roots: Sequence[str], host: str) -> Path | None:
    """The hosts directory of `host` under `roots` (the first that exists), or None."""
    for root in roots:
        for name in host_dir_names(host):
            path = Path(root) / name
            try:
                if path.is_dir():
                    return path
            except OSError as e:
                raise HostsConfigError(str(path), f"cannot look at it: {e.strerror or e}") from None
    return None


def _abs(path: str, base: Path) -> str:
    return path if os.path.isabs(path) else str(base / path)


def _strings(value: Any, path: str, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return list(value)
    raise HostsConfigError(path, f"{key} must be a string or a list of strings, not {_kind(value)}")


def _kind(value: Any) -> str:
    return {
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _table(
    url: str, config: dict[str, Any], base: Path, path: str, where: str, *, top: bool = False
) -> HostEndpoint:
    """One endpoint from its table (`where` names it in messages: ``[host."https://m"]`` or ``the top
    level``); `url` is "" for a top level without ``server`` (the registry's default origin)."""
    unknown = sorted(set(config) - set(_HOST_KEYS) - ({"server", "host"} if top else set()))
    if unknown:
        log.warning("%s: %s: ignoring unknown key(s) %s", path, where, ", ".join(unknown))
    scheme = host = ""
    api = "/v2"
    override = config.get("override_path", False)
    if not isinstance(override, bool):
        raise HostsConfigError(path, f"{where}: override_path must be a boolean, not {_kind(override)}")
    if url:
        if "://" not in url:
            url = "https://" + url  # containerd: a bare host is HTTPS
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
            raise HostsConfigError(path, f"{where}: {url!r} is not an http:// or https:// URL of a host")
        try:
            _ = u.port  # a bad port raises here
        except ValueError as e:
            raise HostsConfigError(path, f"{where}: {url!r}: {e}") from None
        scheme, host = u.scheme, u.netloc
        api = os.path.normpath(u.path) if u.path not in ("", "/") else ""
        if not override and not api.endswith("/v2"):
            api += "/v2"
    capabilities = ALL_CAPABILITIES
    if "capabilities" in config:
        names = config["capabilities"]
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise HostsConfigError(
                path, f"{where}: capabilities must be a list of strings, not {_kind(names)}"
            )
        bad = [c for c in names if c.lower() not in ALL_CAPABILITIES]
        if bad:
            raise HostsConfigError(
                path, f"{where}: unknown capability {bad[0]!r} (known: pull, resolve, push)"
            )
        if names:  # an empty list means all three, as in containerd
            capabilities = frozenset(c.lower() for c in names)
    ca: tuple[str, ...] = ()
    if "ca" in config:
        ca = tuple(_abs(p, base) for p in _strings(config["ca"], path, f"{where}: ca"))
    client: list[tuple[str, str]] = []
    if "client" in config:
        value = config["client"]
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list):
            raise HostsConfigError(
                path,
                f"{where}: client must be a path, a list of paths or of "
                f"[cert, key] pairs, not {_kind(value)}",
            )
        for item in items:
            if isinstance(item, str):
                client.append((_abs(item, base), ""))
            elif isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item):
                client.append((_abs(item[0], base), _abs(item[1], base)))
            else:
                raise HostsConfigError(
                    path, f"{where}: client entry {item!r} is neither a path nor a [cert, key] pair"
                )
    skip = config.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise HostsConfigError(path, f"{where}: skip_verify must be a boolean, not {_kind(skip)}")
    headers: list[tuple[str, tuple[str, ...]]] = []
    header = config.get("header", {})
    if not isinstance(header, dict):
        raise HostsConfigError(path, f"{where}: header must be a table, not {_kind(header)}")
    for name, value in header.items():
        values = _strings(value, path, f"{where}: header {name!r}")
        if not name or any(c in name for c in ":\r\n \t") or any(("\r" in v or "\n" in v) for v in values):
            raise HostsConfigError(path, f"{where}: header {name!r} is not a valid HTTP header")
        headers.append((name, tuple(values)))
    hint = f"{path} ({where})"
    return HostEndpoint(scheme, host, api, capabilities, ca, tuple(client), skip, tuple(headers), hint=hint)


def parse_hosts_file(text: str, base: Path, path: str = "hosts.toml") -> list[HostEndpoint]:
    """The endpoints of a hosts.toml, mirrors in the file's order, then the server (its `host` is ""
    when the file names no ``server``: the registry's default origin, with the top level's settings).
    Relative paths resolve against `base`, the hosts directory."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HostsConfigError(path, f"not valid TOML: {e}") from None
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise HostsConfigError(path, f"server must be a string, not {_kind(server)}")
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise HostsConfigError(path, f'host must be tables ([host."https://mirror"]), not {_kind(hosts)}')
    if len(hosts) >= MAX_ENDPOINTS:
        raise HostsConfigError(path, f"{len(hosts)} [host] tables: more than {MAX_ENDPOINTS - 1}")
    out: list[HostEndpoint] = []
    # tomllib keeps tables in the order they first appear: the file's order, which is containerd's.
    for url, table in hosts.items():
        where = f'[host."{url}"]'
        if not isinstance(table, dict):
            raise HostsConfigError(path, f"{where} must be a table, not {_kind(table)}")
        if not url:
            raise HostsConfigError(path, '[host.""]: a host table needs a URL')
        out.append(_table(url, table, base, path, where))
    out.append(_table(server, doc, base, path, "the top level", top=True))
    return out


def load_cert_dir(directory: Path) -> HostEndpoint:
    """Docker's certs.d layout, for a hosts directory without hosts.toml: ``*.crt`` CAs, ``*.cert``
    client certificates, each with the ``*.key`` of the same name if there is one. The endpoint is the
    registry's default origin (`host` "")."""
    try:
        names = sorted(e.name for e in os.scandir(directory) if not e.is_dir())
    except OSError as e:
        raise HostsConfigError(str(directory), f"cannot list it: {e.strerror or e}") from None
    ca = tuple(str(directory / n) for n in names if n.endswith(".crt"))
    client = []
    for n in names:
        if n.endswith(".cert"):
            key = n[: -len(".cert")] + ".key"
            client.append((str(directory / n), str(directory / key) if key in names else ""))
    hint = f"{directory / HOSTS_FILE} (the top level)"
    return HostEndpoint("", "", ca=ca, client=tuple(client), hint=hint)


def read_host_dir(directory: Path) -> tuple[list[HostEndpoint], str]:
    """The endpoints a hosts directory configures, and the file they came from."""
    path = directory / HOSTS_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_HOSTS_FILE + 1)
    except FileNotFoundError:
        return [load_cert_dir(directory)], str(directory)
    except OSError as e:
        raise HostsConfigError(str(path), f"cannot read it: {e.strerror or e}") from None
    if len(raw) > MAX_HOSTS_FILE:
        raise HostsConfigError(str(path), f"larger than {MAX_HOSTS_FILE} bytes")
    if not raw.strip():  # containerd: an empty file counts as none
        return [load_cert_dir(directory)], str(directory)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HostsConfigError(str(path), f"not UTF-8 text: {e}") from None
    return parse_hosts_file(text, directory, str(path)), str(path)


# -- the resolver ---------------------------------------------------------------------------------


@dataclass
class Resolver:
    """A registry's endpoints from the hosts tree (`hosts`), and clients that use them (`client`)."""

    settings: RegistrySettings = field(default_factory=RegistrySettings)
    environ: Mapping[str, str] | None = None  # None: os.environ (for proxies)

    def hosts(
        self,
        registry: str,
        plain_http: bool | None = None,
        *,
        mirrors: Sequence[str] = (),
        insecure: bool = False,
    ) -> RegistryHosts:
        """The endpoints of `registry`, read from its hosts directory now.

        `plain_http`: the default origin's scheme (None: HTTP for loopback registries only); a ``server``
        the hosts file names keeps its own. `mirrors` (base URLs, pull and resolve) go before the file's;
        `insecure` turns verification off everywhere."""
        registry = DOCKER_HUB if registry in ("index.docker.io", DOCKER_HUB_API) else registry
        roots = self.settings.roots()
        directory = find_host_dir(roots, registry)
        default_file = str(Path(roots[0] if roots else DEFAULT_CONFIG_PATH) / registry / HOSTS_FILE)
        if directory is None:
            configured = [HostEndpoint("", "", hint=f"{default_file} (to create)")]
            source = ""
        else:
            configured, source = read_host_dir(directory)
        endpoints = [self._mirror(m, default_file) for m in mirrors] + configured
        if len(endpoints) > MAX_ENDPOINTS:
            raise HostsConfigError(source or default_file, f"more than {MAX_ENDPOINTS} endpoints")
        out = []
        for configured_endpoint in endpoints:
            e = configured_endpoint
            if not e.host:  # the registry's default origin
                host = api_host(registry)
                plain = is_loopback(host) if plain_http is None else plain_http
                e = dataclasses.replace(e, scheme="http" if plain else "https", host=host)
            if insecure:
                e = dataclasses.replace(e, skip_verify=True)
            out.append(dataclasses.replace(e, proxy=proxy_for(self.settings, e.scheme, e.host, self.environ)))
        return RegistryHosts(registry, tuple(out), source)

    @staticmethod
    def _mirror(url: str, hint_file: str) -> HostEndpoint:
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise InvalidReferenceError(url, "a mirror is an http:// or https:// base URL")
        path = u.path.rstrip("/") + "/v2"
        return HostEndpoint(
            u.scheme, u.netloc, path, frozenset({PULL, RESOLVE}), hint=f'{hint_file} ([host."{url}"])'
        )

    def client(
        self,
        registry: str,
        plain_http: bool | None = None,
        *,
        mirrors: Sequence[str] = (),
        insecure: bool = False,
        **kwargs: Any,
    ) -> RegistryClient:
        """A `RegistryClient` for `registry` over its endpoints (`kwargs`: the client's own, such as
        `retry`, `timeouts`, `credentials`). Imports the HTTP client now."""
        module = importlib.import_module("p2p.registry")  # httpx: only when a client is made
        hosts = self.hosts(registry, plain_http, mirrors=mirrors, insecure=insecure)
        client: RegistryClient = module.RegistryClient(registry, hosts=hosts, **kwargs)
        return client
