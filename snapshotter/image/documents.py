"""An image's small documents, read safely wherever they are: manifests, indexes, configs, ``index.json``.

`Files` is the one interface readers of images on disk use: named files of a directory
(`DirectoryFiles`) or of an archive (`snapshotter.convert.archive.ArchiveFiles`). Every document is
bounded before it is read — at most ``limit + 1`` bytes (`MAX_DOCUMENT_SIZE`, or the size its
descriptor gives), so neither a file's size nor a descriptor's decides what is allocated — then checked
against its descriptor (size and digest) and parsed, each failure an `ImageError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Protocol

from blockformat.digest import Digest, digest_of
from p2p.errors import P2PError
from p2p.manifest import MAX_DOCUMENT_SIZE, Descriptor, Index, Manifest, parse_manifest

from ..errors import ImageError


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class Files(Protocol):
    """Named files of a layout: a directory's, or an archive's members (the reader's only interface)."""

    path: str

    def where(self, name: str) -> str:
        """How errors name file `name`."""
        ...

    def exists(self, name: str) -> bool: ...

    def open(self, name: str) -> AbstractContextManager[Reader]:
        """The file for reading; a missing one is an `ImageError`."""
        ...

    def close(self) -> None: ...


class DirectoryFiles:
    """The files under a directory."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def where(self, name: str) -> str:
        return os.path.join(self.path, name)

    def exists(self, name: str) -> bool:
        return os.path.isfile(self.where(name))

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Reader]:
        try:
            f = open(self.where(name), "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise ImageError(self.where(name), e.strerror or str(e), "the image is incomplete") from None
        with f:
            yield f

    def close(self) -> None:
        pass


def read_document(
    files: Files, name: str, what: str, limit: int = MAX_DOCUMENT_SIZE, error: type[ImageError] = ImageError
) -> bytes:
    """A small file (``index.json``, ``oci-layout``, a manifest), refused past `limit` bytes.

    Reads at most ``limit + 1`` bytes, so the file's size never decides what is allocated."""
    with files.open(name) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise error(files.where(name), f"{what} is larger than {limit} bytes", "the layout is damaged")
    return raw


def check_document_size(desc: Descriptor, where: str, what: str) -> None:
    """Refuse a manifest, index or config whose descriptor declares more than MAX_DOCUMENT_SIZE bytes,
    before the declared size sizes any read."""
    if desc.size > MAX_DOCUMENT_SIZE:
        raise ImageError(
            where,
            f"{what} blob: its descriptor declares {desc.size} bytes, more than the {MAX_DOCUMENT_SIZE}-byte "
            "limit for manifests, indexes and configs",
            "the image is damaged; fix or rebuild it",
        )


def verify_document(data: bytes, desc: Descriptor, where: str, what: str) -> bytes:
    """`data`, once its size and digest are those of `desc`."""
    got = digest_of(data, desc.digest.partition(":")[0])
    if len(data) != desc.size or got != desc.digest:
        raise ImageError(
            where,
            f"{what} blob {desc.digest} does not match its descriptor ({len(data)} bytes, digest {got})",
            "the source is damaged; fetch or rebuild the image",
        )
    return data


def read_verified(files: Files, name: str, desc: Descriptor, what: str) -> bytes:
    """File `name`, a manifest, index or config, bounded by its descriptor and checked against it."""
    where = files.where(name)
    check_document_size(desc, where, what)
    with files.open(name) as f:
        data = f.read(desc.size + 1)  # one byte more: a longer file is a mismatch, not a silent cut
    return verify_document(data, desc, where, what)


def parse_document(
    raw: bytes, where: str, media_type: str | None, digest: Digest | None = None
) -> Manifest | Index:
    """A manifest or index; a document that does not parse is an `ImageError`."""
    try:
        return parse_manifest(raw, media_type, where, digest)
    except P2PError as e:
        raise ImageError(where, f"the manifest does not parse: {e}", "fix or rebuild the image") from e
