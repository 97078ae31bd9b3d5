"""``damselfly convert --referrer`` and ``damselfly rpull`` of the *source* tag, on real parts: a real
docker-registry 2.8 (no referrers API: the referrers tag schema), a containerd 1.6 whose proxy plugin
``damselfly`` is a `damselfly serve` started here, and ``ctr run``.

- the converted variant is found among the referrers of the source's platform manifest and pulled
  lazily under the source's name (its layers "remote");
- with the converted manifest deleted from the registry (its listing left behind) the source is
  pulled as it is;
- with a converted layer's blob deleted from the registry's storage, the snapshotter refuses the
  layer at Prepare (its HEAD check fails), rpull says so on a ``fallback:`` line and pulls the source
  instead, the image record names the source manifest, the container runs, and serve's
  ``damselfly_remote_fallbacks_total`` counted the refusal.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from blockformat.annotations import IMAGE_ARTIFACT_TYPE, KEY_SOURCE_DIGEST, KEY_SOURCE_REPOSITORY
from p2p.manifest import Index, Manifest, variant_problem
from p2p.reference import parse_reference
from p2p.referrers import find_referrers
from p2p.registry import RegistryClient
from scripts.demolib.registry import free_port
from scripts.demolib.serve import release as release_remote
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_OK
from snapshotter.device.client import DeviceClient
from tests import oci_images as oi
from tests.p2p.registry_server import RegistryServer
from tests.snapshotter import serving
from tests.snapshotter.remote_lab import serve_config

from . import observe
from .conftest import ContainerdFactory
from .containerd import Containerd

SNAPSHOTTER = "damselfly"
NS = "rpull-referrers"


@dataclass
class Stack:
    containerd: Containerd
    served: serving.Served
    metrics: str  # host:port of serve's /metrics
    state: Path  # the device daemon's state directory (rpull --state-dir: lookups through it)


@pytest.fixture
def stack(make_containerd: ContainerdFactory) -> Iterator[Stack]:
    """`damselfly serve` (its /metrics on a free loopback port) and a containerd whose proxy plugin
    ``damselfly`` is it; containerd stops first, while the snapshotter it may still call is up."""
    d = Path(tempfile.mkdtemp(prefix="dfly-refs-", dir="/tmp"))  # short: the socket's sun_path
    state = d / "state"
    metrics = f"127.0.0.1:{free_port()}"
    served = serving.start(d, "--config", str(serve_config(d / "config.toml", state, metrics=metrics)))
    try:
        c = make_containerd(proxy_plugins={SNAPSHOTTER: str(served.socket)}, namespace=NS)
        yield Stack(c, served, metrics, state)
        forced = c.stop()
        assert not forced, forced
    finally:
        served.stop()
        release_remote(served.root, state)  # the device daemon and chain mounts outlive serve
        serving.unmount_under(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def convert_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converter cache for the module: the busybox layer converts once."""
    return tmp_path_factory.mktemp("convert-cache")


@dataclass(frozen=True)
class Converted:
    src: str  # the source tag
    dst: str  # the converted image's tag (same repository)
    source: oi.BuiltImage
    manifest: Manifest  # the converted manifest
    output: str


def convert_with_referrer(
    registry: RegistryServer, tmp_path: Path, repo: str, cache: Path, line: str
) -> Converted:
    motd = oi.Layer((oi.file("etc/motd", f"{line}\n".encode()),), created_by="ADD motd")
    built = oi.write_layout(oi.busybox_image(motd, cmd=("/bin/cat", "/etc/motd")), tmp_path / "layout")
    src = oi.push_image(registry.host, built, repo, "v1")
    dst = f"{registry.host}/{repo}:v1-damselfly"
    r = CliRunner().invoke(
        cli, ["convert", "--quiet", "--referrer", src, dst, "--cache-dir", str(cache)], catch_exceptions=False
    )
    assert r.exit_code == EXIT_OK, r.output
    with RegistryClient(registry.host) as client:
        manifest = client.get_manifest(repo, "v1-damselfly")
    assert isinstance(manifest, Manifest)
    return Converted(src, dst, built, manifest, r.output)


def rpull(stack: Stack, ref: str, *, via_daemon: bool = True) -> Result:
    """``damselfly rpull REF``: through the node's device daemon (its `variant` and `resolve` ops), or
    with `via_daemon` False as on a node without one (rpull's own registry client)."""
    state = stack.state if via_daemon else stack.state.parent / "no-daemon"
    c = stack.containerd
    argv = ["rpull", ref, "--address", c.address, "--namespace", NS, "--state-dir", str(state)]
    return CliRunner().invoke(cli, argv, catch_exceptions=False)


def layer_lines(output: str) -> list[str]:
    return re.findall(r"^layer \d+/\d+ [0-9a-f]{12}: (\w+)", output, re.MULTILINE)


