"""HMAC signing of peer requests: what is covered, freshness, replays, and the secret file's checks."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from pathlib import Path

import pytest

from p2p.peerauth import (
    DATE_HEADER,
    MIN_SECRET_BYTES,
    NONCE_HEADER,
    SIGNATURE_HEADER,
    PeerAuthError,
    RequestVerifier,
    SecretFileError,
    Signer,
    canonical,
    load_secret,
)

SECRET = b"0123456789abcdef0123456789abcdef"
TARGET = "/blobs/sha256:abc?part=1"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def signed(
    signer: Signer,
    method: str = "GET",
    target: str = TARGET,
    range_value: str = "bytes=0-99",
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The lowercase header dict a peer server would see."""
    extra = extra or {}
    headers = signer.headers(method, target, range_value, extra)
    headers.update(extra)
    if range_value:
        headers["range"] = range_value
    return headers


def reason(verifier: RequestVerifier, method: str, target: str, headers: dict[str, str]) -> str:
    with pytest.raises(PeerAuthError) as caught:
        verifier.verify(method, target, headers)
    assert caught.value.reason in str(caught.value)
    return caught.value.reason


def test_a_signed_request_passes_with_its_extra_headers() -> None:
    clock = Clock()
    v = RequestVerifier(SECRET, clock=clock)
    headers = signed(Signer(SECRET, clock), extra={"x-damselfly-hops": "2", "x-damselfly-deadline": "9"})
    assert re.fullmatch(r"[0-9a-f]{32}", headers[NONCE_HEADER])
    assert re.fullmatch(r"[0-9a-f]{64}", headers[SIGNATURE_HEADER])
    assert headers[DATE_HEADER] == str(int(clock.now * 1000))
    v.verify("get", TARGET, headers)  # the method's case does not matter
    assert v.accepted == 1 and v.remembered() == 1


def test_the_signature_is_the_hmac_of_the_documented_string() -> None:
    expected = b"GET\n/x?y=1\n\n5\nn\n\n7\n"  # hops, deadline, to
    assert canonical("get", "/x?y=1", "", "5", "n", {"X-Damselfly-Deadline": "7"}) == expected
    h = Signer(SECRET, Clock()).headers("GET", TARGET, "bytes=1-2", {"x-damselfly-hops": "1"})
    covered = canonical(
        "GET", TARGET, "bytes=1-2", h[DATE_HEADER], h[NONCE_HEADER], {"x-damselfly-hops": "1"}
    )
    assert h[SIGNATURE_HEADER] == hmac.new(SECRET, covered, hashlib.sha256).hexdigest()
    with pytest.raises(ValueError):
        canonical("GET", "/x\nforged", "", "5", "n", {})


@pytest.mark.parametrize("header", [DATE_HEADER, NONCE_HEADER, SIGNATURE_HEADER])
def test_each_missing_header_is_refused(header: str) -> None:
    v = RequestVerifier(SECRET)
    headers = signed(Signer(SECRET))
    del headers[header]
    assert reason(v, "GET", TARGET, headers) == "missing"
    assert v.refused["missing"] == 1


@pytest.mark.parametrize(
    ("header", "value"),
    [
        (DATE_HEADER, "soon"),
        (DATE_HEADER, "-5"),
        (NONCE_HEADER, "abc"),
        (NONCE_HEADER, "0123456789ABCDEF0123456789ABCDEF"),
        (SIGNATURE_HEADER, "00" * 31),
        (SIGNATURE_HEADER, "zz" * 32),
    ],
)
def test_malformed_headers_are_refused(header: str, value: str) -> None:
    v = RequestVerifier(SECRET)
    headers = signed(Signer(SECRET))
    headers[header] = value
    assert reason(v, "GET", TARGET, headers) == "malformed"


@pytest.mark.parametrize("offset", [-31.0, 31.0])
def test_a_date_outside_the_window_either_way_is_stale(offset: float) -> None:
    clock = Clock()
    signer_clock = Clock(clock.now + offset)
    v = RequestVerifier(SECRET, window=30.0, clock=clock)
    assert reason(v, "GET", TARGET, signed(Signer(SECRET, signer_clock))) == "stale"
    signer_clock.now = clock.now + offset * 29 / 31  # just inside
    v.verify("GET", TARGET, signed(Signer(SECRET, signer_clock)))


def test_another_secret_is_wrong() -> None:
    v = RequestVerifier(SECRET)
    assert reason(v, "GET", TARGET, signed(Signer(b"another secret, 16+ bytes"))) == "wrong"
    assert v.refused["wrong"] == 1 and v.accepted == 0


