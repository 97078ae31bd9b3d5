"""Image references: ``[host[:port]/]repository[:tag][@digest]``.

Follows the grammar of distribution's ``reference`` package (the one docker, containerd and skopeo use):

- the first path component is a registry host when it contains ``.`` or ``:``, is ``localhost``, or has
  an uppercase letter (``[::1]:5000`` style IPv6 hosts included); otherwise the host is ``docker.io``;
- on ``docker.io`` a one-component repository gets the ``library/`` prefix, and the API is served by
  ``registry-1.docker.io``;
- path components are ``[a-z0-9]+`` joined by ``.``, ``_``, ``__`` or runs of ``-``;
- a tag is ``[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}``; with neither tag nor digest the tag is ``latest``;
- with both, the digest decides what is fetched (the tag is kept for display only).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from blockformat.digest import Digest, parse_digest
from blockformat.errors import InvalidDigestError

from .errors import InvalidReferenceError

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 255

_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST_RE = re.compile(
    rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]{{1,5}})?$"
)


@dataclass(frozen=True)
class Reference:
    """A parsed image reference. `registry` is the name users write (``docker.io``), not the API host."""

    registry: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        return parse_reference(text)

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/`` in the URL: the digest if there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """The host:port that serves the registry API for `registry`."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def name(self) -> str:
        """``registry/repository``, the familiar name without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += f":{self.tag}"
        if self.digest is not None:
            s += f"@{self.digest}"
        return s


def _looks_like_host(component: str) -> bool:
    return (
        "." in component
        or ":" in component
        or component == "localhost"
        or component != component.lower()
        or component.startswith("[")
    )


def parse_reference(text: str) -> Reference:
    """Parse ``[host[:port]/]repository[:tag][@digest]``; raise `InvalidReferenceError` if malformed."""
    if not text:
        raise InvalidReferenceError(text, "empty")
    rest, at, digest_text = text.partition("@")
    try:
        digest = parse_digest(digest_text) if at else None
    except InvalidDigestError as e:
        raise InvalidReferenceError(text, e.why) from None
    if not rest:
        raise InvalidReferenceError(text, "no repository name")

    tag: str | None = None
    colon = rest.rfind(":")
    if colon > rest.rfind("/"):
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.match(tag):
            raise InvalidReferenceError(text, f"invalid tag {tag!r}")

    first, slash, remainder = rest.partition("/")
    if slash and _looks_like_host(first):
        registry, path = first, remainder
        if not _HOST_RE.match(registry):
            raise InvalidReferenceError(text, f"invalid registry host {registry!r}")
    else:
        registry, path = DOCKER_HUB, rest
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"

    for component in path.split("/"):
        if not _COMPONENT_RE.match(component):
            raise InvalidReferenceError(
                text,
                f"invalid repository path component {component!r} "
                "(lowercase letters, digits and single separators . _ __ - only)",
            )
    if len(registry) + 1 + len(path) > MAX_NAME_LENGTH:
        raise InvalidReferenceError(text, f"name longer than {MAX_NAME_LENGTH} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, path, tag, digest)


def host_without_port(host: str) -> str:
    """``127.0.0.1:5000`` → ``127.0.0.1``; ``[::1]:5000`` → ``::1``."""
    if host.startswith("["):
        return host[1 : host.index("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``, with or without a port."""
    bare = host_without_port(host)
    if bare == "localhost" or bare.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False
