"""Registries reached as containerd's hosts.toml says (issue 15), with real docker-registry processes on
loopback: a TLS registry whose CA only a hosts.toml names, and a pull-through-cache mirror in front of an
origin, through `damselfly fetch`, `damselfly mount`, the device daemon's block reads and background
download, and the Prepare check of `serve` (`BlobCheck`).

The hosts tree is a temporary directory named by a config file's ``[registry] config_path`` (tests must
not write /etc/containerd). Registries, daemons and mounts are stopped and removed at teardown by pid
and path (`RegistryServer`, `DeviceLab`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2p.hosts import RegistrySettings, Resolver
from p2p.registry import RegistryClient
from snapshotter.remote.blobcheck import BlobCheck, RemoteOptions
from tests.conftest import FAST_RETRY, FAST_TIMEOUTS, NO_CREDENTIALS
from tests.p2p.images import make_image, push_image
from tests.p2p.registry_server import LoopbackTLS, RegistryServer

from .devd import DAMSELFLY, DeviceLab, MiB, build_image, push_layout
from .test_blockimage import assert_same_tree, make_tree

REPO = "hosts/image"
DAMSELFLY_UA = b'"damselfly/'


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> LoopbackTLS:
    return LoopbackTLS.generate(tmp_path_factory.mktemp("hosts-tls"))


@pytest.fixture(scope="module")
def tls_registry(tls: LoopbackTLS) -> Iterator[RegistryServer]:
    """A registry serving HTTPS with a certificate of the test CA (in no trust store)."""
    with RegistryServer(name="hosts-tls", tls=tls) as server:
        yield server


def hosts_config(root: Path, host: str, hosts_toml: str, files: dict[str, bytes] | None = None) -> Path:
    """A damselfly config whose ``[registry] config_path`` is a new hosts tree under `root` holding
    `host`'s hosts.toml (and `files` next to it); returns the config file."""
    certs = root / "certs.d"
    d = certs / host
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(hosts_toml)
    for name, data in (files or {}).items():
        (d / name).write_bytes(data)
    config = root / "config.toml"
    config.write_text(f'[registry]\nconfig_path = "{certs}"\n')
    return config


def _client(config: Path, host: str) -> RegistryClient:
    settings = RegistrySettings(config_path=str(config.parent / "certs.d"))
    return Resolver(settings).client(
        host, credentials=NO_CREDENTIALS, retry=FAST_RETRY, timeouts=FAST_TIMEOUTS
    )


def _push_image(tmp_path: Path, client: RegistryClient, files: int = 120) -> Path:
    src = tmp_path / "src"
    make_tree(src, files=files, seed=15)
    image = build_image(src, tmp_path / "image", vsize=64 * MiB)
    push_layout(client, REPO, image.layout, "v1")
    return src


def _damselfly(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DAMSELFLY), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _trusting(tmp_path: Path, registry: RegistryServer, tls: LoopbackTLS) -> Path:
    return hosts_config(
        tmp_path / "trusting",
        registry.host,
        f'server = "{registry.url}"\nca = "ca.crt"\n',
        {"ca.crt": tls.ca_pem},
    )


def _not_trusting(tmp_path: Path, registry: RegistryServer) -> Path:
    return hosts_config(tmp_path / "not-trusting", registry.host, f'server = "{registry.url}"\n')


def _assert_refused_with_the_remedy(
    proc: subprocess.CompletedProcess[str], registry: RegistryServer, config: Path
) -> None:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    hosts_toml = config.parent / "certs.d" / registry.host / "hosts.toml"
    assert f"certificate verify failed for {registry.url}" in proc.stderr, proc.stderr
    assert f"add its CA as `ca` in {hosts_toml}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# -- TLS with a CA only hosts.toml names -----------------------------------------------------------


def test_fetch_trusts_a_registry_through_the_ca_its_hosts_toml_names(
    tls_registry: RegistryServer, tls: LoopbackTLS, tmp_path: Path
) -> None:
    trusting = _trusting(tmp_path, tls_registry, tls)
    image = make_image([os.urandom(5000)])
    with _client(trusting, tls_registry.host) as client:
        push_image(client, "hosts/fetch", image, "v1")
    layer = image.layer_descriptors[0].digest
    ref = f"{tls_registry.host}/hosts/fetch:v1"

    ok = _damselfly("fetch", ref, "--dest", str(tmp_path / "out"), "--quiet", "--config", str(trusting))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "blobs" / "sha256" / layer.partition(":")[2]).stat().st_size == 5000

    not_trusting = _not_trusting(tmp_path, tls_registry)
    refused = _damselfly(
        "fetch", ref, "--dest", str(tmp_path / "out2"), "--quiet", "--config", str(not_trusting)
    )
    _assert_refused_with_the_remedy(refused, tls_registry, not_trusting)
    # --hosts-dir names the tree without a config file, as `ctr --hosts-dir` does.
    again = _damselfly(
        "fetch",
        ref,
        "--dest",
        str(tmp_path / "out3"),
        "--quiet",
        "--hosts-dir",
        str(trusting.parent / "certs.d"),
    )
    assert again.returncode == 0, again.stderr


