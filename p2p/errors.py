"""The exceptions of `p2p`.

Every failure this package reports is a `P2PError`. Foreign exceptions (``httpx``'s, ``json``'s,
``OSError`` from a credentials file) are mapped at the boundary to the most specific class here::

    P2PError
     ├── InvalidReferenceError        an image reference or digest string that does not parse (ValueError)
     ├── CredentialsError             a Docker config.json or credential helper that cannot be used
     ├── HostsConfigError             a hosts.toml (containerd's certs.d tree) or a file it names that
     │                                cannot be used; `path` and `why` say which and how
     ├── DigestMismatchError          downloaded bytes whose digest is not the one asked for
     ├── CacheError                   the node blob cache cannot do what was asked (settings, local write)
     │    └── CacheFullError              no room within the cache limit to keep a blob's units
     ├── UnavailableError             bytes cannot be had now; ask again later
     │    ├── DeadlineExceededError       the caller's deadline (`p2p.deadline`) passed first
     │    └── CoolingDownError            the unit or the upstream failed a moment ago: not asked again yet
     └── RegistryError                talking to a registry failed; `url` says where
          ├── RegistryUnavailableError    connect errors, timeouts, 5xx or 429 outlasted the retry budget
          ├── TLSVerifyError              the server's certificate did not verify (never retried)
          ├── AuthError                   401/403: no, wrong or insufficient credentials, or no token
          ├── NotFoundError               404: the repository, manifest, tag or blob is not there
          ├── RegistryProtocolError       a response this client cannot accept: bad status, header or body
          │    ├── UnsupportedMediaTypeError  a manifest of a kind we do not read (e.g. schema 1)
          │    ├── InvalidManifestError       a manifest or index whose JSON breaks the OCI/Docker schema
          │    └── RangeResponseError         a ranged GET answered with other bytes than asked for
          └── NoMatchingPlatformError     an image index without a manifest for the wanted platform

A message says what went wrong, where (URL, repository, digest), and what to do about it.
`RegistryError.status` carries the HTTP status when there was one.
"""

from __future__ import annotations

from blockformat import errors as blockformat_errors


class P2PError(Exception):
    """Base of every error raised by `p2p`."""


class InvalidReferenceError(P2PError, ValueError):
    """A string that is not a valid image reference (or digest)."""

    def __init__(self, text: str, why: str) -> None:
        self.text = text
        self.why = why
        super().__init__(
            f"invalid image reference {text!r}: {why}; "
            "expected [host[:port]/]repository[:tag][@sha256:<64 hex digits>]"
        )


class CredentialsError(P2PError):
    """Credentials that are present but unusable (malformed config.json, failing helper)."""

    def __init__(self, where: str, why: str, remedy: str = "fix or remove the entry") -> None:
        self.where = where
        self.why = why
        super().__init__(f"{where}: {why}; {remedy}")


class HostsConfigError(P2PError):
    """A registry hosts file (containerd's ``hosts.toml``) that cannot be used, or a file it names (a CA,
    a client certificate or key) that cannot be read."""

    def __init__(
        self,
        path: str,
        why: str,
        remedy: str = "fix the file (the format is containerd's hosts.toml: docs/registries.md)",
    ) -> None:
        self.path = path
        self.why = why
        super().__init__(f"{path}: {why}; {remedy}")


class DigestMismatchError(P2PError, blockformat_errors.DigestMismatchError):
    """Bytes whose digest (or size) is not what the descriptor or reference promised.

    Never a transient failure: the source served wrong bytes, and they were not handed to anyone.
    """

    def __init__(self, where: str, expected: str, got: str, what: str = "digest") -> None:
        blockformat_errors.DigestMismatchError.__init__(
            self,
            where,
            expected,
            got,
            what,
            "the registry, a mirror or a proxy on the way served wrong content: retry, or bypass the "
            "mirror/proxy",
        )


class RegistryError(P2PError):
    """A request to a registry failed."""

    def __init__(self, message: str, url: str = "", status: int | None = None) -> None:
        self.url = url
        self.status = status
        super().__init__(message)


class RegistryUnavailableError(RegistryError):
    """The registry did not answer usefully within the retry budget (connection, timeout, 5xx, 429)."""

    def __init__(
        self, url: str, cause: str, attempts: int, elapsed: float, status: int | None = None
    ) -> None:
        self.cause = cause
        self.attempts = attempts
        self.elapsed = elapsed
        super().__init__(
            f"{url}: registry unavailable after {attempts} attempt(s) in {elapsed:.1f}s: {cause}; "
            "check that the registry (and the proxy, if one is set) is reachable, "
            "or raise the retry budget",
            url,
            status,
        )


class TLSVerifyError(RegistryError):
    """The server's TLS certificate did not verify against the endpoint's trust (system store, plus the
    ``ca`` of its hosts.toml). Not transient: retrying cannot help, so it is never retried.

    `origin` is ``https://host[:port]`` of the server that failed; `hint` says where its trust is set
    (the hosts.toml, and the table in it)."""

    def __init__(self, url: str, origin: str, reason: str, hint: str) -> None:
        self.origin = origin
        self.reason = reason
        self.hint = hint
        super().__init__(
            f"certificate verify failed for {origin} ({reason}): to trust it, add its CA as `ca` in {hint}, "
            "or to the system trust store (or point SSL_CERT_FILE at a bundle holding it); "
            "`skip_verify = true` there turns verification off",
            url,
        )


