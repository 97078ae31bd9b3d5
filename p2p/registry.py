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
import ssl
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO, TypeVar

import httpx

from blockformat.digest import Digest, Verifier, digest_of, parse_digest
from blockformat.errors import InvalidDigestError

from .auth import CredentialProvider, DockerConfigFile, repository_scope
from .errors import (
    DigestMismatchError,
    HostsConfigError,
    InvalidReferenceError,
    P2PError,
    RangeResponseError,
    RegistryProtocolError,
    RegistryUnavailableError,
    TLSVerifyError,
)
from .hosts import PULL, PUSH, RESOLVE, HostEndpoint, RegistryHosts, RegistrySettings, Resolver
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
from .reference import DOCKER_HUB, DOCKER_HUB_API, Reference, parse_reference
from .retry import Deadline, RetryPolicy, Timeouts
from .session import Session
from .tls import default_ssl_context, ssl_context
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


class RegistryClient:
    """A client for one registry (``host[:port]``, or ``docker.io``).

    - `hosts`: its endpoints, in order (`p2p.hosts.Resolver.hosts`: containerd's hosts.toml, which is
      how damselfly's commands make clients); without it, the endpoints the next three arguments make:
    - `plain_http`: talk HTTP instead of HTTPS; ``None`` (default) means HTTP for loopback hosts only
      (what Docker does for 127.0.0.0/8), HTTPS for everything else.
    - `insecure`: HTTPS without certificate verification.
    - `mirrors`: base URLs (``http://127.0.0.1:5001``) tried in order before the origin for pulls.
    - `proxy`: an HTTP(S) proxy URL for every request; proxy environment variables are NOT consulted
      here (`p2p.hosts.RegistrySettings.use_proxy_env` decides that), so what is configured is what
      happens.
    - `credentials`: host → `Credentials` (`p2p.auth`); default: Docker's config.json, read again when it
      changes (`DockerConfigFile`).
    - `retry`, `timeouts`: the bounds (`p2p.retry`); `transport`, `clock`, `sleep`: replace the network
      and time in tests (a `transport` serves every endpoint, whatever their TLS settings).

    Each endpoint's TLS (system trust plus its ``ca``, client certificates, ``skip_verify``) and proxy
    live in an HTTP client of its own, shared by endpoints that configure the same.
    """

    def __init__(
        self,
        registry: str,
        *,
        hosts: RegistryHosts | None = None,
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
        if hosts is None:
            settings = RegistrySettings(config_path="", proxy=proxy or "")
            hosts = Resolver(settings).hosts(self.registry, plain_http, mirrors=mirrors, insecure=insecure)
        elif hosts.registry != self.registry:
            raise ValueError(f"hosts of {hosts.registry} given for a client of {self.registry}")
        self.hosts = hosts
        timeouts = timeouts or Timeouts()
        self._timeouts = timeouts
        self._transport = transport
        self._http_clients: dict[object, httpx.Client] = {}
        self._http = self._http_client(None, proxy)
        try:
            self.endpoints = tuple(
                self._endpoint(e, i == len(hosts.endpoints) - 1) for i, e in enumerate(hosts.endpoints)
            )
        except BaseException:
            self.close()
            raise
        self.origin = self.endpoints[-1]
        self.mirrors = self.endpoints[:-1]
        self._mirror_down_until: dict[str, float] = {}
        self.session = Session(
            self._http,
            credentials if credentials is not None else DockerConfigFile(),
            retry or RetryPolicy(),
            timeouts,
            clock,
            sleep,
            proxy,
        )
        # Pushes go to the first endpoint that may take them (the origin, unless hosts.toml says
        # otherwise): the client's push methods are the uploader's.
        pushers = [e for e in self.endpoints if PUSH in e.capabilities]
        refusal = None if pushers else self._no_endpoint((PUSH,), "a push")
        uploader = Uploader(self.session, pushers[0] if pushers else self.origin, refusal)
        self.blob_exists = uploader.blob_exists
        self.push_blob = uploader.push_blob
        self.push_manifest = uploader.push_manifest

    def _http_client(self, endpoint: HostEndpoint | None, proxy: str | None) -> httpx.Client:
        """The HTTP client for an endpoint's TLS and proxy (None: the default one), made once."""
        tls = endpoint.tls_key() if endpoint is not None and endpoint.scheme == "https" else None
        key = (tls, proxy)
        client = self._http_clients.get(key)
        if client is None:
            verify: ssl.SSLContext | bool = True
            if self._transport is None:
                special = tls is not None and tls != ((), (), False)
                verify = ssl_context(endpoint) if special and endpoint is not None else default_ssl_context()
            client = httpx.Client(
                timeout=self._timeouts.httpx(),
                verify=verify,
                proxy=proxy if self._transport is None else None,
                transport=self._transport,
                trust_env=False,
                follow_redirects=False,
            )
            self._http_clients[key] = client
        return client

    def _endpoint(self, e: HostEndpoint, last: bool) -> Endpoint:
        mirror = self.hosts.is_mirror(e)
        # containerd sends ``ns=<registry>`` to other hosts so one mirror can serve several upstreams.
        params = {"ns": self.registry} if mirror else {}
        headers = tuple((name, ", ".join(values)) for name, values in e.headers)
        return Endpoint(
            e.url,
            e.host,
            not last,
            params,
            e.path,
            e.capabilities,
            headers,
            self._http_client(e, e.proxy),
            e.proxy,
            e.hint,
        )

    def close(self) -> None:
        for client in self._http_clients.values():
            client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------------

    def _endpoints_for(self, capabilities: tuple[str, ...], what: str) -> list[Endpoint]:
        out = [e for e in self.endpoints if all(c in e.capabilities for c in capabilities)]
        if not out:
            raise self._no_endpoint(capabilities, what)
        return out

    def _no_endpoint(self, capabilities: tuple[str, ...], what: str) -> HostsConfigError:
        return HostsConfigError(
            self.hosts.source or self.registry,
            f"no endpoint of {self.registry} has the capabilities {'+'.join(capabilities)} that {what} needs",
            remedy="add them to the server's or a [host] table's capabilities",
        )

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
        capabilities: tuple[str, ...] = (PULL,),
    ) -> T:
        """GET/HEAD `path` from each endpoint with `capabilities` in order (mirrors, then the origin)
        until one succeeds; redirects are followed. Only the last one's failure is raised, with the
        others' as notes; the others get one attempt (the next endpoint is their retry), and one that
        was unreachable or failed TLS verification is skipped for `MIRROR_COOLDOWN` seconds."""
        failures: list[str] = []
        endpoints = self._endpoints_for(capabilities, what)
        for i, endpoint in enumerate(endpoints):
            last = i == len(endpoints) - 1
            key = endpoint.base_url + endpoint.api_root
            if not last:
                down_until = self._mirror_down_until.get(key, 0.0)
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
                    retry=None if last else MIRROR_RETRY,
                )
            except P2PError as e:
                if last:
                    for f in failures:
                        e.add_note(f)
                    raise
                if isinstance(e, RegistryUnavailableError | TLSVerifyError):
                    self._mirror_down_until[key] = self.session.clock() + MIRROR_COOLDOWN
                log.info("mirror %s failed, trying the next source: %s", endpoint.base_url, e)
                failures.append(f"mirror {endpoint.base_url} failed first: {e}")
        raise AssertionError("unreachable: the last endpoint's failure is raised")

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
            # A tag is resolved only where hosts.toml allows (containerd: pull + resolve); a digest
            # names immutable bytes, which any endpoint that may serve pulls can give.
            capabilities=(PULL,) if want is not None else (PULL, RESOLVE),
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
                capabilities=(PULL, RESOLVE),  # a list that changes, like a tag
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
