#!/usr/bin/env python3
"""Benchmark of the chunk container format (``blockformat.chunkfile``) on a real ext4 image.

DESIGN.md §8.4: compression ratio and (de)compression throughput per codec and chunk size. The script

1. builds (once, cached in ``--workdir``) an ext4 image of >= ``--data-mb`` MB of file data copied from
   this machine's ``/usr`` with ``mkfs.ext4 -d``, image size = used size x 1.25 so it has free space;
2. for every codec x chunk size packs the image with ``pack_file`` and measures
   - compression ratio (image bytes / blob bytes) and pack MB/s,
   - sequential read MB/s through ``ChunkReader`` (1 MiB reads, default chunk cache),
   - random 4 KiB reads through ``ChunkReader`` with ``cache_chunks=0`` (every read decodes a chunk),
   - the same two access patterns as a "bare codec loop": the stored chunks held in memory and
     decompressed by the codec library directly (no SHA-256, no I/O, no reader bookkeeping), which is
     the physical limit of our reader;
3. writes a Markdown table to ``bench/results/blockformat.md``, prints it, and recommends a default
   chunk size.

Run ``.venv/bin/python scripts/bench_blockformat.py --help`` for the options; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import hashlib
import io
import json
import math
import os
import platform
import pstats
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import lz4.block
import snappy
import zstandard
from demolib.report import cpu_model, fmt_size, loadavg, parse_size, publish

from blockformat.chunkfile import BlobInfo, ChunkReader, pack_file
from blockformat.source import FileSource

REPO = Path(__file__).resolve().parent.parent
KIB = 1024
MIB = 1024 * 1024
MB = 1_000_000  # throughput is reported in decimal MB/s

ALL_CODECS = ("lz4", "zstd", "snappy", "none")
ALL_CHUNK_SIZES = (4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB)
#: Where the image's files come from, in this order; each root's entries are taken in name order until
#: the target amount of file data is reached. A mix of Python code, compiler binaries and /usr/share.
DEFAULT_SOURCES = (
    "/usr/lib/python3.11",
    "/usr/lib/git-core",
    "/usr/lib/gcc",
    "/usr/share",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib",
)
IMAGE_UUID = "d4a5e1f1-0000-4000-8000-000000000001"  # fixed -U and hash_seed: reproducible images
FAKE_TIME = "1700000000"  # E2FSPROGS_FAKE_TIME: fixed superblock timestamps
IMAGE_SLACK = 1.25  # image size = used size x this, so the image has free (zero) space like real ones
IMAGE_ROUND = 16 * MIB
IO_SIZE = MIB  # sequential read size
RAND_SIZE = 4 * KIB  # random read size
RECOMMEND_RATIO_SHARE = 0.90  # recommend the smallest chunk with >= this share of the best ratio

Decoder = Callable[[bytes, int], bytes]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the image ---------------------------------------------------------------------------------------


@dataclass
class ImageFacts:
    path: str
    size: int
    used: int  # (block count - free blocks) x block size, from dumpe2fs
    file_bytes: int  # apparent size of the regular files copied in
    entries: int  # files + directories + symlinks copied in
    sources: list[str]
    mkfs_command: str
    mke2fs_version: str
    build_seconds: float
    nonzero_4k_blocks: int = 0  # filled in when the image is first read


def tree_size(path: Path) -> tuple[int, int, int]:
    """(apparent bytes of regular files, bytes rounded up to 4 KiB blocks, entries) under path."""
    st = path.lstat()
    if not os.path.isdir(path) or path.is_symlink():
        blocks = -(-st.st_size // 4096) * 4096 if path.is_file() and not path.is_symlink() else 0
        return (st.st_size if blocks else 0), blocks, 1
    apparent, rounded, entries = 0, 4096, 1
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                s = os.lstat(p)
            except OSError:
                continue
            entries += 1
            if os.path.isdir(p) and not os.path.islink(p):
                rounded += 4096
            elif os.path.isfile(p) and not os.path.islink(p):
                apparent += s.st_size
                rounded += -(-s.st_size // 4096) * 4096
    return apparent, rounded, entries


def select_sources(roots: Sequence[str], target: int) -> tuple[list[Path], int, int, int]:
    """Top-level entries of ``roots`` (in order, names sorted) until ``target`` bytes of file data."""
    picked: list[Path] = []
    seen: set[Path] = set()
    apparent = rounded = entries = 0
    for root in map(Path, roots):
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir(), key=lambda p: p.name):
            if any(child == s or s in child.parents or child in s.parents for s in seen):
                continue
            a, r, e = tree_size(child)
            picked.append(child)
            seen.add(child)
            apparent, rounded, entries = apparent + a, rounded + r, entries + e
            if apparent >= target:
                return picked, apparent, rounded, entries
    raise SystemExit(f"only {apparent / MB:.0f} MB of file data under {', '.join(roots)}; lower --data-mb")


def dumpe2fs_used(image: Path) -> int:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in out.splitlines()) if v
    )
    return (int(fields["Block count"]) - int(fields["Free blocks"])) * int(fields["Block size"])


def build_image(workdir: Path, data_mb: int, roots: Sequence[str]) -> ImageFacts:
    target = data_mb * MB
    image = workdir / f"ext4-usr-{data_mb}MB.img"
    facts_path = image.with_suffix(".json")
    if image.exists() and facts_path.exists():
        facts = ImageFacts(**json.loads(facts_path.read_text()))
        if facts.size == image.stat().st_size:
            log(f"using cached image {image} ({facts.size / MB:.0f} MB)")
            return facts
    mkfs = shutil.which("mkfs.ext4")
    if mkfs is None:
        raise SystemExit("mkfs.ext4 not found (install e2fsprogs)")
    t0 = time.perf_counter()
    picked, apparent, rounded, entries = select_sources(roots, target)
    log(f"staging {len(picked)} entries, {apparent / MB:.0f} MB of file data, {entries} inodes")
    stage = workdir / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for src in picked:
        # --parents with -a also copies the parent directories' owners, modes and times; cp 9.1 needs
        # the source relative to the working directory for that.
        rel = src.resolve().relative_to("/")
        subprocess.run(["cp", "-a", "--parents", str(rel), str(stage.resolve())], check=True, cwd="/")
    os.chmod(stage, 0o755)
    os.utime(stage, ns=(int(FAKE_TIME) * 10**9, int(FAKE_TIME) * 10**9))
    size = math.ceil(rounded * IMAGE_SLACK / IMAGE_ROUND) * IMAGE_ROUND
    inodes = max(size // 16384, entries * 5 // 4 + 1024)  # the mke2fs default unless too few
    tmp = image.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with open(tmp, "wb") as f:
        f.truncate(size)
    cmd = [mkfs, *f"-q -F -t ext4 -b 4096 -N {inodes} -L damselfly-bench -U {IMAGE_UUID}".split()]
    cmd += ["-E", f"root_owner=0:0,hash_seed={IMAGE_UUID}", "-d", str(stage), str(tmp)]
    env = dict(os.environ, E2FSPROGS_FAKE_TIME=FAKE_TIME)
    log("running " + shlex.join(cmd))
    subprocess.run(cmd, check=True, env=env)
    subprocess.run(["e2fsck", "-fn", str(tmp)], check=True, capture_output=True)
    shutil.rmtree(stage)
    tmp.rename(image)
    version = subprocess.run([mkfs, "-V"], check=False, capture_output=True, text=True).stderr.splitlines()[0]
    facts = ImageFacts(
        path=str(image),
        size=size,
        used=dumpe2fs_used(image),
        file_bytes=apparent,
        entries=entries,
        sources=[str(p) for p in picked],
        mkfs_command=shlex.join(
            ["E2FSPROGS_FAKE_TIME=" + FAKE_TIME, *[c if c != str(tmp) else str(image) for c in cmd]]
        ),
        mke2fs_version=version,
        build_seconds=time.perf_counter() - t0,
    )
    facts_path.write_text(json.dumps(facts.__dict__, indent=1))
    log(f"built {image}: {size / MB:.0f} MB, {facts.used / MB:.0f} MB used, in {facts.build_seconds:.0f} s")
    return facts


def count_nonzero_blocks(image: Path) -> int:
    """Non-zero 4 KiB blocks of the image (also warms the page cache)."""
    zero = bytes(4096)
    n = 0
    with open(image, "rb") as f:
        while buf := f.read(16 * MIB):
            mv = memoryview(buf)
            for off in range(0, len(buf), 4096):
                if mv[off : off + 4096] != zero:
                    n += 1
    return n


# -- measuring ---------------------------------------------------------------------------------------


@contextmanager
def no_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timed(fn: Callable[[], object]) -> float:
    with no_gc():
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def bare_decoder(codec: str) -> Decoder:
    """The codec library's own decompress, exactly as our codecs call it, minus our wrappers."""
    if codec == "lz4":
        dec = lz4.block.decompress
        return lambda d, n: dec(d, uncompressed_size=n)
    if codec == "zstd":
        dctx = zstandard.ZstdDecompressor()
        return lambda d, n: dctx.decompress(d, max_output_size=n)
    if codec == "snappy":
        unc = snappy.uncompress
        return lambda d, n: unc(d)
    return lambda d, n: d


