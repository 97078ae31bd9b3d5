"""`damselfly rpull` against a real containerd 1.6 whose proxy plugin ``damselfly`` is a `damselfly serve`
started by the test, and the real loopback registry: plain images unpack through containerd's Diff
service and run with ``ctr run --snapshotter damselfly``; converted images are handed to the
snapshotter as remote layers; the GC labels let ``ctr image rm --sync`` remove everything; and the
failures an operator meets (containerd down, snapshotter not registered or not running, registry
errors) end with exit status 1, a message saying what to do, and nothing left behind. (An unreachable
containerd needs none: tests/snapshotter/test_rpull.py.)
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from p2p.auth import static_credentials
from p2p.registry import RegistryClient
from scripts.demolib.registry import free_port
from scripts.demolib.serve import release as release_remote
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_ERROR, EXIT_OK
from tests import oci_images as oi
from tests.p2p.registry_server import RegistryServer
from tests.snapshotter import serving
from tests.snapshotter.remote_lab import serve_config

from . import observe
from .conftest import ContainerdFactory
from .containerd import Containerd, remove_container, wait_task

SNAPSHOTTER = "damselfly"
NS = "rpull-test"


@dataclass
class Stack:
    containerd: Containerd
    served: serving.Served
    config: Path
    metrics: str  # host:port of the device daemon's /metrics ("" when off)


@pytest.fixture
def serve_dir() -> Iterator[Path]:
    """A short directory for `damselfly serve` (its socket path must fit in sun_path)."""
    d = Path(tempfile.mkdtemp(prefix="dfly-rpull-", dir="/tmp"))
    try:
        yield d
    finally:
        serving.unmount_under(d)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def stack(
    make_containerd: ContainerdFactory, serve_dir: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """`damselfly serve` on a temporary root, and a containerd whose proxy plugin ``damselfly`` is it.
    containerd is stopped first, while the snapshotter it may still call is up. A test may set the
    device daemon's background download delay (``indirect`` parameter ``{"background_delay": S}``);
    the daemon's /metrics is served on a free loopback port."""
    state = serve_dir / "state"
    metrics = f"127.0.0.1:{free_port()}"
    options = getattr(request, "param", {})
    config = serve_config(serve_dir / "config.toml", state, device_metrics=metrics, **options)
    served = serving.start(serve_dir, "--config", str(config))
    try:
        c = make_containerd(proxy_plugins={SNAPSHOTTER: str(served.socket)}, namespace=NS)
        yield Stack(c, served, config, metrics)
        forced = c.stop()  # before the snapshotter goes: containerd may still call it
        assert not forced, forced
    finally:
        served.stop()
        # the device daemon (and any chain mount) outlives `serve` on purpose; undo them by pid and path
        release_remote(served.root, state)


def rpull(containerd: Containerd, ref: str, *extra: str) -> Result:
    return CliRunner().invoke(
        cli,
        ["rpull", ref, "--address", containerd.address, "--namespace", NS, *extra],
        catch_exceptions=False,
    )


def push_busybox(
    registry: RegistryServer, tmp_path: Path, repo: str, *extra: oi.Layer
) -> tuple[str, oi.BuiltImage]:
    built = oi.write_layout(oi.busybox_image(*extra), tmp_path / "layout")
    return oi.push_image(registry.host, built, repo, "v1"), built


def assert_failed_leaving_nothing(containerd: Containerd, r: Result, *needles: str) -> None:
    """The pull failed, saying each of `needles`, and left containerd no image and no lease."""
    assert r.exit_code == EXIT_ERROR, r.output
    for needle in needles:
        assert needle in r.output, (needle, r.output)
    assert containerd.ctr("image", "ls", "-q").stdout.strip() == ""
    assert not containerd.ctr("leases", "ls").stdout.splitlines()[1:]


def content_labels(containerd: Containerd) -> dict[str, dict[str, str]]:
    """Every blob of the namespace's content store → its labels (``ctr content ls``)."""
    out: dict[str, dict[str, str]] = {}
    for line in containerd.ctr("content", "ls").stdout.splitlines()[1:]:
        cols = line.split()
        labels = cols[-1] if len(cols) >= 4 and "=" in cols[-1] else ""
        out[cols[0]] = dict(kv.split("=", 1) for kv in labels.split(",") if kv)
    return out


def snapshot_info(containerd: Containerd, key: str) -> dict[str, object]:
    info: dict[str, object] = json.loads(
        containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "info", key).stdout
    )
    return info


def snapshot_names(containerd: Containerd) -> list[str]:
    lines = containerd.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout.splitlines()[1:]
    return sorted(line.split()[0] for line in lines if line.strip())


def layer_lines(output: str) -> list[str]:
    """The state word of each ``layer i/n DIGEST: STATE ...`` line."""
    return re.findall(r"^layer \d+/\d+ [0-9a-f]{12}: (\w+)", output, re.MULTILINE)


# -- plain images ----------------------------------------------------------------------------------


