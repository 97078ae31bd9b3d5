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
``FILE.tar``           an OCI archive (a layout in a tar) or a ``docker save`` tarball
                       (``manifest.json``, config and layer tars by path)
anything else          a registry reference (``host/repo:tag`` or ``@sha256:...``)
=====================  ========================================================================
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, BinaryIO, Protocol, cast

from p2p.digest import Digest, digest_of, parse_digest
from p2p.errors import P2PError
from p2p.manifest import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    MAX_DOCUMENT_SIZE,
    Descriptor,
    Index,
    Manifest,
    build_manifest,
    parse_manifest,
)
from p2p.reference import Reference, parse_reference
from p2p.registry import RegistryClient

from ..errors import ImageError, LayerError
from ..image.ocilayout import INDEX_FILE, OCI_LAYOUT_FILE, REF_NAME
from .applytar import MAX_EXTENDED_HEADER  # tarfile reads such headers whole, also while listing

_PIECE = 1 << 20
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


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
        self, desc: Descriptor, layer: str
    ) -> contextlib.AbstractContextManager[VerifiedReader]: ...

    def close(self) -> None:  # noqa: B027 - an optional hook: most have nothing to release
        """Release connections and files."""

    def manifest(self, desc: Descriptor) -> Manifest:
        """The image manifest an index entry points to, verified."""
        where = f"{self.name}@{desc.digest}"
        raw = self.read_small(desc, "manifest")
        doc = _parse(raw, desc.media_type, where, desc.digest)
        if not isinstance(doc, Manifest):
            raise ImageError(where, "an index entry points to another index", "flatten the index")
        return doc


def _parse(raw: bytes, media_type: str | None, where: str, digest: Digest | None = None) -> Manifest | Index:
    try:
        return parse_manifest(raw, media_type, where, digest)
    except P2PError as e:
        raise ImageError(where, f"the manifest does not parse: {e}", "fix or rebuild the image") from e


def _check_small(desc: Descriptor, where: str, what: str) -> None:
    """Refuse a manifest or config whose descriptor declares more than MAX_DOCUMENT_SIZE bytes, before
    the declared size sizes any read."""
    if desc.size > MAX_DOCUMENT_SIZE:
        raise ImageError(
            where,
            f"{what}: its descriptor declares {desc.size} bytes, more than the {MAX_DOCUMENT_SIZE}-byte "
            "limit for manifests, indexes and configs",
            "the image is damaged; fix or rebuild it",
        )


def _check(data: bytes, desc: Descriptor, where: str, what: str) -> bytes:
    if len(data) != desc.size or digest_of(data, desc.digest.partition(":")[0]) != desc.digest:
        raise ImageError(
            where,
            f"{what} {desc.digest} does not match its descriptor ({len(data)} bytes, "
            f"digest {digest_of(data, desc.digest.partition(':')[0])})",
            "the source is damaged; fetch or rebuild the image",
        )
    return data


# -- OCI layout directories and OCI archives ------------------------------------------------------


