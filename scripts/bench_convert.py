#!/usr/bin/env python3
"""Benchmark of `damselfly convert`: conversion MB/s and output size per codec (issue 5, DESIGN §8.4),
against an earlier revision and against gunzip alone (issue 16).

    bench_convert.py [--target-mb 320] [--codecs lz4,zstd,snappy] [--runs 3] [--chunk-size 65536]
                     [--level N] [--via api|cli] [--baseline REV] [--small-files N] [--small-files-mb MB]
                     [--out bench/results/convert.md] [--dry-run]

1. gets a realistic image from ``scripts/build_debian_image.py`` (cached in ``bench/work/images/``): the
   Debian ``bookworm`` minbase + python3 base layer, a generated payload layer sized so the image holds at
   least ``--target-mb`` MB of uncompressed tar, and a small top layer with a whiteout; gzip level 6;
2. converts it ``--runs`` times with every codec, the codecs side by side in each run (their order
   rotated from run to run), each conversion a real one: a fresh ``--cache-dir`` (so no layer is reused;
   checked) and a fresh output layout, both deleted after the run;
3. reports medians: MB/s of uncompressed layer tar per wall second, wall and CPU seconds (user + system
   of the child process and everything it waited for — the device daemon, mkfs, e2fsck — from
   ``getrusage(RUSAGE_CHILDREN)`` deltas; the kernel's own loop and writeback threads are not counted),
   and the output's size against the gzip original and the tar; per layer too (``--via api``);
4. writes the Markdown table and the command to ``bench/results/convert.md`` and prints it.

``--baseline REV`` (e.g. ``a0fdb1c``) checks that revision out into a git worktree under the work dir
(removed at the end unless ``--keep``) and converts with it too, in the same runs, right after the
current code on the same image and codec (``PYTHONPATH`` = that tree; same virtualenv), so "before"
and "after" share the machine's state.
``--small-files N`` (default 30000; 0: off) also converts a second image — the busybox base, a layer of
N small text files (``--small-files-mb``, default 400 MB of tar, ~110 MB gzip) and the top layer —
with lz4, and times ``gzip -dc`` (GNU gzip: what a user types) and isal over the same layer blobs in
the same run: the conversion's wall time over gunzip's, per run, medians.

``--via api`` (default) runs each conversion in a child Python calling
``snapshotter.convert.converter.convert`` (per-layer seconds and the ``reused`` flags come back as JSON);
``--via cli`` runs ``damselfly convert SRC DST --oci-layout --quiet`` and reads the output layout. The
source blobs are in the page cache for every run (they were just built or read), so the figures are
the converter's, not the disk's. Needs root, like ``damselfly convert``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import isal.isal_zlib
from build_debian_image import DEFAULT_CACHE, BuiltImage, ImageBuildError, ImageSpec, build_image

from p2p.errors import P2PError
from p2p.manifest import Index, Manifest, parse_manifest

REPO = Path(__file__).resolve().parent.parent
MB = 1_000_000
CODECS = ("lz4", "zstd", "snappy")
DEFAULT_OUT = REPO / "bench" / "results" / "convert.md"
DEFAULT_WORK = REPO / "bench" / "work" / "convert"
DAMSELFLY = REPO / ".venv" / "bin" / "damselfly"

#: The child of ``--via api``: one conversion through the Python API, its result as JSON on stdout.
API_CHILD = """
import json, sys
from dataclasses import asdict
import snapshotter
from snapshotter.convert.converter import ConvertOptions, convert
job = json.loads(sys.argv[1])
result = convert(job["src"], job["dst"], ConvertOptions(**job["options"]))
print(json.dumps({"manifest_digest": result.manifest_digest, "layers": [asdict(x) for x in result.layers],
                  "code": snapshotter.__file__}))