def test_plain_image_is_unpacked_and_runs_with_the_damselfly_snapshotter(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str
) -> None:
    extra = oi.Layer((oi.file("etc/motd", b"second layer\n"),), created_by="ADD motd")
    ref, built = push_busybox(registry, tmp_path, repo, extra)
    c = stack.containerd

    r = rpull(c, ref)
    assert r.exit_code == EXIT_OK, r.output
    assert layer_lines(r.output) == ["unpacked", "unpacked"], r.output
    assert f"image {ref}: created" in r.output
    assert re.search(r"^done: \d+\.\d\ds$", r.output, re.MULTILINE), r.output

    assert c.image_target(ref) == built.manifest_digest
    chains = built.chain_ids
    assert c.image_chain_id(ref) == chains[-1]
    assert set(chains) <= set(snapshot_names(c))
    assert not [k for k in snapshot_names(c) if k.startswith("extract-")], "an extraction key was left"

    # the labels containerd's GC follows: manifest -> config + layers, config -> top snapshot
    labels = content_labels(c)
    m_labels = labels[built.manifest_digest]
    assert m_labels["containerd.io/gc.ref.content.config"] == built.config_digest
    for i, layer in enumerate(built.layers):
        assert m_labels[f"containerd.io/gc.ref.content.l.{i}"] == layer.digest
        assert labels[layer.digest]["containerd.io/uncompressed"] == layer.diff_id
    assert labels[built.config_digest][f"containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"] == chains[-1]
    assert not c.ctr("leases", "ls").stdout.splitlines()[1:], "the pull's lease was not deleted"

    run = c.run(ref, ["/bin/sh", "-c", "echo hi; cat /etc/motd"], snapshotter=SNAPSHOTTER)
    assert run.stdout == "hi\nsecond layer\n"

    # a second pull finds everything there
    again = rpull(c, ref)
    assert again.exit_code == EXIT_OK, again.output
    assert layer_lines(again.output) == ["exists", "exists"], again.output
    assert f"image {ref}: updated" in again.output


def test_image_rm_lets_containerds_gc_remove_snapshots_and_content(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str
) -> None:
    ref, _ = push_busybox(registry, tmp_path, repo)
    c = stack.containerd
    assert rpull(c, ref).exit_code == EXIT_OK
    assert (
        c.run(ref, ["/bin/sh", "-c", "echo hi > /tmp/x; cat /tmp/x"], snapshotter=SNAPSHOTTER).stdout
        == "hi\n"
    )
    assert snapshot_names(c)
    assert serving.names(stack.served.stub, None)

    c.ctr("image", "rm", "--sync", ref)

    assert snapshot_names(c) == []
    assert serving.names(stack.served.stub, None) == [], "containerd's GC left snapshots in damselfly"
    assert content_labels(c) == {}
    assert serving.mounts_under(stack.served.root) == []


def test_index_image_is_pulled_for_this_platform(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str
) -> None:
    built = oi.write_layout(oi.busybox_image(cmd=("/bin/sh", "-c", "echo from-index")), tmp_path / "layout")
    index = oi.canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": oi.MT_INDEX,
            "manifests": [
                {
                    "mediaType": oi.MT_MANIFEST,
                    "digest": built.manifest_digest,
                    "size": len(built.manifest),
                    "platform": {"os": "linux", "architecture": oi.host_arch()},
                }
            ],
        }
    )
    with RegistryClient(registry.host, plain_http=True, credentials=static_credentials({})) as client:
        oi.push_layout(client, repo, built, built.manifest_digest)
        client.push_manifest(repo, index, oi.MT_INDEX, "multi")
    ref = f"{registry.host}/{repo}:multi"
    c = stack.containerd

    r = rpull(c, ref)
    assert r.exit_code == EXIT_OK, r.output
    index_digest = oi.sha256_digest(index)
    assert c.image_target(ref) == index_digest
    labels = content_labels(c)
    assert labels[index_digest]["containerd.io/gc.ref.content.m.0"] == built.manifest_digest
    assert c.run(ref, snapshotter=SNAPSHOTTER).stdout == "from-index\n"


