"""`damselfly fetch`: pull a whole image into an OCI image layout directory (OCI image-spec v1.1,
"OCI Image Layout Specification").

What the directory holds when a fetch succeeded::

    DIR/oci-layout                 {"imageLayoutVersion": "1.0.0"}
    DIR/index.json                 an image index: one descriptor per fetched reference, annotated with
                                   org.opencontainers.image.ref.name = <tag> (what ``skopeo oci:DIR:TAG``
                                   and ``ctr import`` look up) and io.containerd.image.name = <reference>
    DIR/blobs/<alg>/<hex>          content: layers, config, the platform manifest, and the index if the
                                   reference names one (only the selected platform's manifest is fetched,
                                   as ``ctr export --platform`` does; the layout spec lets a layout miss
                                   blobs that are referenced)

Write order, and what a crash (or Ctrl-C, or a failed download) at each step leaves behind:

1. ``oci-layout`` if missing: temp file, fsync, rename, fsync the directory.
2. Each blob, children before parents (layers and config, then the manifest, then the index): streamed
   into ``blobs/<alg>/.<hex>.<pid>.<random>.partial``, hashed while it streams and checked against its
   descriptor's digest and size before the rename (`RegistryClient.download_blob`), fsynced, renamed to
   its final name, directory fsynced. A failure unlinks the partial file; a crash leaves at most
   ``.partial`` files, which the next fetch into the directory removes once their process is gone. So a
   blob file at its final name always holds exactly its digest's bytes. A blob already at its final name
   is hashed, kept if valid and replaced if not.
3. ``index.json`` last, read-modified-written under an exclusive ``flock`` on DIR (temp, fsync, rename):
   a reference is listed only once every blob it needs is in place; concurrent fetches into one
   directory do not lose each other's entries. Entries with the same tag are replaced.

Blobs are downloaded `--jobs` at a time; the first failure cancels the others at their next write, and
the command fails with that error (the others as notes) — never with a half-written blob file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from p2p.auth import CredentialProvider, Credentials, static_credentials
from p2p.digest import Digest, Verifier
from p2p.errors import InvalidReferenceError, P2PError
from p2p.manifest import DEFAULT_PLATFORM, MAX_DOCUMENT_SIZE, OCI_INDEX, Descriptor, Platform
from p2p.reference import Reference, parse_reference
from p2p.registry import RegistryClient, Resolved

from .errors import reports_errors

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

LAYOUT_FILE = "oci-layout"
LAYOUT_VERSION = "1.0.0"  # the only version of the image layout there is; a reader accepts exactly it
INDEX_FILE = "index.json"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
PARTIAL_SUFFIX = ".partial"
DEFAULT_JOBS = 3  # containerd's default for concurrent layer downloads
HASH_BLOCK = 4 * 1024 * 1024


class LayoutError(P2PError):
    """The destination cannot hold (or is not) an OCI image layout we may write into."""

    def __init__(self, path: Path | str, why: str, remedy: str) -> None:
        self.path = str(path)
        self.why = why
        super().__init__(f"{path}: {why}; {remedy}")


class _CancelledError(Exception):
    """Raised inside a download when another one failed (or the user interrupted): stop writing."""


@dataclass(frozen=True)
class _Blob:
    """One thing to put under ``blobs/``: downloaded by descriptor, or `data` already verified in memory."""

    desc: Descriptor
    label: str
    data: bytes | None = None


@dataclass
class _Outcome:
    fetched: int = 0
    present: int = 0
    fetched_bytes: int = 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _current_umask() -> int:
    # Read once, before any worker thread exists: setting and restoring the umask is process-wide.
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _ProgressFile(io.FileIO):
    """A temp file that reports how much it holds and aborts a download once the fetch is cancelled.

    `download_blob` rewinds (seek + truncate) between attempts, so progress is the current position.
    Writes are looped until complete: a short write (disk full) is an error, never silently lost bytes.
    """

    def __init__(self, fd: int, report: Callable[[int], None], cancelled: threading.Event) -> None:
        super().__init__(fd, "w", closefd=True)
        self._report = report
        self._cancelled = cancelled

    def write(self, b: ReadableBuffer, /) -> int:
        if self._cancelled.is_set():
            raise _CancelledError()
        view = memoryview(b).cast("B")
        done = 0
        while done < len(view):
            n = super().write(view[done:])
            if not n:
                raise OSError(errno.ENOSPC, "short write to a blob file", self.name)
            done += n
        self._report(self.tell())
        return done

    def truncate(self, size: int | None = None, /) -> int:
        result = super().truncate(size)
        self._report(self.tell())
        return result


def _ignore(n: int) -> None:
    pass


def _read_document(path: Path) -> bytes:
    """A layout's ``oci-layout`` or ``index.json``, refused past MAX_DOCUMENT_SIZE (the file's size never
    sizes a read: at most one byte more than the limit is read)."""
    with path.open("rb") as f:
        raw = f.read(MAX_DOCUMENT_SIZE + 1)
    if len(raw) > MAX_DOCUMENT_SIZE:
        raise LayoutError(path, f"is larger than {MAX_DOCUMENT_SIZE} bytes", "repair or remove it")
    return raw


def _remove_stale_partials(directory: Path) -> None:
    """Unlink ``.partial`` files that processes which no longer exist left behind (a crash, SIGKILL)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        # ".<name>.<pid>.<random>.partial", as `Layout.write_atomic` names them
        stem = entry.name.removesuffix(PARTIAL_SUFFIX)
        parts = stem.rsplit(".", 2)
        if stem == entry.name or not stem.startswith(".") or len(parts) != 3 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # still running: maybe another fetch into the same directory
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()


