"""Retries, backoff, Retry-After, timeouts and malformed range answers.

The real registry never sends a 503 or a wrong range, so these tests swap the network for a plain
function (``httpx.MockTransport``) and the clock for a fake one; the stall tests use real sockets.
"""

from __future__ import annotations

import email.utils
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from blockformat.digest import digest_of
from p2p import deadline
from p2p.errors import (
    AuthError,
    DeadlineExceededError,
    DigestMismatchError,
    NotFoundError,
    RangeResponseError,
    RegistryError,
    RegistryProtocolError,
    RegistryUnavailableError,
)
from p2p.manifest import OCI_MANIFEST, Descriptor, build_manifest
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy, Timeouts, parse_retry_after
from tests.conftest import NO_CREDENTIALS, ClientFactory

from .servers import RawServer, read_request_head

BLOB = bytes(range(256)) * 40
BLOB_DIGEST = digest_of(BLOB)
CONFIG = Descriptor("application/vnd.oci.image.config.v1+json", digest_of(b"{}"), 2)
MANIFEST = build_manifest(
    CONFIG, [Descriptor("application/vnd.oci.image.layer.v1.tar", BLOB_DIGEST, len(BLOB))]
)

Handler = Callable[[httpx.Request], httpx.Response]


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def mock_client(
    handler: Handler, fake: FakeTime, retry: RetryPolicy | None = None, **kw: Any
) -> RegistryClient:
    return RegistryClient(
        "registry.test",
        transport=httpx.MockTransport(handler),
        credentials=kw.pop("credentials", NO_CREDENTIALS),
        retry=retry or RetryPolicy(attempts=5, budget=60, base_delay=0.2, max_delay=10),
        clock=fake.clock,
        sleep=fake.sleep,
        **kw,
    )


def scripted(
    *responses: httpx.Response | Exception, then: httpx.Response | None = None
) -> tuple[Handler, list[str]]:
    """A handler answering with `responses` in turn (exceptions are raised), then `then` forever."""
    seen: list[str] = []
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url.path}")
        item = queue.pop(0) if queue else then
        if item is None:
            raise AssertionError(f"unexpected request {request.method} {request.url}")
        if isinstance(item, Exception):
            raise item
        return item

    return handler, seen


def manifest_ok() -> httpx.Response:
    return httpx.Response(200, content=MANIFEST, headers={"content-type": OCI_MANIFEST})


# -- what is retried, and how long we wait --------------------------------------------------------


def test_5xx_is_retried_with_exponential_backoff() -> None:
    fake = FakeTime()
    handler, seen = scripted(
        httpx.Response(503), httpx.Response(502), httpx.Response(500), then=manifest_ok()
    )
    client = mock_client(handler, fake)
    assert client.get_manifest("a/b", "latest").digest == digest_of(MANIFEST)
    assert len(seen) == 4
    # base 0.2 s doubling, minus up to 25 % jitter
    for got, nominal in zip(fake.sleeps, [0.2, 0.4, 0.8], strict=True):
        assert 0.75 * nominal <= got <= nominal


def test_429_retry_after_seconds_is_honoured() -> None:
    fake = FakeTime()
    handler, seen = scripted(httpx.Response(429, headers={"retry-after": "3"}), then=manifest_ok())
    mock_client(handler, fake).get_manifest("a/b", "latest")
    assert fake.sleeps == [3.0]
    assert len(seen) == 2


def test_503_retry_after_http_date_is_honoured() -> None:
    fake = FakeTime()
    when = email.utils.formatdate(time.time() + 5, usegmt=True)
    handler, _ = scripted(httpx.Response(503, headers={"retry-after": when}), then=manifest_ok())
    mock_client(handler, fake).get_manifest("a/b", "latest")
    assert len(fake.sleeps) == 1 and 3.5 <= fake.sleeps[0] <= 5.0


