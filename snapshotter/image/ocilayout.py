"""The OCI image layout on disk (image-spec v1.1, ``image-layout.md``): blobs by digest, ``index.json``.

Small primitives shared by everything that reads or writes layouts (block images, the converter):
every file is written atomically (temp file in the same directory, fsync, rename, fsync the
directory), blobs are content addressed (an existing blob of the right size is kept), and what is read
is checked against its descriptor before use.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import tempfile

from p2p.digest import Digest, digest_of
from p2p.errors import P2PError
from p2p.manifest import MAX_DOCUMENT_SIZE, OCI_INDEX, Descriptor, Index, Manifest, parse_manifest

from ..errors import ImageError

OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"
INDEX_FILE = "index.json"
REF_NAME = "org.opencontainers.image.ref.name"
#: Copy granularity for blobs (bounded memory).
COPY_PIECE = 4 << 20


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def blob_path(layout_dir: str, digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return os.path.join(layout_dir, "blobs", algo, hexpart)


def put_blob_bytes(layout_dir: str, data: bytes) -> Digest:
    digest = digest_of(data)
    path = blob_path(layout_dir, digest)
    if not (os.path.exists(path) and os.path.getsize(path) == len(data)):
        write_atomic(path, data)
    return digest


def put_blob_file(layout_dir: str, src: str, digest: str, size: int) -> None:
    """Hard-link (or copy) a finished blob into the layout under its digest; content addressed, so an
    existing file of the right size is kept."""
    dst = blob_path(layout_dir, digest)
    if os.path.exists(dst) and os.path.getsize(dst) == size:
        return
    directory = os.path.dirname(dst)
    tmp = os.path.join(directory, f".tmp-{secrets.token_hex(8)}")
    try:
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, COPY_PIECE)
                fout.flush()
                os.fsync(fout.fileno())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def file_digest(path: str) -> Digest:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(COPY_PIECE):
            h.update(piece)
    return Digest("sha256:" + h.hexdigest())


def read_document(path: str, what: str, limit: int = MAX_DOCUMENT_SIZE) -> bytes:
    """A small JSON file of a layout (``index.json``, ``oci-layout``), refused past `limit` bytes.

    Reads at most ``limit + 1`` bytes, so the file's size never decides what is allocated."""
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise ImageError(path, f"{what} is larger than {limit} bytes", "the layout is damaged")
    return raw


def read_index(layout: str) -> tuple[Descriptor, ...]:
    path = os.path.join(layout, INDEX_FILE)
    try:
        raw = read_document(path, "the image index")
    except FileNotFoundError:
        return ()
    doc = parse_doc(raw, path, OCI_INDEX)
    if not isinstance(doc, Index):
        raise ImageError(path, "is not an image index", "rewrite the layout")
    return doc.manifests


def parse_doc(raw: bytes, where: str, media_type: str) -> Manifest | Index:
    try:
        return parse_manifest(raw, media_type, where)
    except P2PError as e:
        raise ImageError(where, str(e)) from e


def read_blob(layout: str, desc: Descriptor, what: str) -> bytes:
    """A manifest, index or config blob, checked against its descriptor.

    The descriptor's size is checked against MAX_DOCUMENT_SIZE before it sizes any read: it comes from
    the layout (or a manifest in it), not from us."""
    path = blob_path(layout, desc.digest)
    if desc.size > MAX_DOCUMENT_SIZE:
        raise ImageError(
            path,
            f"{what} blob: its descriptor declares {desc.size} bytes, more than the "
            f"{MAX_DOCUMENT_SIZE}-byte limit for manifests, indexes and configs",
            "the layout is damaged; rebuild it",
        )
    try:
        with open(path, "rb") as f:
            data = f.read(desc.size + 1)
    except OSError as e:
        raise ImageError(path, f"{what} blob: {e.strerror or e}", "the layout is incomplete") from e
    if len(data) != desc.size or digest_of(data, desc.digest.partition(":")[0]) != desc.digest:
        raise ImageError(path, f"{what} blob does not match its descriptor", "the layout is damaged")
    return data
