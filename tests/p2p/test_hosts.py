"""containerd's hosts.toml tree, read as containerd reads it (`p2p.hosts`): pure logic, real files."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from p2p.errors import HostsConfigError
from p2p.hosts import (
    ALL_CAPABILITIES,
    PULL,
    RESOLVE,
    HostEndpoint,
    RegistrySettings,
    Resolver,
    host_dir_names,
    parse_hosts_file,
)
from p2p.proxies import no_proxy_matches, proxy_for
from p2p.tls import ssl_context

from .registry_server import LoopbackTLS


def _write(root: Path, host: str, text: str) -> Path:
    d = root / host
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d


def _resolver(root: Path, **kwargs: object) -> Resolver:
    return Resolver(RegistrySettings(config_path=str(root), **kwargs), environ={})  # type: ignore[arg-type]


def test_mirrors_come_first_in_file_order_then_the_server(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "registry.example.com",
        """
server = "https://registry.example.com"
[host."https://b.example.com"]
  capabilities = ["pull"]
[host."http://a.example.com:5000"]
  capabilities = ["pull", "resolve"]
[host."https://c.example.com/prefix"]
""",
    )
    hosts = _resolver(tmp_path).hosts("registry.example.com")
    assert [e.url for e in hosts.endpoints] == [
        "https://b.example.com",
        "http://a.example.com:5000",
        "https://c.example.com",
        "https://registry.example.com",
    ]
    assert [e.capabilities for e in hosts.endpoints] == [
        frozenset({PULL}),
        frozenset({PULL, RESOLVE}),
        ALL_CAPABILITIES,
        ALL_CAPABILITIES,
    ]
    assert hosts.endpoints[2].path == "/prefix/v2"
    assert hosts.source == str(tmp_path / "registry.example.com" / "hosts.toml")
    assert hosts.is_mirror(hosts.endpoints[0]) and not hosts.is_mirror(hosts.origin)


def test_no_server_means_the_registry_itself_with_the_top_level_settings(tmp_path: Path) -> None:
    _write(tmp_path, "registry.example.com", 'ca = "ca.crt"\nskip_verify = true\n')
    hosts = _resolver(tmp_path).hosts("registry.example.com")
    assert len(hosts.endpoints) == 1
    origin = hosts.origin
    assert (origin.url, origin.path) == ("https://registry.example.com", "/v2")
    assert origin.ca == (str(tmp_path / "registry.example.com" / "ca.crt"),)
    assert origin.skip_verify


def test_ca_and_client_forms_and_relative_paths(tmp_path: Path) -> None:
    base = tmp_path / "h"
    [e] = parse_hosts_file(
        """
ca = ["ca.crt", "/etc/ssl/other.pem"]
client = [["client.cert", "client.key"], "both.pem"]
""",
        base,
    )
    assert e.ca == (str(base / "ca.crt"), "/etc/ssl/other.pem")
    assert e.client == ((str(base / "client.cert"), str(base / "client.key")), (str(base / "both.pem"), ""))
    [one] = parse_hosts_file('client = "/abs/c.pem"\nca = "/abs/ca.pem"', base)
    assert one.client == (("/abs/c.pem", ""),) and one.ca == ("/abs/ca.pem",)


def test_override_path_keeps_the_path_as_the_api_root(tmp_path: Path) -> None:
    prefixed, versioned, server = parse_hosts_file(
        """