@dataclass
class Row:
    codec: str
    chunk_size: int
    info: BlobInfo
    avg_stored: float  # mean stored bytes of a non-zero chunk: what a cold 4 KiB read fetches
    zero_hits: float  # share of the random offsets that fall into an all-zero chunk
    reads: int  # random 4 KiB reads per repetition
    pack_s: list[float] = field(default_factory=list)
    seq_s: list[float] = field(default_factory=list)
    bare_seq_s: list[float] = field(default_factory=list)
    rand_s: list[float] = field(default_factory=list)
    bare_rand_s: list[float] = field(default_factory=list)

    @property
    def index_bytes(self) -> int:
        return 40 + 37 * self.info.chunk_count + self.info.metadata_size


def reader_sequential(blob: Path, digest: str, size: int) -> None:
    with FileSource(blob) as src:
        r = ChunkReader(src, digest)
        off = 0
        while off < size:
            d = r.read(off, IO_SIZE)
            if not d:
                raise RuntimeError(f"short read at {off}")
            off += len(d)


def reader_random(r: ChunkReader, offsets: Sequence[int]) -> None:
    read = r.read
    for off in offsets:
        read(off, RAND_SIZE)


@dataclass
class Chunks:
    """A blob's stored chunks held in memory, for the bare codec loops."""

    shift: int
    stored: list[bytes]  # b"" for an all-zero chunk
    raw: list[bool]  # stored uncompressed (compression did not help, or codec none)
    ulen: list[int]

    @classmethod
    def load(cls, blob: Path, digest: str) -> Chunks:
        data = blob.read_bytes()
        with FileSource(blob) as src:
            r = ChunkReader(src, digest)
            stored, raw, ulen = [], [], []
            for i in range(r.chunk_count):
                off, length = r.chunk_range(i)
                n = r.chunk_len(i)
                stored.append(data[off : off + length])
                # A chunk is stored compressed only when that is smaller, so full length means raw.
                raw.append(length == n)
                ulen.append(n)
            return cls(r.chunk_shift, stored, raw, ulen)


