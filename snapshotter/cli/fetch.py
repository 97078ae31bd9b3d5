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

Written by `snapshotter.image.ocilayout.LayoutWriter`, whose docstring gives the write order and what
a crash at each step leaves behind: ``oci-layout`` first; each blob, children before parents, streamed
into a ``.partial`` file beside its final name, hashed while it streams and checked against its
descriptor before the rename (`RegistryClient.download_blob`), so a blob file at its final name always
holds exactly its digest's bytes (one already there is hashed, kept if valid and replaced if not);
``index.json`` last, under a lock, so a reference is listed only once every blob it needs is in place.
Partial files of a fetch that was killed are removed by the next one.

Blobs are downloaded `--jobs` at a time; the first failure cancels the others at their next write, and
the command fails with that error (the others as notes) — never with a half-written blob file.
"""

from __future__ import annotations

import contextlib
import errno
import io
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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

from blockformat.digest import Digest
from p2p.auth import CredentialProvider, Credentials, static_credentials
from p2p.errors import InvalidReferenceError
from p2p.hosts import Resolver
from p2p.manifest import DEFAULT_PLATFORM, Descriptor, Platform, Resolved
from p2p.reference import Reference, parse_reference
from p2p.registry import RegistryClient

from ..image.ocilayout import REF_NAME, LayoutWriter
from ..units import binary_size
from .errors import reports_errors
from .registryopts import registry_options, settings_from

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

CONTAINERD_NAME = "io.containerd.image.name"
DEFAULT_JOBS = 3  # containerd's default for concurrent layer downloads


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


def layout_for(root: Path) -> LayoutWriter:
    """The destination of a fetch: a layout whose files everyone may read (``0666 & ~umask``)."""
    return LayoutWriter(root, remedy="choose an empty or new directory as --dest")


def add_reference(layout: LayoutWriter, ref: Reference, top: Descriptor) -> None:
    """List `top` in ``index.json`` under `ref`'s tag (the name ``skopeo oci:DIR:TAG`` and ``ctr
    import`` look up) and the whole reference (containerd's image name)."""
    annotations = {CONTAINERD_NAME: str(ref)}
    if ref.tag is not None:
        annotations[REF_NAME] = ref.tag
    layout.add_to_index(Descriptor(top.media_type, top.digest, top.size, annotations))


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
    """Pulls one resolved image into an open `LayoutWriter` through a `RegistryClient`."""

    def __init__(
        self, client: RegistryClient, layout: LayoutWriter, repository: str, progress: Progress, jobs: int
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

        if self.layout.has_blob(desc, report=report):
            self.progress.update(task, completed=desc.size, description=f"{blob.label:<12} (present)")
            with self._lock:
                self.outcome.present += 1
            return

        def opener(fd: int) -> io.FileIO:
            return _ProgressFile(fd, report, self.cancelled)

        with self.layout.new_blob(desc.digest, opener) as f:
            if blob.data is not None:
                f.write(blob.data)
            else:
                self.client.download_blob(self.repository, desc.digest, f, desc.size)
        with self._lock:
            self.outcome.fetched += 1
            self.outcome.fetched_bytes += desc.size


def _platform(ctx: click.Context, param: click.Parameter, value: str) -> Platform:
    try:
        return Platform.parse(value)
    except InvalidReferenceError:
        raise click.BadParameter(f"{value!r} is not os/architecture[/variant], e.g. linux/arm64") from None


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
@registry_options
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
    config_path: Path | None,
    hosts_dir: str | None,
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
    layout = layout_for(root)
    resolver = Resolver(settings_from(config_path, hosts_dir))
    with resolver.client(
        ref.registry, True if plain_http else None, insecure=insecure, credentials=credentials
    ) as client:
        resolved = client.resolve(ref, platform)
        layout.open()
        with _progress(quiet) as progress:
            fetcher = Fetcher(client, layout, ref.repository, progress, jobs)
            top = fetcher.run(resolved)
        add_reference(layout, ref, top)
    o = fetcher.outcome
    click.echo(
        f"{resolved.reference} -> {root}: {o.fetched} blob(s) fetched ({binary_size(o.fetched_bytes)}), "
        f"{o.present} already present"
    )