server = "https://r.example.com/custom/api"
override_path = true
[host."https://m.example.com/ns"]
[host."https://m2.example.com/registry/v2/"]
""",
        tmp_path,
    )
    assert prefixed.path == "/ns/v2"  # a prefix: /v2 under it
    assert versioned.path == "/registry/v2"  # already the API root
    assert server.path == "/custom/api"  # override_path: the path as it is
    [bare] = parse_hosts_file('server = "https://r.example.com"\noverride_path = true', tmp_path)
    assert bare.path == ""


def test_server_without_scheme_is_https_and_headers_are_kept(tmp_path: Path) -> None:
    [e] = parse_hosts_file(
        'server = "r.example.com:5443"\n[header]\nX-One = "1"\nX-Two = ["a", "b"]\n', tmp_path
    )
    assert e.url == "https://r.example.com:5443"
    assert e.headers == (("X-One", ("1",)), ("X-Two", ("a", "b")))


def test_empty_capabilities_mean_all(tmp_path: Path) -> None:
    [m, _] = parse_hosts_file('[host."https://m"]\ncapabilities = []\n', tmp_path)
    assert m.capabilities == ALL_CAPABILITIES


def test_directory_names_and_default(tmp_path: Path) -> None:
    assert host_dir_names("r.example.com:5000") == ["r.example.com_5000_", "r.example.com:5000", "_default"]
    assert host_dir_names("r.example.com") == ["r.example.com", "_default"]
    _write(tmp_path, "_default", '[host."https://mirror.example.com"]\ncapabilities = ["pull"]\n')
    hosts = _resolver(tmp_path).hosts("other.example.com:5000")
    assert [e.url for e in hosts.endpoints] == [
        "https://mirror.example.com",
        "https://other.example.com:5000",
    ]
    _write(tmp_path, "other.example.com_5000_", 'server = "http://other.example.com:5000"\n')
    _write(tmp_path, "other.example.com:5000", 'server = "https://ignored.example.com"\n')
    assert [e.url for e in _resolver(tmp_path).hosts("other.example.com:5000").endpoints] == [
        "http://other.example.com:5000"
    ]


def test_several_roots_are_searched_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    _write(second, "r.example.com", '[host."https://m.example.com"]\n')
    settings = RegistrySettings(config_path=f"{first}:{second}")
    first_endpoint = Resolver(settings, {}).hosts("r.example.com").endpoints[0]
    assert first_endpoint.url == "https://m.example.com"


def test_without_a_directory_the_registry_is_its_only_endpoint(tmp_path: Path) -> None:
    r = _resolver(tmp_path / "missing")
    [e] = r.hosts("r.example.com").endpoints
    assert e.url == "https://r.example.com" and e.capabilities == ALL_CAPABILITIES
    assert "to create" in e.hint and str(tmp_path / "missing" / "r.example.com" / "hosts.toml") in e.hint
    assert r.hosts("127.0.0.1:5000").origin.url == "http://127.0.0.1:5000"  # loopback: plain HTTP
    assert r.hosts("127.0.0.1:5000", plain_http=False).origin.url == "https://127.0.0.1:5000"
    assert r.hosts("r.example.com", plain_http=True).origin.url == "http://r.example.com"
    assert r.hosts("docker.io").origin.url == "https://registry-1.docker.io"


def test_an_explicit_server_keeps_its_scheme_under_plain_http(tmp_path: Path) -> None:
    _write(tmp_path, "127.0.0.1:5000", 'server = "https://127.0.0.1:5000"\n')
    assert _resolver(tmp_path).hosts("127.0.0.1:5000", plain_http=True).origin.url == "https://127.0.0.1:5000"


def test_docker_cert_layout_without_hosts_toml(tmp_path: Path) -> None:
    d = tmp_path / "r.example.com"
    d.mkdir()
    for name in ("ca.crt", "client.cert", "client.key", "lonely.cert", "notes.txt"):
        (d / name).write_text("x")
    [e] = _resolver(tmp_path).hosts("r.example.com").endpoints
    assert e.ca == (str(d / "ca.crt"),)
    assert e.client == ((str(d / "client.cert"), str(d / "client.key")), (str(d / "lonely.cert"), ""))


def test_mirror_urls_given_as_arguments_go_first(tmp_path: Path) -> None:
    hosts = _resolver(tmp_path).hosts("r.example.com", mirrors=["http://m:5000/p/"], insecure=True)
    assert [(e.url, e.path) for e in hosts.endpoints] == [
        ("http://m:5000", "/p/v2"),
        ("https://r.example.com", "/v2"),
    ]
    assert all(e.skip_verify for e in hosts.endpoints)
    assert hosts.endpoints[0].capabilities == frozenset({PULL, RESOLVE})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server = [", "not valid TOML"),
        ("server = 5", "server must be a string, not an integer"),
        ('server = "ftp://x"', "'ftp://x' is not an http:// or https:// URL"),
        ('server = "https://x:99999"', "Port out of range"),
        ('[host."https://m"]\ncapabilities = ["pull", "delete"]', "unknown capability 'delete'"),
        ('[host."https://m"]\ncapabilities = "pull"', "capabilities must be a list of strings, not a string"),
        ('[host."https://m"]\nca = 3', "ca must be a string or a list of strings, not an integer"),
        ('[host."https://m"]\nca = ["a", 1]', "ca must be a string or a list of strings, not a list"),
        ('[host."https://m"]\nclient = [["a", "b", "c"]]', "neither a path nor a [cert, key] pair"),
        ('[host."https://m"]\nclient = {a = 1}', "client must be a path"),
        ('[host."https://m"]\nskip_verify = "yes"', "skip_verify must be a boolean, not a string"),
        ('[host."https://m"]\noverride_path = 1', "override_path must be a boolean"),
        ('[host."https://m"]\nheader = "x"', "header must be a table"),
        ('[host."https://m"]\nheader = { "X Bad" = "1" }', "is not a valid HTTP header"),
        ('[host."https://m"]\nheader = { X = 1 }', "header 'X' must be a string or a list of strings"),
        ('host = "x"', "host must be tables"),
        ('[host]\n"https://m" = 1', "must be a table, not an integer"),
    ],
)
def test_bad_files_are_refused_naming_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    d = _write(tmp_path, "r.example.com", text)
    with pytest.raises(HostsConfigError) as e:
        _resolver(tmp_path).hosts("r.example.com")
    assert e.value.path == str(d / "hosts.toml")
    assert message in str(e.value)


def test_unknown_keys_are_ignored_like_containerd(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(tmp_path, "r.example.com", '[host."https://m"]\ndial_timeout = "3s"\n')
    assert len(_resolver(tmp_path).hosts("r.example.com").endpoints) == 2
    assert "dial_timeout" in caplog.text


def test_empty_hosts_toml_counts_as_none(tmp_path: Path) -> None:
    _write(tmp_path, "r.example.com", "  \n")
    [e] = _resolver(tmp_path).hosts("r.example.com").endpoints
    assert e.url == "https://r.example.com"


def test_settings_problems_and_json_round_trip() -> None:
    s = RegistrySettings(config_path="/a:/b", use_proxy_env=True, proxy="http://p:3128")
    assert RegistrySettings.from_json(s.to_json()) == s
    assert s.roots() == ["/a", "/b"]
    assert RegistrySettings(config_path="rel").problems() == [
        "registry.config_path must hold absolute paths, not 'rel'"
    ]
    assert "registry.proxy" in RegistrySettings(proxy="socks://x").problems()[0]
    with pytest.raises(HostsConfigError, match="not valid registry settings"):
        RegistrySettings.from_json('{"nope": 1}')


# -- proxies ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "scheme", "netloc", "matches"),
    [
        ("*", "https", "r.example.com", True),
        ("example.com", "https", "r.example.com", True),
        ("example.com", "https", "example.com", True),
        (".example.com", "https", "example.com", True),
        ("*.example.com", "https", "r.example.com", True),
        ("example.com", "https", "notexample.com", False),
        ("r.example.com:5000", "https", "r.example.com:5000", True),
        ("r.example.com:5000", "https", "r.example.com", False),
        ("r.example.com:443", "https", "r.example.com", True),
        ("10.0.0.0/8", "https", "10.1.2.3:5000", True),
        ("10.0.0.0/8", "https", "11.1.2.3", False),
        ("10.1.2.3", "https", "10.1.2.3:5000", True),
        ("10.1.2.3", "https", "10.1.2.4", False),
        ("[::1]:5000", "https", "[::1]:5000", True),
        (" , other.com ,example.com", "https", "r.example.com", True),
        ("", "https", "r.example.com", False),
    ],
)
def test_no_proxy_follows_gos_rules(no_proxy: str, scheme: str, netloc: str, matches: bool) -> None:
    assert no_proxy_matches(no_proxy, scheme, netloc) is matches


def test_proxy_choice() -> None:
    env = {"HTTPS_PROXY": "proxy:3128", "http_proxy": "http://plain:8080", "NO_PROXY": "internal.com"}
    off = RegistrySettings()
    on = RegistrySettings(use_proxy_env=True)
    assert proxy_for(off, "https", "r.example.com", env) is None  # the environment is ignored by default
    assert proxy_for(on, "https", "r.example.com", env) == "http://proxy:3128"
    assert proxy_for(on, "http", "r.example.com", env) == "http://plain:8080"
    assert proxy_for(on, "https", "r.internal.com", env) is None
    assert proxy_for(on, "https", "127.0.0.1:5000", env) is None  # loopback: never
    assert proxy_for(on, "http", "localhost:5000", env) is None
    explicit = RegistrySettings(proxy="http://dfdaemon:65001", use_proxy_env=True)
    assert proxy_for(explicit, "https", "r.internal.com", env) == "http://dfdaemon:65001"
    assert [e.proxy for e in Resolver(on, env).hosts("r.example.com").endpoints] == ["http://proxy:3128"]


# -- TLS contexts -----------------------------------------------------------------------------------


def test_tls_context_loads_the_ca_and_client_pair(tmp_path: Path) -> None:
    tls = LoopbackTLS.generate(tmp_path)
    (tmp_path / "ca.crt").write_bytes(tls.ca_pem)
    e = HostEndpoint(
        "https",
        "127.0.0.1:1",
        ca=(str(tmp_path / "ca.crt"),),
        client=((str(tls.cert_path), str(tls.key_path)),),
    )
    ctx = ssl_context(e)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert any(c.get("subject") == ((("commonName", "damselfly test CA"),),) for c in ctx.get_ca_certs())
    skip = ssl_context(HostEndpoint("https", "x", skip_verify=True))
    assert skip.verify_mode == ssl.CERT_NONE and not skip.check_hostname


def test_tls_context_refuses_missing_or_bad_files_naming_them(tmp_path: Path) -> None:
    hint = "/etc/containerd/certs.d/x/hosts.toml (the top level)"
    with pytest.raises(HostsConfigError, match="does not exist") as e:
        ssl_context(HostEndpoint("https", "x", ca=(str(tmp_path / "nope.crt"),), hint=hint))
    assert e.value.path == str(tmp_path / "nope.crt") and hint in str(e.value)
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    with pytest.raises(HostsConfigError, match="no usable PEM certificate"):
        ssl_context(HostEndpoint("https", "x", ca=(str(tmp_path / "junk.crt"),)))
    tls = LoopbackTLS.generate(tmp_path)
    with pytest.raises(HostsConfigError, match="do not load"):
        ssl_context(HostEndpoint("https", "x", client=((str(tls.cert_path), str(tmp_path / "junk.crt")),)))
