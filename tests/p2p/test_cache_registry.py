"""The node blob cache with the real registry as its upstream: faults, a crash mid-write, offline reads.

Every test reads a chunk container through ``ChunkReader(cached_blob, index_digest)``, the cache's
upstream being a `RegistryBlobSource` over the real docker-registry (through the fault-injecting proxy
where a fault is the point). What is proved, per issue 3's "Done when":

- faults (reset mid-body, 500s, 429 + Retry-After, a stalled response, wrong bytes in a range): a read
  returns exactly the right bytes or fails with a `BlockFormatError` naming the problem, within a bound;
  wrong bytes are never marked present;
- a filler process SIGKILLed in the middle of writing a unit: a new cache over the same root serves
  every present unit with no network, and refetches only the missing units;
- after the background download completes, the whole blob reads with the registry stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockformat.chunkfile import TAIL_READ, ChunkReader, pack_file
from blockformat.digest import Digest
from blockformat.errors import BlockFormatError
from blockformat.source import RangeSource
from p2p.background import BackgroundDownload, State
from p2p.blobsource import RegistryBlobSource
from p2p.cache import BlobCache, CachedBlob
from p2p.errors import RegistryUnavailableError
from p2p.registry import RegistryClient
from p2p.retry import RetryPolicy, Timeouts
from scripts.demolib.registry import free_port
from tests.conftest import FAST_RETRY, FAST_TIMEOUTS, NO_CREDENTIALS, ClientFactory

from .faultproxy import Fault, FaultProxy
from .registry_server import RegistryServer

pytestmark = pytest.mark.timeout(60)

CHUNK = 16 * 1024  # chunk container chunk size: smaller than a unit, so edge widening stays inside one
UNIT = 64 * 1024  # cache fetch unit
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Small bounds so a fault costs well under a second per attempt and every failure is quick.
TIMEOUTS = Timeouts(connect=1.0, read=0.5, write=2.0, pool=1.0, total=5.0)
RETRY = RetryPolicy(attempts=4, budget=5.0, base_delay=0.05, max_delay=0.2)
#: The longest a persistent fault may take to become an error: 4 attempts of at most one read
#: timeout each, the backoff between them, and slack for a loaded machine.
FAIL_BOUND = RETRY.attempts * TIMEOUTS.read + 3 * RETRY.max_delay + 2.0


@dataclass(frozen=True)
class Packed:
    """A chunk container pushed to the registry: its data, its bytes and its digests."""

    data: bytes
    blob: bytes
    digest: Digest
    index_digest: str
    repo: str


def _payload(seed: int) -> bytes:
    """4 MiB: random (stored raw), compressible text (many chunks per unit), zeros (stored as
    nothing), random again."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 12)) for _ in range(300)]
    text = bytearray()
    while len(text) < 1 << 20:
        text += rng.choice(words)
    return rng.randbytes(2 << 20) + bytes(text[: 1 << 20]) + bytes(512 << 10) + rng.randbytes(512 << 10)


def _pack(data: bytes, repo: str) -> Packed:
    out = io.BytesIO()
    info = pack_file(io.BytesIO(data), out, "lz4", CHUNK)
    blob = out.getvalue()
    return Packed(data, blob, Digest("sha256:" + hashlib.sha256(blob).hexdigest()), info.index_digest, repo)


def _push(host: str, packed: Packed) -> None:
    with RegistryClient(
        host, plain_http=True, retry=FAST_RETRY, timeouts=FAST_TIMEOUTS, credentials=NO_CREDENTIALS
    ) as client:
        assert client.push_blob(packed.repo, packed.blob).digest == packed.digest


@pytest.fixture(scope="module")
def pushed(registry: RegistryServer) -> Packed:
    """One blob in the shared registry (each test gets its own empty cache)."""
    packed = _pack(_payload(seed=31), "t/cache-registry")
    _push(registry.host, packed)
    return packed


class CountingSource:
    """A range source that records every read asked of it (before delegating, so failures count)."""

    def __init__(self, inner: RangeSource) -> None:
        self.inner = inner
        self.requests: list[tuple[int, int]] = []

    @property
    def name(self) -> str:
        return self.inner.name

    def size(self) -> int:
        return self.inner.size()

    def read(self, offset: int, length: int) -> bytes:
        self.requests.append((offset, length))
        return self.inner.read(offset, length)


def _source(client: RegistryClient, packed: Packed) -> CountingSource:
    return CountingSource(RegistryBlobSource(client, packed.repo, packed.digest, len(packed.blob)))