class _Files:
    """Named files: a directory's, or the regular members of an uncompressed tar (by offset)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tar: BinaryIO | None = None
        self._members: dict[str, tuple[int, int]] = {}
        if os.path.isfile(path):
            self._tar = open(path, "rb")  # noqa: SIM115 - closed by close()
            try:
                # tarfile checks that each member's data lies inside the file (it reads the byte before
                # the next header), so the sizes kept here are bounded by the archive itself.
                headers = cast(IO[bytes], _HeaderReads(self._tar, path))  # tarfile only reads, seeks, tells
                with tarfile.open(fileobj=headers, mode="r:") as tf:
                    for m in tf:
                        if m.isreg():
                            self._members[os.path.normpath(m.name)] = (m.offset_data, m.size)
            except tarfile.TarError as e:
                self.close()
                raise ImageError(
                    path,
                    f"is not an uncompressed tar archive ({e})",
                    "pass `docker save` or OCI archive output",
                ) from None
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def exists(self, name: str) -> bool:
        if self._tar is None:
            return os.path.isfile(os.path.join(self.path, name))
        return os.path.normpath(name) in self._members

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Reader]:
        if self._tar is None:
            try:
                f = open(os.path.join(self.path, name), "rb")  # noqa: SIM115
            except OSError as e:
                raise ImageError(
                    os.path.join(self.path, name), e.strerror or str(e), "the image is incomplete"
                ) from None
            with f:
                yield f
            return
        entry = self._members.get(os.path.normpath(name))
        if entry is None:
            raise ImageError(
                f"{self.path}:{name}", "is missing from the archive", "the archive is incomplete"
            )
        offset, size = entry
        yield _Slice(self._tar, offset, size)

    def read(self, name: str, limit: int = MAX_DOCUMENT_SIZE) -> bytes:
        """The whole file, refused past `limit` bytes (at most ``limit + 1`` are read)."""
        with self.open(name) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ImageError(
                f"{self.path}:{name}", f"is larger than {limit} bytes", "the image is damaged or not an image"
            )
        return data


class _HeaderReads:
    """The archive file as tarfile sees it while listing members: it only seeks and reads headers, so a
    read larger than a header can be is a hostile size (a PAX or GNU long-name header declaring GiBs)
    and is refused before tarfile allocates for it."""

    def __init__(self, f: BinaryIO, path: str) -> None:
        self._f = f
        self._path = path

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0 or n > MAX_EXTENDED_HEADER:
            raise ImageError(
                f"{self._path} (at byte {self._f.tell()})",
                f"a tar header declares {n} bytes of extended header (at most {MAX_EXTENDED_HEADER})",
                "the archive is damaged or hostile; pass `docker save` or OCI archive output",
            )
        return self._f.read(n)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


class _Slice:
    """A window of an open file (a tar member), read with pread: no shared file position."""

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        self._fd = f.fileno()
        self._pos = offset
        self._end = offset + size

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data


class LayoutSource(ImageSource):
    """An OCI image layout, as a directory or inside a tar (an OCI archive)."""

    def __init__(self, files: _Files, ref: str | None) -> None:
        self.files = files
        self.ref = ref
        self.name = files.path + (f":{ref}" if ref else "")

    def top(self) -> TopDocument:
        raw = self.files.read(INDEX_FILE)
        where = f"{self.name} {INDEX_FILE}"
        index = _parse(raw, "application/vnd.oci.image.index.v1+json", where)
        if not isinstance(index, Index):
            raise ImageError(where, "is not an image index", "fix the layout")
        entries = list(index.manifests)
        names = [e.annotations.get(REF_NAME, e.digest) for e in entries]
        if self.ref is not None:
            entries = [e for e in entries if e.annotations.get(REF_NAME) == self.ref or e.digest == self.ref]
            if not entries:
                raise ImageError(self.name, f"has no image {self.ref!r}; it has {names}", "pass one of those")
        elif len(entries) != 1:
            raise ImageError(self.name, f"holds {len(entries)} images {names}", "name one as DIR:REF")
        entry = entries[-1]
        where = f"{self.name}@{entry.digest}"
        return TopDocument(
            _parse(self.read_small(entry, "manifest"), entry.media_type, where, entry.digest), where
        )

    def read_small(self, desc: Descriptor, what: str) -> bytes:
        name = _blob_name(desc)
        where = f"{self.files.path}:{name}"
        _check_small(desc, where, what)
        return _check(self.files.read(name, desc.size + 1), desc, where, what)

    @contextlib.contextmanager
    def open_layer(self, desc: Descriptor, layer: str) -> Iterator[VerifiedReader]:
        with self.files.open(_blob_name(desc)) as f:
            yield VerifiedReader(f, desc, layer)

    def close(self) -> None:
        self.files.close()


def _blob_name(desc: Descriptor) -> str:
    algo, _, hexpart = desc.digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


# -- docker save ----------------------------------------------------------------------------------


class DockerArchiveSource(ImageSource):
    """A ``docker save`` tarball: ``manifest.json`` lists the config and layer tars by path.

    Older ones have no descriptors at all, so we make the manifest docker would push: each layer path
    becomes a descriptor of the file's digest and size (computed here), the config likewise.
    """

    def __init__(self, files: _Files, ref: str | None) -> None:
        self.files = files
        self.ref = ref
        self.name = files.path
        self._by_digest: dict[str, str] = {}

    def _entry(self) -> dict[str, object]:
        where = f"{self.name}:manifest.json"
        try:
            doc = json.loads(self.files.read("manifest.json"))
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
        return TopDocument(_parse(raw, DOCKER_MANIFEST, where), where)

    def read_small(self, desc: Descriptor, what: str) -> bytes:
        name = self._by_digest.get(desc.digest) or _blob_name(desc)
        where = f"{self.name}:{name}"
        _check_small(desc, where, what)
        return _check(self.files.read(name, desc.size + 1), desc, where, what)

    @contextlib.contextmanager
    def open_layer(self, desc: Descriptor, layer: str) -> Iterator[VerifiedReader]:
        with self.files.open(self._by_digest.get(desc.digest) or _blob_name(desc)) as f:
            yield VerifiedReader(f, desc, layer)

    def close(self) -> None:
        self.files.close()


# -- registries -----------------------------------------------------------------------------------


class RegistrySource(ImageSource):
    """An image in a registry. Layers are downloaded (verified) to `spool_dir`, then read from there."""

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
        _check_small(desc, where, what)
        if desc.media_type in MANIFEST_TYPES:
            doc = self.client.get_manifest(self.ref.repository, desc.digest)
            return _check(doc.raw, desc, where, what)
        return self.client.get_blob(self.ref.repository, desc.digest, desc.size, MAX_DOCUMENT_SIZE)

    def spool_path(self, desc: Descriptor) -> str:
        return os.path.join(self.spool_dir, desc.digest.replace(":", "-"))

    def download(self, desc: Descriptor) -> str:
        """Download a layer blob (verified by the client against digest and size) to the spool."""
        path = self.spool_path(desc)
        if os.path.exists(path) and os.path.getsize(path) == desc.size:
            return path
        tmp = path + ".part"
        with open(tmp, "wb") as f:
            self.client.download_blob(self.ref.repository, parse_digest(desc.digest), f, desc.size)
        os.replace(tmp, path)
        return path

    @contextlib.contextmanager
    def open_layer(self, desc: Descriptor, layer: str) -> Iterator[VerifiedReader]:
        path = self.download(desc)
        try:
            with open(path, "rb") as f:
                yield VerifiedReader(f, desc, layer)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def close(self) -> None:
        self.client.close()


def split_layout_arg(arg: str) -> tuple[str, str | None]:
    """``DIR`` or ``DIR:REF`` (also for archives: ``FILE.tar:REF``)."""
    if os.path.exists(arg):
        return arg, None
    head, sep, ref = arg.rpartition(":")
    if sep and os.path.exists(head):
        return head, ref
    return arg, None


def is_local(arg: str) -> bool:
    path, _ = split_layout_arg(arg)
    return os.path.exists(path) or arg.startswith(("/", "./", "../"))


def open_source(src: str, *, plain_http: bool | None, spool_dir: str) -> ImageSource:
    if is_local(src):
        path, ref = split_layout_arg(src)
        if not os.path.exists(path):
            raise ImageError(
                path, "does not exist", "pass an OCI layout directory, an archive or a reference"
            )
        files = _Files(path)
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
    return RegistrySource(reference, RegistryClient(reference.registry, plain_http=plain_http), spool_dir)


__all__ = [
    "DockerArchiveSource",
    "ImageSource",
    "LayoutSource",
    "RegistrySource",
    "TopDocument",
    "VerifiedReader",
    "is_local",
    "open_source",
    "split_layout_arg",
]