@pytest.mark.parametrize(
    "tamper",
    ["method", "target", "range", "range-dropped", "hops", "hops-added", "deadline"],
)
def test_altering_any_covered_field_is_wrong(tamper: str) -> None:
    v = RequestVerifier(SECRET)
    headers = signed(Signer(SECRET), extra={"x-damselfly-deadline": "1700000001000"})
    method, target = "GET", TARGET
    if tamper == "method":
        method = "HEAD"
    elif tamper == "target":
        target = "/blobs/sha256:abc?part=2"
    elif tamper == "range":
        headers["range"] = "bytes=0-999999"
    elif tamper == "range-dropped":
        del headers["range"]
    elif tamper == "hops":
        headers = signed(Signer(SECRET), extra={"x-damselfly-hops": "3"})
        headers["x-damselfly-hops"] = "0"
    elif tamper == "hops-added":
        headers["x-damselfly-hops"] = "0"
    elif tamper == "deadline":
        headers["x-damselfly-deadline"] = "1700009999000"
    assert reason(v, method, target, headers) == "wrong"


def test_a_replayed_request_is_refused() -> None:
    v = RequestVerifier(SECRET)
    headers = signed(Signer(SECRET))
    v.verify("GET", TARGET, headers)
    assert reason(v, "GET", TARGET, dict(headers)) == "replayed"
    assert v.refused["replayed"] == 1


def test_a_nonce_is_not_remembered_unless_the_signature_holds() -> None:
    v = RequestVerifier(SECRET)
    good = signed(Signer(SECRET))
    forged = dict(good, **{SIGNATURE_HEADER: "0" * 64})
    assert reason(v, "GET", TARGET, forged) == "wrong"
    assert v.remembered() == 0
    v.verify("GET", TARGET, good)  # the forger did not burn the real request's nonce


def test_nonces_are_forgotten_after_twice_the_window() -> None:
    clock = Clock()
    signer = Signer(SECRET, clock)
    v = RequestVerifier(SECRET, window=10.0, clock=clock)
    for i in range(1000):
        clock.now += 0.001 * (i % 2)
        v.verify("GET", TARGET, signed(signer))
    assert v.remembered() == 1000
    clock.now += 20.5  # every one of them is past 2 * window
    v.verify("GET", TARGET, signed(signer))
    assert v.remembered() == 1


def test_a_full_nonce_memory_refuses_as_busy_until_it_drains() -> None:
    clock = Clock()
    signer = Signer(SECRET, clock)
    v = RequestVerifier(SECRET, window=10.0, clock=clock, max_nonces=3)
    for _ in range(3):
        v.verify("GET", TARGET, signed(signer))
    assert reason(v, "GET", TARGET, signed(signer)) == "busy"
    clock.now += 21.0
    v.verify("GET", TARGET, signed(signer))
    assert v.remembered() == 1


def _secret_file(tmp_path: Path, content: bytes = b"  " + SECRET + b"\n", mode: int = 0o600) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_private_secret_file_loads_stripped(tmp_path: Path, mode: int) -> None:
    assert load_secret(str(_secret_file(tmp_path, mode=mode))) == SECRET


def test_a_secret_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, mode=0o644)
    with pytest.raises(SecretFileError, match=re.escape(f"chmod 600 {path}")):
        load_secret(str(path))


def test_a_symlink_to_the_secret_is_refused(tmp_path: Path) -> None:
    real = _secret_file(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(SecretFileError, match="symbolic link"):
        load_secret(str(link))


def test_a_short_secret_is_refused(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, content=b"x" * (MIN_SECRET_BYTES - 1) + b"\n\n")
    with pytest.raises(SecretFileError, match=f"fewer than {MIN_SECRET_BYTES}"):
        load_secret(str(path))


def test_a_directory_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir"
    d.mkdir(mode=0o700)
    with pytest.raises(SecretFileError, match="not a regular file"):
        load_secret(str(d))
    with pytest.raises(SecretFileError, match="does not exist"):
        load_secret(str(tmp_path / "nothing"))


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SecretFileError, match="not a regular file"):
        load_secret(str(fifo))


def test_a_huge_secret_file_is_refused(tmp_path: Path) -> None:
    path = _secret_file(tmp_path, content=b"y" * (64 * 1024 + 1))
    with pytest.raises(SecretFileError, match="more than"):
        load_secret(str(path))


def test_a_secret_file_owned_by_someone_else_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _secret_file(tmp_path)
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)  # as if another user ran us
    with pytest.raises(SecretFileError, match=f"owned by uid {owner}.*chown {owner + 1}"):
        load_secret(str(path))
