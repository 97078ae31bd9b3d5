"""`damselfly status` without a daemon: the converted chains read from `serve`'s metadata store alone,
and a report that says no daemon runs."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from blockformat.annotations import LayerAnnotations
from snapshotter.cli import cli
from snapshotter.image.spec import device_name
from snapshotter.labels import (
    LABEL_BLOB_SIZE,
    LABEL_IMAGE_LAYERS,
    LABEL_IMAGE_REF,
    LABEL_LAYER_DIGEST,
    LABEL_SNAPSHOT_REF,
    LABEL_SOURCE,
)
from snapshotter.service.metadata import MetaStore
from snapshotter.service.records import Kind
from snapshotter.status import chains, report

NS = "default"
REF = "registry.test:5000/app:v1"
DIGESTS = [f"sha256:{c * 64}" for c in "ab"]


def _record_image(store: MetaStore) -> None:
    """Two converted layers of REF as `serve` records them, a container on top, and a plain snapshot."""
    parent = ""
    for i, digest in enumerate(DIGESTS):
        ann = LayerAnnotations(index_digest=f"sha256:{'9' * 63}{i}", size=1000 + i, vsize=1 << 30)
        labels = {
            **ann.to_dict(),
            LABEL_SNAPSHOT_REF: f"chain-{i}",
            LABEL_IMAGE_REF: REF,
            LABEL_LAYER_DIGEST: digest,
            LABEL_IMAGE_LAYERS: ",".join(DIGESTS[i:]),
            LABEL_SOURCE: "registry.test:5000/app",
            LABEL_BLOB_SIZE: str(1000 + i),
        }
        with store.write(NS) as tx:
            tx.create(Kind.COMMITTED, f"chain-{i}", parent, labels)
        parent = f"chain-{i}"
    with store.write(NS) as tx:
        tx.create(Kind.ACTIVE, "container-1", parent, {})
        tx.create(Kind.ACTIVE, "plain", "", {})


def test_chains_come_from_serves_metadata_with_their_image_and_containers(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "metadata.db")
    try:
        _record_image(store)
    finally:
        store.close()
    found, error = chains(tmp_path)
    assert error is None
    name = device_name(DIGESTS)
    assert list(found) == [name]
    chain = found[name]
    assert chain.layers == DIGESTS
    assert chain.images == {REF}
    assert chain.users == 1
    assert chain.snapshots == {(NS, "chain-0"), (NS, "chain-1")}


def test_status_without_a_daemon_says_so_and_still_shows_the_chains(tmp_path: Path) -> None:
    store = MetaStore(tmp_path / "root" / "metadata.db")
    try:
        _record_image(store)
    finally:
        store.close()
    args = ["status", "--root", str(tmp_path / "root"), "--state-dir", str(tmp_path / "state")]
    r = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["daemon"]["running"] is False
    assert data["daemon"]["socket"] == str(tmp_path / "state" / "devd.sock")
    assert data["devices"] == [] and data["blobs"] == [] and data["bytes"] is None
    (chain,) = data["chains"]
    assert chain["images"] == [REF] and chain["layers"] == DIGESTS
    assert chain["mounted"] is False and chain["attached"] is False
    assert data["images"] == [{"image": REF, "device": device_name(DIGESTS)}]
    assert data == report(str(tmp_path / "root"), str(tmp_path / "state"), None)

    table = CliRunner().invoke(cli, args, catch_exceptions=False, terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "device daemon: not running" in table.output
    assert REF in table.output and device_name(DIGESTS) in table.output


def test_status_of_a_node_without_serve_or_daemon(tmp_path: Path) -> None:
    r = CliRunner().invoke(
        cli, ["status", "--root", str(tmp_path / "r"), "--state-dir", str(tmp_path / "s")], terminal_width=200
    )
    assert r.exit_code == 0, r.output
    assert "device daemon: not running" in r.output
    assert "no converted image recorded" in r.output
    assert not (tmp_path / "r").exists(), "status created serve's root"