def bare_sequential(ch: Chunks, dec: Decoder) -> None:
    for d, raw, n in zip(ch.stored, ch.raw, ch.ulen, strict=True):
        if d and not raw:
            dec(d, n)


def bare_random(ch: Chunks, dec: Decoder, offsets: Sequence[int]) -> None:
    shift, stored, raw, ulen = ch.shift, ch.stored, ch.raw, ch.ulen
    zeros = bytes(1 << shift)
    mask = (1 << shift) - 1
    for off in offsets:
        i = off >> shift
        d = stored[i]
        out = zeros if not d else d if raw[i] else dec(d, ulen[i])
        o = off & mask
        out[o : o + RAND_SIZE]


def check_reads(
    blob: Path, digest: str, image: Path, offsets: Sequence[int], ch: Chunks, dec: Decoder
) -> None:
    """Reader and bare loop return the image's bytes (a sample, outside the timings)."""
    fd = os.open(image, os.O_RDONLY)
    try:
        with FileSource(blob) as src:
            r = ChunkReader(src, digest, cache_chunks=0)
            mask = (1 << ch.shift) - 1
            for off in offsets[:300]:
                want = os.pread(fd, RAND_SIZE, off)
                i = off >> ch.shift
                d = ch.stored[i]
                full = bytes(1 << ch.shift) if not d else d if ch.raw[i] else dec(d, ch.ulen[i])
                bare = full[off & mask : (off & mask) + RAND_SIZE]
                if r.read(off, RAND_SIZE) != want or bare != want:
                    raise RuntimeError(f"{blob}: wrong bytes at offset {off}")
    finally:
        os.close(fd)