"""


class BenchError(Exception):
    pass


@dataclass
class Run:
    codec: str
    wall: float
    cpu: float
    tar_bytes: int
    out_bytes: int
    manifest_digest: str
    layer_seconds: list[float] = field(default_factory=list)  # empty with --via cli
    which: str = "now"  # or "before": the --baseline revision
    layer_out: list[int] = field(default_factory=list)


def cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def read_layout_manifest(layout: Path) -> Manifest:
    """The single image manifest of an OCI layout (an index entry may point at a platform index)."""
    where = str(layout)
    try:
        top = parse_manifest((layout / "index.json").read_bytes(), None, where)
        while isinstance(top, Index):
            if len(top.manifests) != 1:
                raise BenchError(f"{where}: expected one image, found {len(top.manifests)}")
            desc = top.manifests[0]
            blob = layout / "blobs" / desc.digest.replace(":", "/")
            top = parse_manifest(blob.read_bytes(), desc.media_type, where, desc.digest)
    except (OSError, P2PError) as e:
        raise BenchError(f"{where}: cannot read the converted image: {e}") from e
    return top


def convert_once(
    image: BuiltImage,
    codec: str,
    args: argparse.Namespace,
    work: Path,
    dry_run: bool,
    tree: Path | None = None,
) -> Run | None:
    """One conversion with a fresh cache; `tree`: with the code of that checkout (the baseline)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{codec}-", dir=work))
    cache_dir, out_dir = run_dir / "cache", run_dir / "out"
    level = args.level if codec == "zstd" else None
    via = "api" if tree is not None else args.via
    env = None
    if via == "cli":
        cmd = [
            args.damselfly, "convert", image.layout_dir, str(out_dir), "--codec", codec,
            "--chunk-size", str(args.chunk_size), "--cache-dir", str(cache_dir), "--oci-layout", "--quiet",
        ]  # fmt: skip
        if level is not None:
            cmd += ["--level", str(level)]
    else:
        options = {
            "codec": codec, "level": level, "chunk_size": args.chunk_size, "cache_dir": str(cache_dir),
            "oci_layout": True, "quiet": True,
        }  # fmt: skip
        job = {"src": image.layout_dir, "dst": str(out_dir), "options": options}
        cmd = [sys.executable, "-c", API_CHILD, json.dumps(job)]
        if tree is not None:  # the tree's packages before the virtualenv's editable install of this one
            env = {**os.environ, "PYTHONPATH": str(tree)}
    try:
        if dry_run:
            shown = cmd if via == "cli" else [*cmd[:2], "API_CHILD", cmd[3]]
            print("would run:", f"PYTHONPATH={tree}" if tree else "", shlex.join(shown), file=sys.stderr)
            return None
        cpu0, t0 = cpu_children(), time.perf_counter()
        # cwd: `python -c` puts it first on sys.path, so it decides which checkout's code runs.
        cwd = str(tree) if tree is not None else str(REPO)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env, cwd=cwd)
        wall, cpu = time.perf_counter() - t0, cpu_children() - cpu0
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise BenchError(f"{shlex.join(cmd[:4])} ... failed with exit {done.returncode}:\n{tail}")
        manifest = read_layout_manifest(out_dir)
        if len(manifest.layers) != len(image.layers):
            raise BenchError(f"{codec}: {len(manifest.layers)} layers out, {len(image.layers)} in")
        run = Run(
            codec, wall, cpu, image.uncompressed_size, sum(d.size for d in manifest.layers), manifest.digest
        )
        run.which = "before" if tree is not None else "now"
        if via == "api":
            result = json.loads(done.stdout.strip().splitlines()[-1])
            expected = str(tree) if tree is not None else str(REPO)
            if not result["code"].startswith(expected + os.sep):
                raise BenchError(f"the conversion ran {result['code']}, not the code in {expected}")
            if any(layer["reused"] for layer in result["layers"]):
                raise BenchError(f"{codec}: a layer was reused from a fresh cache dir ({cache_dir})")
            run.layer_seconds = [layer["seconds"] for layer in result["layers"]]
            run.layer_out = [layer["blob_size"] for layer in result["layers"]]
        return run
    finally:
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def baseline_tree(rev: str, work: Path) -> Path:
    """A checkout of `rev` (a git worktree of this repository) under `work`."""
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if commit.returncode != 0:
        raise BenchError(f"--baseline {rev}: not a commit of {REPO}: {commit.stderr.strip()}")
    tree = work / f"baseline-{commit.stdout.strip()[:12]}"
    if not (tree / "snapshotter").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], check=False)
        done = subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree),
             commit.stdout.strip()],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise BenchError(f"git worktree add {tree}: {done.stderr.strip()}")
    return tree


