#!/usr/bin/env python3
"""Benchmark of getting bytes from a registry (``p2p``): lazy random reads and full background download.

DESIGN.md §5 (fetch unit "chosen by measurement") and §8. The script

1. packs (once, cached in ``--workdir``) a >= 200 MB chunk container with lz4 and 64 KiB chunks from
   realistic data: the ext4 image of /usr files that ``scripts/bench_blockformat.py`` builds
   (``bench/work/ext4-usr-560MB.img``) if it is there, else files from /usr concatenated;
2. starts its own ``docker-registry`` on loopback (own temp directory, stopped by pid at the end) and
   pushes the blob with `RegistryClient.push_blob`;
3. measures, medians of ``--reps`` runs, every run on a fresh cache and a fresh client, the cases of a
   measurement round-robin (so load from other processes spreads over all of them):
   a. cold lazy random reads: ``--reads`` random 4 KiB reads (200: sparse, like a container start that
      reads a small part of its image; 2,000: dense, where big units end up fetching the whole blob) through
      ``ChunkReader(CachedBlob(RegistryBlobSource))`` per fetch unit — reads/s, MB/s of data read, HTTP
      requests, and read amplification = bytes requested from the registry / bytes needed (4 KiB x
      reads; opening the blob — its tail and index — is included). Also the same reads with no cache
      (``ChunkReader(RegistryBlobSource)``: one ranged GET per chunk run, nothing stored), as reference;
      and every byte read is compared with the source file;
   b. full background download: ``BackgroundDownload`` (no delay, unlimited rate, its default batch of
      about 4 MiB per request) per fetch unit x concurrency, until the blob is complete (all units verified
      and the whole-blob SHA-256 checked) — MB/s and registry bytes / blob size; plus (a)'s other units,
      and small units with a fixed batch of 4 units, which shows that the request size is what counts;
   c. baseline: ``RegistryClient.download_blob`` of the whole blob into a file (streamed SHA-256, one
      fsync at the end);
4. writes a Markdown table to ``bench/results/fetch.md``, prints it, and recommends the default fetch
   unit by a rule stated in the output.

Loopback has no latency and nearly unbounded bandwidth, so measured times show the CPU and disk cost of
each unit; to show what a real link adds, the table also gives a model: measured requests x RTT + measured
bytes / bandwidth, for two links (requests are sequential in the random-read case).

Run ``.venv/bin/python scripts/bench_fetch.py --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from demolib.registry import REGISTRY_BIN, Registry
from demolib.report import fmt_size, git, loadavg, machine, parse_size, publish

from blockformat.chunkfile import BlobInfo, ChunkReader, pack_file
from blockformat.digest import Digest, parse_digest
from p2p.background import BackgroundDownload
from p2p.blobsource import RegistryBlobSource
from p2p.cache import BlobCache
from p2p.registry import RegistryClient

REPO = Path(__file__).resolve().parent.parent
KIB = 1024
MIB = 1024 * 1024
MB = 1_000_000  # throughput in decimal MB/s
READ_SIZE = 4 * KIB
MIN_BLOB_BYTES = 200 * MB
REPOSITORY = "bench/fetch"
DEFAULT_IMAGE = REPO / "bench" / "work" / "ext4-usr-560MB.img"
CONCAT_ROOTS = ("/usr/lib", "/usr/share", "/usr/bin")
PACK_CODEC = "lz4"
PACK_CHUNK = 64 * KIB
#: Links for the model columns: (label, bits per second, round-trip seconds).
LINKS = (("1 Gbit/s, 2 ms RTT", 1e9, 0.002), ("100 Mbit/s, 20 ms RTT", 100e6, 0.020))
#: Recommendation: among units measured in both (a) and (b) whose best background MB/s is at least this
#: share of the best, the one with the lowest modelled cold-read time on the slower link.
BACKGROUND_SHARE = 0.75
#: Contrast rows (marked †): a fixed batch of this many units per request, whatever the unit (the batch
#: `BackgroundDownload` used before it sized requests in bytes).
CONTRAST_BATCH = 4


def log(msg: str) -> None:
    print(f"[bench_fetch {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


# -- the blob -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    path: Path
    source: Path
    source_bytes: int  # uncompressed bytes packed (a prefix of `source`)
    digest: Digest
    size: int
    index_digest: str
    info: dict[str, Any]


def concat_usr(workdir: Path, target: int) -> Path:
    """Files from /usr, concatenated in name order, up to `target` bytes (built once, cached)."""
    out = workdir / f"usr-concat-{target // MB}MB.bin"
    if out.exists() and out.stat().st_size == target:
        return out
    log(f"concatenating files from {', '.join(CONCAT_ROOTS)} into {out}")
    tmp = out.with_suffix(".tmp")
    written = 0
    with tmp.open("wb") as f:
        for root in CONCAT_ROOTS:
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames.sort()
                for name in sorted(filenames):
                    p = os.path.join(dirpath, name)
                    if not os.path.isfile(p) or os.path.islink(p):
                        continue
                    with contextlib.suppress(OSError), open(p, "rb") as src:
                        data = src.read(target - written)
                        f.write(data)
                        written += len(data)
                    if written >= target:
                        break
                if written >= target:
                    break
            if written >= target:
                break
    tmp.replace(out)
    return out


def packed_blob(workdir: Path, source: Path, limit: int) -> Blob:
    """The chunk container of the first `limit` bytes of `source` (packed once, cached with a sidecar)."""
    st = source.stat()
    nbytes = min(limit, st.st_size) if limit else st.st_size
    name = f"fetch-{source.stem}-{nbytes // MB}MB-{PACK_CODEC}-{fmt_size(PACK_CHUNK)}"
    path, meta = workdir / f"{name}.dfly", workdir / f"{name}.json"
    key = {"source": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "bytes": nbytes}
    if path.exists() and meta.exists():
        doc = json.loads(meta.read_text())
        if doc.get("key") == key and path.stat().st_size == doc["info"]["blob_size"]:
            i = doc["info"]
            return Blob(
                path, source, nbytes, parse_digest(i["blob_digest"]), i["blob_size"], i["index_digest"], i
            )
    log(
        f"packing {nbytes / MB:.0f} MB of {source} with {PACK_CODEC} {fmt_size(PACK_CHUNK)} chunks "
        f"into {path}"
    )
    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp")
    with source.open("rb") as f, tmp.open("wb") as out:
        src: BinaryIO = f if nbytes == st.st_size else io.BytesIO(f.read(nbytes))
        info: BlobInfo = pack_file(src, out, PACK_CODEC, PACK_CHUNK)
    tmp.replace(path)
    log(f"packed in {time.perf_counter() - t0:.1f} s: {info.blob_size / MB:.0f} MB, ratio {info.ratio:.2f}")
    i = {k: getattr(info, k) for k in info.__dataclass_fields__}
    meta.write_text(json.dumps({"key": key, "info": i}, indent=1))
    assert info.blob_digest is not None
    return Blob(path, source, nbytes, parse_digest(info.blob_digest), info.blob_size, info.index_digest, i)


# -- the registry -------------------------------------------------------------------------------------


@contextlib.contextmanager
def registry(workdir: Path) -> Iterator[str]:
    """A docker-registry on loopback with its own storage (the demo's `Registry`, no access log);
    yields host:port; stopped by pid."""
    d = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=workdir))
    server = Registry(d, d / "registry.log", access_log=False)
    try:
        try:
            server.start()
        except OSError as e:
            raise SystemExit(f"{e}:\n{server.log_tail()}") from None
        yield server.host
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


# -- measurements -------------------------------------------------------------------------------------


@dataclass
class Runs:
    seconds: list[float] = field(default_factory=list)
    registry_bytes: list[int] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)

    def add(self, seconds: float, nbytes: int, requests: int) -> None:
        self.seconds.append(seconds)
        self.registry_bytes.append(nbytes)
        self.requests.append(requests)


@contextlib.contextmanager
def fresh_dir(workdir: Path, prefix: str) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def client_for(host: str) -> RegistryClient:
    return RegistryClient(host, plain_http=True, credentials=lambda h: None)


def check_reads(blob: Blob, offsets: Sequence[int], got: Sequence[bytes]) -> None:
    with blob.source.open("rb") as f:
        for off, data in zip(offsets, got, strict=True):
            f.seek(off)
            if f.read(READ_SIZE) != data:
                raise SystemExit(f"wrong bytes at offset {off}: the benchmark measured a broken read path")


def random_reads(host: str, blob: Blob, unit: int | None, offsets: Sequence[int], workdir: Path) -> Runs:
    """One run of cold random reads; `unit` None = no cache (ChunkReader straight over the registry)."""
    runs = Runs()
    with client_for(host) as client, fresh_dir(workdir, "bench-cache-") as d:
        src = RegistryBlobSource(client, REPOSITORY, blob.digest, blob.size)
        got: list[bytes] = []
        t0 = time.perf_counter()
        if unit is None:
            reader = ChunkReader(src, blob.index_digest)
            got = [reader.read(off, READ_SIZE) for off in offsets]
        else:
            cache = BlobCache(str(d), unit)
            cached = cache.open(blob.digest, blob.size, src, blob.index_digest)
            try:
                reader = ChunkReader(cached, blob.index_digest)
                got = [reader.read(off, READ_SIZE) for off in offsets]
            finally:
                cache.release(cached)
        runs.add(time.perf_counter() - t0, src.bytes_fetched, src.requests)
    check_reads(blob, offsets, got)
    return runs


def background(
    host: str, blob: Blob, unit: int, concurrency: int, batch: int | None, workdir: Path
) -> tuple[Runs, int]:
    """One full background download on a fresh cache; returns the runs and the batch (units/request)."""
    runs = Runs()
    with client_for(host) as client, fresh_dir(workdir, "bench-cache-") as d:
        src = RegistryBlobSource(client, REPOSITORY, blob.digest, blob.size)
        cache = BlobCache(str(d), unit)
        cached = cache.open(blob.digest, blob.size, src, blob.index_digest)
        try:
            extra = {} if batch is None else {"batch_units": batch}
            bg = BackgroundDownload(
                cached, delay=0.0, rate_bytes_per_second=0.0, concurrency=concurrency, **extra
            )
            t0 = time.perf_counter()
            bg.start()
            done = bg.wait(timeout=600)
            elapsed = time.perf_counter() - t0
            bg.stop()
            if not done:
                raise SystemExit(f"background download did not complete: {bg.status()}")
            runs.add(elapsed, src.bytes_fetched, src.requests)
        finally:
            cache.release(cached)
    return runs, bg.batch_units


def baseline(host: str, blob: Blob, workdir: Path) -> float:
    with client_for(host) as client, fresh_dir(workdir, "bench-dl-") as d, (d / "blob").open("wb") as f:
        t0 = time.perf_counter()
        client.download_blob(REPOSITORY, blob.digest, f, blob.size)
        f.flush()
        os.fsync(f.fileno())
        return time.perf_counter() - t0


# -- report -------------------------------------------------------------------------------------------


@dataclass
class Random:
    reads: int
    unit: int | None  # None: no cache
    runs: Runs

    @property
    def label(self) -> str:
        return "no cache (chunk ranges)" if self.unit is None else fmt_size(self.unit)

    @property
    def amplification(self) -> float:
        return med(self.runs.registry_bytes) / (self.reads * READ_SIZE)

    def model(self, bps: float, rtt: float) -> float:
        """Seconds on a link: sequential requests x RTT + bytes / bandwidth (CPU not counted)."""
        return med(self.runs.requests) * rtt + med(self.runs.registry_bytes) * 8 / bps


@dataclass
class Background:
    unit: int
    concurrency: int
    batch: int
    runs: Runs
    mark: str = ""  # "*": a unit of (a) only; "†": a fixed batch of CONTRAST_BATCH units


def random_table(rows: Sequence[Random]) -> list[str]:
    head = ["reads", "fetch unit", "reads/s", "MB/s read", "requests", "registry MB", "amplification"]
    head += [f"model s @ {label}" for label, _, _ in LINKS]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "|".join("---:" for _ in head[2:]) + "|"]
    for r in rows:
        s = med(r.runs.seconds)
        cells = [
            f"{r.reads:,}",
            r.label,
            f"{r.reads / s:,.0f}",
            f"{r.reads * READ_SIZE / s / MB:.2f}",
            f"{med(r.runs.requests):,.0f}",
            f"{med(r.runs.registry_bytes) / MB:.1f}",
            f"{r.amplification:.1f}x",
        ]
        cells += [f"{r.model(bps, rtt):.1f}" for _, bps, rtt in LINKS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def background_table(rows: Sequence[Background], size: int, base_s: Sequence[float]) -> list[str]:
    head = ["fetch unit", "request (units)", "concurrency", "MB/s", "seconds", "registry bytes / blob"]
    lines = ["| " + " | ".join(head) + " |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = med(r.runs.seconds)
        cells = [
            fmt_size(r.unit),
            f"{fmt_size(r.unit * r.batch)} ({r.batch})" + (f" {r.mark}" if r.mark else ""),
            str(r.concurrency),
            f"{size / s / MB:.0f}",
            f"{s:.2f}",
            f"{med(r.runs.registry_bytes) / size:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    b = med(base_s)
    lines.append(f"| `download_blob` (baseline) | whole blob | 1 | {size / b / MB:.0f} | {b:.2f} | 1.000 |")
    return lines


def recommend(rand: Sequence[Random], bg: Sequence[Background], size: int) -> list[str]:
    best_bg: dict[int, float] = {}
    for b in bg:
        best_bg[b.unit] = max(best_bg.get(b.unit, 0.0), size / med(b.runs.seconds) / MB)
    cold: dict[int, list[Random]] = {}
    for r in rand:
        if r.unit is not None:
            cold.setdefault(r.unit, []).append(r)
    both = sorted(set(best_bg) & set(cold))
    if not both:
        return ["No fetch unit was measured in both (a) and (b); no recommendation."]
    top = max(best_bg[u] for u in both)
    eligible = [u for u in both if best_bg[u] >= BACKGROUND_SHARE * top]
    # Regret of unit u on one workload and link: its modelled time / the best unit's (1.0 = best).
    cases = [
        (reads, label, bps, rtt) for reads in sorted({r.reads for r in rand}) for label, bps, rtt in LINKS
    ]

    def regret(u: int, reads: int, bps: float, rtt: float) -> float:
        mine = next(r for r in cold[u] if r.reads == reads).model(bps, rtt)
        best = min(next(r for r in cold[v] if r.reads == reads).model(bps, rtt) for v in both)
        return mine / best

    def worst(u: int) -> float:
        return max(regret(u, reads, bps, rtt) for reads, _, bps, rtt in cases)

    pick = min(eligible, key=worst)
    out = [
        f"Recommended default fetch unit: **{fmt_size(pick)}**.",
        "",
        f"Rule: among the units measured in both (a) and (b) whose best background download (any batch) "
        f"reaches >= {BACKGROUND_SHARE:.0%} of the best of them, the one whose modelled cold-read time is "
        "closest to the best unit's in the worst case over every read count and link (minimax regret: a "
        "default must not be far off in either a sparse or a dense access pattern, fast or slow link).",
        "",
    ]
    for u in both:
        regrets = ", ".join(
            f"{reads:,} reads @ {label.split(',')[0]}: {regret(u, reads, bps, rtt):.2f}x"
            for reads, label, bps, rtt in cases
        )
        out.append(
            f"- {fmt_size(u):>4}: worst {worst(u):.2f}x of the best ({regrets}); best background "
            f"{best_bg[u]:.0f} MB/s ({best_bg[u] / top:.0%} of the best of these units)"
            + ("" if u in eligible else " — not eligible")
        )
    out += [
        "",
        "Caveats: uniform random 4 KiB reads are the worst case for large units; a real start reads whole "
        "files with some locality, which favours a somewhat larger unit. Loopback latency comes from a "
        "registry and client sharing the CPUs, so the reads/s columns measure CPU cost per request more than "
        "the network. The model ignores that a P2P tree (DESIGN §5) pays per request on every edge.",
    ]
    return out


def machine_facts() -> list[str]:
    registry_version = subprocess.run(
        [REGISTRY_BIN, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return [
        f"- {machine()}",
        f"- registry: `{registry_version or REGISTRY_BIN}` on loopback, filesystem storage under --workdir",
    ]


def git_head() -> str:
    dirty = git("status", "--porcelain", "--", "p2p", "blockformat")
    return (git("rev-parse", "--short", "HEAD") or "?") + (
        " (p2p/ or blockformat/ modified)" if dirty else ""
    )


def render(
    blob: Blob,
    args: argparse.Namespace,
    rand: Sequence[Random],
    bg: Sequence[Background],
    base_s: Sequence[float],
    push_s: float,
    elapsed: float,
    load: tuple[str, str],
) -> str:
    i = blob.info
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    reads = " and ".join(f"{n:,}" for n in sorted({r.reads for r in rand}))
    lines = [
        "# Fetch benchmark: lazy random reads and background download from a registry",
        "",
        f"Generated {now} by `scripts/bench_fetch.py` in {elapsed / 60:.1f} min; code at {git_head()}; "
        f"load average {load[0]} at start, {load[1]} at end (other processes share the CPUs: compare rows "
        f"within one run rather than across runs). Medians of {args.reps} runs, each on a fresh cache and a "
        "fresh client.",
        "",
        *machine_facts(),
        f"- blob: {blob.size / MB:.0f} MB chunk container ({i['codec']}, {fmt_size(i['chunk_size'])} chunks, "
        f"{i['chunk_count']:,} chunks of which {i['zero_chunks']:,} zero, "
        f"ratio {blob.source_bytes / blob.size:.2f}) "
        f"packed from {blob.source_bytes / MB:.0f} MB of `{blob.source}`; pushed in {push_s:.1f} s",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        "",
        f"## (a) Cold lazy random reads: {reads} random 4 KiB reads, "
        "`ChunkReader(CachedBlob(RegistryBlobSource))`",
        "",
        "Offsets uniform over the whole uncompressed image, the same in every run. Amplification = bytes "
        "requested from the registry / bytes needed (4 KiB x reads), including opening the blob (tail and "
        "index). Every byte read was compared with the source. The model columns are not measured: they put "
        "the measured requests and bytes on a link (requests one after another, CPU not counted). The fewer "
        "reads are the sparse case (a container start reads a small part of its image); with the more reads, "
        "large units end up fetching the whole blob.",
        "",
        *random_table(rand),
        "",
        "## (b) Full background download, `BackgroundDownload` (no delay, unlimited rate)",
        "",
        "Until the blob is complete: every unit verified chunk by chunk and made durable, then the whole "
        "blob's SHA-256 checked. `request` = fetch unit x the download's batch of neighbouring units; by "
        "default `BackgroundDownload` batches about 4 MiB per request whatever the unit. Rows marked * are "
        "units of (a) that are not in (b)'s list, so every unit has a background figure; rows marked † use a "
        f"fixed batch of {CONTRAST_BATCH} units, to show that throughput follows the request size, not the "
        "unit. Cases run round-robin (one run of every case, then the next), so load that comes and goes "
        "hits every case alike.",
        "",
        *background_table(bg, blob.size, base_s),
        "",
        "## Recommendation",
        "",
        *recommend(rand, bg, blob.size),
        "",
    ]
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument(
        "--workdir", type=Path, default=REPO / "bench" / "work", help="packed blob, caches, registry"
    )
    p.add_argument("--output", type=Path, help="Markdown result file (default bench/results/fetch.md)")
    p.add_argument(
        "--source", type=Path, help=f"file to pack (default {DEFAULT_IMAGE} if present, else /usr files)"
    )
    p.add_argument("--data-mb", type=int, default=0, help="pack only this many MB of the source (0: all)")
    p.add_argument("--reads", default="200,2000", help="random 4 KiB reads per run, one case per count")
    p.add_argument("--reps", type=int, default=3, help="runs of each measurement (default 3)")
    p.add_argument("--random-units", default="64K,256K,1M", help="fetch units for (a)")
    p.add_argument("--background-units", default="256K,1M,4M", help="fetch units for (b)")
    p.add_argument("--concurrency", default="1,2,4", help="background download concurrencies for (b)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random offsets")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 48 MB blob, 300 reads, 1 run, fewer cases"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.data_mb, args.reads, args.reps = 48, "300", 1
        args.random_units, args.background_units, args.concurrency = "64K,1M", "256K,1M", "2"
    read_counts = [int(n) for n in args.reads.split(",")]
    rand_units = [parse_size(u) for u in args.random_units.split(",")]
    bg_units = [parse_size(u) for u in args.background_units.split(",")]
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    output: Path = args.output or (
        args.workdir / "fetch-quick.md" if args.quick else REPO / "bench" / "results" / "fetch.md"
    )

    t_start = time.perf_counter()
    load_start = loadavg()
    args.workdir.mkdir(parents=True, exist_ok=True)
    source: Path = args.source or (
        DEFAULT_IMAGE if DEFAULT_IMAGE.exists() else concat_usr(args.workdir, 600 * MB)
    )
    blob = packed_blob(args.workdir, source, args.data_mb * MB)
    if blob.size < MIN_BLOB_BYTES and not args.quick:
        raise SystemExit(f"the blob is {blob.size / MB:.0f} MB, under 200 MB: give a larger --source")

    with registry(args.workdir) as host:
        with client_for(host) as client, blob.path.open("rb") as f:
            t0 = time.perf_counter()
            client.push_blob(REPOSITORY, f, blob.digest)
            push_s = time.perf_counter() - t0
        log(f"pushed {blob.size / MB:.0f} MB to {host} in {push_s:.1f} s")

        base_s = [baseline(host, blob, args.workdir) for _ in range(args.reps)]
        log(f"baseline download_blob: {blob.size / med(base_s) / MB:.0f} MB/s")

        rand: list[Random] = []
        offsets: dict[int, list[int]] = {}
        for reads in read_counts:
            rng = random.Random(args.seed + reads)
            offsets[reads] = [rng.randrange(blob.source_bytes // READ_SIZE) * READ_SIZE for _ in range(reads)]
            rand += [Random(reads, unit, Runs()) for unit in [None, *rand_units]]
        for rep in range(args.reps):
            for r in rand:
                one = random_reads(host, blob, r.unit, offsets[r.reads], args.workdir)
                r.runs.add(one.seconds[0], one.registry_bytes[0], one.requests[0])
            log(f"random reads: run {rep + 1} of {args.reps} done")
        for r in rand:
            log(
                f"{r.reads} random reads, unit {r.label}: {r.reads / med(r.runs.seconds):,.0f} reads/s, "
                f"{r.amplification:.1f}x amplification, {med(r.runs.requests):,.0f} requests"
            )

        mid = sorted(concurrencies)[len(concurrencies) // 2]
        cases: list[tuple[Background, int | None]] = [
            (Background(u, c, 0, Runs()), None) for u in bg_units for c in concurrencies
        ]
        cases += [(Background(u, mid, 0, Runs(), "*"), None) for u in rand_units if u not in bg_units]
        cases += [
            (Background(u, mid, CONTRAST_BATCH, Runs(), "†"), CONTRAST_BATCH)
            for u in sorted(set(rand_units) | set(bg_units))
            if u * CONTRAST_BATCH < MIB
        ]
        for rep in range(args.reps):
            for row, batch in cases:
                one, row.batch = background(host, blob, row.unit, row.concurrency, batch, args.workdir)
                row.runs.add(one.seconds[0], one.registry_bytes[0], one.requests[0])
            log(f"background: run {rep + 1} of {args.reps} done")
        bg = [row for row, _ in cases]
        for row in bg:
            log(
                f"background, unit {fmt_size(row.unit)} x{row.batch} x{row.concurrency}: "
                f"{blob.size / med(row.runs.seconds) / MB:.0f} MB/s"
            )

    text = render(
        blob, args, rand, bg, base_s, push_s, time.perf_counter() - t_start, (load_start, loadavg())
    )
    publish(output, text, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
