"""Mirrors tried in order before the origin, and an HTTP proxy, with real registries."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from p2p.errors import HostsConfigError, NotFoundError, RegistryUnavailableError
from p2p.hosts import RegistryHosts, RegistrySettings, Resolver
from p2p.registry import MIRROR_COOLDOWN, RegistryClient
from scripts.demolib.registry import free_port

from .conftest import ClientFactory
from .images import make_image, push_image
from .registry_server import RegistryServer
from .servers import ForwardProxy, RawServer, RedirectServer


def _flip_byte(registry: RegistryServer, digest: str) -> None:
    path = registry.blob_data_path(digest)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_image_only_on_the_mirror_is_pulled_from_it_while_the_origin_is_down(
    mirror_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    image = make_image([os.urandom(100)])
    push_image(make_client(mirror_registry.host), repo, image)
    dead_origin = f"127.0.0.1:{free_port()}"

    client = make_client(dead_origin, mirrors=[mirror_registry.url])
    resolved = client.resolve(f"{dead_origin}/{repo}")

    assert resolved.manifest.digest == image.manifest_digest
    assert client.get_blob(repo, image.layer_descriptors[0].digest) == image.layers[0]
    assert client.read_blob_range(repo, image.layer_descriptors[0].digest, 10, 5) == image.layers[0][10:15]


def test_missing_on_the_mirror_falls_back_to_the_origin(
    registry: RegistryServer, mirror_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    image = make_image([os.urandom(100)])
    push_image(make_client(registry.host), repo, image)

    client = make_client(registry.host, mirrors=[mirror_registry.url])
    assert client.resolve(f"{registry.host}/{repo}").manifest.digest == image.manifest_digest


def test_wrong_bytes_from_a_mirror_fall_back_to_the_origin(
    registry: RegistryServer, mirror_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    data = os.urandom(3000)
    digest = make_client(registry.host).push_blob(repo, data).digest
    make_client(mirror_registry.host).push_blob(repo, data)
    _flip_byte(mirror_registry, digest)

    client = make_client(registry.host, mirrors=[mirror_registry.url])
    assert client.get_blob(repo, digest) == data


def test_mirrors_are_tried_in_order(
    registry: RegistryServer, mirror_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    data = os.urandom(100)
    digest = make_client(mirror_registry.host).push_blob(repo, data).digest
    dead_mirror = f"http://127.0.0.1:{free_port()}"
    # Counting fronts: the first live mirror lacks the blob (404), the second has it, and the origin
    # (which lacks it too) must not be asked at all.
    with RedirectServer(registry.url) as empty_mirror, RedirectServer(registry.url) as origin:
        client = make_client(origin.host, mirrors=[dead_mirror, empty_mirror.url, mirror_registry.url])
        assert client.get_blob(repo, digest) == data
    assert (empty_mirror.redirects, origin.redirects) == (1, 0)


def test_unreachable_mirror_is_skipped_for_a_while(
    registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    digest = make_client(registry.host).push_blob(repo, b"x" * 100).digest
    now = [0.0]

    def hang_up(conn: socket.socket) -> None:
        conn.close()

    with RawServer(hang_up) as dead_mirror:
        client = make_client(registry.host, mirrors=[f"http://{dead_mirror.host}"], clock=lambda: now[0])
        assert client.read_blob_range(repo, digest, 0, 10) == b"x" * 10
        assert dead_mirror.connections == 1  # one attempt, no retries: the origin is the fallback
        client.read_blob_range(repo, digest, 0, 10)
        assert dead_mirror.connections == 1  # skipped while cooling down
        now[0] += MIRROR_COOLDOWN + 1
        client.read_blob_range(repo, digest, 0, 10)
        assert dead_mirror.connections == 2  # tried again afterwards


def test_failure_everywhere_raises_the_origins_error_with_the_mirrors_as_notes(
    registry: RegistryServer, mirror_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    client = make_client(registry.host, mirrors=[mirror_registry.url])
    with pytest.raises(NotFoundError) as e:
        client.get_manifest(repo, "latest")
    assert registry.host in str(e.value)
    assert any(mirror_registry.url in note for note in e.value.__notes__)


def test_pushes_go_to_the_origin_only(
    registry: RegistryServer, mirror_registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    client = make_client(registry.host, mirrors=[mirror_registry.url])
    digest = client.push_blob(repo, b"origin only").digest
    assert make_client(registry.host).blob_exists(repo, digest)
    assert not make_client(mirror_registry.host).blob_exists(repo, digest)


def test_requests_go_through_the_configured_http_proxy(
    registry: RegistryServer, make_client: ClientFactory, repo: str
) -> None:
    image = make_image([os.urandom(2000)])
    with ForwardProxy() as proxy:
        client = make_client(registry.host, proxy=proxy.url)
        push_image(client, repo, image)
        resolved = client.resolve(f"{registry.host}/{repo}")
        assert (
            client.read_blob_range(repo, resolved.manifest.layers[0].digest, 5, 10) == image.layers[0][5:15]
        )
    methods = {m for m, _ in proxy.requests}
    assert {"HEAD", "POST", "PUT", "GET"} <= methods
    assert all(url.startswith(registry.url) for _, url in proxy.requests)


def test_dead_proxy_is_reported_as_unavailable(registry: RegistryServer, make_client: ClientFactory) -> None:
    client = make_client(registry.host, proxy=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryUnavailableError) as e:
        client.get_manifest("a/b", "latest")
    assert f"through the HTTP proxy {client.session.proxy}" in str(e.value)


def test_bad_mirror_url_is_refused() -> None:
    with pytest.raises(ValueError, match="mirror"):
        RegistryClient("127.0.0.1:5000", mirrors=["ftp://mirror"], credentials=lambda h: None)


# -- hosts.toml capabilities (p2p.hosts) ------------------------------------------------------------


def _hosts(tmp_path: Path, registry: str, text: str) -> RegistryHosts:
    d = tmp_path / "certs.d" / registry
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(text)
    return Resolver(RegistrySettings(config_path=str(tmp_path / "certs.d")), {}).hosts(registry)


def test_a_pull_only_mirror_serves_digests_but_never_resolves_tags(
    registry: RegistryServer,
    mirror_registry: RegistryServer,
    make_client: ClientFactory,
    repo: str,
    tmp_path: Path,
) -> None:
    image = make_image([os.urandom(100)])
    push_image(make_client(mirror_registry.host), repo, image)  # on the mirror only
    hosts = _hosts(tmp_path, registry.host, f'[host."{mirror_registry.url}"]\ncapabilities = ["pull"]\n')
    client = make_client(registry.host, hosts=hosts)
    with pytest.raises(NotFoundError) as e:
        client.resolve(f"{registry.host}/{repo}")  # a tag: the origin only, which lacks it
    assert not getattr(e.value, "__notes__", None), "the pull-only mirror was asked to resolve a tag"
    assert client.get_manifest(repo, image.manifest_digest).digest == image.manifest_digest
    assert client.get_blob(repo, image.layer_descriptors[0].digest) == image.layers[0]


def test_a_pull_and_resolve_mirror_resolves_tags(
    registry: RegistryServer,
    mirror_registry: RegistryServer,
    make_client: ClientFactory,
    repo: str,
    tmp_path: Path,
) -> None:
    image = make_image([os.urandom(100)])
    push_image(make_client(mirror_registry.host), repo, image)
    hosts = _hosts(
        tmp_path, registry.host, f'[host."{mirror_registry.url}"]\ncapabilities = ["pull", "resolve"]\n'
    )
    client = make_client(registry.host, hosts=hosts)
    assert client.resolve(f"{registry.host}/{repo}").manifest.digest == image.manifest_digest


def test_pushes_are_refused_when_no_endpoint_may_take_them(
    registry: RegistryServer, make_client: ClientFactory, repo: str, tmp_path: Path
) -> None:
    hosts = _hosts(
        tmp_path, registry.host, f'server = "{registry.url}"\ncapabilities = ["pull", "resolve"]\n'
    )
    client = make_client(registry.host, hosts=hosts)
    with pytest.raises(HostsConfigError, match="capabilities push that a push needs") as e:
        client.push_blob(repo, b"read-only")
    assert e.value.path == hosts.source


def test_override_path_makes_the_mirror_url_the_api_root(
    registry: RegistryServer, make_client: ClientFactory, repo: str, tmp_path: Path
) -> None:
    digest = make_client(registry.host).push_blob(repo, b"override").digest
    dead_origin = f"127.0.0.1:{free_port()}"
    # The front serves the distribution API at its root: it redirects /<repo>/blobs/... to the
    # registry's /v2/<repo>/blobs/...; a request for /v2/... would land on /v2/v2/... and miss.
    with RedirectServer(registry.url + "/v2") as front:
        hosts = _hosts(
            tmp_path, dead_origin, f'[host."{front.url}"]\ncapabilities = ["pull"]\noverride_path = true\n'
        )
        client = make_client(dead_origin, hosts=hosts)
        assert client.get_blob(repo, digest) == b"override"
    assert front.redirects == 1