class AuthError(RegistryError):
    """Authentication or authorisation failed (401 or 403, or the token server refused)."""

    def __init__(self, url: str, why: str, status: int | None = None, remedy: str = "") -> None:
        self.why = why
        remedy = remedy or (
            "check the credentials (docker login, DOCKER_CONFIG, the pod's image pull secret through "
            "damselfly's CRI socket, or the client's credentials argument) and that they grant access to "
            "this repository"
        )
        super().__init__(f"{url}: {why}; {remedy}", url, status)


class NotFoundError(RegistryError):
    """The registry says the thing asked for does not exist (404)."""

    def __init__(self, url: str, what: str, detail: str = "") -> None:
        self.what = what
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{url}: {what} not found{extra}; check the repository name, tag or digest", url, 404
        )


class RegistryProtocolError(RegistryError):
    """The registry answered, but not in a way this client can accept."""

    def __init__(self, url: str, why: str, status: int | None = None, remedy: str = "") -> None:
        self.why = why
        remedy = (
            remedy or "the registry (or a proxy in front of it) does not follow the OCI distribution spec"
        )
        super().__init__(f"{url}: {why}; {remedy}", url, status)


class UnsupportedMediaTypeError(RegistryProtocolError):
    """A manifest of a media type this client does not read."""

    def __init__(self, url: str, media_type: str) -> None:
        self.media_type = media_type
        super().__init__(
            url,
            f"unsupported manifest media type {media_type!r}",
            remedy="only OCI and Docker schema 2 manifests and indexes are supported; "
            "re-push the image with a current tool (e.g. skopeo copy --format oci)",
        )


class InvalidManifestError(RegistryProtocolError):
    """A manifest or index whose JSON does not follow the schema."""

    def __init__(self, url: str, why: str) -> None:
        super().__init__(url, f"invalid manifest: {why}", remedy="the image is malformed; re-push it")


class RangeResponseError(RegistryProtocolError):
    """A ranged GET whose answer does not carry exactly the bytes asked for."""

    def __init__(self, url: str, offset: int, length: int, why: str) -> None:
        self.offset = offset
        self.length = length
        super().__init__(
            url,
            f"range {offset}+{length}: {why}",
            remedy="the registry or a proxy mishandles HTTP ranges; bypass the proxy or mirror, or retry",
        )


class NoMatchingPlatformError(RegistryError):
    """An image index has no manifest for the requested platform."""

    def __init__(self, url: str, wanted: str, available: list[str]) -> None:
        self.wanted = wanted
        self.available = available
        have = ", ".join(available) if available else "none"
        super().__init__(
            f"{url}: image index has no manifest for platform {wanted} (available: {have}); "
            "choose one of the available platforms",
            url,
        )


class CacheError(P2PError):
    """The node cache cannot do what was asked (bad settings, a failed local write)."""


class CacheFullError(CacheError):
    """The cache has no room within its limit for units of `blob`, and nothing unused to evict. Raised
    only to callers that fetch to keep (the background download, a trace replay): a read gets its
    bytes all the same (`p2p.cachedblob.CachedBlob.read`)."""

    def __init__(self, blob: str, nbytes: int, limit: int) -> None:
        self.blob = blob
        self.nbytes = nbytes
        self.limit = limit
        super().__init__(
            f"{blob}: no room for {nbytes} more bytes within the cache limit of {limit} bytes, and no "
            "unused blob to evict; raise [device] cache_limit or detach images"
        )


class UnavailableError(P2PError):
    """The bytes cannot be had now (no answer in time, or a source that just failed); a later try may
    succeed. Never a statement about the bytes themselves."""


class DeadlineExceededError(UnavailableError):
    """The deadline of the read in progress (`p2p.deadline`) passed before `what` could be done."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what}: the read's deadline passed; the data may come later, ask again")


class CoolingDownError(UnavailableError):
    """A fetch of the same unit, or from the same upstream, failed less than a cool-down ago, so this
    one fails at once instead of waiting out another timeout (the remedy is time, or the upstream)."""

    def __init__(self, what: str, why: str, seconds: float) -> None:
        self.what = what
        self.why = why
        self.seconds = seconds
        super().__init__(
            f"{what}: not asked again for {seconds:.1f}s after a failure ({why}); "
            "check the registry or peer, reads are tried again after the cool-down"
        )


class RefusedError(P2PError):
    """A node does not fetch a blob for a peer (its registry is not in its ``[p2p] registries``)."""


class UpstreamsFailedError(P2PError):
    """Every upstream of a fetch failed (peers, then the registry); `errors` holds each one's error, in
    the order tried, also as the ``ExceptionGroup`` this error is caused by."""

    def __init__(self, what: str, errors: list[Exception]) -> None:
        self.errors = errors
        tried = "; ".join(str(e) for e in errors)
        super().__init__(f"{what}: every upstream failed: {tried}")


def unavailable_cause(e: BaseException) -> UnavailableError | None:
    """The "not now" error (a cool-down, a deadline) `e` is or was caused by, or None for breakage.

    Follows ``__cause__``; an ``ExceptionGroup`` (several upstreams failed) counts as "not now" only
    when every one of its errors does, and then stands for the last one tried."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, UnavailableError):
            return seen
        if isinstance(seen, BaseExceptionGroup):
            causes = [unavailable_cause(x) for x in seen.exceptions]
            return causes[-1] if causes and all(c is not None for c in causes) else None
        seen = seen.__cause__
    return None