def _units_of(reader: ChunkReader, offset: int, length: int) -> range:
    """The cache units holding the stored bytes of the chunks under data range [offset, offset+length)."""
    first, last = offset // reader.chunk_size, (offset + length - 1) // reader.chunk_size
    start, n = reader.stored_range(first, last)
    return range(start // UNIT, (start + n - 1) // UNIT + 1)


def _whole_units(offset: int, length: int, size: int) -> range:
    """Units lying entirely inside blob range [offset, offset+length) (the short last unit included)."""
    end = offset + length
    last = (size - 1) // UNIT if end >= size else end // UNIT - 1
    return range(-(-offset // UNIT), last + 1)


def _runs(units: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for u in units:
        if runs and runs[-1][1] == u - 1:
            runs[-1] = (runs[-1][0], u)
        else:
            runs.append((u, u))
    return runs


# -- faults through the proxy ---------------------------------------------------------------------


@dataclass
class Faulty:
    proxy: FaultProxy
    blob: CachedBlob
    reader: ChunkReader
    packed: Packed


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


@pytest.fixture
def faulty(proxy: FaultProxy, make_client: ClientFactory, pushed: Packed, tmp_path: Path) -> Iterator[Faulty]:
    """A fresh cache over the registry behind the fault proxy, already opened (tail fetched, no fault)."""
    client = make_client(proxy.host, timeouts=TIMEOUTS, retry=RETRY)
    cache = BlobCache(str(tmp_path / "cache"), unit_size=UNIT)
    blob = cache.open(pushed.digest, len(pushed.blob), _source(client, pushed), pushed.index_digest)
    # No decompressed-chunk cache in the reader: every read goes through the blob cache.
    reader = ChunkReader(blob, pushed.index_digest, cache_chunks=0)
    yield Faulty(proxy, blob, reader, pushed)
    cache.release(blob)


#: Data offsets: in the random (stored raw) part, in the compressible part, and where the all-zero
#: part (no stored bytes) meets the second random part. None of them is in the tail the open fetched.
RANDOM_AT = (1 << 20) + 5000
TEXT_AT = (2 << 20) + 300_000
ZERO_EDGE = (3 << 20) + (512 << 10) - 50_000


def _exact_read_despite(f: Faulty, offset: int, length: int = 50_000) -> float:
    """Read a range that is not cached yet; assert its bytes are exact and its units now present.
    Return the time taken."""
    units = _units_of(f.reader, offset, length)
    assert not any(f.blob.is_present(u) for u in units), "the test range must start uncached"
    start = time.monotonic()
    got = f.reader.read(offset, length)
    elapsed = time.monotonic() - start
    assert got == f.packed.data[offset : offset + length]
    assert all(f.blob.is_present(u) for u in units)
    return elapsed


def _clear_failure(f: Faulty, offset: int, length: int = 50_000) -> tuple[BlockFormatError, float]:
    """Read a range that is not cached yet; assert it fails, marking none of its units present."""
    units = _units_of(f.reader, offset, length)
    present = f.blob.present_count()
    start = time.monotonic()
    with pytest.raises(BlockFormatError) as e:
        f.reader.read(offset, length)
    elapsed = time.monotonic() - start
    assert not any(f.blob.is_present(u) for u in units)
    assert f.blob.present_count() == present
    return e.value, elapsed


def test_connection_reset_mid_body_is_retried_and_the_read_is_exact(faulty: Faulty) -> None:
    faulty.proxy.add(Fault("reset", method="GET", times=2))
    assert _exact_read_despite(faulty, RANDOM_AT) < 3.0
    assert _exact_read_despite(faulty, TEXT_AT) < 3.0
    assert faulty.proxy.faults_applied("reset") == 2


def test_transient_500s_are_retried_and_the_read_is_exact(faulty: Faulty) -> None:
    faulty.proxy.add(Fault("status", method="GET", status=500, times=2))
    assert _exact_read_despite(faulty, RANDOM_AT) < 3.0
    assert faulty.proxy.faults_applied("status") == 2


def test_persistent_500s_fail_clearly_in_bounded_time_and_mark_nothing(faulty: Faulty) -> None:
    faulty.proxy.add(Fault("status", method="GET", status=500, times=1000))
    error, elapsed = _clear_failure(faulty, RANDOM_AT)
    assert elapsed < FAIL_BOUND
    assert "registry unavailable after 4 attempt(s)" in str(error) and "HTTP 500" in str(error)
    assert faulty.packed.digest in str(error)
    faulty.proxy.faults.clear()  # the registry recovers
    _exact_read_despite(faulty, RANDOM_AT)


def test_429_with_retry_after_is_honoured_then_the_read_is_exact(faulty: Faulty) -> None:
    faulty.proxy.add(Fault("status", method="GET", status=429, retry_after="1"))
    elapsed = _exact_read_despite(faulty, TEXT_AT)
    assert 1.0 <= elapsed < 3.0
    assert faulty.proxy.faults_applied("status") == 1


def test_429_asking_to_wait_past_the_retry_budget_fails_at_once(faulty: Faulty) -> None:
    faulty.proxy.add(Fault("status", method="GET", status=429, retry_after="60", times=1000))
    error, elapsed = _clear_failure(faulty, TEXT_AT)
    assert elapsed < 1.0, "sleeping past the budget only to fail is pointless"
    assert "HTTP 429" in str(error) and "past the retry budget" in str(error)
    faulty.proxy.faults.clear()
    _exact_read_despite(faulty, TEXT_AT)


def test_stalled_response_times_out_and_the_retry_returns_exact_bytes(faulty: Faulty) -> None:
    faulty.proxy.add(Fault("stall", method="GET", seconds=20))
    elapsed = _exact_read_despite(faulty, RANDOM_AT)
    assert TIMEOUTS.read <= elapsed < TIMEOUTS.read + 2.0
    assert faulty.proxy.faults_applied("stall") == 1


def test_a_registry_that_keeps_stalling_fails_clearly_in_bounded_time(faulty: Faulty) -> None:
    faulty.proxy.add(Fault("stall", method="GET", seconds=20, times=1000))
    error, elapsed = _clear_failure(faulty, RANDOM_AT)
    assert elapsed < FAIL_BOUND
    assert "timed out waiting for data" in str(error)
    assert faulty.proxy.faults_applied("stall") == RETRY.attempts
    faulty.proxy.faults.clear()
    _exact_read_despite(faulty, RANDOM_AT)


@pytest.mark.parametrize("offset", [RANDOM_AT, TEXT_AT], ids=["raw-chunks", "compressed-chunks"])
def test_wrong_bytes_in_a_range_fail_the_read_and_are_never_marked_present(
    faulty: Faulty, offset: int
) -> None:
    faulty.proxy.add(Fault("corrupt", method="GET"))
    error, elapsed = _clear_failure(faulty, offset)
    assert elapsed < 2.0
    assert faulty.proxy.faults_applied("corrupt") == 1
    assert "upstream sent wrong bytes" in str(error) and "corrupt chunk" in str(error)
    # The fault is gone: the same read now fetches good bytes and marks them.
    _exact_read_despite(faulty, offset)


def test_wrong_bytes_on_every_fetch_never_reach_the_cache(faulty: Faulty) -> None:
    before = faulty.blob.present_count()
    faulty.proxy.add(Fault("corrupt", method="GET", times=1000))
    for offset in (0, RANDOM_AT, TEXT_AT, ZERO_EDGE):
        _clear_failure(faulty, offset, 100_000)
    with pytest.raises(BlockFormatError, match="upstream sent wrong bytes"):
        faulty.reader.read(0, len(faulty.packed.data))
    assert faulty.blob.present_count() == before
    faulty.proxy.faults.clear()
    assert faulty.reader.read(0, len(faulty.packed.data)) == faulty.packed.data
    # Every stored byte is the registry's: the whole-blob digest matches.
    assert faulty.blob.verify_complete()


def test_wrong_bytes_in_the_tail_fail_the_open_and_store_nothing(
    proxy: FaultProxy, make_client: ClientFactory, pushed: Packed, tmp_path: Path
) -> None:
    client = make_client(proxy.host, timeouts=TIMEOUTS, retry=RETRY)
    cache = BlobCache(str(tmp_path / "cache"), unit_size=UNIT)
    blob = cache.open(pushed.digest, len(pushed.blob), _source(client, pushed), pushed.index_digest)
    proxy.add(Fault("corrupt", method="GET"))
    start = time.monotonic()
    # The flipped byte lands in a chunk of the tail read (the index and trailer are checked too).
    with pytest.raises(BlockFormatError, match=r"upstream sent wrong bytes: .*corrupt chunk"):
        ChunkReader(blob, pushed.index_digest)
    assert time.monotonic() - start < 2.0
    assert blob.present_count() == 0
    reader = ChunkReader(blob, pushed.index_digest)  # the fault is gone
    assert reader.read(0, len(pushed.data)) == pushed.data
    assert blob.verify_complete()
    cache.release(blob)


# -- a filler process killed mid-write --------------------------------------------------------------

#: Fills the cache unit by unit through a ChunkReader; on its `stall_at`-th write of the data file it
#: writes only the first half, says so, and hangs there until killed.
FILLER = r"""
import json, os, sys, time
args = json.loads(sys.argv[1])
real_pwrite = os.pwrite
data_writes = 0

def pwrite(fd, data, offset):
    global data_writes
    if not os.readlink(f"/proc/self/fd/{fd}").endswith("/data"):
        return real_pwrite(fd, data, offset)
    data_writes += 1
    if data_writes < args["stall_at"]:
        return real_pwrite(fd, data, offset)
    half = len(data) // 2
    real_pwrite(fd, bytes(data[:half]), offset)
    print("STALLED", offset, len(data), flush=True)
    time.sleep(120)
    raise SystemExit("the parent should have killed this process")

os.pwrite = pwrite

from blockformat.chunkfile import ChunkReader
from p2p.auth import static_credentials
from p2p.blobsource import RegistryBlobSource
from p2p.cache import BlobCache
from blockformat.digest import Digest
from p2p.registry import RegistryClient

client = RegistryClient(args["host"], plain_http=True, credentials=static_credentials({}))
source = RegistryBlobSource(client, args["repo"], Digest(args["digest"]), args["size"])
blob = BlobCache(args["root"], unit_size=args["unit"]).open(
    args["digest"], args["size"], source, args["index_digest"]
)
ChunkReader(blob, args["index_digest"])
print("OPENED", flush=True)
for u in args["units"]:
    blob.read(u * args["unit"], 1)
    print("PRESENT", u, flush=True)
print("DONE", flush=True)
time.sleep(120)
"""


class Filler:
    """The filler process, its stdout as a queue of lines, and its end by exact pid."""

    def __init__(self, args: dict[str, object], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", FILLER, json.dumps(args)],
                cwd=REPO_ROOT,
                env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                stdout=subprocess.PIPE,
                stderr=err,
            )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().strip())
        self.lines.put("EOF")

    def until(self, prefix: str, timeout: float = 20.0) -> tuple[list[str], str]:
        """Lines up to the first starting with `prefix`, and that line."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = "TIMEOUT"
            if line.startswith(prefix):
                return seen, line
            if line in ("EOF", "TIMEOUT", "DONE"):
                raise AssertionError(
                    f"filler never printed {prefix!r} ({line}); output {seen}; "
                    f"stderr:\n{self.stderr_path.read_text(errors='replace')}"
                )
            seen.append(line)

    def kill(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)


def test_a_cache_filled_by_a_killed_process_serves_present_units_offline_and_refetches_only_the_rest(
    registry: RegistryServer, make_client: ClientFactory, pushed: Packed, tmp_path: Path
) -> None:
    root = tmp_path / "cache"
    size = len(pushed.blob)
    # Every third unit of the chunk area before the tail, so present and missing units interleave.
    wanted = list(range(0, (size - TAIL_READ) // UNIT - 1, 3))
    filler = Filler(
        {
            "host": registry.host,
            "repo": pushed.repo,
            "digest": pushed.digest,
            "size": size,
            "index_digest": pushed.index_digest,
            "root": str(root),
            "unit": UNIT,
            "units": wanted,
            "stall_at": 8,  # the tail's writes, then a few units, then one half-written
        },
        tmp_path / "filler.stderr",
    )
    try:
        filler.until("OPENED")
        seen, stalled = filler.until("STALLED")
        assert filler.kill() == -signal.SIGKILL
    finally:
        filler.kill()
    reported = [int(line.split()[1]) for line in seen if line.startswith("PRESENT")]
    assert len(reported) >= 3, seen
    _, torn_offset, torn_length = stalled.split()
    torn = _whole_units(int(torn_offset), int(torn_length), size)
    assert len(torn) >= 1
    # It really died mid-write: the torn range holds half new bytes and is not what the blob says.
    with (root / "blobs/sha256" / pushed.digest[7:] / "data").open("rb") as f:
        f.seek(int(torn_offset))
        on_disk = f.read(int(torn_length))
    assert on_disk != pushed.blob[int(torn_offset) : int(torn_offset) + int(torn_length)]

    # A new process: the same root, an upstream on a port nothing listens on.
    dead = _source(make_client(f"127.0.0.1:{free_port()}"), pushed)
    cache = BlobCache(str(root), unit_size=UNIT)
    blob = cache.open(pushed.digest, size, dead, pushed.index_digest)
    present = [u for u in range(blob.units) if blob.is_present(u)]
    missing = blob.missing_units()
    assert set(reported) <= set(present)
    assert not any(blob.is_present(u) for u in torn), "a unit whose write was cut off is marked present"
    assert missing, "the filler was killed before it could fill everything"

    # Every present unit is served locally, byte for byte, with no request upstream.
    for u in present:
        assert blob.read(u * UNIT, UNIT) == pushed.blob[u * UNIT : (u + 1) * UNIT], f"unit {u}"
    reader = ChunkReader(blob, pushed.index_digest, cache_chunks=0)
    served = 0
    for i in range(reader.chunk_count):
        start, n = reader.chunk_range(i)
        if n and blob.units_present(start, n):
            at = i * reader.chunk_size
            assert reader.read(at, reader.chunk_len(i)) == pushed.data[at : at + reader.chunk_len(i)]
            served += 1
    assert served >= len(reported)
    assert dead.requests == []

    # A missing unit cannot be had offline: a clear error, quickly.
    t0 = time.monotonic()
    with pytest.raises(BlockFormatError, match="registry unavailable") as e:
        blob.read(missing[0] * UNIT, 1)
    assert isinstance(e.value.__cause__, RegistryUnavailableError)
    assert time.monotonic() - t0 < 5.0
    cache.release(blob)

    # Back online: a whole read fetches exactly the missing units, one request per run of them.
    live = _source(make_client(registry.host), pushed)
    blob = cache.open(pushed.digest, size, live, pushed.index_digest)
    reader = ChunkReader(blob, pushed.index_digest, cache_chunks=0)
    assert reader.read(0, len(pushed.data)) == pushed.data
    runs = _runs(missing)
    assert len(live.requests) == len(runs), (live.requests, runs)
    for offset, length in live.requests:
        inside = set(_whole_units(offset, length, size))
        assert inside <= set(missing), f"request {offset}+{length} refetched present units"
        assert inside, f"request {offset}+{length} covers no missing unit"
    needed = sum(min(UNIT, size - u * UNIT) for u in missing)
    fetched = sum(n for _, n in live.requests)
    assert needed <= fetched <= needed + 2 * CHUNK * len(runs)
    assert blob.missing_units() == []
    assert blob.verify_complete()
    cache.release(blob)


# -- background download, then the registry goes away ------------------------------------------------


@pytest.fixture
def own_registry() -> Iterator[RegistryServer]:
    """A registry of this test alone, so it can be stopped without breaking the others."""
    with RegistryServer(name="offline") as server:
        yield server


def test_after_the_background_download_completes_reads_succeed_with_the_registry_stopped(
    own_registry: RegistryServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    packed = _pack(_payload(seed=32), "t/offline")
    _push(own_registry.host, packed)
    client = make_client(own_registry.host)
    cache = BlobCache(str(tmp_path / "cache"), unit_size=UNIT)
    blob = cache.open(packed.digest, len(packed.blob), _source(client, packed), packed.index_digest)
    reader = ChunkReader(blob, packed.index_digest, cache_chunks=0)
    assert reader.read(TEXT_AT, 1000) == packed.data[TEXT_AT : TEXT_AT + 1000]  # a lazy read first

    bg = BackgroundDownload(blob, delay=0.1, rate_bytes_per_second=16 << 20, concurrency=2).start()
    try:
        assert bg.wait(30)
    finally:
        bg.stop()
    status = bg.status()
    assert status.state is State.COMPLETE and status.progress.fraction == 1.0
    assert blob.complete

    own_registry.stop()
    with pytest.raises(RegistryUnavailableError):  # the registry is really gone
        client.read_blob_range(packed.repo, packed.digest, 0, 10)

    assert reader.read(0, len(packed.data)) == packed.data
    # And after a restart: a new cache over the same root, its upstream the stopped registry.
    cache.release(blob)
    offline = _source(make_client(own_registry.host), packed)
    again = BlobCache(str(tmp_path / "cache"), unit_size=UNIT).open(
        packed.digest, len(packed.blob), offline, packed.index_digest
    )
    assert again.complete
    assert ChunkReader(again, packed.index_digest).read(0, len(packed.data)) == packed.data
    assert offline.requests == []