def measure(
    image: Path,
    size: int,
    workdir: Path,
    codec: str,
    chunk_size: int,
    offsets: Sequence[int],
    reps: int,
    pack_reps: int,
) -> Row:
    blob = workdir / f"blob-{codec}-{fmt_size(chunk_size)}.dfly"
    info: BlobInfo | None = None
    pack_s: list[float] = []
    try:
        for _ in range(pack_reps):
            with open(image, "rb") as src, open(blob, "wb") as out:
                t0 = time.perf_counter()
                info = pack_file(src, out, codec=codec, chunk_size=chunk_size)
                pack_s.append(time.perf_counter() - t0)
        assert info is not None
        digest = info.index_digest
        ch = Chunks.load(blob, digest)
        dec = bare_decoder(codec)
        check_reads(blob, digest, image, offsets, ch, dec)
        nonzero = [len(d) for d in ch.stored if d]
        row = Row(
            codec,
            chunk_size,
            info,
            avg_stored=statistics.fmean(nonzero) if nonzero else 0.0,
            zero_hits=sum(1 for o in offsets if not ch.stored[o >> ch.shift]) / len(offsets),
            reads=len(offsets),
            pack_s=pack_s,
        )
        for _ in range(reps):
            # Interleaved, so a noisy neighbour on the machine affects reader and bare loop alike.
            row.seq_s.append(timed(lambda: reader_sequential(blob, digest, size)))
            row.bare_seq_s.append(timed(lambda: bare_sequential(ch, dec)))
            with FileSource(blob) as src:
                r = ChunkReader(src, digest, cache_chunks=0)
                row.rand_s.append(timed(lambda: reader_random(r, offsets)))  # noqa: B023
            row.bare_rand_s.append(timed(lambda: bare_random(ch, dec, offsets)))
        return row
    finally:
        blob.unlink(missing_ok=True)