def fallbacks(stack: Stack) -> float:
    """serve's count of converted layers refused at Prepare because their blob is not there."""
    samples = observe.scrape(stack.metrics)
    return observe.sample(samples, "damselfly_remote_fallbacks_total", reason="source")


def delete_manifest(registry: RegistryServer, repo: str, digest: str) -> None:
    r = httpx.delete(f"{registry.url}/v2/{repo}/manifests/{digest}", timeout=10)
    assert r.status_code == 202, (r.status_code, r.text)


def test_convert_referrer_links_the_variant_to_its_source(
    registry: RegistryServer, tmp_path: Path, repo: str, convert_cache: Path
) -> None:
    conv = convert_with_referrer(registry, tmp_path, repo, convert_cache, "linked")
    m = conv.manifest
    # subject = the source manifest, our artifact type, the source recorded in the annotations
    assert m.subject is not None and m.subject.digest == conv.source.manifest_digest
    assert m.subject.size == len(conv.source.manifest)
    assert m.artifact_type == IMAGE_ARTIFACT_TYPE and variant_problem(m) == ""
    assert m.annotations[KEY_SOURCE_DIGEST] == conv.source.manifest_digest
    assert m.annotations[KEY_SOURCE_REPOSITORY] == f"{registry.host}/{repo}"
    assert f"{m.digest} is a referrer of {conv.source.manifest_digest} (referrers tag)" in conv.output
    # docker-registry 2.8 has no referrers API: the tag schema lists it, with artifactType and
    # annotations, so a reader chooses without fetching the manifest
    with RegistryClient(registry.host) as client:
        (entry,) = find_referrers(client, repo, conv.source.manifest_digest, IMAGE_ARTIFACT_TYPE)
        listing = json.loads(client.get_manifest(repo, "sha256-" + conv.source.manifest_digest[7:]).raw)
    assert entry.digest == m.digest and entry.size == m.size
    assert entry.annotations[KEY_SOURCE_DIGEST] == conv.source.manifest_digest
    assert listing["manifests"][0]["artifactType"] == IMAGE_ARTIFACT_TYPE
    # the source's tag is untouched
    with RegistryClient(registry.host) as client:
        assert client.get_manifest(repo, "v1").digest == conv.source.manifest_digest


@pytest.mark.parametrize("via_daemon", [True, False], ids=["daemon", "direct"])
def test_rpull_of_the_source_tag_runs_the_converted_variant_lazily(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str, convert_cache: Path, via_daemon: bool
) -> None:
    conv = convert_with_referrer(registry, tmp_path, repo, convert_cache, "lazy variant")
    c = stack.containerd
    # the lookup goes through serve's device daemon, or (no daemon at that state directory) direct;
    # serve starts its daemon in the background, and a conversion may end before it is up
    deadline = time.monotonic() + 60
    while DeviceClient(str(stack.state)).ping() is None:
        assert time.monotonic() < deadline, "serve's device daemon did not come up within 60 s"
        time.sleep(0.1)
    assert DeviceClient(str(stack.state.parent / "no-daemon")).ping() is None

    r = rpull(stack, conv.src, via_daemon=via_daemon)
    assert r.exit_code == EXIT_OK, r.output
    assert f"converted variant {conv.manifest.digest}" in r.output, r.output
    assert layer_lines(r.output) == ["remote", "remote"], r.output
    assert "fallback:" not in r.output
    # containerd's image named by the source tag is the converted manifest
    assert c.image_target(conv.src) == conv.manifest.digest
    assert c.run(conv.src, snapshotter=SNAPSHOTTER).stdout == "lazy variant\n"


def test_without_the_variant_the_source_is_pulled_as_it_is(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str, convert_cache: Path
) -> None:
    conv = convert_with_referrer(registry, tmp_path, repo, convert_cache, "plain again")
    # The converted manifest goes (and its tag with it); the referrers tag still lists it.
    delete_manifest(registry, repo, conv.manifest.digest)
    c = stack.containerd

    r = rpull(stack, conv.src)
    assert r.exit_code == EXIT_OK, r.output
    assert "no converted variant" in r.output, r.output
    assert layer_lines(r.output) == ["unpacked", "unpacked"], r.output
    assert c.image_target(conv.src) == conv.source.manifest_digest
    assert c.run(conv.src, snapshotter=SNAPSHOTTER).stdout == "plain again\n"