class Layout:
    """An OCI image layout directory being filled (see the module docstring for the write order)."""

    def __init__(self, root: Path, umask: int) -> None:
        self.root = root
        self.mode = 0o666 & ~umask

    def prepare(self) -> None:
        """Create the directory (or check it is a layout, or empty) and its ``oci-layout`` file."""
        marker = self.root / LAYOUT_FILE
        if self.root.exists() and not self.root.is_dir():
            raise LayoutError(self.root, "exists and is not a directory", "choose another --dest")
        self.root.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.root)
        if marker.exists():
            try:
                doc = json.loads(_read_document(marker))
                version = doc.get("imageLayoutVersion") if isinstance(doc, dict) else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                version = None
            if version != LAYOUT_VERSION:
                raise LayoutError(
                    marker,
                    f"imageLayoutVersion is {version!r}, this tool writes only {LAYOUT_VERSION!r}",
                    "choose another --dest",
                )
        elif any(self.root.iterdir()):
            raise LayoutError(
                self.root,
                f"is not empty and not an OCI image layout (no {LAYOUT_FILE} file)",
                "choose an empty or new directory as --dest",
            )
        else:
            body = json.dumps({"imageLayoutVersion": LAYOUT_VERSION}).encode()
            self.write_atomic(marker, lambda f: f.write(body))

    def blob_path(self, digest: Digest) -> Path:
        algorithm, _, hexpart = digest.partition(":")
        return self.root / "blobs" / algorithm / hexpart

    def write_atomic(
        self,
        path: Path,
        fill: Callable[[_ProgressFile], object],
        report: Callable[[int], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> None:
        """Create `path` by `fill`-ing a temp file beside it, fsync, rename, fsync the directory.

        On any failure (and on cancellation) the temp file is removed and `path` is untouched."""
        prefix = f".{path.name}.{os.getpid()}."
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=PARTIAL_SUFFIX, dir=path.parent)
        try:
            with _ProgressFile(fd, report or _ignore, cancelled or threading.Event()) as f:
                fill(f)
                os.fchmod(fd, self.mode)  # mkstemp's 0600 would hide the blob from other users
                os.fsync(fd)
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def has_valid(self, desc: Descriptor, report: Callable[[int], None]) -> bool:
        """Whether the blob file exists with exactly the descriptor's size and digest (hashed in full)."""
        path = self.blob_path(desc.digest)
        try:
            f = path.open("rb")
        except FileNotFoundError:
            return False
        with f:
            if os.fstat(f.fileno()).st_size != desc.size:
                return False
            v = Verifier(desc.digest, desc.size)
            while block := f.read(HASH_BLOCK):
                v.update(block)
                report(v.count)
        return v.count == desc.size and v.digest() == desc.digest

    def add_reference(self, ref: Reference, top: Descriptor) -> None:
        """List `top` in ``index.json`` under `ref`'s tag, replacing an entry with the same tag."""
        annotations = {CONTAINERD_NAME: str(ref)}
        if ref.tag is not None:
            annotations[REF_NAME] = ref.tag
        entry = Descriptor(top.media_type, top.digest, top.size, annotations).to_json()
        path = self.root / INDEX_FILE
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close
            doc = self._load_index(path)
            manifests = [m for m in doc["manifests"] if not _same_reference(m, entry)]
            doc["manifests"] = [*manifests, entry]
            body = (json.dumps(doc, indent=2) + "\n").encode()
            self.write_atomic(path, lambda f: f.write(body))
        finally:
            os.close(fd)

    @staticmethod
    def _load_index(path: Path) -> dict[str, Any]:
        try:
            raw = _read_document(path)
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LayoutError(path, f"not valid JSON ({e})", "repair or remove it") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
            raise LayoutError(path, "not an image index (no manifests list)", "repair or remove it")
        return doc


def _same_reference(existing: object, new: dict[str, Any]) -> bool:
    """An index.json entry that `new` supersedes: the same tag, or, untagged, the same digest."""
    if not isinstance(existing, dict):
        return False
    old_ann = existing.get("annotations") or {}
    old_tag = old_ann.get(REF_NAME) if isinstance(old_ann, dict) else None
    new_tag = new["annotations"].get(REF_NAME)
    if new_tag is not None:
        return bool(old_tag == new_tag)
    return old_tag is None and existing.get("digest") == new["digest"]


def _plan(resolved: Resolved) -> tuple[list[_Blob], list[_Blob], Descriptor]:
    """(blobs to download, verified manifests to write, descriptor for index.json), children first."""
    m = resolved.manifest
    downloads: dict[Digest, _Blob] = {}
    for i, layer in enumerate(m.layers, 1):
        downloads.setdefault(layer.digest, _Blob(layer, f"layer {i}/{len(m.layers)}"))
    downloads.setdefault(m.config.digest, _Blob(m.config, "config"))
    manifest_desc = Descriptor(m.media_type, m.digest, m.size)
    documents = [_Blob(manifest_desc, "manifest", m.raw)]
    top = manifest_desc
    if resolved.index is not None:
        ix = resolved.index
        top = Descriptor(ix.media_type, ix.digest, len(ix.raw))
        documents.append(_Blob(top, "index", ix.raw))
    return list(downloads.values()), documents, top


@contextlib.contextmanager
def _progress(quiet: bool) -> Iterator[Progress]:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
    )
    with progress:
        yield progress