def test_retry_after_past_the_budget_fails_at_once_saying_so() -> None:
    fake = FakeTime()
    handler, seen = scripted(httpx.Response(429, headers={"retry-after": "3600"}), then=manifest_ok())
    with pytest.raises(RegistryUnavailableError) as e:
        mock_client(handler, fake).get_manifest("a/b", "latest")
    assert fake.sleeps == [] and len(seen) == 1
    assert "retry after 3600s" in str(e.value) and e.value.status == 429


def test_persistent_500_gives_up_after_the_attempt_count() -> None:
    fake = FakeTime()
    handler, seen = scripted(
        then=httpx.Response(500, json={"errors": [{"code": "UNKNOWN", "message": "boom"}]})
    )
    with pytest.raises(RegistryUnavailableError) as e:
        mock_client(handler, fake, RetryPolicy(attempts=4, budget=60)).get_manifest("a/b", "latest")
    assert len(seen) == 4 and e.value.attempts == 4 and e.value.status == 500
    assert "HTTP 500 (UNKNOWN: boom)" in str(
        e.value
    ) and "https://registry.test/v2/a/b/manifests/latest" in str(e.value)


def test_retries_stop_at_the_time_budget() -> None:
    fake = FakeTime()
    handler, seen = scripted(then=httpx.Response(503))
    retry = RetryPolicy(attempts=1000, budget=5.0, base_delay=1.0, max_delay=1.0, jitter=0.0)
    with pytest.raises(RegistryUnavailableError) as e:
        mock_client(handler, fake, retry).get_manifest("a/b", "latest")
    assert sum(fake.sleeps) <= 5.0 and len(seen) == 6
    assert e.value.elapsed <= 5.0


def test_connect_errors_are_retried() -> None:
    fake = FakeTime()
    handler, seen = scripted(httpx.ConnectError("refused"), httpx.ConnectTimeout("slow"), then=manifest_ok())
    assert mock_client(handler, fake).get_manifest("a/b", "latest").raw == MANIFEST
    assert len(seen) == 3


def test_body_cut_short_is_retried() -> None:
    fake = FakeTime()
    handler, seen = scripted(httpx.RemoteProtocolError("peer closed connection"), then=manifest_ok())
    assert mock_client(handler, fake).get_manifest("a/b", "latest").raw == MANIFEST
    assert len(seen) == 2


@pytest.mark.parametrize("status", [400, 404, 405])
def test_client_errors_are_not_retried(status: int) -> None:
    fake = FakeTime()
    handler, seen = scripted(then=httpx.Response(status))
    with pytest.raises(RegistryError) as e:
        mock_client(handler, fake).get_manifest("a/b", "latest")
    assert not isinstance(e.value, RegistryUnavailableError)
    assert len(seen) == 1 and fake.sleeps == []
    assert isinstance(e.value, NotFoundError) == (status == 404)