def profile_case(
    image: Path, workdir: Path, codec: str, chunk_size: int, offsets: Sequence[int], reps: int
) -> str:
    """Where the reader's random 4 KiB loop spends its time, for one codec and chunk size.

    Two views: the cost of each step the reader does, timed alone over the same offsets (median of
    ``reps``; the rest of the reader's time is Python bookkeeping), and cProfile of the reader loop.
    """
    blob = workdir / f"blob-profile-{codec}-{fmt_size(chunk_size)}.dfly"
    try:
        with open(image, "rb") as f, open(blob, "wb") as out:
            info = pack_file(f, out, codec=codec, chunk_size=chunk_size)
        ch = Chunks.load(blob, info.index_digest)
        dec = bare_decoder(codec)
        with FileSource(blob) as src:
            r = ChunkReader(src, info.index_digest, cache_chunks=0)
            idx = [o >> r.chunk_shift for o in offsets]
            hits = [(i, *r.chunk_range(i)) for i in idx if r.chunk_range(i)[1]]
            comp = [(ch.stored[i], ch.ulen[i]) for i, _, _ in hits if not ch.raw[i]]
            fd = os.open(blob, os.O_RDONLY)
            pread, sha256 = os.pread, hashlib.sha256

            def step_pread() -> None:
                for _, off, n in hits:
                    pread(fd, n, off)

            def step_sha() -> None:
                for i, _, _ in hits:
                    sha256(ch.stored[i]).digest()

            def step_copy() -> None:
                for i, _, _ in hits:
                    bytes(memoryview(ch.stored[i])[:])

            def step_wrapper() -> None:
                for d, n in comp:
                    r.codec.decompress(d, n)

            def step_bare() -> None:
                for d, n in comp:
                    dec(d, n)

            steps: list[tuple[str, Callable[[], None]]] = [
                ("whole reader loop (ChunkReader.read, cache_chunks=0)", lambda: reader_random(r, offsets)),
                ("pread of the stored chunk (page cache)", step_pread),
                ("SHA-256 of the stored chunk", step_sha),
                ("decompress via blockformat.codecs wrapper", step_wrapper),
                ("for reference: decompress via the codec library (bare)", step_bare),
                ("for reference: bytes(memoryview) copy of the stored chunk", step_copy),
            ]
            samples: dict[str, list[float]] = {name: [] for name, _ in steps}
            for _ in range(reps):  # interleaved, so load from other processes hits every step alike
                for name, fn in steps:
                    samples[name].append(timed(fn))
            times = {name: med(ts) for name, ts in samples.items()}
            os.close(fd)
            total = times[steps[0][0]]
            accounted = sum(times[n] for n, _ in steps[1:4])  # pread + SHA-256 + decompress
            lines = [
                f"{len(offsets):,} random 4 KiB reads, {len(hits):,} of them in stored chunks, "
                f"{len(comp):,} compressed; time per read (all reads), median of {reps}:",
                "",
                "| step | µs per read | share of the reader loop |",
                "|---|---|---|",
            ]
            for name, _ in steps:
                t = times[name]
                lines.append(f"| {name} | {t / len(offsets) * 1e6:.1f} | {t / total:.0%} |")
            rest = total - accounted
            lines.append(
                f"| rest of the reader loop (Python bookkeeping, copies): whole - pread - SHA-256 - "
                f"wrapper decompress | "
                f"{rest / len(offsets) * 1e6:.1f} | {rest / total:.0%} |"
            )
            prof = cProfile.Profile()
            prof.enable()
            reader_random(r, offsets)
            prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.strip_dirs().sort_stats("tottime").print_stats(14)
        lines += [
            "",
            "cProfile of the reader loop (tottime order; profiling inflates Python call costs):",
            "",
        ]
        lines += ["```", buf.getvalue().strip(), "```"]
        return "\n".join(lines)
    finally:
        blob.unlink(missing_ok=True)


# -- reporting ---------------------------------------------------------------------------------------


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def machine_facts() -> dict[str, str]:
    cpu = cpu_model()
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = ", ".join(f for f in ("sha_ni", "avx2", "avx512f") if f" {f}" in text)
    except OSError:
        pass
    libs = []
    for dist in ("lz4", "zstandard", "python-snappy"):
        try:
            libs.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            libs.append(f"{dist} ?")
    nproc = subprocess.run(["nproc"], check=False, capture_output=True, text=True).stdout.strip() or str(
        os.cpu_count()
    )
    return {
        "nproc": nproc,
        "CPU": f"{cpu} ({flags})" if flags else cpu,
        "memory": mem,
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "codec libraries": ", ".join(libs),
    }


def code_state() -> str:
    """The commit and whether blockformat/ had uncommitted changes when measured."""

    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, check=False).stdout

    head = git("rev-parse", "--short", "HEAD").strip() or "?"
    diff = git("diff", "HEAD", "--", "blockformat")
    if not diff:
        return f"commit {head}, blockformat/ unmodified"
    digest = hashlib.sha256(diff.encode()).hexdigest()[:12]
    return f"commit {head} + uncommitted blockformat/ changes (diff sha256 {digest})"


