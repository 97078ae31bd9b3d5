"""The test-image builders: layouts are deterministic and valid for other tools, configs match their
layers, and every hostile image is refused by a reference reader (manifest, digest, media type, then
`applytar`) with an error naming what `HostileImage.fragments` promises — nothing lands outside."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from snapshotter.convert.applytar import apply_layer
from snapshotter.convert.layerstream import open_layer_stream
from snapshotter.errors import LayerError

from . import oci_images as oi


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:  # applying layers chowns and makes devices; CI runs as root: never a skip
        pytest.fail("needs root (chown, mknod) to apply layers")


def _uncompressed(blob: bytes) -> bytes:
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompress(blob)
    return blob


def test_layouts_are_byte_identical_across_runs(tmp_path: Path) -> None:
    a = oi.write_layout(oi.semantics_image(big_size=1 << 20), tmp_path / "a")
    b = oi.write_layout(oi.semantics_image(big_size=1 << 20), tmp_path / "b")
    assert a.manifest_digest == b.manifest_digest
    assert (a.layout / "index.json").read_bytes() == (b.layout / "index.json").read_bytes()
    assert sorted(os.listdir(a.layout / "blobs/sha256")) == sorted(os.listdir(b.layout / "blobs/sha256"))


def test_config_matches_the_layers(tmp_path: Path) -> None:
    built = oi.write_layout(oi.semantics_image(big_size=1 << 20), tmp_path / "layout")
    config = json.loads(built.config)
    manifest = json.loads(built.manifest)
    assert [d["mediaType"] for d in manifest["layers"]] == [
        oi.MT_LAYER["gzip"],
        oi.MT_LAYER["gzip"],
        oi.MT_LAYER["zstd"],
        oi.MT_LAYER["none"],
    ]
    for desc, diff_id in zip(manifest["layers"], config["rootfs"]["diff_ids"], strict=True):
        blob = built.blob(desc["digest"]).read_bytes()
        assert (len(blob), "sha256:" + hashlib.sha256(blob).hexdigest()) == (desc["size"], desc["digest"])
        assert "sha256:" + hashlib.sha256(_uncompressed(blob)).hexdigest() == diff_id
    assert [h.get("empty_layer", False) for h in config["history"]] == [False, True, False, False, False]
    assert config["config"]["Env"] == ["PATH=/bin", "DAMSELFLY=semantics"]
    assert config["config"]["Cmd"] == ["/bin/sh", "-c", f"echo {oi.SEMANTICS_MESSAGE}"]
    assert (config["os"], config["architecture"]) == ("linux", oi.host_arch())
    assert built.chain_ids[0] == built.diff_ids[0] and len(set(built.chain_ids)) == 4


def test_every_layer_lists_its_parent_directories_first(tmp_path: Path) -> None:
    built = oi.write_layout(oi.semantics_image(big_size=1 << 20), tmp_path / "layout")
    for layer in built.layers:
        seen: set[str] = set()
        with tarfile.open(fileobj=io.BytesIO(_uncompressed(layer.path.read_bytes()))) as tf:
            for m in tf:
                name = m.pax_headers.get("GNU.sparse.name", m.name).rstrip("/")
                parent = name.rpartition("/")[0]
                assert not parent or parent in seen, f"{layer.digest}: {name} before its parent"
                if m.isdir():
                    seen.add(name)


def test_skopeo_reads_the_layout(tmp_path: Path) -> None:
    built = oi.write_layout(oi.busybox_image(), tmp_path / "layout", ref="v1")
    out = subprocess.run(
        ["skopeo", "inspect", "--raw", f"oci:{built.layout}:v1"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert out == built.manifest


# -- hostile images ----------------------------------------------------------------------------


def consume(layout: Path, ref: str, root: Path) -> None:
    """A reference reader: index → manifest → per layer: digest, media type, apply (raises on damage)."""
    index = json.loads((layout / "index.json").read_text())
    (entry,) = [m for m in index["manifests"] if m["annotations"][oi.REF_NAME] == ref]
    raw = oi.blob_path(layout, entry["digest"]).read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"manifest {entry['digest']} does not parse: {e}") from None
    for desc in manifest["layers"]:
        blob = oi.blob_path(layout, desc["digest"]).read_bytes()
        got = oi.sha256_digest(blob)
        if got != desc["digest"]:
            raise ValueError(f"layer {desc['digest']}: its bytes hash to {got}")
        stream = open_layer_stream(io.BytesIO(blob), desc["mediaType"], layer=desc["digest"])
        apply_layer(stream, root, layer=desc["digest"])


@pytest.mark.parametrize("name", sorted(oi.HOSTILE))
def test_hostile_images_fail_naming_the_layer_and_entry(name: str, tmp_path: Path) -> None:
    escaped = [Path("/tmp/damselfly-escaped"), Path("/tmp/damselfly-escaped-abs")]
    hostile = oi.hostile_image(name, tmp_path / "layouts")
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises((LayerError, ValueError)) as err:
        consume(hostile.layout, hostile.built.ref, root)
    message = str(err.value)
    for fragment in hostile.fragments:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"
    if hostile.entry is not None:
        assert isinstance(err.value, LayerError) and err.value.entry == hostile.entry
    if hostile.layer_index is not None:  # the layers below the bad one applied
        assert (root / "ok" / "file").exists()
    assert not any(p.exists() for p in escaped)
    assert not (Path("/tmp") / "damselfly-through-symlink").exists()


def test_hostile_names_are_written_as_given(tmp_path: Path) -> None:
    hostile = oi.hostile_image("dotdot", tmp_path)
    blob = hostile.built.layers[1].path.read_bytes()
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tf:
        assert tf.getnames() == ["ok/fine", "ok/../../../../tmp/damselfly-escaped"]
