"""Peers prove they share the fleet's secret: an HMAC-SHA256 over each request.

A peer server hands out blob bytes to whoever asks. Digests keep the *bytes* honest (a reader checks
them before use), but without authentication anyone who reaches the port could use the fleet as a free
mirror, or make a node fetch from its registry on their behalf. Every node of a fleet reads one secret
(`load_secret`, a root-owned 0600 file) and signs each request it sends to a peer (`Signer`); the peer
server checks the signature before doing any work (`RequestVerifier`).

The signed string (`canonical`) is these fields joined by ``"\\n"``, UTF-8::

    METHOD                      upper-cased
    target                      path plus query, exactly as sent
    Range header value          "" when absent
    x-damselfly-date            unix time in milliseconds, decimal
    x-damselfly-nonce           32 lowercase hex digits (16 random bytes)
    x-damselfly-hops            "" when absent  } SIGNED_EXTRA, in this order: a relay cannot
    x-damselfly-deadline        "" when absent  } lengthen a deadline or reset a hop count, and a
    x-damselfly-to              "" when absent  } request for one member is not one for another

and ``x-damselfly-signature`` is the lowercase hex HMAC-SHA256 of it. No field may hold a line break
(HTTP header values cannot), so no two different requests share a signed string.

Replays: a captured request is only good while its date is within `window` seconds of the verifier's
clock, i.e. for at most ``2 * window`` seconds after the verifier first saw it. The verifier remembers
each nonce for that long and refuses it a second time. A nonce is remembered only once its signature
checked out, so unsigned junk can neither fill the memory nor pre-empt a real peer's nonce. Should more
than `max_nonces` signed requests arrive within ``2 * window`` — a peer gone mad, or the secret leaked —
new ones are refused with reason ``"busy"`` rather than letting the memory grow or forgetting early.

Reasons of `PeerAuthError` (each counted in `RequestVerifier.refused`): ``missing``, ``malformed``,
``stale``, ``wrong``, ``replayed``, ``busy``.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping

from .errors import P2PError

DATE_HEADER = "x-damselfly-date"
NONCE_HEADER = "x-damselfly-nonce"
SIGNATURE_HEADER = "x-damselfly-signature"
#: Headers the signature also covers when present (absent counts as "").
SIGNED_EXTRA = ("x-damselfly-hops", "x-damselfly-deadline", "x-damselfly-to")

#: Seconds a request's date may differ from the verifier's clock (either way).
DEFAULT_WINDOW = 30.0
#: A shorter secret is refused: it could be guessed.
MIN_SECRET_BYTES = 16
#: A longer secret file is refused unread: it is surely the wrong file.
MAX_SECRET_FILE = 64 * 1024

REASONS = ("missing", "malformed", "stale", "wrong", "replayed", "busy")

_DATE = re.compile(r"[0-9]{1,16}")
_NONCE = re.compile(r"[0-9a-f]{32}")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")

_EXPLAIN = {
    "missing": "no {date}, {nonce} or {sig} header: the sender does not sign requests",
    "malformed": "a signature header (or a signed field) is malformed",
    "stale": "the request's date is more than the window away from this node's clock: "
    "check that both clocks are synchronised (NTP)",
    "wrong": "the signature does not match: the sender uses another secret, or the request was altered",
    "replayed": "this nonce was seen before: a replayed request",
    "busy": "too many signed requests remembered for replay protection; try again shortly",
}


class PeerAuthError(P2PError):
    """A peer request that is not signed with the fleet's secret; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        why = _EXPLAIN[reason].format(date=DATE_HEADER, nonce=NONCE_HEADER, sig=SIGNATURE_HEADER)
        extra = f" ({detail})" if detail else ""
        super().__init__(f"peer request refused [{reason}]: {why}{extra}")


class SecretFileError(P2PError):
    """The shared-secret file cannot be used; the message says why and what to do."""

    def __init__(self, path: str, why: str, remedy: str) -> None:
        self.path = path
        self.why = why
        super().__init__(f"peer secret {path}: {why}; {remedy}")


