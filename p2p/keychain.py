"""Credentials per image repository, in memory only: what a kubelet sends with a CRI ``PullImage``.

Kubernetes hands a pod's image pull secret to the container runtime with each ``PullImage`` call (CRI
``runtime.v1.AuthConfig``), never to a snapshotter. `damselfly serve`'s CRI proxy
(`snapshotter.cri`) sees those calls on their way to containerd and keeps the credentials here, keyed by
the image's registry and repository, so that the Prepare checks of that image and the device daemon's
block reads and background downloads of its layers authenticate as containerd's pull did
(stargz-snapshotter's ``cri_keychain`` does the same).

- `credentials_from_cri`: containerd's rules for an ``AuthConfig`` (``pkg/cri/server/image_pull.go``,
  ``ParseAuth``): a ``server_address`` naming another registry means none; then the user name and
  password, the identity token, the base64 ``auth``; damselfly also takes the registry token (sent to
  the registry as a bearer token, as Docker does).
- `Keychain`: the store, a `p2p.auth.RepositoryProvider`: it answers for a (host, repository) only —
  credentials sent for one image are not used for another repository of the same registry. It holds at
  most `MAX_ENTRIES` repositories (the least recently stored go first). A pull without credentials
  leaves what an earlier pull stored (a running container's reads of that image keep working).

Nothing here is written to disk or logged: `Credentials` keeps its secrets out of its repr, and
`Keychain` logs only the kind of credentials and where they are for. `entry_to_json`/`entry_from_json`
are the form an entry crosses the device daemon's root-only control socket in (``credentials`` op).
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from .auth import Credentials, normalize_host
from .errors import CredentialsError

#: Repositories a keychain holds credentials for at most.
MAX_ENTRIES = 4096
#: The longest secret field accepted (a bearer token of a cloud registry is a few kB).
MAX_FIELD = 64 * 1024


def credentials_from_cri(
    registry: str,
    *,
    username: str = "",
    password: str = "",
    auth: str = "",
    server_address: str = "",
    identity_token: str = "",
    registry_token: str = "",
) -> Credentials | None:
    """The credentials a CRI ``AuthConfig`` holds for `registry` (containerd's ``ParseAuth`` order), or
    None when it holds none for it. A malformed ``auth`` raises `CredentialsError` (no secret in it)."""
    for name, value in (
        ("username", username),
        ("password", password),
        ("auth", auth),
        ("server_address", server_address),
        ("identity_token", identity_token),
        ("registry_token", registry_token),
    ):
        if len(value) > MAX_FIELD:
            raise CredentialsError(f"AuthConfig for {registry}", f"{name} is longer than {MAX_FIELD} bytes")
    if server_address and normalize_host(server_address) != normalize_host(registry):
        return None  # for another registry (containerd: "do not return the auth info")
    if username:
        return Credentials(username, password)
    if identity_token:
        return Credentials(identity_token=identity_token)
    if auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(
                f"AuthConfig for {registry}", '"auth" is not base64 of "user:password"'
            ) from None
        user, sep, secret = decoded.partition(":")
        if not sep:
            raise CredentialsError(f"AuthConfig for {registry}", '"auth" decodes to no "user:password" pair')
        return Credentials(user, secret)
    if registry_token:
        return Credentials(registry_token=registry_token)
    return None


def entry_to_json(registry: str, repository: str, creds: Credentials) -> dict[str, str]:
    """One keychain entry as the device daemon's ``credentials`` request carries it."""
    return {
        "registry": registry,
        "repository": repository,
        "username": creds.username,
        "password": creds.password,
        "identity_token": creds.identity_token or "",
        "registry_token": creds.registry_token or "",
    }


def entry_from_json(entry: Mapping[str, Any]) -> tuple[str, str, Credentials]:
    """`entry_to_json` in reverse; `CredentialsError` (naming no secret) for a malformed one."""
    fields = ("registry", "repository", "username", "password", "identity_token", "registry_token")
    values = {name: entry.get(name, "") for name in fields}
    bad = [n for n, v in values.items() if not isinstance(v, str) or len(v) > MAX_FIELD]
    if bad or not values["registry"] or not values["repository"]:
        why = f"field {bad[0]} is not a string of at most {MAX_FIELD} bytes" if bad else "no repository"
        raise CredentialsError("credentials entry", why, "send registry, repository and strings")
    creds = Credentials(
        values["username"],
        values["password"],
        values["identity_token"] or None,
        values["registry_token"] or None,
    )
    return values["registry"], values["repository"], creds


class Keychain:
    """Credentials by (registry, repository), in memory (see the module docstring)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], Credentials] = OrderedDict()

    @staticmethod
    def key(registry: str, repository: str) -> tuple[str, str]:
        return normalize_host(registry), repository

    def put(self, registry: str, repository: str, creds: Credentials) -> bool:
        """Keep `creds` for `repository` of `registry`; True if they differ from what was kept."""
        key = self.key(registry, repository)
        with self._lock:
            changed = self._entries.get(key) != creds
            self._entries[key] = creds
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return changed

    def forget(self, registry: str, repository: str) -> None:
        with self._lock:
            self._entries.pop(self.key(registry, repository), None)

    def entries(self) -> Iterator[tuple[str, str, Credentials]]:
        """(registry, repository, credentials) of every entry, oldest first (a copy: safe to iterate)."""
        with self._lock:
            items = list(self._entries.items())
        for (registry, repository), creds in items:
            yield registry, repository, creds

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- p2p.auth.RepositoryProvider -----------------------------------------------------------------

    def __call__(self, host: str) -> Credentials | None:
        return None  # credentials from a pull are for its repository, never for a whole registry

    def for_repository(self, host: str, repository: str) -> Credentials | None:
        with self._lock:
            return self._entries.get(self.key(host, repository))