class Fetcher:
    """Pulls one resolved image into a `Layout` through a `RegistryClient`."""

    def __init__(
        self, client: RegistryClient, layout: Layout, repository: str, progress: Progress, jobs: int
    ) -> None:
        self.client = client
        self.layout = layout
        self.repository = repository
        self.progress = progress
        self.jobs = max(1, jobs)
        self.cancelled = threading.Event()
        self.outcome = _Outcome()
        self._lock = threading.Lock()

    def run(self, resolved: Resolved) -> Descriptor:
        downloads, documents, top = _plan(resolved)
        for directory in {self.layout.blob_path(b.desc.digest).parent for b in downloads + documents}:
            directory.mkdir(parents=True, exist_ok=True)
            _remove_stale_partials(directory)
        tasks = {
            b.desc.digest: self.progress.add_task(
                f"{b.label:<12} {b.desc.digest.partition(':')[2][:12]}", total=b.desc.size
            )
            for b in downloads + documents
        }
        self._download_all(downloads, tasks)
        for doc in documents:
            self._store(doc, tasks[doc.desc.digest])
        return top

    def _download_all(self, blobs: list[_Blob], tasks: dict[Digest, TaskID]) -> None:
        errors: list[BaseException] = []
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="fetch") as pool:
            futures: list[Future[None]] = [pool.submit(self._store, b, tasks[b.desc.digest]) for b in blobs]
            try:
                for fut in as_completed(futures):
                    exc = fut.exception()
                    if exc is not None and not isinstance(exc, _CancelledError):
                        errors.append(exc)
                        self.cancelled.set()
            except BaseException:  # Ctrl-C: the workers stop at their next write and clean up
                self.cancelled.set()
                raise
        if errors:
            first = errors[0]
            for other in errors[1:]:
                first.add_note(f"also failed: {other}")
            raise first

    def _store(self, blob: _Blob, task: TaskID) -> None:
        if self.cancelled.is_set():
            raise _CancelledError()
        desc = blob.desc

        def report(n: int) -> None:
            self.progress.update(task, completed=n)

        if self.layout.has_valid(desc, report):
            self.progress.update(task, completed=desc.size, description=f"{blob.label:<12} (present)")
            with self._lock:
                self.outcome.present += 1
            return
        path = self.layout.blob_path(desc.digest)
        data = blob.data

        def fill(f: _ProgressFile) -> None:
            if data is not None:
                f.write(data)
            else:
                self.client.download_blob(self.repository, desc.digest, f, desc.size)

        self.layout.write_atomic(path, fill, report, self.cancelled)
        with self._lock:
            self.outcome.fetched += 1
            self.outcome.fetched_bytes += desc.size


