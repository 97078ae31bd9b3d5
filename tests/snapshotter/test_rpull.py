"""`snapshotter.remote.rpull` and `damselfly rpull` without containerd: names and labels (chain IDs,
extraction keys, GC and snapshot labels), the decisions of `Puller` against a recording stand-in for
containerd's API — a layer the snapshotter takes (ALREADY_EXISTS) is never fetched, an active snapshot
is applied and committed or removed on failure, the lease is always deleted — and the command's exit
codes without a containerd. The real thing is in tests/e2e/test_rpull.py."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pytest
from click.testing import CliRunner

from blockformat.annotations import MEDIA_TYPE_LAYER, MEDIA_TYPE_LAYER_V0
from blockformat.digest import Digest
from p2p.manifest import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    Platform,
)
from p2p.reference import parse_reference
from p2p.registry import Resolved
from snapshotter.api.containerd.types import descriptor_pb2
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_ERROR, EXIT_OK, EXIT_USAGE
from snapshotter.errors import ContainerdError, ImageError
from snapshotter.labels import (
    LABEL_IMAGE_LAYERS,
    MAX_LABEL_SIZE,
    config_gc_labels,
    image_layers_label,
    index_gc_labels,
    manifest_gc_labels,
    snapshot_labels,
)
from snapshotter.remote.containerd import lease_expiry
from snapshotter.remote.rpull import (
    Puller,
    chain_ids,
    diff_ids_of,
    is_tar_layer,
    unpack_key,
)
from tests import oci_images as oi


def sha(data: bytes) -> Digest:
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


# -- names and labels ------------------------------------------------------------------------------


def test_chain_ids_follow_the_image_spec() -> None:
    a, b, c = (sha(x) for x in (b"a", b"b", b"c"))
    ids = chain_ids([a, b, c])
    assert ids[0] == a
    assert ids[1] == sha(f"{a} {b}".encode())
    assert ids[2] == sha(f"{ids[1]} {c}".encode())
    assert ids == oi.chain_ids([a, b, c])  # the test suite's own implementation agrees
    assert chain_ids([]) == []


def test_unpack_keys_are_containerds_format_and_unique() -> None:
    chain = sha(b"x")
    keys = {unpack_key(chain) for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert re.fullmatch(r"extract-\d+-[A-Za-z0-9_-]{4} sha256:[0-9a-f]{64}", key), key
        assert key.endswith(" " + chain)


@pytest.mark.parametrize(
    ("media_type", "tar"),
    [
        ("application/vnd.oci.image.layer.v1.tar", True),
        ("application/vnd.oci.image.layer.v1.tar+gzip", True),
        ("application/vnd.oci.image.layer.v1.tar+zstd", True),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", True),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", True),
        (MEDIA_TYPE_LAYER, False),
        (MEDIA_TYPE_LAYER_V0, False),
        ("application/octet-stream", False),
    ],
)
def test_tar_layers_are_what_containerds_diff_service_applies(media_type: str, tar: bool) -> None:
    assert is_tar_layer(media_type) is tar


def layer(
    i: int, annotations: Mapping[str, str] | None = None, media_type: str = OCI_LAYER_GZIP
) -> Descriptor:
    return Descriptor(media_type, sha(f"layer {i}".encode()), 100 + i, dict(annotations or {}))


def test_snapshot_labels_carry_inherited_annotations_and_the_cri_labels() -> None:
    ours = {
        "containerd.io/snapshot/damselfly/index-digest": sha(b"idx"),
        "containerd.io/snapshot/damselfly/size": "5",
    }
    layers = [layer(0), layer(1, {**ours, "org.opencontainers.image.title": "dropped"}), layer(2)]
    labels = snapshot_labels(layers, 1, "sha256:" + "c" * 64, "reg/app:1", "sha256:" + "m" * 64)
    assert labels == {
        **ours,
        "containerd.io/snapshot.ref": "sha256:" + "c" * 64,
        "containerd.io/snapshot/cri.image-ref": "reg/app:1",
        "containerd.io/snapshot/cri.layer-digest": layers[1].digest,
        "containerd.io/snapshot/cri.manifest-digest": "sha256:" + "m" * 64,
        "containerd.io/snapshot/cri.image-layers": f"{layers[1].digest},{layers[2].digest}",
    }


def test_image_layers_label_stops_before_the_label_size_limit() -> None:
    layers = [layer(i) for i in range(100)]  # 100 x 72 bytes: more than fits
    value = image_layers_label(layers)
    assert len(LABEL_IMAGE_LAYERS) + len(value) <= MAX_LABEL_SIZE
    kept = value.split(",")
    assert kept == [d.digest for d in layers[: len(kept)]]
    assert len(kept) == (MAX_LABEL_SIZE - len(LABEL_IMAGE_LAYERS) + 1) // 72


def test_gc_labels_are_the_ones_containerds_collector_follows() -> None:
    config = Descriptor(OCI_CONFIG, sha(b"config"), 10)
    m = Manifest(OCI_MANIFEST, sha(b"m"), b"m", config, (layer(0), layer(1)))
    assert manifest_gc_labels(m) == {
        "containerd.io/gc.ref.content.config": config.digest,
        "containerd.io/gc.ref.content.l.0": layer(0).digest,
        "containerd.io/gc.ref.content.l.1": layer(1).digest,
    }
    entries = tuple(
        Descriptor(OCI_MANIFEST, sha(bytes([i])), 1, platform=Platform("linux", a))
        for i, a in enumerate(("amd64", "arm64"))
    )
    ix = Index(OCI_INDEX, sha(b"i"), b"i", entries)
    assert index_gc_labels(ix) == {
        "containerd.io/gc.ref.content.m.0": entries[0].digest,
        "containerd.io/gc.ref.content.m.1": entries[1].digest,
    }
    assert config_gc_labels("damselfly", "sha256:top") == {
        "containerd.io/gc.ref.snapshot.damselfly": "sha256:top"
    }


def test_lease_expiry_is_rfc3339_utc() -> None:
    now = datetime.datetime(2030, 1, 2, 3, 4, 5, 999, tzinfo=datetime.UTC)
    assert lease_expiry(now, datetime.timedelta(hours=1)) == "2030-01-02T04:04:05Z"


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (b"not json", "no rootfs.diff_ids"),
        (b"{}", "no rootfs.diff_ids"),
        (b'{"rootfs": {"diff_ids": "sha256:x"}}', "not a list"),
        (b'{"rootfs": {"diff_ids": ["md5:x"]}}', "not a list of sha256"),
        (b'{"rootfs": {"diff_ids": []}}', "1 layer(s) in the manifest but 0 diff_id(s)"),
    ],
)
def test_a_config_without_one_diff_id_per_layer_is_refused(config: bytes, why: str) -> None:
    with pytest.raises(ImageError, match=re.escape(why)):
        diff_ids_of(config, "reg/app config", 1)


# -- the pull against stand-ins ------------------------------------------------------------------


def tar_layer(content: bytes) -> tuple[Descriptor, bytes, str]:
    """A layer blob (the tests do not decompress; the fake Apply reports `diff_id`)."""
    blob = b"blob:" + content
    return Descriptor(OCI_LAYER_GZIP, sha(blob), len(blob)), blob, sha(b"tar:" + content)


@dataclass
class FakeRegistry:
    manifest: Manifest
    config: bytes
    blobs: dict[str, bytes]
    downloads: list[str] = field(default_factory=list)

    def resolve(self, ref: Any, platform: Platform) -> Resolved:
        return Resolved(ref.with_digest(self.manifest.digest), self.manifest)

    def get_config(self, repository: str, manifest: Manifest) -> bytes:
        return self.config

    def download_blob(self, repository: str, digest: Digest, out: BinaryIO, size: int | None = None) -> int:
        self.downloads.append(digest)
        out.write(self.blobs[digest])
        return len(self.blobs[digest])


def error(code: str) -> ContainerdError:
    return ContainerdError("call", code, "said containerd", "remedy")


@dataclass
class FakeContainerd:
    """Records calls; snapshots is name → kind; `remote` chain IDs answer Prepare with ALREADY_EXISTS."""

    diff_ids: dict[str, str]  # layer digest -> what Apply reports
    remote: set[str] = field(default_factory=set)
    snapshots: dict[str, str] = field(default_factory=dict)
    content: dict[str, dict[str, str]] = field(default_factory=dict)
    images: dict[str, str] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    lease: str | None = None
    leases_deleted: int = 0
    fail_apply: bool = False

    def create_lease(self, lease_id: str, ttl: datetime.timedelta) -> str:
        self.lease = lease_id
        return lease_id

    def delete_lease(self) -> None:
        self.lease = None
        self.leases_deleted += 1

    def lease_resource(self, resource_id: str, resource_type: str) -> None:
        self.calls.append(f"lease {resource_type} {resource_id}")

    def content_info(self, digest: str) -> object | None:
        return object() if digest in self.content else None

    def update_content_labels(self, digest: str, labels: Mapping[str, str]) -> None:
        self.content[digest].update(labels)

    def write_content(
        self, ref: str, digest: str, size: int, chunks: Iterable[bytes], labels: Mapping[str, str]
    ) -> bool:
        data = b"".join(chunks)
        assert (sha(data), len(data)) == (digest, size)
        self.content[digest] = dict(labels)
        self.calls.append(f"write {digest}")
        return True

    def snapshot_stat(self, snapshotter: str, key: str) -> object | None:
        return object() if self.snapshots.get(key) == "committed" else None

    def prepare(self, snapshotter: str, key: str, parent: str, labels: Mapping[str, str]) -> list[Any]:
        self.calls.append(f"prepare {key}")
        assert not parent or self.snapshots.get(parent) == "committed"
        chain = labels["containerd.io/snapshot.ref"]
        if chain in self.remote:
            self.snapshots[chain] = "committed"
            raise error("ALREADY_EXISTS")
        self.snapshots[key] = "active"
        return []

    def apply(self, desc: descriptor_pb2.Descriptor, mounts: Sequence[Any]) -> descriptor_pb2.Descriptor:
        self.calls.append(f"apply {desc.digest}")
        assert desc.digest in self.content, "applied before it was in the content store"
        if self.fail_apply:
            raise error("UNKNOWN")
        return descriptor_pb2.Descriptor(digest=self.diff_ids[desc.digest])

    def commit(self, snapshotter: str, name: str, key: str, labels: Mapping[str, str]) -> None:
        assert self.snapshots.pop(key) == "active"
        self.snapshots[name] = "committed"

    def remove(self, snapshotter: str, key: str) -> None:
        self.calls.append(f"remove {key.split(maxsplit=1)[0]}")
        del self.snapshots[key]

    def put_image(self, name: str, target: descriptor_pb2.Descriptor) -> str:
        how = "updated" if name in self.images else "created"
        self.images[name] = target.digest
        return how


def image(layers: Sequence[tuple[Descriptor, bytes, str]]) -> tuple[FakeRegistry, FakeContainerd]:
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [d for _, _, d in layers]}}).encode()
    cdesc = Descriptor(OCI_CONFIG, sha(config), len(config))
    raw = json.dumps({"config": cdesc.digest, "layers": [d.digest for d, _, _ in layers]}).encode()
    m = Manifest(OCI_MANIFEST, sha(raw), raw, cdesc, tuple(d for d, _, _ in layers))
    registry = FakeRegistry(m, config, {d.digest: b for d, b, _ in layers})
    return registry, FakeContainerd({d.digest: diff for d, _, diff in layers})


REF = parse_reference("registry.example/app:1")


def pull(registry: FakeRegistry, containerd: FakeContainerd) -> tuple[Any, list[str]]:
    lines: list[str] = []
    puller = Puller(containerd, registry, report=lines.append)  # type: ignore[arg-type]
    return puller.pull(REF, Platform("linux", "amd64")), lines


def test_plain_layers_are_fetched_applied_and_committed_under_their_chain_ids() -> None:
    layers = [tar_layer(b"one"), tar_layer(b"two")]
    registry, containerd = image(layers)
    result, lines = pull(registry, containerd)
    chains = chain_ids([d for _, _, d in layers])
    assert [r.how for r in result.layers] == ["unpacked", "unpacked"]
    assert containerd.snapshots == dict.fromkeys(chains, "committed")
    assert registry.downloads == [d.digest for d, _, _ in layers]
    for d, _, diff in layers:
        assert containerd.content[d.digest]["containerd.io/uncompressed"] == diff
    m = registry.manifest
    assert containerd.content[m.config.digest]["containerd.io/gc.ref.snapshot.damselfly"] == chains[-1]
    assert containerd.content[m.digest]["containerd.io/gc.ref.content.l.1"] == layers[1][0].digest
    assert containerd.images == {"registry.example/app:1": m.digest}
    assert containerd.lease is None and containerd.leases_deleted == 1
    assert lines[-1].startswith("done: ")


def test_a_layer_the_snapshotter_takes_is_never_fetched() -> None:
    ours = {"containerd.io/snapshot/damselfly/index-digest": sha(b"i")}
    remote = (Descriptor(MEDIA_TYPE_LAYER, sha(b"r"), 1, ours), b"r", sha(b"r"))
    registry, containerd = image([remote, tar_layer(b"top")])
    containerd.remote = {remote[2]}
    result, lines = pull(registry, containerd)
    assert [r.how for r in result.layers] == ["remote", "unpacked"]
    assert registry.downloads == [registry.manifest.layers[1].digest]
    assert any(re.fullmatch(r"layer 1/2 [0-9a-f]{12}: remote \(\d+\.\d\ds\)", line) for line in lines), lines


def test_existing_snapshots_are_reused_and_leased() -> None:
    layers = [tar_layer(b"one")]
    registry, containerd = image(layers)
    pull(registry, containerd)
    containerd.calls.clear()
    result, _ = pull(registry, containerd)
    assert [r.how for r in result.layers] == ["exists"]
    chain = chain_ids([layers[0][2]])[0]
    assert f"lease snapshots/damselfly {chain}" in containerd.calls
    assert not [c for c in containerd.calls if c.startswith(("prepare", "write", "apply"))]
    assert result.image == "updated"


def test_a_failed_apply_removes_the_extraction_snapshot_and_the_lease() -> None:
    registry, containerd = image([tar_layer(b"one")])
    containerd.fail_apply = True
    with pytest.raises(ContainerdError):
        pull(registry, containerd)
    assert containerd.snapshots == {}
    assert containerd.calls[-1].startswith("remove extract-")
    assert containerd.leases_deleted == 1 and containerd.images == {}


def test_a_wrong_diff_id_is_refused_and_nothing_is_committed() -> None:
    registry, containerd = image([tar_layer(b"one")])
    containerd.diff_ids = dict.fromkeys(containerd.diff_ids, sha(b"something else"))
    with pytest.raises(ImageError, match="diff_id"):
        pull(registry, containerd)
    assert containerd.snapshots == {} and containerd.images == {}


def test_a_converted_layer_the_snapshotter_did_not_take_is_not_applied() -> None:
    ours = {"containerd.io/snapshot/damselfly/index-digest": sha(b"i")}
    registry, containerd = image([(Descriptor(MEDIA_TYPE_LAYER, sha(b"r"), 1, ours), b"r", sha(b"r"))])
    with pytest.raises(ImageError, match="did not take the converted layer"):
        pull(registry, containerd)
    assert containerd.snapshots == {}
    assert registry.downloads == []
    assert not [c for c in containerd.calls if c.startswith("apply")]


def test_an_unknown_snapshotter_names_the_proxy_plugin_remedy() -> None:
    registry, containerd = image([tar_layer(b"one")])

    def not_loaded(snapshotter: str, key: str) -> None:
        raise ContainerdError("Snapshots.Stat", "INVALID_ARGUMENT", "snapshotter not loaded: damselfly", "x")

    containerd.snapshot_stat = not_loaded  # type: ignore[method-assign]
    with pytest.raises(ContainerdError, match=re.escape("[proxy_plugins.damselfly]")):
        pull(registry, containerd)
    assert registry.downloads == [] and containerd.leases_deleted == 1


# -- the command -----------------------------------------------------------------------------------


def test_unreachable_containerd_fails_with_exit_1_and_the_remedy(tmp_path: Path) -> None:
    r = CliRunner().invoke(cli, ["rpull", "127.0.0.1:1/x/y:v1", "--address", str(tmp_path / "none.sock")])
    assert r.exit_code == EXIT_ERROR, r.output
    assert "Leases.Create" in r.output
    assert f"check that containerd is running and serving {tmp_path / 'none.sock'}" in r.output
    assert "Traceback" not in r.output


def test_a_malformed_reference_is_a_usage_error() -> None:
    r = CliRunner().invoke(cli, ["rpull", "registry.example/Bad_Repo:tag", "--address", "/nonexistent.sock"])
    assert r.exit_code == EXIT_USAGE, r.output
    assert "invalid image reference" in r.output


def test_help_names_the_options() -> None:
    r = CliRunner().invoke(cli, ["rpull", "--help"])
    assert r.exit_code == EXIT_OK
    for option in ("--address", "--namespace", "--snapshotter", "--platform", "--plain-http"):
        assert option in r.output