# -- converted images ------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", [{"background_delay": 0.5}], indirect=True)
def test_converted_image_layers_are_prepared_as_remote_layers(
    stack: Stack, registry: RegistryServer, tmp_path: Path, repo: str
) -> None:
    src, _ = push_busybox(registry, tmp_path, repo)
    dst = f"{registry.host}/{repo}:damselfly"
    conv = CliRunner().invoke(
        cli, ["convert", "--quiet", src, dst, "--cache-dir", str(tmp_path / "cache")], catch_exceptions=False
    )
    assert conv.exit_code == EXIT_OK, conv.output
    c = stack.containerd

    r = rpull(c, dst)
    assert r.exit_code == EXIT_OK, r.output
    assert layer_lines(r.output) == ["remote"], r.output

    chain = c.image_chain_id(dst)
    info = snapshot_info(c, chain)
    labels = info["Labels"]
    assert isinstance(labels, dict)
    assert labels["containerd.io/snapshot.ref"] == chain
    assert labels["containerd.io/snapshot/cri.image-ref"] == dst
    assert labels["containerd.io/snapshot/damselfly/index-digest"].startswith("sha256:")
    manifest_digest = c.image_target(dst)
    assert labels["containerd.io/snapshot/cri.manifest-digest"] == manifest_digest
    layer = json.loads(c.content(manifest_digest))["layers"][0]
    assert labels["containerd.io/snapshot/cri.layer-digest"] == layer["digest"]
    assert layer["digest"] not in content_labels(c), "rpull downloaded a converted layer"

    assert c.run(dst, ["/bin/sh", "-c", "echo hi"], snapshotter=SNAPSHOTTER).stdout == "hi\n"

    # While a container runs, the background download completes the layer: status and /metrics say so.
    c.run(
        dst,
        ["/bin/sh", "-c", "sleep 300"],
        container_id="bg",
        snapshotter=SNAPSHOTTER,
        detach=True,
        extra=["--null-io"],
    )
    try:
        wait_task(c, "bg", "RUNNING")
        assert_completed_in_the_background(stack, dst, layer["digest"], layer["size"])
    finally:
        remove_container(c, "bg")

    c.ctr("image", "rm", "--sync", dst)
    assert snapshot_names(c) == []
    assert serving.names(stack.served.stub, None) == []
    assert serving.mounts_under(stack.served.root) == [], "the image's device is still mounted"


def assert_completed_in_the_background(stack: Stack, ref: str, digest: str, size: int) -> None:
    """Once the background download of the image's one layer completes, `damselfly status --json` shows
    it 100% local and verified, and the daemon's /metrics the same bytes."""

    def complete() -> bool:
        status = observe.status(stack.config, stack.served.root)
        return any(b["digest"] == digest and b["complete"] for b in status["blobs"])

    observe.wait_for(f"the background download of {digest}", complete)
    status = observe.status(stack.config, stack.served.root)
    (chain,) = [x for x in status["chains"] if ref in x["images"]]
    assert chain["layers"] == [digest] and chain["attached"] and chain["mounted"], chain
    b = observe.blob(status, digest)
    assert (b["size"], b["local_bytes"], b["percent"]) == (size, size, 100.0), b
    assert b["verified"] and b["background"] == "complete" and b["background_error"] is None, b
    # The whole blob came from the registry (the node's counter also has the config); the blob's own
    # counter starts at its open, and the first container's device may have been detached and this one
    # opened on a complete cache since.
    assert size <= status["bytes"]["fetched"]["registry"], status["bytes"]
    assert 0 <= b["registry_bytes"] <= status["bytes"]["fetched"]["registry"], (b, status["bytes"])
    assert status["bytes"]["read"]["registry"] + status["bytes"]["read"]["cache"] > 0, status["bytes"]
    assert status["errors"] == [], status["errors"]

    samples = observe.scrape(stack.metrics)
    assert observe.sample(samples, "damselfly_blob_local_bytes", blob=digest) == size
    assert observe.sample(samples, "damselfly_blob_complete", blob=digest) == 1
    assert observe.sample(samples, "damselfly_background_download", blob=digest, state="complete") == 1
    fetched = observe.sample(samples, "damselfly_fetched_bytes_total", source="registry")
    assert fetched == status["bytes"]["fetched"]["registry"]  # nothing is fetched once complete
    assert observe.sample(samples, "damselfly_fetch_failures_total", source="registry") == 0


# -- failures --------------------------------------------------------------------------------------


def test_snapshotter_not_registered_in_containerd_is_named_with_the_remedy(
    make_containerd: ContainerdFactory, registry: RegistryServer, tmp_path: Path, repo: str
) -> None:
    ref, _ = push_busybox(registry, tmp_path, repo)
    c = make_containerd(namespace=NS)  # no proxy plugins
    assert_failed_leaving_nothing(
        c, rpull(c, ref), "containerd has no snapshotter 'damselfly'", "[proxy_plugins.damselfly]"
    )


def test_snapshotter_not_running_is_named_and_nothing_is_left(
    make_containerd: ContainerdFactory, registry: RegistryServer, tmp_path: Path, repo: str, serve_dir: Path
) -> None:
    ref, _ = push_busybox(registry, tmp_path, repo)
    c = make_containerd(proxy_plugins={SNAPSHOTTER: str(serve_dir / "nobody.sock")}, namespace=NS)
    assert_failed_leaving_nothing(
        c, rpull(c, ref), "cannot reach the snapshotter 'damselfly'", "damselfly serve"
    )


def test_missing_tag_is_a_registry_error_and_leaves_no_lease(
    stack: Stack, registry: RegistryServer, repo: str
) -> None:
    c = stack.containerd
    r = rpull(c, f"{registry.host}/{repo}:nope")
    assert_failed_leaving_nothing(c, r)
    assert "not found" in r.output.lower()