def _platform(ctx: click.Context, param: click.Parameter, value: str) -> Platform:
    try:
        return Platform.parse(value)
    except InvalidReferenceError:
        raise click.BadParameter(f"{value!r} is not os/architecture[/variant], e.g. linux/arm64") from None


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@click.command()
@click.argument("reference", metavar="REF")
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="OCI layout directory to fill (created; default: ./<last component of the repository>).",
)
@click.option(
    "--platform",
    "platform",
    default=str(DEFAULT_PLATFORM),
    show_default=True,
    callback=_platform,
    help="Platform to take from an image index (os/architecture[/variant]).",
)
@click.option("--plain-http", is_flag=True, help="HTTP instead of HTTPS (automatic for loopback hosts).")
@click.option("--insecure", is_flag=True, help="HTTPS without certificate verification.")
@click.option("--username", "-u", default=None, help="Registry user (default: Docker's config.json).")
@click.option(
    "--password",
    "-p",
    default=None,
    envvar="DAMSELFLY_PASSWORD",
    help="Registry password (or $DAMSELFLY_PASSWORD; prompted for if --username is given alone).",
)
@click.option(
    "--jobs", "-j", type=click.IntRange(1, 32), default=DEFAULT_JOBS, show_default=True, help="Blobs at once."
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; print only the summary line.")
@reports_errors
def fetch(
    reference: str,
    dest: Path | None,
    platform: Platform,
    plain_http: bool,
    insecure: bool,
    username: str | None,
    password: str | None,
    jobs: int,
    quiet: bool,
) -> None:
    """Pull the image REF (manifest, config, layers) into an OCI image layout directory.

    Every blob is checked against its digest before it gets its final name; blobs already in the
    directory are kept if valid. The result can be read with `skopeo copy oci:DIR:TAG ...` or
    `ctr image import`.
    """
    ref = parse_reference(reference)
    credentials: CredentialProvider | None = None
    if password is not None and username is None:
        raise click.UsageError("--password needs --username")
    if username is not None:
        if password is None:
            password = click.prompt(f"Password for {username}@{ref.registry}", hide_input=True, err=True)
        credentials = static_credentials({ref.registry: Credentials(username, password or "")})
    root = dest if dest is not None else Path(ref.repository.rsplit("/", 1)[-1])
    layout = Layout(root, _current_umask())
    with RegistryClient(
        ref.registry, plain_http=True if plain_http else None, insecure=insecure, credentials=credentials
    ) as client:
        resolved = client.resolve(ref, platform)
        layout.prepare()
        with _progress(quiet) as progress:
            fetcher = Fetcher(client, layout, ref.repository, progress, jobs)
            top = fetcher.run(resolved)
        layout.add_reference(ref, top)
    o = fetcher.outcome
    click.echo(
        f"{resolved.reference} -> {root}: {o.fetched} blob(s) fetched ({_human(o.fetched_bytes)}), "
        f"{o.present} already present"
    )
