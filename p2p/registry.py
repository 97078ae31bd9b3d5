"""OCI distribution client: resolve, pull (whole and ranged) and push, for one registry.

Follows the OCI distribution spec v1.1 (``/v2/<name>/manifests/<reference>``, ``/v2/<name>/blobs/<digest>``,
``/v2/<name>/blobs/uploads/``). The policy — auth, retries, timeouts, exception mapping — lives in
`p2p.session.Session` (with `p2p.authflow` and `p2p.wire` under it); this module is the API: the pulls
here, the pushes in `p2p.push` (offered by `RegistryClient` as well).

Pulls try each mirror in order, then the origin; a mirror's failure of any kind (including wrong bytes)
moves on to the next, and only the origin's failure is raised, with the mirrors' as notes. A mirror gets
one attempt per request (falling through to the next source is its retry), and one that was unreachable
is skipped for `MIRROR_COOLDOWN` seconds, so a dead mirror costs one timeout, not one per request.
Pushes go to the origin only.

Integrity: every complete download (manifest by digest, config, blob) is hashed as it streams and checked
against its digest and, when known, its size before any byte is returned. A manifest fetched by tag is
checked against the registry's ``Docker-Content-Digest`` header. Ranged reads cannot be checked here —
their consumer (the chunk container reader) checks each chunk's SHA-256 — but they are checked to be
exactly the range asked for.

Thread safety: one client may be used from many threads (httpx's pool and our caches are locked).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, TypeVar

import httpx

from blockformat.digest import Digest, Verifier, digest_of, parse_digest
from blockformat.errors import InvalidDigestError

from .auth import CredentialProvider, DockerConfigFile, repository_scope
from .errors import (
    DigestMismatchError,
    InvalidReferenceError,
    P2PError,
    RangeResponseError,
    RegistryProtocolError,
    RegistryUnavailableError,
)
from .manifest import (
    ACCEPT,
    DEFAULT_PLATFORM,
    MAX_DOCUMENT_SIZE,
    OCI_INDEX,
    Index,
    Manifest,
    Platform,
    Resolved,
    parse_manifest,
)
from .push import Uploader
from .reference import DOCKER_HUB, DOCKER_HUB_API, Reference, is_loopback, parse_reference
from .retry import Deadline, RetryPolicy, Timeouts
from .session import Session
from .wire import Endpoint, iter_body, read_body

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Blobs fetched whole into memory (`get_blob`) are refused past this size; image configs past
#: MAX_DOCUMENT_SIZE.
MAX_IN_MEMORY_BLOB = 64 * 1024 * 1024
#: If a server ignores ``Range`` and sends the whole blob (200), we accept and slice it up to this size;
#: beyond, downloading the whole blob for one range would be a silent performance disaster, so we refuse.
MAX_FULL_BODY_FOR_RANGE = 64 * 1024 * 1024

#: How long a mirror that was unreachable is skipped.
MIRROR_COOLDOWN = 30.0
#: Mirrors are tried once per request: the next source is their retry.
MIRROR_RETRY = RetryPolicy(attempts=1, budget=0.0)

_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def referrers_tag(digest: str) -> str:
    """The tag of the referrers tag schema (OCI distribution 1.1): ``<algorithm>-<hex>``."""
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}-{hexpart[:64]}"


def api_host(registry: str) -> str:
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


class RegistryClient:
    """A client for one registry (``host[:port]``, or ``docker.io``).

    - `plain_http`: talk HTTP instead of HTTPS; ``None`` (default) means HTTP for loopback hosts only
      (what Docker does for 127.0.0.0/8), HTTPS for everything else.
    - `insecure`: HTTPS without certificate verification.
    - `mirrors`: base URLs (``http://127.0.0.1:5001``) tried in order before the origin for pulls.
    - `proxy`: an HTTP(S) proxy URL for every request; proxy environment variables are NOT consulted, so
      what is configured is what happens.
    - `credentials`: host → `Credentials` (`p2p.auth`); default: Docker's config.json, read again when it
      changes (`DockerConfigFile`).
    - `retry`, `timeouts`: the bounds (`p2p.retry`); `transport`, `clock`, `sleep`: replace the network
      and time in tests.
    """

    def __init__(
        self,
        registry: str,
        *,
        plain_http: bool | None = None,
        insecure: bool = False,
        mirrors: Sequence[str] = (),
        proxy: str | None = None,
        credentials: CredentialProvider | None = None,
        retry: RetryPolicy | None = None,
        timeouts: Timeouts | None = None,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.registry = DOCKER_HUB if registry in ("index.docker.io", DOCKER_HUB_API) else registry
        host = api_host(self.registry)
        if plain_http is None:
            plain_http = is_loopback(host)
        scheme = "http" if plain_http else "https"
        self.origin = Endpoint(f"{scheme}://{host}", self.registry)
        self.mirrors = tuple(self._mirror(m) for m in mirrors)
        self._mirror_down_until: dict[str, float] = {}
        timeouts = timeouts or Timeouts()
        self._http = httpx.Client(
            timeout=timeouts.httpx(),
            verify=not insecure,
            proxy=proxy if transport is None else None,
            transport=transport,
            trust_env=False,
            follow_redirects=False,
        )
        self.session = Session(
            self._http,
            credentials if credentials is not None else DockerConfigFile(),
            retry or RetryPolicy(),
            timeouts,
            clock,
            sleep,
            proxy,
        )
        # Pushes go to the origin only (`p2p.push`): the client's push methods are the uploader's.
        uploader = Uploader(self.session, self.origin)
        self.blob_exists = uploader.blob_exists
        self.push_blob = uploader.push_blob
        self.push_manifest = uploader.push_manifest

    def _mirror(self, url: str) -> Endpoint:
        u = httpx.URL(url)
        if u.scheme not in ("http", "https") or not u.host:
            raise InvalidReferenceError(url, "a mirror is an http:// or https:// base URL")
        netloc = u.netloc.decode("ascii")
        # containerd sends ``ns=<registry>`` to mirrors so one mirror can serve several upstreams.
        return Endpoint(f"{u.scheme}://{netloc}{u.path.rstrip('/')}", netloc, True, {"ns": self.registry})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------

    def _endpoints(self) -> tuple[Endpoint, ...]:
        return (*self.mirrors, self.origin)

    def _pull(
        self,
        path: str,
        consume: Callable[[httpx.Response, Deadline], T],
        *,
        what: str,
        scopes: list[str],
        method: str = "GET",
        headers: dict[str, str] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> T:
        """GET/HEAD `path` from the mirrors, then the origin, until one succeeds; redirects are followed."""
        failures: list[str] = []
        for endpoint in self._endpoints():
            if endpoint.is_mirror:
                down_until = self._mirror_down_until.get(endpoint.base_url, 0.0)
                if self.session.clock() < down_until:
                    failures.append(f"mirror {endpoint.base_url} skipped: unreachable moments ago")
                    continue
            try:
                return self.session.call(
                    method,
                    endpoint,
                    endpoint.url(path),
                    consume,
                    scopes=scopes,
                    headers=headers,
                    ok=ok,
                    follow_redirects=True,
                    what=what,
                    retry=MIRROR_RETRY if endpoint.is_mirror else None,
                )
            except P2PError as e:
                if not endpoint.is_mirror:
                    for f in failures:
                        e.add_note(f)
                    raise
                if isinstance(e, RegistryUnavailableError):
                    self._mirror_down_until[endpoint.base_url] = self.session.clock() + MIRROR_COOLDOWN
                log.info("mirror %s failed, trying the next source: %s", endpoint.base_url, e)
                failures.append(f"mirror {endpoint.base_url} failed first: {e}")
        raise AssertionError("unreachable: the origin is always last")

    @staticmethod
    def _scope(repository: str, actions: str = "pull") -> list[str]:
        return [repository_scope(repository, actions)]

    # -- pull ------------------------------------------------------------------------------------

    def ping(self) -> None:
        """Check that the origin speaks the v2 API (200, or 401 which still proves it)."""
        url = self.origin.url("/v2/")
        self.session.call(
            "GET",
            self.origin,
            url,
            lambda r, d: None,
            ok=(200, 401),
            authenticate=False,
            what="API root /v2/",
        )

    def get_manifest(self, repository: str, reference: str) -> Manifest | Index:
        """The manifest or index `reference` (a tag or digest) names, verified."""
        try:
            want: Digest | None = parse_digest(reference) if ":" in reference else None
        except InvalidDigestError as e:
            raise InvalidReferenceError(f"{repository}@{reference}", e.why) from None

        def consume(resp: httpx.Response, deadline: Deadline) -> Manifest | Index:
            where = str(resp.url)
            raw = read_body(resp, deadline, MAX_DOCUMENT_SIZE, where)
            if want is not None:
                got = digest_of(raw, want.partition(":")[0])
                if got != want:
                    raise DigestMismatchError(where, want, got)
                return parse_manifest(raw, resp.headers.get("content-type"), where, want)
            digest = digest_of(raw)
            header = resp.headers.get("docker-content-digest")
            if header and header.startswith("sha256:") and header != digest:
                raise DigestMismatchError(f"{where} (Docker-Content-Digest header)", header, digest)
            return parse_manifest(raw, resp.headers.get("content-type"), where, digest)

        return self._pull(
            f"/v2/{repository}/manifests/{reference}",
            consume,
            scopes=self._scope(repository),
            headers={"accept": ACCEPT},
            what=f"manifest {repository}:{reference}",
        )

    def referrers_index(self, repository: str, digest: Digest, tag_schema: bool = True) -> bytes | None:
        """The raw index of the manifests whose ``subject`` is `digest` (OCI distribution 1.1): from the
        referrers API, else from the referrers tag schema (``sha256-<hex>``: registries without the API,
        like docker-registry 2.8); None when there is neither. Not verified: an index of referrers is
        mutable, like a tag; what it lists is fetched by digest."""
        parse_digest(digest)

        def consume(resp: httpx.Response, deadline: Deadline) -> bytes | None:
            if resp.status_code == 404:
                return None
            return read_body(resp, deadline, MAX_DOCUMENT_SIZE, str(resp.url))

        paths = [(f"/v2/{repository}/referrers/{digest}", f"referrers of {repository}@{digest}")]
        if tag_schema:
            tag = referrers_tag(digest)
            paths.append((f"/v2/{repository}/manifests/{tag}", f"referrers tag of {repository}@{digest}"))
        for path, what in paths:
            raw = self._pull(
                path,
                consume,
                scopes=self._scope(repository),
                headers={"accept": OCI_INDEX},
                what=what,
                ok=(200, 404),
            )
            if raw is not None:
                return raw
        return None

    def resolve(self, ref: Reference | str, platform: Platform = DEFAULT_PLATFORM) -> Resolved:
        """Resolve a reference to the image manifest for `platform`, through an index if there is one."""
        if isinstance(ref, str):
            ref = parse_reference(ref)
        if ref.registry != self.registry:
            raise InvalidReferenceError(str(ref), f"this client talks to {self.registry}, not {ref.registry}")
        top = self.get_manifest(ref.repository, ref.reference)
        resolved_ref = ref.with_digest(top.digest)
        if isinstance(top, Manifest):
            return Resolved(resolved_ref, top)
        desc = top.select(platform, f"{ref}")
        child = self.get_manifest(ref.repository, desc.digest)
        if not isinstance(child, Manifest):
            raise RegistryProtocolError(
                str(ref),
                f"index entry {desc.digest} for {platform} is itself an index",
                remedy="re-push the image",
            )
        if child.size != desc.size:
            raise DigestMismatchError(
                f"{ref} manifest {desc.digest}", f"{desc.size} bytes", f"{child.size} bytes", "size"
            )
        return Resolved(resolved_ref, child, top)

    def blob_size(self, repository: str, digest: Digest) -> int:
        """The size of a blob, from a HEAD request."""
        return self._pull(
            f"/v2/{repository}/blobs/{digest}",
            _content_length,
            method="HEAD",
            scopes=self._scope(repository),
            what=f"blob {digest} in {repository}",
        )

    def get_blob(
        self, repository: str, digest: Digest, size: int | None = None, max_size: int = MAX_IN_MEMORY_BLOB
    ) -> bytes:
        """A whole blob in memory (configs, small blobs), verified against `digest` and `size`."""
        if size is not None and size > max_size:
            raise RegistryProtocolError(
                f"{self.origin.base_url}/v2/{repository}/blobs/{digest}",
                f"blob of {size} bytes is too large to hold in memory (limit {max_size})",
                remedy="use download_blob to stream it to a file",
            )

        def consume(resp: httpx.Response, deadline: Deadline) -> bytes:
            where = str(resp.url)
            data = read_body(resp, deadline, max_size, where)
            v = Verifier(digest, size)
            v.update(data)
            _check(v, where)
            return data

        return self._pull(
            f"/v2/{repository}/blobs/{digest}",
            consume,
            scopes=self._scope(repository),
            what=f"blob {digest} in {repository}",
        )

    def get_config(self, repository: str, manifest: Manifest) -> bytes:
        """The image config blob a manifest points to, verified."""
        desc = manifest.config
        if desc.size > MAX_DOCUMENT_SIZE:
            raise RegistryProtocolError(
                f"{self.origin.base_url}/v2/{repository}/blobs/{desc.digest}",
                f"the manifest declares an image config of {desc.size} bytes, more than the "
                f"{MAX_DOCUMENT_SIZE}-byte limit",
                remedy="the manifest is damaged or not an image manifest; fix or re-push the image",
            )
        return self.get_blob(repository, desc.digest, desc.size, MAX_DOCUMENT_SIZE)

    def download_blob(self, repository: str, digest: Digest, out: BinaryIO, size: int | None = None) -> int:
        """Stream a blob into `out` (seekable; written from its current position), verified; return its size.

        A failed attempt is rewound (seek + truncate) before the next, so `out` never holds a mix. On a
        digest mismatch `out` is truncated back too: no unverified byte is left behind.
        """
        start = out.tell()

        def consume(resp: httpx.Response, deadline: Deadline) -> int:
            where = str(resp.url)
            out.seek(start)
            out.truncate()
            v = Verifier(digest, size)
            try:
                for chunk in iter_body(resp, deadline, where):
                    v.update(chunk)
                    if size is not None and v.count > size:
                        break
                    out.write(chunk)
                _check(v, where)
            except BaseException:
                out.seek(start)
                out.truncate()
                raise
            return v.count

        return self._pull(
            f"/v2/{repository}/blobs/{digest}",
            consume,
            scopes=self._scope(repository),
            what=f"blob {digest} in {repository}",
        )

    def read_blob_range(
        self,
        repository: str,
        digest: Digest,
        offset: int,
        length: int,
        max_full_body: int = MAX_FULL_BODY_FOR_RANGE,
    ) -> bytes:
        """Exactly the bytes ``[offset, offset+length)`` of a blob, or an error.

        Sends ``Range: bytes=a-b`` and expects ``206`` with a matching ``Content-Range``. A server that
        ignores the range and answers ``200`` with the whole blob is tolerated up to `max_full_body`
        bytes: the blob is then verified against its digest and sliced.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"negative range {offset}+{length}")
        if length == 0:
            return b""
        last = offset + length - 1

        def consume(resp: httpx.Response, deadline: Deadline) -> bytes:
            where = str(resp.url)
            if resp.status_code == 416:
                total = resp.headers.get("content-range", "").rpartition("/")[2]
                why = f"the blob has only {total} bytes" if total.isdigit() else "range not satisfiable"
                raise RangeResponseError(where, offset, length, why)
            if resp.status_code == 200:
                data = read_body(resp, deadline, max_full_body, where)
                v = Verifier(digest)
                v.update(data)
                _check(v, where)
                if len(data) < offset + length:
                    raise RangeResponseError(where, offset, length, f"the blob has only {len(data)} bytes")
                return data[offset : offset + length]
            cr = resp.headers.get("content-range", "")
            m = _CONTENT_RANGE_RE.match(cr.strip())
            if m is None:
                raise RangeResponseError(where, offset, length, f"206 with unusable Content-Range {cr!r}")
            first, got_last, total = int(m.group(1)), int(m.group(2)), m.group(3)
            if first != offset or got_last != last:
                if first == offset and total != "*" and got_last == int(total) - 1 < last:
                    raise RangeResponseError(where, offset, length, f"the blob has only {total} bytes")
                raise RangeResponseError(
                    where, offset, length, f"server sent bytes {first}-{got_last} instead"
                )
            data = read_body(resp, deadline, length, where)
            if len(data) != length:
                raise RangeResponseError(where, offset, length, f"body has {len(data)} bytes")
            return data

        return self._pull(
            f"/v2/{repository}/blobs/{digest}",
            consume,
            scopes=self._scope(repository),
            headers={"range": f"bytes={offset}-{last}"},
            ok=(200, 206, 416),
            what=f"blob {digest} in {repository}",
        )


def _content_length(resp: httpx.Response, deadline: Deadline) -> int:
    value = resp.headers.get("content-length", "")
    # At most 19 ASCII digits (any int64, which is how HTTP stacks hold it): `int` is never handed a
    # number it would refuse (Unicode digits, thousands of digits) or a size no blob can have.
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise RegistryProtocolError(str(resp.url), f"HEAD of a blob without a Content-Length (got {value!r})")
    return int(value)


def _check(v: Verifier, where: str) -> None:
    """Raise `DigestMismatchError` unless the bytes `v` saw have its expected size and digest."""
    bad = v.mismatch()
    if bad is not None:
        what, expected, got = bad
        raise DigestMismatchError(where, expected, got, what)