def gunzip_seconds(image: BuiltImage) -> float:
    """Wall seconds of ``gzip -dc`` (GNU gzip) over every layer blob of the image, output discarded."""
    t0 = time.perf_counter()
    for layer in image.layers:
        blob = Path(image.layout_dir) / "blobs" / layer.digest.replace(":", "/")
        with open(blob, "rb") as f:
            subprocess.run(["gzip", "-dc"], stdin=f, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def gunzip_rate(image: BuiltImage) -> float:
    """MB/s of tar from decoding the image's gzip layers with isal alone (the floor of any converter)."""
    total = 0
    t0 = time.perf_counter()
    for layer in image.layers:
        blob = Path(image.layout_dir) / "blobs" / layer.digest.replace(":", "/")
        with open(blob, "rb") as f:
            # wbits 31: one gzip member, as the builder writes them
            decoder = isal.isal_zlib.decompressobj(31)
            while piece := f.read(1 << 20):
                total += len(decoder.decompress(piece))
            total += len(decoder.flush())
    return total / (time.perf_counter() - t0) / MB


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@dataclass
class SmallFiles:
    """The many-small-files image's runs: conversions and gunzip, side by side in each run."""

    image: BuiltImage
    now: list[Run] = field(default_factory=list)
    before: list[Run] = field(default_factory=list)
    gzip_s: list[float] = field(default_factory=list)
    isal_s: list[float] = field(default_factory=list)


def _baseline_section(runs: list[Run], codecs: list[str], args: argparse.Namespace, tar: int) -> list[str]:
    lines = [
        "",
        f"Before and after, same image, same runs (before = `{args.baseline}`, converted right after the "
        "current code with the same codec):",
        "",
        "| codec | before MB/s | now MB/s | speed-up | before wall s | now wall s "
        "| same digest every run (before, now) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for codec in codecs:
        now = [r for r in runs if r.codec == codec and r.which == "now"]
        before = [r for r in runs if r.codec == codec and r.which == "before"]
        if not now or not before:
            continue
        wn, wb = _med([r.wall for r in now]), _med([r.wall for r in before])
        same = [len({r.manifest_digest for r in rs}) == 1 for rs in (before, now)]
        lines.append(
            f"| {codec} | {tar / wb / MB:.1f} | {tar / wn / MB:.1f} | {wb / wn:.2f}x | {wb:.1f} | {wn:.1f} "
            f"| {'yes' if same[0] else 'NO'}, {'yes' if same[1] else 'NO'} |"
        )
    return lines


def _small_files_section(sf: SmallFiles, args: argparse.Namespace) -> list[str]:
    img = sf.image
    big = max(img.layers, key=lambda layer: layer.uncompressed_size)
    n = min(len(sf.now), len(sf.gzip_s), len(sf.isal_s))
    pairs = list(zip(sf.gzip_s, sf.isal_s, strict=False))
    lines = [
        "",
        f"Many small files: `{Path(img.layout_dir).name}` ({len(img.layers)} layers; the big one: "
        f"{args.small_files} text files, {big.uncompressed_size / MB:.1f} MB of tar, {big.size / MB:.1f} MB "
        f"gzip -6), lz4. Each run converts the image (fresh cache) and decodes the same layer blobs with "
        "`gzip -dc` (GNU gzip, output discarded) and isal; ratios are per run, then the median.",
        "",
        "| | wall s | x gzip -dc | x isal |",
        "|---|---:|---:|---:|",
        f"| gzip -dc | {_med(sf.gzip_s):.2f} | 1.00 | {_med([g / i for g, i in pairs]):.2f} |",
        f"| isal | {_med(sf.isal_s):.2f} | {_med([i / g for g, i in pairs]):.2f} | 1.00 |",
    ]
    for label, rs in (
        ("damselfly convert (now)", sf.now),
        (f"damselfly convert ({args.baseline})", sf.before),
    ):
        if not rs:
            continue
        k = min(len(rs), n)
        lines.append(
            f"| {label} | {_med([r.wall for r in rs]):.2f} "
            f"| {_med([rs[j].wall / sf.gzip_s[j] for j in range(k)]):.2f} "
            f"| {_med([rs[j].wall / sf.isal_s[j] for j in range(k)]):.2f} |"
        )
    same = len({r.manifest_digest for r in sf.now}) == 1
    lines += ["", f"Same manifest digest in every run (now): {'yes' if same else 'NO'}."]
    return lines


def report(
    image: BuiltImage,
    all_runs: list[Run],
    failures: dict[str, list[str]],
    codecs: list[str],
    args: argparse.Namespace,
    gz_rate: float,
    small: SmallFiles | None = None,
) -> str:
    runs = [r for r in all_runs if r.which == "now"]
    tar, gz = image.uncompressed_size, image.compressed_size
    lines = [
        "# Conversion benchmark (`damselfly convert`)",
        "",
        f"{datetime.date.today().isoformat()}, {_cpu_model()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, kernel {platform.release()}; load average (1 min) "
        f"{args.load_before:.1f} before, {os.getloadavg()[0]:.1f} after (other work on the machine "
        "skews the figures).",
        "",
        f"Image: `{Path(image.layout_dir).name}` ({len(image.layers)} layers: "
        + ", ".join(f"{layer.kind} {layer.uncompressed_size / MB:.1f} MB" for layer in image.layers)
        + f"), {tar / MB:.1f} MB of tar, {gz / MB:.1f} MB gzip -6 (tar/gzip {tar / gz:.2f}x).",
        f"Chunk size {args.chunk_size}, zstd level {args.level if args.level is not None else 'default'}; "
        f"medians of {args.runs} runs, the codecs side by side in each run (order rotated); every run a "
        f"fresh cache dir (no layer reused) and a fresh output layout; via {args.via}.",
        "",
        "| codec | MB/s (tar) | wall s | CPU s | output MB | output / gzip | tar / output | failed runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| gzip -6 (source) | | | | {gz / MB:.1f} | 1.00 | {tar / gz:.2f} | |",
    ]
    for codec in codecs:
        mine = [r for r in runs if r.codec == codec]
        failed = f"{len(failures[codec])}/{args.runs}"
        if not mine:
            lines.append(f"| {codec} | | | | | | | {failed} |")
            continue
        wall = _med([r.wall for r in mine])
        out = _med([float(r.out_bytes) for r in mine])
        lines.append(
            f"| {codec} | {tar / wall / MB:.1f} | {wall:.1f} | {_med([r.cpu for r in mine]):.1f} | "
            f"{out / MB:.1f} | {out / gz:.2f} | {tar / out:.2f} | {failed} |"
        )
    digests = {c: {r.manifest_digest for r in runs if r.codec == c} for c in codecs}
    digests = {c: d for c, d in digests.items() if d}
    lines += [
        "",
        "For scale: decoding the gzip layers alone (isal, no tar parsing, no writes) runs at "
        f"{gz_rate:.0f} MB/s of tar. Output MB counts the converted layer blobs (ext4 metadata, "
        "chunk index and trailer included); MB is 10^6 bytes. CPU s: user + system time of the "
        "conversion process and the processes it waited for.",
        "Same manifest digest in every run of a codec (determinism): "
        + ", ".join(f"{c} {'yes' if len(d) == 1 else 'NO'}" for c, d in digests.items())
        + ".",
    ]
    if any(failures.values()):
        lines += ["", "Failed conversions (medians above are over the runs that succeeded):", ""]
    for codec, why in failures.items():
        for n, message in enumerate(why, 1):
            lines.append(f"- {codec}, failure {n}: `{message}`")
    if runs and all(r.layer_seconds for r in runs):
        lines += [
            "",
            "Per layer (medians):",
            "",
            "| codec | layer | tar MB | MB/s | output MB | tar / output |",
        ]
        lines.append("|---|---|---:|---:|---:|---:|")
        for codec in codecs:
            mine = [r for r in runs if r.codec == codec]
            if not mine:
                continue
            for i, layer in enumerate(image.layers):
                secs = _med([r.layer_seconds[i] for r in mine])
                out = _med([float(r.layer_out[i]) for r in mine])
                rate = f"{layer.uncompressed_size / secs / MB:.1f}" if secs > 0 else "-"
                lines.append(
                    f"| {codec} | {layer.kind} | {layer.uncompressed_size / MB:.1f} | {rate} "
                    f"| {out / MB:.2f} | {layer.uncompressed_size / out:.2f} |"
                )
    if args.baseline:
        lines += _baseline_section(all_runs, codecs, args, tar)
    if small is not None:
        lines += _small_files_section(small, args)
    lines += ["", "Command:", "", "```sh", shlex.join([".venv/bin/python", *sys.argv]), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="bench_convert", description=doc.split("\n\n")[0])
    parser.add_argument("--target-mb", type=int, default=320, help="image size in MB of tar (default: 320)")
    parser.add_argument(
        "--codecs", default=",".join(CODECS), help="comma-separated (default: lz4,zstd,snappy)"
    )
    parser.add_argument("--runs", type=int, default=3, help="conversions per codec (default: 3)")
    parser.add_argument("--chunk-size", type=int, default=65536, help="converter chunk size (default: 65536)")
    parser.add_argument("--level", type=int, default=None, help="zstd level (default: the converter's)")
    parser.add_argument("--via", choices=("api", "cli"), default="api", help="how to run the converter")
    parser.add_argument("--damselfly", default=str(DAMSELFLY), help="the CLI for --via cli")
    parser.add_argument("--image-cache", default=str(DEFAULT_CACHE), help=f"default: {DEFAULT_CACHE}")
    parser.add_argument(
        "--workdir", default=str(DEFAULT_WORK), help=f"run directories (default: {DEFAULT_WORK})"
    )
    parser.add_argument(
        "--out", default=str(DEFAULT_OUT), help=f"the Markdown result (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--baseline", default=None, metavar="REV", help="also convert with this revision")
    parser.add_argument(
        "--small-files", type=int, default=30000, metavar="N", help="files of the small-files image (0: off)"
    )
    parser.add_argument(
        "--small-files-mb", type=int, default=400, help="its layer's MB of tar (default: 400)"
    )
    parser.add_argument("--keep", action="store_true", help="keep every run's cache and output")
    parser.add_argument("--dry-run", action="store_true", help="build the image, print the commands, stop")
    args = parser.parse_args(argv)
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    unknown = set(codecs) - set(CODECS)
    if unknown or not codecs or args.runs < 1:
        parser.error(f"--codecs takes some of {', '.join(CODECS)}; --runs >= 1")
    if os.geteuid() != 0 and not args.dry_run:
        print("bench_convert: damselfly convert needs root (it mounts ext4 over a loop device); run as root",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        image = build_image(ImageSpec(target_mb=args.target_mb), args.image_cache)
    except ImageBuildError as e:
        print(f"bench_convert: {e}", file=sys.stderr)
        return 1
    print(
        f"bench_convert: image {image.layout_dir}: {image.uncompressed_size / MB:.1f} MB tar, "
        f"{image.compressed_size / MB:.1f} MB gzip, {len(image.layers)} layers",
        file=sys.stderr,
    )
    args.load_before = os.getloadavg()[0]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    small: SmallFiles | None = None
    try:
        tree = baseline_tree(args.baseline, work) if args.baseline else None
        if args.small_files > 0:
            spec = ImageSpec(variant="busybox", payload_mb=args.small_files_mb, small_files=args.small_files)
            small = SmallFiles(build_image(spec, args.image_cache))
    except (BenchError, ImageBuildError) as e:
        print(f"bench_convert: {e}", file=sys.stderr)
        return 1
    runs: list[Run] = []
    failures: dict[str, list[str]] = {c: [] for c in codecs}

    def attempt(img: BuiltImage, codec: str, i: int, with_tree: Path | None) -> Run | None:
        label = f"run {i + 1}/{args.runs} {codec}{' (baseline)' if with_tree else ''}"
        try:
            run = convert_once(img, codec, args, work, args.dry_run, with_tree)
        except BenchError as e:
            # One failed conversion is a result too: record it, measure the rest, exit 1 at the end.
            print(f"bench_convert: {label} FAILED: {e}", file=sys.stderr)
            failures.setdefault(codec, []).append(str(e).strip().splitlines()[-1])
            return None
        if run is not None:
            print(
                f"bench_convert: {label}: {run.tar_bytes / run.wall / MB:.1f} MB/s, {run.wall:.1f} s wall, "
                f"{run.cpu:.1f} s CPU, {run.out_bytes / MB:.1f} MB out",
                file=sys.stderr,
            )
        return run

    for i in range(args.runs):
        order = codecs[i % len(codecs) :] + codecs[: i % len(codecs)]
        for codec in order:
            for with_tree in (None, tree) if tree is not None else (None,):
                run = attempt(image, codec, i, with_tree)
                if run is not None:
                    runs.append(run)
        if small is not None:
            for with_tree in (None, tree) if tree is not None else (None,):
                run = attempt(small.image, "lz4", i, with_tree)
                if run is not None:
                    (small.before if with_tree else small.now).append(run)
            if not args.dry_run:
                small.gzip_s.append(gunzip_seconds(small.image))
                small.isal_s.append(small.image.uncompressed_size / MB / gunzip_rate(small.image))
                print(
                    f"bench_convert: run {i + 1}/{args.runs} small files: gzip -dc {small.gzip_s[-1]:.2f} s, "
                    f"isal {small.isal_s[-1]:.2f} s",
                    file=sys.stderr,
                )
        if args.dry_run:
            break
    if tree is not None and not args.keep:  # the checkout goes; the worktree entry with it
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    if args.dry_run:
        return 0
    gz_rate = _med([gunzip_rate(image) for _ in range(args.runs)])
    text = report(image, runs, failures, codecs, args, gz_rate, small)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