def _upload_handler(patch: httpx.Response | Exception, seen: list[str]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if request.method == "HEAD":
            return httpx.Response(404)
        if request.method == "POST":
            return httpx.Response(202, headers={"location": "/v2/a/b/blobs/uploads/u1?_state=x"})
        if request.method == "PATCH":
            if isinstance(patch, Exception):
                raise patch
            return patch
        return httpx.Response(201, headers={"docker-content-digest": BLOB_DIGEST})

    return handler


def test_upload_patch_is_not_retried_once_it_may_have_been_applied() -> None:
    fake, seen = FakeTime(), list[str]()
    client = mock_client(_upload_handler(httpx.ReadError("reset"), seen), fake)
    with pytest.raises(RegistryUnavailableError) as e:
        client.push_blob("a/b", BLOB, chunk_size=1024)
    assert seen == ["HEAD", "POST", "PATCH"]
    assert "not retried" in str(e.value)


def test_upload_patch_429_is_retried() -> None:
    fake, seen = FakeTime(), list[str]()
    answers = [httpx.Response(429, headers={"retry-after": "1"})]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "PATCH" and answers:
            seen.append("PATCH")
            return answers.pop()
        return _upload_handler(httpx.Response(202, headers={"location": "/v2/a/b/blobs/uploads/u2"}), seen)(
            request
        )

    result = mock_client(handler, fake).push_blob("a/b", BLOB, chunk_size=len(BLOB))
    assert result.how == "uploaded" and seen == ["HEAD", "POST", "PATCH", "PATCH", "PUT"]
    assert fake.sleeps == [1.0]


def test_endless_401_stops_after_one_renewal() -> None:
    fake = FakeTime()
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "auth.test":
            return httpx.Response(200, json={"token": "t", "expires_in": 300})
        challenge = 'Bearer realm="https://auth.test/token",service="registry.test"'
        return httpx.Response(401, headers={"www-authenticate": challenge})

    with pytest.raises(AuthError):
        mock_client(handler, fake).get_manifest("a/b", "latest")
    assert seen == ["registry.test", "auth.test", "registry.test"]


def test_manifest_whose_digest_header_disagrees_is_rejected() -> None:
    fake = FakeTime()
    wrong = digest_of(b"another manifest")
    handler, _ = scripted(
        then=httpx.Response(
            200, content=MANIFEST, headers={"content-type": OCI_MANIFEST, "docker-content-digest": wrong}
        )
    )
    with pytest.raises(DigestMismatchError) as e:
        mock_client(handler, fake).get_manifest("a/b", "latest")
    assert e.value.expected == wrong and e.value.got == digest_of(MANIFEST)


# -- range answers --------------------------------------------------------------------------------


def _range_handler(respond: Callable[[int, int], httpx.Response]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        first, last = request.headers["range"].removeprefix("bytes=").split("-")
        return respond(int(first), int(last))

    return handler


def test_full_200_answer_to_a_range_is_verified_and_sliced() -> None:
    client = mock_client(_range_handler(lambda a, b: httpx.Response(200, content=BLOB)), FakeTime())
    assert client.read_blob_range("a/b", BLOB_DIGEST, 100, 50) == BLOB[100:150]


def test_full_200_answer_with_wrong_bytes_is_rejected() -> None:
    bad = b"X" + BLOB[1:]
    client = mock_client(_range_handler(lambda a, b: httpx.Response(200, content=bad)), FakeTime())
    with pytest.raises(DigestMismatchError):
        client.read_blob_range("a/b", BLOB_DIGEST, 100, 50)


def test_full_200_answer_beyond_the_limit_is_refused_clearly() -> None:
    client = mock_client(_range_handler(lambda a, b: httpx.Response(200, content=BLOB)), FakeTime())
    with pytest.raises(RegistryProtocolError) as e:
        client.read_blob_range("a/b", BLOB_DIGEST, 0, 10, max_full_body=1000)
    assert "exceeds the 1000-byte limit" in str(e.value)


def test_206_with_other_bytes_than_asked_is_rejected() -> None:
    def respond(a: int, b: int) -> httpx.Response:
        return httpx.Response(
            206, content=BLOB[a + 1 : b + 2], headers={"content-range": f"bytes {a + 1}-{b + 1}/{len(BLOB)}"}
        )

    client = mock_client(_range_handler(respond), FakeTime())
    with pytest.raises(RangeResponseError) as e:
        client.read_blob_range("a/b", BLOB_DIGEST, 10, 20)
    assert "bytes 11-30 instead" in str(e.value) and e.value.offset == 10 and e.value.length == 20


def test_206_with_a_short_body_is_rejected() -> None:
    def respond(a: int, b: int) -> httpx.Response:
        return httpx.Response(206, content=BLOB[a:b], headers={"content-range": f"bytes {a}-{b}/{len(BLOB)}"})

    client = mock_client(_range_handler(respond), FakeTime())
    with pytest.raises(RangeResponseError) as e:
        client.read_blob_range("a/b", BLOB_DIGEST, 10, 20)
    assert "body has 19 bytes" in str(e.value)


def test_206_without_content_range_is_rejected() -> None:
    client = mock_client(
        _range_handler(lambda a, b: httpx.Response(206, content=BLOB[a : b + 1])), FakeTime()
    )
    with pytest.raises(RangeResponseError):
        client.read_blob_range("a/b", BLOB_DIGEST, 0, 10)


def test_parse_retry_after() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=time.time()) == 0.0


# -- stalls, with real sockets --------------------------------------------------------------------

STALL_TIMEOUTS = Timeouts(connect=1.0, read=0.5, write=1.0, pool=1.0, total=1.0)
STALL_RETRY = RetryPolicy(attempts=2, budget=5.0, base_delay=0.05)


def _stall_client(make_client: ClientFactory, server: RawServer) -> RegistryClient:
    return make_client(server.host, timeouts=STALL_TIMEOUTS, retry=STALL_RETRY)


def test_server_that_never_answers_fails_in_bounded_time(make_client: ClientFactory) -> None:
    def silent(conn: socket.socket) -> None:
        read_request_head(conn)
        server.stopping.wait(10)

    with RawServer(silent) as server:
        start = time.monotonic()
        with pytest.raises(RegistryUnavailableError) as e:
            _stall_client(make_client, server).get_manifest("a/b", "latest")
        elapsed = time.monotonic() - start
    assert "timed out waiting for data" in str(e.value)
    assert elapsed < 2 * 0.5 + 1.0 and server.connections == 2


def test_body_that_stalls_midway_fails_in_bounded_time(make_client: ClientFactory) -> None:
    def stall_mid_body(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(
            b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: application/json\r\n\r\n{"sche'
        )
        server.stopping.wait(10)

    with RawServer(stall_mid_body) as server:
        start = time.monotonic()
        with pytest.raises(RegistryUnavailableError):
            _stall_client(make_client, server).get_manifest("a/b", "latest")
        assert time.monotonic() - start < 2.5


def test_trickling_body_is_cut_off_by_the_total_time_limit(make_client: ClientFactory) -> None:
    def trickle(conn: socket.socket) -> None:
        read_request_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(200):  # one byte every 0.1 s: never idle long enough for the read timeout
            if server.stopping.wait(0.1):
                return
            conn.sendall(b"x")

    with RawServer(trickle) as server:
        start = time.monotonic()
        with pytest.raises(RegistryUnavailableError) as e:
            _stall_client(make_client, server).get_blob("a/b", BLOB_DIGEST)
        elapsed = time.monotonic() - start
    assert "too slow" in str(e.value)
    assert elapsed < 2 * (1.0 + 0.5) + 1.0


# -- the caller's deadline bounds everything -------------------------------------------------------

SLOW_TIMEOUTS = Timeouts(connect=30.0, read=30.0, write=30.0, pool=30.0, total=60.0)
PATIENT_RETRY = RetryPolicy(attempts=5, budget=60.0, base_delay=0.05)


def test_a_callers_deadline_cuts_timeouts_and_retries_short(make_client: ClientFactory) -> None:
    def silent(conn: socket.socket) -> None:
        read_request_head(conn)
        server.stopping.wait(10)

    with RawServer(silent) as server:
        client = make_client(server.host, timeouts=SLOW_TIMEOUTS, retry=PATIENT_RETRY)
        start = time.monotonic()
        with deadline.scope(start + 1.0), pytest.raises(RegistryUnavailableError) as e:
            client.read_blob_range("a/b", BLOB_DIGEST, 0, 4096)  # 5 x 30 s without the deadline
        elapsed = time.monotonic() - start
    assert "timed out waiting for data" in str(e.value)
    assert 0.6 < elapsed < 1.0, elapsed  # it ends just before the caller's deadline, saying why


def test_a_call_with_no_time_left_is_not_sent(make_client: ClientFactory) -> None:
    def answer(conn: socket.socket) -> None:
        read_request_head(conn)

    with RawServer(answer) as server:
        client = make_client(server.host)
        with deadline.scope(time.monotonic() - 1), pytest.raises(DeadlineExceededError):
            client.read_blob_range("a/b", BLOB_DIGEST, 0, 4096)
    assert server.connections == 0
