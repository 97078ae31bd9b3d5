"""The OCI image layout (image-spec v1.1, ``image-layout.md``): the one reader and the one writer.

What a layout holds::

    DIR/oci-layout           {"imageLayoutVersion": "1.0.0"}   the only version there is; read and
                                                               written as exactly that
    DIR/index.json           an image index; an entry is named by its annotation
                             org.opencontainers.image.ref.name (`REF_NAME`)
    DIR/blobs/<alg>/<hex>    content, by digest

`LayoutReader` reads a layout from any `snapshotter.image.documents.Files` (a directory, or an OCI
archive: `snapshotter.convert.archive`). Every document is bounded before it is read and checked
against its descriptor before use (`snapshotter.image.documents`); a digest is checked to be one
before it names a path, so ``sha256:../../x`` reaches no file.

`LayoutWriter` fills a directory, in an order that a crash at any step leaves harmless:

1. `open`: the directory is created, or checked to be a layout of version 1.0.0, or empty; then
   ``oci-layout`` (`blockformat.durable.write_file_atomic`).
2. Blobs, children before the documents that name them: each is written to
   ``blobs/<alg>/.<hex>.<pid>.<random>.partial`` beside its final name, fsynced, renamed, and the
   directory fsynced. A failure unlinks the partial file; a crash leaves it, and the next `open` of
   the layout removes partial files whose process is gone. So a blob at its final name holds exactly
   its digest's bytes. Content addressed: a blob already there is kept (checked by size, or by hash
   where the caller asks: `has_blob`).
3. ``index.json`` last, read-modified-written under an exclusive ``flock`` on the directory
   (`add_to_index`): concurrent writers do not lose each other's entries; an entry with the same ref
   name (or, untagged, the same digest) is replaced. An image is listed only once all its blobs are in.

Files get `shared_file_mode` (``0666 & ~umask``) unless the writer is given a mode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from blockformat.digest import Digest, Verifier, digest_of, parse_digest
from blockformat.durable import fsync_dir, write_file_atomic
from p2p.errors import P2PError
from p2p.manifest import OCI_INDEX, Descriptor, Index, Manifest

from ..errors import ImageError, LayoutError
from ..host.umask import shared_file_mode
from .documents import DirectoryFiles, Files, Reader, parse_document, read_document, read_verified

OCI_LAYOUT_FILE = "oci-layout"
OCI_LAYOUT_VERSION = "1.0.0"
INDEX_FILE = "index.json"
REF_NAME = "org.opencontainers.image.ref.name"
PARTIAL_SUFFIX = ".partial"
#: Copy and hash granularity for blobs (bounded memory).
COPY_PIECE = 4 << 20


def blob_name(digest: str) -> str:
    """``blobs/<alg>/<hex>``, once `digest` is checked to be a digest (it comes from the layout)."""
    try:
        algorithm, _, hexpart = parse_digest(digest).partition(":")
    except P2PError as e:
        raise ImageError(digest, f"not a digest: {e}", "the layout is damaged") from None
    return f"blobs/{algorithm}/{hexpart}"


def blob_path(root: str | os.PathLike[str], digest: str) -> str:
    return os.path.join(root, blob_name(digest))


def _version(files: Files, error: type[ImageError]) -> object:
    raw = read_document(files, OCI_LAYOUT_FILE, "the oci-layout file", error=error)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc.get("imageLayoutVersion") if isinstance(doc, dict) else None


class LayoutReader:
    """An OCI image layout read through `files` (a path means a directory)."""

    def __init__(self, files: Files | str | os.PathLike[str]) -> None:
        self.files: Files = DirectoryFiles(files) if isinstance(files, (str, os.PathLike)) else files
        self.path = self.files.path

    def close(self) -> None:
        self.files.close()

    def check(self) -> None:
        """Refuse what is not a layout of the one version there is."""
        if not self.files.exists(OCI_LAYOUT_FILE):
            raise ImageError(
                self.path,
                f"is not an OCI image layout (no {OCI_LAYOUT_FILE} file)",
                "pass a layout directory",
            )
        version = _version(self.files, ImageError)
        if version != OCI_LAYOUT_VERSION:
            raise ImageError(
                self.files.where(OCI_LAYOUT_FILE),
                f"imageLayoutVersion is {version!r}, not {OCI_LAYOUT_VERSION!r}",
                "pass a layout of the OCI image-spec",
            )

    def entries(self) -> tuple[Descriptor, ...]:
        """The entries of ``index.json`` (none when there is no such file)."""
        if not self.files.exists(INDEX_FILE):
            return ()
        where = self.files.where(INDEX_FILE)
        doc = parse_document(read_document(self.files, INDEX_FILE, "the image index"), where, OCI_INDEX)
        if not isinstance(doc, Index):
            raise ImageError(where, "is not an image index", "rewrite the layout")
        return doc.manifests

    def select(self, ref: str | None) -> Descriptor:
        """The entry named `ref` (its ref name or digest; the last of several), or the only one."""
        entries = self.entries()
        names = [e.annotations.get(REF_NAME, e.digest) for e in entries]
        if ref is None:
            if len(entries) != 1:
                raise ImageError(self.path, f"holds {len(entries)} images {names}", "name one as DIR:REF")
            return entries[0]
        matches = [e for e in entries if e.annotations.get(REF_NAME) == ref or e.digest == ref]
        if not matches:
            raise ImageError(self.path, f"has no image {ref!r}; it has {names}", "pass one of those")
        return matches[-1]

    def read_blob(self, desc: Descriptor, what: str) -> bytes:
        """A manifest, index or config blob, bounded and checked against its descriptor."""
        return read_verified(self.files, blob_name(desc.digest), desc, what)

    def read_document(self, desc: Descriptor, what: str) -> Manifest | Index:
        """The manifest or index `desc` points to, verified and parsed."""
        where = f"{self.path}@{desc.digest}"
        return parse_document(self.read_blob(desc, what), where, desc.media_type, desc.digest)

    def open_blob(self, desc: Descriptor) -> AbstractContextManager[Reader]:
        """A blob to stream (a layer); the caller checks its bytes as they come."""
        return self.files.open(blob_name(desc.digest))


def file_digest(path: str) -> Digest:
    """The sha256 digest of the file at `path`, read in pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(COPY_PIECE):
            h.update(piece)
    return Digest("sha256:" + h.hexdigest())