def test_mount_reads_a_converted_image_from_a_tls_registry_whose_ca_hosts_toml_names(
    lab: DeviceLab, tls_registry: RegistryServer, tls: LoopbackTLS, tmp_path: Path
) -> None:
    trusting = _trusting(tmp_path, tls_registry, tls)
    with _client(trusting, tls_registry.host) as client:
        src = _push_image(tmp_path, client)
    ref = f"{tls_registry.host}/{REPO}:v1"

    # The daemon's block reads and background download use its own [registry] settings.
    daemon = lab.daemon(extra_args=("--config", str(trusting)), background_delay=0.2)
    mp = lab.mount_point("mp")
    daemon.cli("mount", ref, str(mp), "--config", str(trusting))
    assert_same_tree(src, mp)
    daemon.wait_complete()
    daemon.cli("umount", str(mp))

    # Without the CA, `mount` says which host failed and where its CA goes; nothing is mounted.
    not_trusting = _not_trusting(tmp_path, tls_registry)
    refused = daemon.cli(
        "mount", ref, str(lab.mount_point("mp2")), "--config", str(not_trusting), check=False
    )
    _assert_refused_with_the_remedy(refused, tls_registry, not_trusting)


def test_a_daemon_without_the_ca_refuses_the_attach_naming_its_own_hosts_toml(
    lab: DeviceLab, tls_registry: RegistryServer, tls: LoopbackTLS, tmp_path: Path
) -> None:
    trusting = _trusting(tmp_path, tls_registry, tls)
    with _client(trusting, tls_registry.host) as client:
        _push_image(tmp_path, client, files=20)
    not_trusting = _not_trusting(tmp_path, tls_registry)
    daemon = lab.daemon(extra_args=("--config", str(not_trusting)), read_timeout=2.0)
    # The image resolves here (this command trusts the CA); the daemon's reads (the layer's index, at
    # attach) do not, and its error comes back through the control socket with its exit status.
    mp = lab.mount_point("mp")
    proc = daemon.cli(
        "mount", f"{tls_registry.host}/{REPO}:v1", str(mp), "--config", str(trusting), check=False
    )
    _assert_refused_with_the_remedy(proc, tls_registry, not_trusting)


# -- a pull-through mirror in front of the origin ---------------------------------------------------


@pytest.fixture
def origin_and_mirror(tmp_path: Path) -> Iterator[tuple[RegistryServer, RegistryServer]]:
    """An origin registry and a pull-through cache of it, both logging every request with its
    User-Agent: the mirror's own fetches from the origin are Go's, damselfly's say damselfly."""
    with (
        RegistryServer(name="hosts-origin", access_log=True) as origin,
        RegistryServer(name="hosts-mirror", upstream=origin.url, access_log=True) as mirror,
    ):
        yield origin, mirror


def _mirror_config(tmp_path: Path, origin: RegistryServer, mirror: RegistryServer) -> Path:
    return hosts_config(
        tmp_path / "mirrored", origin.host, f'[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )


def _log_since(registry: RegistryServer, offset: int) -> list[bytes]:
    with registry.log.open("rb") as f:
        f.seek(offset)
        return [line for line in f.read().split(b"\n") if b'"HEAD ' in line or b'"GET ' in line]


def test_prepare_check_goes_to_the_mirror(
    origin_and_mirror: tuple[RegistryServer, RegistryServer], tmp_path: Path
) -> None:
    origin, mirror = origin_and_mirror
    with RegistryClient(origin.host, plain_http=True, credentials=NO_CREDENTIALS) as pusher:
        digest = pusher.push_blob("hosts/check", os.urandom(4000)).digest
    config = _mirror_config(tmp_path, origin, mirror)
    offset = origin.log_offset()
    check = BlobCheck(RemoteOptions(registry=RegistrySettings(config_path=str(config.parent / "certs.d"))))
    try:
        assert check.size(origin.host, "hosts/check", digest) == 4000
    finally:
        check.close()
    assert not [line for line in _log_since(origin, offset) if DAMSELFLY_UA in line]
    assert any(
        b"HEAD /v2/hosts/check/blobs/" + digest.encode() in line and DAMSELFLY_UA in line
        for line in _log_since(mirror, 0)
    )


def test_block_reads_and_background_download_go_through_the_mirror_not_the_origin(
    lab: DeviceLab, origin_and_mirror: tuple[RegistryServer, RegistryServer], tmp_path: Path
) -> None:
    origin, mirror = origin_and_mirror
    with RegistryClient(origin.host, plain_http=True, credentials=NO_CREDENTIALS) as pusher:
        src = _push_image(tmp_path, pusher)
    config = _mirror_config(tmp_path, origin, mirror)
    offset = origin.log_offset()

    daemon = lab.daemon(extra_args=("--config", str(config)), background_delay=0.2)
    mp = lab.mount_point("mp")
    daemon.cli("mount", f"{origin.host}/{REPO}:v1", str(mp), "--config", str(config))
    assert_same_tree(src, mp)
    daemon.wait_complete()
    daemon.cli("umount", str(mp))

    from_damselfly = [line for line in _log_since(origin, offset) if DAMSELFLY_UA in line]
    assert not from_damselfly, from_damselfly
    upstream = [line for line in _log_since(origin, offset) if b"/blobs/" in line]
    assert upstream, "the mirror fetched nothing from the origin: was it asked at all?"
    ours = [line for line in _log_since(mirror, 0) if DAMSELFLY_UA in line]
    assert any(b"/manifests/v1" in line for line in ours), ours
    assert any(b"/blobs/" in line and b'" 206 ' in line for line in ours), ours  # ranged block reads
