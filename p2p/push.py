"""Pushing to a registry (OCI distribution spec v1.1, "Pushing blobs", "Pushing manifests").

A blob goes up unless the registry has it (``HEAD``): mounted from another repository when asked and
the registry can (``POST ?mount=&from=`` answered ``201``), else uploaded — one ``PUT`` for bytes in
memory, a series of ``PATCH`` requests then a closing ``PUT`` for files, so memory stays bounded. The
bytes are hashed before anything is sent, and the registry's ``Docker-Content-Digest`` must agree.
Pushes go to the origin only, never a mirror; an upload ``PATCH``/``PUT`` is not idempotent, so the
session retries it only where it cannot have been applied (`p2p.session`).

`RegistryClient` (`p2p.registry`) holds one `Uploader` and offers its methods.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

import httpx

from blockformat.digest import Digest, Verifier, digest_of

from .auth import repository_scope
from .errors import DigestMismatchError, P2PError, RegistryProtocolError
from .retry import Deadline
from .session import Session
from .wire import Endpoint

#: Default PATCH size for chunked uploads from a file.
DEFAULT_UPLOAD_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class PushResult:
    digest: Digest
    size: int
    how: Literal["exists", "mounted", "uploaded"]


def _scope(repository: str, actions: str = "pull") -> list[str]:
    return [repository_scope(repository, actions)]


class Uploader:
    """Pushes blobs and manifests to one registry's origin through its session (the first endpoint with
    the ``push`` capability, `p2p.hosts`); with `refusal`, every push raises it instead (no endpoint
    may take pushes)."""

    def __init__(self, session: Session, origin: Endpoint, refusal: P2PError | None = None) -> None:
        self.session = session
        self.origin = origin
        self.refusal = refusal

    def _may_push(self) -> None:
        if self.refusal is not None:
            raise self.refusal

    def blob_exists(self, repository: str, digest: Digest) -> bool:
        """Whether the origin has the blob (mirrors are not asked: this serves pushes)."""
        self._may_push()
        url = self.origin.url(f"/v2/{repository}/blobs/{digest}")
        return self.session.call(
            "HEAD",
            self.origin,
            url,
            lambda resp, deadline: resp.status_code == 200,
            scopes=_scope(repository, "pull,push"),
            ok=(200, 404),
            follow_redirects=True,
            what=f"blob {digest}",
        )

    def push_blob(
        self,
        repository: str,
        data: bytes | BinaryIO,
        digest: Digest | None = None,
        *,
        chunk_size: int | None = None,
        mount_from: str | None = None,
    ) -> PushResult:
        """Upload a blob unless the registry has it; mount it from `mount_from` if the registry can.

        `data` is bytes or a seekable binary file (read from its current position to the end). With
        `chunk_size` the upload is a series of ``PATCH`` requests of that size, else one ``PUT`` (files
        default to `DEFAULT_UPLOAD_CHUNK`-sized chunks so memory stays bounded).
        """
        self._may_push()
        algorithm = digest.partition(":")[0] if digest else "sha256"
        blob: bytes | BinaryIO
        if isinstance(data, bytes | bytearray | memoryview):
            blob = bytes(data)
            size = len(blob)
            actual = digest_of(blob, algorithm)
            base = 0
        else:
            blob = data
            base = data.tell()
            actual, size = _hash_file(data, algorithm)
            chunk_size = chunk_size or DEFAULT_UPLOAD_CHUNK
        if digest is not None and digest != actual:
            raise DigestMismatchError(f"blob to push to {repository}", digest, actual)
        digest = actual
        if self.blob_exists(repository, digest):
            return PushResult(digest, size, "exists")

        scopes = _scope(repository, "pull,push")
        params: dict[str, str] = {}
        if mount_from is not None and mount_from != repository:
            params = {"mount": digest, "from": mount_from}
            scopes = scopes + _scope(mount_from, "pull")
        start_url = self.origin.url(f"/v2/{repository}/blobs/uploads/").copy_merge_params(params)

        def started(resp: httpx.Response, deadline: Deadline) -> tuple[int, httpx.URL]:
            return resp.status_code, _location(resp)

        status, location = self.session.call(
            "POST", self.origin, start_url, started, scopes=scopes, ok=(201, 202), what=f"upload of {digest}"
        )
        if status == 201:
            return PushResult(digest, size, "mounted")

        if chunk_size is None:
            assert isinstance(blob, bytes)
            location = self._finish_upload(location, digest, scopes, blob)
        else:
            for offset, chunk in _chunks(blob, base, size, chunk_size):
                location = self._patch(location, digest, scopes, offset, chunk)
            location = self._finish_upload(location, digest, scopes, b"")
        return PushResult(digest, size, "uploaded")

    def _patch(
        self, location: httpx.URL, digest: Digest, scopes: list[str], offset: int, chunk: bytes
    ) -> httpx.URL:
        headers = {
            "content-type": "application/octet-stream",
            "content-range": f"{offset}-{offset + len(chunk) - 1}",
        }
        return self.session.call(
            "PATCH",
            self.origin,
            location,
            lambda resp, deadline: _location(resp),
            scopes=scopes,
            headers=headers,
            content=chunk,
            ok=(202,),
            idempotent=False,
            what=f"upload of {digest} at offset {offset}",
        )

    def _finish_upload(
        self, location: httpx.URL, digest: Digest, scopes: list[str], body: bytes
    ) -> httpx.URL:
        url = location.copy_merge_params({"digest": digest})
        # Not idempotent: the upload session ends with this PUT.
        self._put(url, scopes, "application/octet-stream", body, digest, "upload", f"upload of {digest}")
        return url

    def push_manifest(
        self, repository: str, raw: bytes, media_type: str, reference: str | None = None
    ) -> Digest:
        """PUT a manifest or index under `reference` (a tag), or by digest when None; return the digest."""
        self._may_push()
        digest = digest_of(raw)
        ref = reference or digest
        if ":" in ref and ref != digest:
            raise DigestMismatchError(f"manifest to push to {repository}", ref, digest)

        url = self.origin.url(f"/v2/{repository}/manifests/{ref}")
        what = f"manifest {repository}:{ref}"
        self._put(url, _scope(repository, "pull,push"), media_type, raw, digest, "manifest", what, True)
        return digest

    def _put(
        self,
        url: httpx.URL,
        scopes: list[str],
        content_type: str,
        body: bytes,
        digest: Digest,
        kind: str,
        what: str,
        idempotent: bool = False,
    ) -> None:
        """PUT `body` (an upload's last bytes, or a manifest) and check the digest the registry says it
        stored (``Docker-Content-Digest``), when it says one."""

        def done(resp: httpx.Response, deadline: Deadline) -> None:
            got = resp.headers.get("docker-content-digest")
            if got and got != digest:
                raise DigestMismatchError(f"{resp.url} (registry's digest of the {kind})", digest, got)

        self.session.call(
            "PUT",
            self.origin,
            url,
            done,
            scopes=scopes,
            headers={"content-type": content_type},
            content=body,
            ok=(201,),
            idempotent=idempotent,
            what=what,
        )


def _location(resp: httpx.Response) -> httpx.URL:
    loc = resp.headers.get("location")
    if not loc:
        raise RegistryProtocolError(str(resp.url), f"HTTP {resp.status_code} without a Location header")
    return resp.url.join(loc)


def _hash_file(f: BinaryIO, algorithm: str) -> tuple[Digest, int]:
    start = f.tell()
    v = Verifier(Digest(f"{algorithm}:"), None)
    while chunk := f.read(4 * 1024 * 1024):
        v.update(chunk)
    f.seek(start)
    return v.digest(), v.count


def _chunks(blob: bytes | BinaryIO, base: int, size: int, chunk_size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) pieces of the blob; files are read one piece at a time."""
    for offset in range(0, size, chunk_size):
        n = min(chunk_size, size - offset)
        if isinstance(blob, bytes):
            yield offset, blob[offset : offset + n]
        else:
            blob.seek(base + offset)
            piece = blob.read(n)
            if len(piece) != n:
                raise P2PError(
                    f"blob file changed while uploading: expected {n} bytes at offset {offset}, "
                    f"got {len(piece)}; "
                    "do not modify a file while it is being pushed"
                )
            yield offset, piece