def load_secret(path: str) -> bytes:
    """The fleet's secret from `path`: a regular file of ours, private to us, of sensible length."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO must not hang us
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise SecretFileError(path, "does not exist", "create it (e.g. openssl rand -hex 32)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SecretFileError(
                path, "is a symbolic link", "point the setting at the real file (links are not followed)"
            ) from None
        raise SecretFileError(path, f"cannot be opened: {e.strerror}", "check the path") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(path, "is not a regular file", "point the setting at a file")
        euid = os.geteuid()
        if st.st_uid != euid:
            raise SecretFileError(
                path, f"is owned by uid {st.st_uid}, not by uid {euid} that runs us", f"chown {euid} {path}"
            )
        if st.st_mode & 0o077:
            mode = stat.S_IMODE(st.st_mode)
            raise SecretFileError(
                path, f"is readable or writable by others (mode {mode:04o})", f"chmod 600 {path}"
            )
        if st.st_size > MAX_SECRET_FILE:
            raise SecretFileError(
                path, f"is {st.st_size} bytes, more than {MAX_SECRET_FILE}", "is this the right file?"
            )
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:  # grew between fstat and read
        raise SecretFileError(path, f"is more than {MAX_SECRET_FILE} bytes", "is this the right file?")
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretFileError(
            path,
            f"holds {len(secret)} bytes, fewer than {MIN_SECRET_BYTES}",
            f"write a longer secret (e.g. openssl rand -hex 32 > {path})",
        )
    return secret


def canonical(
    method: str, target: str, range_value: str, date: str, nonce: str, extra: Mapping[str, str]
) -> bytes:
    """The bytes a signature covers; ValueError if a field holds a line break."""
    lowered = {k.lower(): v for k, v in extra.items()}
    fields = [method.upper(), target, range_value, date, nonce]
    fields += [lowered.get(name, "") for name in SIGNED_EXTRA]
    for f in fields:
        if "\n" in f or "\r" in f:
            raise ValueError(f"a signed field holds a line break: {f!r}")
    return "\n".join(fields).encode()


def _mac(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


class Signer:
    """Signs the requests this node sends to its peers."""

    def __init__(self, secret: bytes, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"peer secret shorter than {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self._clock = clock

    def headers(
        self, method: str, target: str, range_value: str = "", extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """The date, nonce and signature headers (the caller sends `extra` itself)."""
        date = str(int(self._clock() * 1000))
        nonce = secrets.token_hex(16)
        sig = _mac(self._secret, canonical(method, target, range_value, date, nonce, extra or {}))
        return {DATE_HEADER: date, NONCE_HEADER: nonce, SIGNATURE_HEADER: sig}


class RequestVerifier:
    """Checks the signature, freshness and uniqueness of requests from peers. Thread-safe."""

    def __init__(
        self,
        secret: bytes,
        window: float = DEFAULT_WINDOW,
        clock: Callable[[], float] = time.time,
        max_nonces: int = 200_000,
    ) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"peer secret shorter than {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.window = window
        self.max_nonces = max_nonces
        self._clock = clock
        self._lock = threading.Lock()
        # nonce -> when it may be forgotten. Insertion order is (nearly) expiry order, so pruning pops
        # from the front; a wall clock stepping back only delays pruning a little.
        self._nonces: dict[str, float] = {}
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.accepted = 0

    def _refuse(self, reason: str, detail: str = "") -> PeerAuthError:
        with self._lock:
            self.refused[reason] += 1
        return PeerAuthError(reason, detail)

    def remembered(self) -> int:
        """Nonces held for replay protection now (tests, metrics)."""
        with self._lock:
            return len(self._nonces)

    def verify(self, method: str, target: str, headers: Mapping[str, str]) -> None:
        """Return if the request is signed, fresh and new; raise `PeerAuthError` otherwise.

        `headers` is looked up by lowercase names.
        """
        date = headers.get(DATE_HEADER)
        nonce = headers.get(NONCE_HEADER)
        sig = headers.get(SIGNATURE_HEADER)
        if date is None or nonce is None or sig is None:
            raise self._refuse("missing")
        if not _DATE.fullmatch(date):
            raise self._refuse("malformed", f"{DATE_HEADER} is not milliseconds since the epoch")
        if not _NONCE.fullmatch(nonce):
            raise self._refuse("malformed", f"{NONCE_HEADER} is not 32 lowercase hex digits")
        if not _SIGNATURE.fullmatch(sig):
            raise self._refuse("malformed", f"{SIGNATURE_HEADER} is not 64 lowercase hex digits")
        now = self._clock()
        skew = now - int(date) / 1000
        if abs(skew) > self.window:
            raise self._refuse("stale", f"{skew:+.1f}s off, window {self.window:g}s")
        try:
            message = canonical(method, target, headers.get("range", ""), date, nonce, headers)
        except ValueError as e:
            raise self._refuse("malformed", str(e)) from None
        if not hmac.compare_digest(_mac(self._secret, message), sig):
            raise self._refuse("wrong")
        with self._lock:
            self._prune(now)
            if nonce in self._nonces:
                self.refused["replayed"] += 1
                raise PeerAuthError("replayed")
            if len(self._nonces) >= self.max_nonces:
                self.refused["busy"] += 1
                raise PeerAuthError("busy", f"{len(self._nonces)} nonces within {2 * self.window:g}s")
            self._nonces[nonce] = now + 2 * self.window
            self.accepted += 1

    def _prune(self, now: float) -> None:
        """Forget the nonces whose requests can no longer pass the freshness check (lock held)."""
        nonces = self._nonces
        while nonces:
            oldest = next(iter(nonces))
            if nonces[oldest] > now:
                break
            del nonces[oldest]
