"""Where an image to convert comes from: a registry, an OCI layout directory, or an archive tarball.

Every source answers the same three questions: the top document (a manifest or an index, exact bytes),
a small blob (manifests, configs) verified against its descriptor, and a layer blob as a binary stream
whose bytes are checked against the descriptor's digest and size as they are read — a mismatch is an
error at the end of the stream, before the converter commits anything built from it.

=====================  ========================================================================
SRC                    read as
=====================  ========================================================================
``DIR`` / ``DIR:REF``  an OCI image layout (``oci-layout``, ``index.json``, ``blobs/``); REF picks
                       the ``org.opencontainers.image.ref.name`` entry when there are several
``FILE.tar``           an OCI archive (a layout in a tar, `archive`) or a ``docker save`` tarball
                       (``manifest.json``, config and layer tars by path)
anything else          a registry reference (``host/repo:tag`` or ``@sha256:...``)
=====================  ========================================================================

Layouts, in directories and archives alike, are read through `snapshotter.image.ocilayout`.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, cast

from blockformat.digest import Digest, parse_digest
from p2p.errors import P2PError
from p2p.hosts import Resolver
from p2p.manifest import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    MAX_DOCUMENT_SIZE,
    Descriptor,
    Index,
    Manifest,
    build_manifest,
)
from p2p.reference import Reference, parse_reference

from ..errors import ImageError, LayerError
from ..image.documents import (
    Files,
    Reader,
    check_document_size,
    parse_document,
    read_document,
    read_verified,
    verify_document,
)
from ..image.ocilayout import INDEX_FILE, OCI_LAYOUT_FILE, LayoutReader, blob_name, split_ref
from .archive import open_files

if TYPE_CHECKING:  # httpx: imported when a registry client is made (`Resolver.client`)
    from p2p.registry import RegistryClient

_PIECE = 1 << 20
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


class VerifiedReader:
    """A binary stream over a blob that checks its digest and size once it reaches the end.

    A wrong byte surfaces as a `LayerError` when the reader hits the end (or reads past the size), so
    whatever consumed the stream fails before anything built from it is kept.
    """

    def __init__(self, raw: Reader, desc: Descriptor, layer: str) -> None:
        self._raw = raw
        self._desc = desc
        self._layer = layer
        self._hash = hashlib.new(desc.digest.partition(":")[0])
        self._got = 0
        self.verified = False

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            # To the end, in pieces: the descriptor's size (from the image) never sizes a buffer.
            parts = []
            while piece := self.read(_PIECE):
                parts.append(piece)
            return b"".join(parts)
        data = self._raw.read(n)
        if data:
            self._got += len(data)
            self._hash.update(data)
            if self._got > self._desc.size:
                raise self._mismatch(f"more than the {self._desc.size} bytes its descriptor gives")
        elif not self.verified:
            self._finish()
        return data

    def drain(self) -> None:
        while self.read(_PIECE):
            pass

    def _finish(self) -> None:
        if self._got != self._desc.size:
            raise self._mismatch(f"{self._got} bytes, its descriptor says {self._desc.size}")
        got = f"{self._desc.digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if got != self._desc.digest:
            raise self._mismatch(f"digest {got}")
        self.verified = True

    def _mismatch(self, what: str) -> LayerError:
        return LayerError(
            self._layer,
            None,
            f"the blob does not match its descriptor: {what}",
            "the source is damaged or was tampered with; fetch or rebuild the image",
        )


@dataclass(frozen=True)
class TopDocument:
    doc: Manifest | Index
    where: str


class ImageSource(abc.ABC):
    """The interface; see the module docstring."""

    name: str

    @abc.abstractmethod
    def top(self) -> TopDocument: ...

    @abc.abstractmethod
    def read_small(self, desc: Descriptor, what: str) -> bytes: ...

    @abc.abstractmethod
    def open_layer(
        self, desc: Descriptor, layer: str, stop: threading.Event | None = None
    ) -> contextlib.AbstractContextManager[VerifiedReader]:
        """The layer blob as a verified stream. `stop`, set by another thread, abandons whatever the
        source does before the stream is handed out (a registry's download) with a `LayerError`; the
        stream itself is the reader's to stop."""

    def close(self) -> None:  # noqa: B027 - an optional hook: most have nothing to release
        """Release connections and files."""

    def manifest(self, desc: Descriptor) -> Manifest:
        """The image manifest an index entry points to, verified."""
        where = f"{self.name}@{desc.digest}"
        doc = parse_document(self.read_small(desc, "manifest"), where, desc.media_type, desc.digest)
        if not isinstance(doc, Manifest):
            raise ImageError(where, "an index entry points to another index", "flatten the index")
        return doc


# -- OCI layout directories and OCI archives ------------------------------------------------------


class LayoutSource(ImageSource):
    """An OCI image layout, as a directory or inside a tar (an OCI archive)."""

    def __init__(self, files: Files, ref: str | None) -> None:
        self.layout = LayoutReader(files)
        self.ref = ref
        self.name = files.path + (f":{ref}" if ref else "")

    def top(self) -> TopDocument:
        self.layout.check()
        entry = self.layout.select(self.ref)
        where = f"{self.name}@{entry.digest}"
        raw = self.read_small(entry, "manifest")
        return TopDocument(parse_document(raw, where, entry.media_type, entry.digest), where)

    def read_small(self, desc: Descriptor, what: str) -> bytes:
        return self.layout.read_blob(desc, what)

    @contextlib.contextmanager
    def open_layer(
        self, desc: Descriptor, layer: str, stop: threading.Event | None = None
    ) -> Iterator[VerifiedReader]:
        with self.layout.open_blob(desc) as f:
            yield VerifiedReader(f, desc, layer)

    def close(self) -> None:
        self.layout.close()


# -- docker save ----------------------------------------------------------------------------------


class DockerArchiveSource(ImageSource):
    """A ``docker save`` tarball: ``manifest.json`` lists the config and layer tars by path.

    Older ones have no descriptors at all, so we make the manifest docker would push: each layer path
    becomes a descriptor of the file's digest and size (computed here), the config likewise.
    """

    def __init__(self, files: Files, ref: str | None) -> None:
        self.files = files
        self.ref = ref
        self.name = files.path
        self._by_digest: dict[str, str] = {}

    def _entry(self) -> dict[str, object]:
        where = f"{self.name}:manifest.json"
        try:
            doc = json.loads(read_document(self.files, "manifest.json", "manifest.json"))
        except ValueError as e:
            raise ImageError(where, f"is not JSON ({e})", "pass `docker save` output") from None
        if not isinstance(doc, list) or not doc or not all(isinstance(e, dict) for e in doc):
            raise ImageError(where, "is not a list of images", "pass `docker save` output")
        if self.ref is None:
            if len(doc) != 1:
                raise ImageError(where, f"holds {len(doc)} images", "name one as FILE:REPO:TAG")
            return dict(doc[0])
        for image in doc:
            if self.ref in (image.get("RepoTags") or []):
                return dict(image)
        raise ImageError(where, f"has no image tagged {self.ref!r}", "pass one of its RepoTags")

    def _describe(self, name: str, media_type: str) -> Descriptor:
        h = hashlib.sha256()
        size = 0
        with self.files.open(name) as f:
            while piece := f.read(_PIECE):
                h.update(piece)
                size += len(piece)
        digest = Digest("sha256:" + h.hexdigest())
        self._by_digest[digest] = name
        return Descriptor(media_type, digest, size)

    def top(self) -> TopDocument:
        entry = self._entry()
        where = f"{self.name}:manifest.json"
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise ImageError(where, "an entry lacks Config or Layers", "pass `docker save` output")
        config = self._describe(config_name, DOCKER_CONFIG)
        layers = [self._describe(str(n), DOCKER_LAYER_TAR) for n in layer_names]
        raw = build_manifest(config, layers, DOCKER_MANIFEST)
        return TopDocument(parse_document(raw, where, DOCKER_MANIFEST), where)

    def read_small(self, desc: Descriptor, what: str) -> bytes:
        return read_verified(self.files, self._name(desc), desc, what)

    def _name(self, desc: Descriptor) -> str:
        return self._by_digest.get(desc.digest) or blob_name(desc.digest)

    @contextlib.contextmanager
    def open_layer(
        self, desc: Descriptor, layer: str, stop: threading.Event | None = None
    ) -> Iterator[VerifiedReader]:
        with self.files.open(self._name(desc)) as f:
            yield VerifiedReader(f, desc, layer)

    def close(self) -> None:
        self.files.close()


# -- registries -----------------------------------------------------------------------------------


class RegistrySource(ImageSource):
    """An image in a registry. A layer is downloaded (verified) to an unnamed file in `spool_dir`, read
    from there, and gone when it is closed (a crash leaves nothing either: the file has no name)."""

    def __init__(self, ref: Reference, client: RegistryClient, spool_dir: str) -> None:
        self.ref = ref
        self.client = client
        self.spool_dir = spool_dir
        self.name = str(ref)

    def top(self) -> TopDocument:
        doc = self.client.get_manifest(self.ref.repository, self.ref.reference)
        return TopDocument(doc, f"{self.ref}")

    def read_small(self, desc: Descriptor, what: str) -> bytes:
        where = f"{self.ref.repository}@{desc.digest}"
        check_document_size(desc, where, what)
        if desc.media_type in MANIFEST_TYPES:
            doc = self.client.get_manifest(self.ref.repository, desc.digest)
            return verify_document(doc.raw, desc, where, what)
        return self.client.get_blob(self.ref.repository, desc.digest, desc.size, MAX_DOCUMENT_SIZE)

    @contextlib.contextmanager
    def open_layer(
        self, desc: Descriptor, layer: str, stop: threading.Event | None = None
    ) -> Iterator[VerifiedReader]:
        with tempfile.TemporaryFile(prefix="layer-", dir=self.spool_dir) as f:
            # (download_blob only writes, seeks, tells and truncates)
            spool = f if stop is None else cast(BinaryIO, _StoppableSpool(f, stop, layer))
            self.client.download_blob(self.ref.repository, parse_digest(desc.digest), spool, desc.size)
            f.seek(0)
            yield VerifiedReader(f, desc, layer)

    def close(self) -> None:
        self.client.close()


class _StoppableSpool:
    """A download's spool file whose writes fail once `stop` is set: a platform converted beside others
    downloads in a thread no signal reaches, so a stop (another platform failed, Ctrl-C, SIGTERM) must
    end its download at the next piece, not after the whole layer."""

    def __init__(self, f: BinaryIO, stop: threading.Event, layer: str) -> None:
        self._f = f
        self._stop = stop
        self._layer = layer

    def write(self, data: bytes) -> int:
        if self._stop.is_set():
            raise LayerError(self._layer, None, "the conversion was interrupted", "run it again")
        return self._f.write(data)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def truncate(self, size: int | None = None) -> int:
        return self._f.truncate(size)


def is_local(arg: str) -> bool:
    path, _ = split_ref(arg)
    return os.path.exists(path) or arg.startswith(("/", "./", "../"))


def open_source(
    src: str, *, plain_http: bool | None, spool_dir: str, resolver: Resolver | None = None
) -> ImageSource:
    """The image `src`: a layout, an archive, or a registry reference (read through `resolver`'s
    endpoints; default: containerd's hosts.toml tree)."""
    if is_local(src):
        path, ref = split_ref(src)
        if not os.path.exists(path):
            raise ImageError(
                path, "does not exist", "pass an OCI layout directory, an archive or a reference"
            )
        files = open_files(path)
        try:
            if files.exists(OCI_LAYOUT_FILE) and files.exists(INDEX_FILE):
                return LayoutSource(files, ref)
            if files.exists("manifest.json"):
                return DockerArchiveSource(files, ref)
        except BaseException:
            files.close()
            raise
        files.close()
        raise ImageError(
            path,
            "is neither an OCI image layout nor a `docker save` archive (no oci-layout/index.json or "
            "manifest.json)",
            "pass an OCI layout directory, an OCI archive, a docker-save tarball or a registry reference",
        )
    try:
        reference = parse_reference(src)
    except P2PError as e:
        raise ImageError(src, str(e), "pass a registry reference, an OCI layout directory or archive") from e
    client = (resolver or Resolver()).client(reference.registry, plain_http)
    return RegistrySource(reference, client, spool_dir)


__all__ = [
    "DockerArchiveSource",
    "ImageSource",
    "LayoutSource",
    "RegistrySource",
    "TopDocument",
    "VerifiedReader",
    "is_local",
    "open_source",
]