def test_a_converted_blob_gone_at_prepare_falls_back_to_the_source(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str, convert_cache: Path
) -> None:
    conv = convert_with_referrer(registry, tmp_path, repo, convert_cache, "fell back")
    # The top converted layer's bytes vanish from the registry's storage (this test's alone: the
    # bottom one, busybox's, is the same blob for every test of the module).
    top = conv.manifest.layers[-1]
    registry.blob_data_path(top.digest).unlink()
    c = stack.containerd
    before = fallbacks(stack)

    r = rpull(stack, conv.src)
    assert r.exit_code == EXIT_OK, r.output
    assert f"converted variant {conv.manifest.digest}" in r.output, r.output
    fallback = [x for x in r.output.splitlines() if x.startswith("fallback:")]
    assert len(fallback) == 1, r.output
    assert f"layer 2/2 {top.digest[7:19]}" in fallback[0], fallback
    assert conv.source.manifest_digest in fallback[0], fallback
    # the bottom layer was taken remotely before the top one was refused; then the source's layers
    assert layer_lines(r.output) == ["remote", "unpacked", "unpacked"], r.output
    # the image record names the source manifest, whose config's diff_ids are the unpacked chain
    assert c.image_target(conv.src) == conv.source.manifest_digest
    assert c.image_chain_id(conv.src) == conv.source.chain_ids[-1]
    assert c.run(conv.src, snapshotter=SNAPSHOTTER).stdout == "fell back\n"
    assert fallbacks(stack) == before + 1


def test_rpull_of_the_converted_tag_falls_back_to_the_source_its_annotations_name(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str, convert_cache: Path
) -> None:
    conv = convert_with_referrer(registry, tmp_path, repo, convert_cache, "by annotation")
    registry.blob_data_path(conv.manifest.layers[-1].digest).unlink()
    c = stack.containerd

    r = rpull(stack, conv.dst, via_daemon=False)
    assert r.exit_code == EXIT_OK, r.output
    assert "fallback:" in r.output and conv.source.manifest_digest in r.output, r.output
    ref = parse_reference(conv.dst)
    assert c.image_target(str(ref)) == conv.source.manifest_digest
    assert c.run(conv.dst, snapshotter=SNAPSHOTTER).stdout == "by annotation\n"


def test_each_platform_of_an_index_gets_its_own_variant_and_rpull_takes_this_hosts(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str, convert_cache: Path
) -> None:
    here = oi.host_arch()
    other = "arm64" if here != "arm64" else "amd64"
    built: dict[str, oi.BuiltImage] = {}
    for arch in (here, other):
        motd = oi.Layer((oi.file("etc/motd", f"built for {arch}\n".encode()),), created_by="ADD motd")
        image = replace(oi.busybox_image(motd, cmd=("/bin/cat", "/etc/motd")), architecture=arch)
        built[arch] = oi.write_layout(image, tmp_path / "src", arch)
    index_digest = oi.write_index_layout(list(built.values()), tmp_path / "src", "multi")
    with RegistryClient(registry.host) as client:
        for b in built.values():
            oi.push_layout(client, repo, b, None)
        index_raw = (tmp_path / "src" / "blobs" / "sha256" / index_digest[7:]).read_bytes()
        client.push_manifest(repo, index_raw, oi.MT_INDEX, "multi")
    src, dst = f"{registry.host}/{repo}:multi", f"{registry.host}/{repo}:multi-damselfly"
    r = CliRunner().invoke(
        cli,
        [
            "convert",
            "--quiet",
            "--referrer",
            "--platform",
            "all",
            src,
            dst,
            "--cache-dir",
            str(convert_cache),
        ],
        catch_exceptions=False,
    )
    assert r.exit_code == EXIT_OK, r.output

    with RegistryClient(registry.host) as client:
        top = client.get_manifest(repo, "multi-damselfly")
        assert isinstance(top, Index)
        doc = json.loads(top.raw)
        assert doc["subject"]["digest"] == index_digest and doc["artifactType"] == IMAGE_ARTIFACT_TYPE
        (listed_index,) = find_referrers(client, repo, index_digest, IMAGE_ARTIFACT_TYPE)
        assert listed_index.digest == top.digest
        variants = {}
        for entry in top.manifests:
            assert entry.platform is not None
            source = built[entry.platform.architecture]
            m = client.get_manifest(repo, entry.digest)
            assert isinstance(m, Manifest)
            # each platform's variant refers to (and records) that platform's source manifest
            assert m.subject is not None and m.subject.digest == source.manifest_digest
            assert m.annotations[KEY_SOURCE_DIGEST] == source.manifest_digest
            (listed,) = find_referrers(client, repo, source.manifest_digest, IMAGE_ARTIFACT_TYPE)
            assert listed.digest == m.digest
            variants[entry.platform.architecture] = m.digest
    assert sorted(variants) == sorted((here, other))

    r = rpull(stack, src)
    assert r.exit_code == EXIT_OK, r.output
    assert f"converted variant {variants[here]} (linux/{here})" in r.output, r.output
    assert stack.containerd.image_target(src) == variants[here]
    assert stack.containerd.run(src, snapshotter=SNAPSHOTTER).stdout == f"built for {here}\n"