def command_line() -> str:
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(Path.cwd()))
    except ValueError:
        exe_s = str(exe)
    return shlex.join([exe_s, *sys.argv])


def table(rows: Sequence[Row], size: int) -> list[str]:
    head = [
        "codec",
        "chunk",
        "ratio",
        "blob MB",
        "zero / raw chunks",
        "index KiB",
        "pack MB/s",
        "seq read MB/s",
        "bare seq MB/s",
        "seq reader/bare",
        "rand 4K reads/s",
        "rand 4K MB/s",
        "bare rand reads/s",
        "rand reader/bare",
        "amplif. (chunk/4K)",
        "fetch per cold 4K read",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        i = r.info
        na = "n/a"
        seq = size / med(r.seq_s) / MB
        bseq = size / med(r.bare_seq_s) / MB
        rand = r.reads / med(r.rand_s)
        brand = r.reads / med(r.bare_rand_s)
        cells = [
            r.codec,
            fmt_size(r.chunk_size),
            f"{i.ratio:.2f}",
            f"{i.blob_size / MB:.0f}",
            f"{100 * i.zero_chunks / i.chunk_count:.0f}% / {100 * i.raw_chunks / i.chunk_count:.0f}%",
            f"{r.index_bytes / KIB:.0f}",
            f"{size / med(r.pack_s) / MB:.0f}",
            f"{seq:.0f}",
            na if r.codec == "none" else f"{bseq:.0f}",
            na if r.codec == "none" else f"{seq / bseq:.0%}",
            f"{rand:,.0f}",
            f"{rand * RAND_SIZE / MB:.1f}",
            na if r.codec == "none" else f"{brand:,.0f}",
            na if r.codec == "none" else f"{rand / brand:.0%}",
            f"{r.chunk_size // RAND_SIZE}x",
            f"{r.avg_stored / KIB:.1f} KiB ({r.avg_stored / RAND_SIZE:.1f}x)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def recommend(rows: Sequence[Row]) -> list[str]:
    by_codec: dict[str, list[Row]] = {}
    for r in rows:
        by_codec.setdefault(r.codec, []).append(r)
    codec = "lz4" if "lz4" in by_codec else next(iter(by_codec))
    cand = sorted(by_codec[codec], key=lambda r: r.chunk_size)
    if len(cand) < 2:
        return [f"Only one chunk size measured for {codec}; no recommendation (run without --quick)."]
    best = max(r.info.ratio for r in cand)
    pick = next(r for r in cand if r.info.ratio >= RECOMMEND_RATIO_SHARE * best)
    out = [
        f"Recommended default chunk size: **{fmt_size(pick.chunk_size)}** (codec {codec}).",
        "",
        f"Rule: the smallest chunk size whose compression ratio is >= {RECOMMEND_RATIO_SHARE:.0%} of the "
        f"best ratio of {codec} over all chunk sizes ({best:.2f}). Below it, the ratio (registry bytes, "
        "cold-pull time) drops noticeably; above it, the ratio barely improves while every lazily fetched "
        "4 KiB read costs a bigger fetch and a bigger decompression:",
        "",
    ]
    for r in cand:
        rand = r.reads / med(r.rand_s)
        t100 = r.avg_stored * 8 / 100e6 * 1e3  # ms to move one stored chunk over 100 Mbit/s
        out.append(
            f"- {fmt_size(r.chunk_size):>4}: ratio {r.info.ratio:.2f} ({r.info.ratio / best:.0%} of best), "
            f"{rand:,.0f} random 4 KiB reads/s, amplification {r.chunk_size // RAND_SIZE}x uncompressed / "
            f"{r.avg_stored / RAND_SIZE:.1f}x fetched ({t100:.2f} ms at 100 Mbit/s per cold read), "
            f"index {r.index_bytes / KIB:.0f} KiB"
            + (
                " (larger than the 256 KiB tail read: opening needs a second read)"
                if r.index_bytes > 256 * KIB
                else ""
            )
        )
    return out


def summarize_sources(sources: Sequence[str]) -> str:
    """``/usr/share (first 58 of 160 entries, a.. to man)`` instead of 400 paths."""
    by_root: dict[str, list[str]] = {}
    for src in sources:
        root, _, name = src.rpartition("/")
        by_root.setdefault(root, []).append(name)
    parts = []
    for root, names in by_root.items():
        try:
            total = len(os.listdir(root))
        except OSError:
            total = len(names)
        if len(names) >= total:
            parts.append(f"{root} (all {total} entries)")
        else:
            parts.append(f"{root} (first {len(names)} of {total} entries by name, up to `{names[-1]}`)")
    return "; ".join(parts)


def render(
    rows: Sequence[Row],
    facts: ImageFacts,
    args: argparse.Namespace,
    total_s: float,
    profile: str | None,
) -> str:
    size = facts.size
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Chunk container format benchmark",
        "",
        f"Generated by `scripts/bench_blockformat.py` on {now}; total runtime {total_s / 60:.1f} min.",
        "",
        "Command: `" + command_line() + "`",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in machine_facts().items()]
    lines += [
        f"- load average (1/5/15 min) at start: {args.load_start}; at end: {loadavg()} (the machine is "
        "shared; reader and bare loops are interleaved per repetition so both see the same load)",
        f"- code measured: {args.code_state}",
    ]
    lines += [
        "",
        "## Image",
        "",
        f"- ext4 image, {size:,} bytes ({size / MB:.0f} MB); {facts.used / MB:.0f} MB used "
        f"(dumpe2fs), {facts.nonzero_4k_blocks * 4096 / MB:.0f} MB in non-zero 4 KiB blocks "
        f"({facts.nonzero_4k_blocks * 4096 / size:.0%} of the image)",
        f"- contents: {facts.file_bytes / MB:.0f} MB of file data, {facts.entries:,} files/dirs/symlinks, "
        f"copied with `cp -a --parents` from: {summarize_sources(facts.sources)}",
        f"- built with `{facts.mkfs_command}` ({facts.mke2fs_version}); image size = used file blocks x "
        f"{IMAGE_SLACK} rounded up to {IMAGE_ROUND // MIB} MiB",
        "",
        "## Results",
        "",
    ]
    lines += table(rows, size)
    reps = args.reps
    lines += [
        "",
        "Notes:",
        f"- ratio = image bytes / blob bytes; MB = 10^6 bytes; throughputs are per image (uncompressed) "
        f"byte. Read figures are medians of {reps} repetition(s); pack MB/s is the median of "
        f"{args.pack_reps} pack(s) per row (file to file, page cache warm, no fsync).",
        f"- seq read: the whole image in {IO_SIZE // MIB} MiB `ChunkReader.read` calls (default chunk "
        "cache), opening included. bare seq: every stored chunk decompressed in order by the codec library, "
        "from memory.",
        f"- rand 4K: {args.reads:,} reads at 4 KiB-aligned offsets uniform over the whole image (seed "
        f"{args.seed}, the same offsets for every row), `ChunkReader(cache_chunks=0)` so each read fetches "
        "(pread, page cache warm), verifies (SHA-256) and decompresses one chunk. bare rand: the same "
        "offsets, the chunk decompressed from memory by the codec library directly and the 4 KiB sliced "
        "out; no hashing, no I/O. A chunk stored raw (codec none, or incompressible) costs the bare loop "
        "nothing but the slice, so for `none` there is no codec work to compare with (n/a).",
        "- zero / raw chunks: share of chunks that are all zero (not stored) / stored uncompressed. Random "
        "offsets in zero chunks are cheap for both loops; share of the random offsets that land in a zero "
        "chunk: "
        + ", ".join(
            f"{fmt_size(cs)} {zh:.0%}" for cs, zh in sorted({(r.chunk_size, r.zero_hits) for r in rows})
        )
        + ".",
        "- amplif.: uncompressed bytes decoded per single cold 4 KiB read; fetch per cold 4K read: mean "
        "stored (compressed) bytes of a non-zero chunk, i.e. what a lazy fetch of one 4 KiB read moves.",
        "",
        "## Recommendation",
        "",
    ]
    lines += recommend(rows)
    if profile:
        lines += [
            "",
            f"## Where the reader's random 4 KiB time goes ({args.profile})",
            "",
            profile.rstrip(),
        ]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--workdir", type=Path, default=REPO / "bench" / "work", help="image cache and blobs")
    p.add_argument("--output", type=Path, help="Markdown result file (default bench/results/blockformat.md)")
    p.add_argument("--codecs", default=",".join(ALL_CODECS), help="comma-separated, default %(default)s")
    p.add_argument(
        "--chunk-sizes",
        default=",".join(fmt_size(c) for c in ALL_CHUNK_SIZES),
        help="comma-separated (4K, 64K, 1M, ...), default %(default)s",
    )
    p.add_argument("--data-mb", type=int, default=560, help="file data in the image, MB (default 560)")
    p.add_argument("--sources", default=",".join(DEFAULT_SOURCES), help="directories to take files from")
    p.add_argument("--reads", type=int, default=20_000, help="random 4 KiB reads per repetition")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each read measurement")
    p.add_argument("--pack-reps", type=int, default=3, help="repetitions of each pack")
    p.add_argument("--seed", type=int, default=1234, help="seed of the random offsets")
    p.add_argument(
        "--profile", metavar="CODEC:SIZE", help="also cProfile the reader's random loop, e.g. lz4:64K"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 64K only, 2000 reads, 1 repetition")
    args = p.parse_args(argv)

    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    sizes = [parse_size(s) for s in args.chunk_sizes.split(",") if s.strip()]
    if args.quick:
        if args.chunk_sizes == p.get_default("chunk_sizes"):
            sizes = [64 * KIB]
        args.reads = min(args.reads, 2000)
        args.reps = args.pack_reps = 1
    for c in codecs:
        if c not in ALL_CODECS:
            p.error(f"unknown codec {c}")
    output: Path = args.output or (
        args.workdir / "blockformat-quick.md" if args.quick else REPO / "bench" / "results" / "blockformat.md"
    )

    t_start = time.perf_counter()
    args.load_start = loadavg()
    args.code_state = code_state()
    args.workdir.mkdir(parents=True, exist_ok=True)
    facts = build_image(args.workdir, args.data_mb, args.sources.split(","))
    image = Path(facts.path)
    size = facts.size
    log("reading the image once (page cache, non-zero blocks)")
    facts.nonzero_4k_blocks = count_nonzero_blocks(image)
    rng = random.Random(args.seed)
    offsets = [rng.randrange(size // RAND_SIZE) * RAND_SIZE for _ in range(args.reads)]

    rows: list[Row] = []
    for codec in codecs:
        for cs in sizes:
            t0 = time.perf_counter()
            row = measure(image, size, args.workdir, codec, cs, offsets, args.reps, args.pack_reps)
            rows.append(row)
            pack_mbs = size / med(row.pack_s) / MB
            seq_mbs = size / med(row.seq_s) / MB
            rand, bare = len(offsets) / med(row.rand_s), len(offsets) / med(row.bare_rand_s)
            log(
                f"{codec:>6} {fmt_size(cs):>4}: ratio {row.info.ratio:.2f}, pack {pack_mbs:.0f} MB/s, "
                f"seq {seq_mbs:.0f} MB/s, rand {rand:,.0f}/s vs bare {bare:,.0f}/s "
                f"({time.perf_counter() - t0:.0f} s)"
            )

    profile = None
    if args.profile:
        pc, _, ps = args.profile.partition(":")
        log(f"profiling the reader's random loop for {args.profile}")
        profile = profile_case(image, args.workdir, pc, parse_size(ps or "64K"), offsets, max(args.reps, 5))

    publish(output, render(rows, facts, args, time.perf_counter() - t_start, profile), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
