"""Hostile lengths reach the user as one clean error line, never as a MemoryError traceback.

Blobs, OCI layouts and archives are built by code, each lying about one length: a blob trailer that
declares a 16 GiB index, descriptors of 2^50 bytes for a manifest or a config, a tar header declaring
an extended header of GiBs. The commands run under an address-space limit (``prlimit --as``), so code
that trusted such a length would die with MemoryError instead of passing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

import pytest

from blockformat.annotations import LayerAnnotations
from blockformat.chunkfile import CRC, MAX_BLOB_SIZE, MAX_INDEX_SIZE, TRAILER, TRAILER_MAGIC, TRAILER_SIZE
from blockformat.digest import Digest, digest_of
from blockformat.layer import LayerWriter
from p2p.hosts import Resolver
from p2p.manifest import MAX_DOCUMENT_SIZE, OCI_MANIFEST, Descriptor, Manifest, parse_manifest
from snapshotter.cli.errors import EXIT_CORRUPT, EXIT_ERROR
from snapshotter.cli.fetch import layout_for
from snapshotter.convert.sources import VerifiedReader, open_source
from snapshotter.errors import ImageError, LayerError, LayoutError
from snapshotter.image.blockimage import write_oci_layout
from snapshotter.image.ocilayout import LayoutReader
from snapshotter.image.spec import device_spec_for
from tests.conftest import SampleBlob

DAMSELFLY = Path(sys.executable).with_name("damselfly")
#: Address space for a command under test: ample for the interpreter and our imports, far below any
#: hostile length here (16 GiB, 2^50).
AS_LIMIT = 1536 << 20
HUGE = 1 << 50


def damselfly_limited(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["prlimit", f"--as={AS_LIMIT}", "--", str(DAMSELFLY), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_clean_failure(p: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert "Traceback" not in p.stderr and "MemoryError" not in p.stderr, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("damselfly: error: "), p.stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert p.returncode == code, p.stderr


# -- a blob whose trailer declares a 16 GiB index ----------------------------------------------------


def write_blob_with_huge_index(path: Path, blob: bytes, index_length: int) -> None:
    """`blob` with its trailer's index length set to `index_length` (CRC recomputed); the file is made
    as long as that requires, sparse, so only the length is hostile."""
    _, _, _, _, index_offset, real_length, digest = TRAILER.unpack_from(blob, len(blob) - TRAILER_SIZE)
    t = TRAILER.pack(TRAILER_MAGIC, 1, 0, 0, index_offset, index_length, digest)
    t += CRC.pack(zlib.crc32(t) & 0xFFFFFFFF)
    with path.open("wb") as f:
        f.write(blob[: index_offset + real_length])
        f.truncate(index_offset + index_length)
        f.seek(index_offset + index_length)
        f.write(t)


def test_blob_info_on_a_trailer_declaring_a_16_gib_index_exits_3_without_a_traceback(
    sample_blob: SampleBlob, tmp_path: Path
) -> None:
    path = tmp_path / "huge-index.blob"
    write_blob_with_huge_index(path, sample_blob.blob, 16 << 30)
    p = damselfly_limited("blob", "info", path)
    assert_clean_failure(p, EXIT_CORRUPT, "trailer index length", str(16 << 30), str(MAX_INDEX_SIZE))


# -- OCI layouts with descriptors of 2^50 bytes ------------------------------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    blob = tmp_path / "layer.blob"
    with blob.open("wb") as f:
        w = LayerWriter(f, 1 << 20, "lz4", 4096)
        w.add_data(0, b"hostile lengths\n" * 256)
        info = w.close()
    out = tmp_path / "layout"
    annotations = LayerAnnotations(info.index_digest, info.uncompressed_size, 1 << 20)
    write_oci_layout(out, [(blob, info, annotations)])
    return out


def _index(layout: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((layout / "index.json").read_bytes())
    return doc


def _blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.partition(":")[2]


def set_manifest_size(layout: Path, size: int) -> None:
    doc = _index(layout)
    doc["manifests"][0]["size"] = size
    (layout / "index.json").write_text(json.dumps(doc))


def set_config_size(layout: Path, size: int) -> None:
    """Rewrite the manifest with a config descriptor of `size` bytes, and point index.json at it."""
    doc = _index(layout)
    entry = doc["manifests"][0]
    manifest = json.loads(_blob(layout, entry["digest"]).read_bytes())
    manifest["config"]["size"] = size
    raw = json.dumps(manifest).encode()
    digest = digest_of(raw)
    _blob(layout, digest).write_bytes(raw)
    entry.update(digest=digest, size=len(raw))
    (layout / "index.json").write_text(json.dumps(doc))


HOSTILE = {"manifest": set_manifest_size, "config": set_config_size}


@pytest.mark.parametrize("what", HOSTILE)
def test_reading_a_layout_refuses_a_descriptor_of_2_to_the_50_bytes(layout: Path, what: str) -> None:
    HOSTILE[what](layout, HUGE)
    with pytest.raises(ImageError) as ei:
        device_spec_for(str(layout))
    msg = str(ei.value)
    assert f"{what} blob" in msg and str(HUGE) in msg and str(MAX_DOCUMENT_SIZE) in msg


@pytest.mark.parametrize("what", HOSTILE)
def test_a_layout_source_for_conversion_refuses_a_descriptor_of_2_to_the_50_bytes(
    layout: Path, tmp_path: Path, what: str
) -> None:
    HOSTILE[what](layout, HUGE)
    source = open_source(str(layout), plain_http=None, spool_dir=str(tmp_path))
    try:
        with pytest.raises(ImageError) as ei:
            doc = source.top().doc  # the manifest: refused here when its descriptor is hostile
            assert isinstance(doc, Manifest)
            source.read_small(doc.config, "config")
    finally:
        source.close()
    assert str(HUGE) in str(ei.value) and f"{MAX_DOCUMENT_SIZE}-byte limit" in str(ei.value)


@pytest.mark.parametrize("what", HOSTILE)
def test_attach_of_a_layout_with_a_descriptor_of_2_to_the_50_bytes_exits_1_without_a_traceback(
    layout: Path, tmp_path: Path, what: str
) -> None:
    HOSTILE[what](layout, HUGE)
    p = damselfly_limited("attach", layout, "--state-dir", tmp_path / "state")
    assert_clean_failure(p, EXIT_ERROR, str(HUGE), str(MAX_DOCUMENT_SIZE))


@pytest.mark.parametrize("what", HOSTILE)
def test_convert_of_a_layout_with_a_descriptor_of_2_to_the_50_bytes_exits_1_without_a_traceback(
    layout: Path, tmp_path: Path, what: str
) -> None:
    HOSTILE[what](layout, HUGE)
    out, cache = tmp_path / "out", tmp_path / "cache"
    p = damselfly_limited("convert", layout, out, "--oci-layout", "--cache-dir", cache, "-q")
    assert_clean_failure(p, EXIT_ERROR, str(HUGE), str(MAX_DOCUMENT_SIZE))


def test_an_oversized_index_json_is_refused_without_reading_it_whole(layout: Path) -> None:
    with (layout / "index.json").open("r+b") as f:
        f.truncate(MAX_DOCUMENT_SIZE + 1)
    with pytest.raises(ImageError, match=f"larger than {MAX_DOCUMENT_SIZE} bytes"):
        LayoutReader(layout).entries()


def test_a_registry_manifest_with_a_layer_larger_than_any_blob_is_refused(layout: Path) -> None:
    # The device daemon sizes a layer's cache bitmap by the descriptor's size: 2^50 bytes would be a
    # 2 GiB bitmap. The registry's manifest is the only place that size comes from.
    manifest_desc = _index(layout)["manifests"][0]
    manifest = json.loads(_blob(layout, manifest_desc["digest"]).read_bytes())
    manifest["layers"][0]["size"] = MAX_BLOB_SIZE + 1
    hostile = parse_manifest(json.dumps(manifest).encode(), OCI_MANIFEST, "registry.test/app")

    class FakeRegistry:
        def __enter__(self) -> FakeRegistry:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def resolve(self, ref: object, platform: object) -> Any:
            return type("Resolved", (), {"manifest": hostile})

    class FakeResolver(Resolver):
        def client(self, registry: str, plain_http: bool | None = None, **kwargs: Any) -> Any:
            return FakeRegistry()

    with pytest.raises(ImageError, match=f"declares {MAX_BLOB_SIZE + 1} bytes"):
        device_spec_for("registry.test/app:1", resolver=FakeResolver())


# -- archives and layer streams ----------------------------------------------------------------------


def write_archive_with_huge_pax_header(path: Path, size: int) -> None:
    """An uncompressed tar whose first header is a PAX extended header declaring `size` bytes."""
    pax = tarfile.TarInfo("PaxHeaders/manifest.json")
    pax.type = tarfile.XHDTYPE
    pax.size = size  # base-256 in a GNU header when it does not fit in octal
    header = pax.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    path.write_bytes(header + b"x" * 1024 + bytes(1024))  # the body is what little there is


def test_an_archive_with_a_pax_header_of_2_to_the_62_bytes_is_an_image_error(tmp_path: Path) -> None:
    path = tmp_path / "hostile.tar"
    write_archive_with_huge_pax_header(path, 1 << 62)
    with pytest.raises(ImageError, match="extended header"):
        open_source(str(path), plain_http=None, spool_dir=str(tmp_path))


def test_convert_of_an_archive_with_a_16_gib_pax_header_exits_1_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "hostile.tar"
    write_archive_with_huge_pax_header(path, 16 << 30)
    out, cache = tmp_path / "out", tmp_path / "cache"
    p = damselfly_limited("convert", path, out, "--oci-layout", "--cache-dir", cache, "-q")
    assert_clean_failure(p, EXIT_ERROR, "extended header", str(16 << 30))


def test_reading_a_layer_stream_to_its_end_is_not_sized_by_its_descriptor(tmp_path: Path) -> None:
    path = tmp_path / "layer.tar"
    path.write_bytes(b"only a few bytes")
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar", Digest(digest_of(b"other")), HUGE)
    with path.open("rb") as f, pytest.raises(LayerError, match="does not match its descriptor"):
        VerifiedReader(f, desc, "layer 0").read()


# -- damselfly fetch's destination ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["index.json", "oci-layout"])
def test_fetch_refuses_an_oversized_layout_file_in_its_destination(layout: Path, name: str) -> None:
    with (layout / name).open("r+b") as f:
        f.truncate(MAX_DOCUMENT_SIZE + 1)
    dest = layout_for(layout)
    with pytest.raises(LayoutError, match=f"larger than {MAX_DOCUMENT_SIZE} bytes"):
        if name == "oci-layout":
            dest.open()
        else:
            dest.add_to_index(Descriptor(OCI_MANIFEST, Digest(digest_of(b"x")), 1))