def is_layout(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(os.path.join(path, OCI_LAYOUT_FILE))


def split_ref(arg: str) -> tuple[str, str | None]:
    """``PATH`` or ``PATH:REF`` (a layout directory or an archive) as (path, ref)."""
    if os.path.exists(arg):
        return arg, None
    head, sep, ref = arg.rpartition(":")
    if sep and os.path.exists(head):
        return head, ref
    return arg, None


# -- writing ---------------------------------------------------------------------------------------


def _plain_file(fd: int) -> io.FileIO:
    return io.FileIO(fd, "w")


class LayoutWriter:
    """A directory being filled as an OCI image layout (see the module docstring for the order).

    `remedy` ends the message of a destination that cannot be a layout (the command's option)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        mode: int | None = None,
        remedy: str = "choose an empty or new directory",
    ) -> None:
        self.root = os.fspath(root)
        self.mode = shared_file_mode() if mode is None else mode
        self.remedy = remedy
        self._opened = False

    def check(self) -> None:
        """Refuse, writing nothing, a destination that is not a layout of our version, nor empty.

        Hidden files do not count: a temp file of an earlier writer, a build directory beside."""
        if os.path.lexists(self.root) and not os.path.isdir(self.root):
            raise LayoutError(self.root, "exists and is not a directory", self.remedy)
        if not os.path.isdir(self.root):
            return
        if is_layout(self.root):
            version = _version(DirectoryFiles(self.root), LayoutError)
            if version != OCI_LAYOUT_VERSION:
                raise LayoutError(
                    os.path.join(self.root, OCI_LAYOUT_FILE),
                    f"imageLayoutVersion is {version!r}, this tool writes only {OCI_LAYOUT_VERSION!r}",
                    self.remedy,
                )
        elif any(not name.startswith(".") for name in os.listdir(self.root)):
            raise LayoutError(
                self.root,
                f"is not empty and not an OCI image layout (no {OCI_LAYOUT_FILE} file)",
                self.remedy,
            )

    def open(self) -> None:
        """Create the layout (or check it), remove dead writers' partial files, write ``oci-layout``."""
        if self._opened:
            return
        self.check()
        os.makedirs(self.root, exist_ok=True)
        blobs = os.path.join(self.root, "blobs")
        for directory in [self.root] + [os.path.join(blobs, a) for a in _listdir(blobs)]:
            _remove_stale_partials(directory)
        if not is_layout(self.root):
            body = json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode()
            write_file_atomic(os.path.join(self.root, OCI_LAYOUT_FILE), body, self.mode)
        self._opened = True

    def blob_path(self, digest: str) -> str:
        return blob_path(self.root, digest)

    def has_blob(
        self, desc: Descriptor, *, verify: bool = True, report: Callable[[int], None] | None = None
    ) -> bool:
        """Whether the blob is there with the descriptor's size and (`verify`: hashed in full) digest."""
        try:
            f = open(self.blob_path(desc.digest), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            return False
        with f:
            if os.fstat(f.fileno()).st_size != desc.size:
                return False
            if not verify:
                return True
            v = Verifier(desc.digest, desc.size)
            while piece := f.read(COPY_PIECE):
                v.update(piece)
                if report is not None:
                    report(v.count)
        return v.count == desc.size and v.digest() == desc.digest

    def _partial(self, digest: str) -> tuple[str, str]:
        """(final path, partial file path) of blob `digest`, the layout open and its directory made."""
        self.open()
        path = self.blob_path(digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path, _partial_name(path)

    @contextlib.contextmanager
    def new_blob(self, digest: str, opener: Callable[[int], io.FileIO] = _plain_file) -> Iterator[io.FileIO]:
        """A file to write blob `digest` into; on a clean exit it is renamed to the blob's name.

        `opener` makes the file object from the descriptor (e.g. one that reports progress). The
        caller checks the bytes (a registry client verifies as it downloads)."""
        path, tmp = self._partial(digest)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, self.mode)
        try:
            try:
                f = opener(fd)
            except BaseException:
                os.close(fd)
                raise
            with f:
                os.fchmod(fd, self.mode)  # exactly, whatever the umask
                yield f
                os.fsync(fd)
        except BaseException:
            _unlink(tmp)
            raise
        _rename_into_place(tmp, path)

    def put_bytes(self, data: bytes) -> Digest:
        """A blob held in memory (a manifest, a config); kept if already there, verified."""
        digest = digest_of(data)
        if not self.has_blob(Descriptor("", digest, len(data))):
            with self.new_blob(digest) as f:
                f.write(data)
        return digest

    def put_file(self, src: str, digest: str, size: int) -> None:
        """Hard-link (or copy, across filesystems) the finished, durable blob file `src` into the layout.

        Content addressed: a blob of the right size already there is kept."""
        if self.has_blob(Descriptor("", Digest(digest), size), verify=False):
            return
        path, tmp = self._partial(digest)
        try:
            os.link(src, tmp)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            with self.new_blob(digest) as out, open(src, "rb") as f:
                while piece := f.read(COPY_PIECE):
                    out.write(piece)
            return
        _rename_into_place(tmp, path)

    def add_to_index(self, entry: Descriptor) -> None:
        """List `entry` in ``index.json``, replacing one with the same ref name (untagged: digest)."""
        self.open()
        path = os.path.join(self.root, INDEX_FILE)
        new = entry.to_json()
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            doc = self._load_index(path)
            doc["manifests"] = [m for m in doc["manifests"] if not _same_reference(m, new)] + [new]
            write_file_atomic(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode(), self.mode)
        finally:
            os.close(fd)

    def _load_index(self, path: str) -> dict[str, Any]:
        """``index.json`` as JSON (its other entries and fields are kept as they are)."""
        if not os.path.exists(path):
            return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        raw = read_document(DirectoryFiles(self.root), INDEX_FILE, "the image index", error=LayoutError)
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise LayoutError(path, f"not valid JSON ({e})", "repair or remove it") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
            raise LayoutError(path, "not an image index (no manifests list)", "repair or remove it")
        return doc


def _same_reference(existing: object, new: dict[str, Any]) -> bool:
    """An index.json entry that `new` supersedes: the same ref name, or, untagged, the same digest."""
    if not isinstance(existing, dict):
        return False
    old_ann = existing.get("annotations") or {}
    old_tag = old_ann.get(REF_NAME) if isinstance(old_ann, dict) else None
    new_tag = (new.get("annotations") or {}).get(REF_NAME)
    if new_tag is not None:
        return bool(old_tag == new_tag)
    return old_tag is None and existing.get("digest") == new["digest"]


def _rename_into_place(tmp: str, path: str) -> None:
    """Rename the finished `tmp` over `path` and make the rename durable; `tmp` is gone either way."""
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path))


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _partial_name(path: str) -> str:
    """``.<name>.<pid>.<random>.partial`` beside `path`: the pid lets `open` tell a dead writer's."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}")


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove_stale_partials(directory: str) -> None:
    """Unlink partial files whose process no longer exists (a crash, SIGKILL); a live one's stay."""
    for name in _listdir(directory):
        stem = name.removesuffix(PARTIAL_SUFFIX)
        parts = stem.rsplit(".", 2)
        if stem == name or not stem.startswith(".") or len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running: maybe another writer into the same layout
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        _unlink(os.path.join(directory, name))
