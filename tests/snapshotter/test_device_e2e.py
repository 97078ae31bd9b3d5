"""The block device end to end (issue 4, "Done when"): `damselfly device-daemon` serving FUSE device
files, loop devices, ext4 and a real docker-registry on loopback, driven through the `damselfly` CLI.

Every test gets a `DeviceLab`: daemons it starts and mount points it registers are undone at teardown
(mounts, then loop devices over files below the test's directory, then the daemons: control op, then
SIGTERM, then SIGKILL, by pid), and a daemon whose FUSE mount outlives it fails the test. The last
test checks that nothing any of them made is left in the kernel or the process table.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockformat.annotations import LayerAnnotations
from blockformat.chunkfile import ChunkReader
from blockformat.layer import LayerReader
from blockformat.source import FileSource
from p2p.registry import RegistryClient
from snapshotter.host.loop import loop_attach, loop_detach, loops_for
from snapshotter.host.mountinfo import find_mount
from snapshotter.host.mounts import mount, umount
from snapshotter.image.blockimage import write_oci_layout
from tests.conftest import FAST_RETRY, FAST_TIMEOUTS
from tests.p2p.registry_server import RegistryServer

from .devd import (
    LEDGER,
    CountingProxy,
    DeviceDaemon,
    DeviceLab,
    MiB,
    RestartableRegistry,
    build_image,
    drop_page_cache,
    make_big_tree,
    make_many_files_tree,
    push_layout,
    timed_read,
)
from .test_blockimage import assert_same_tree, make_tree

READ_TIMEOUT = 3.0
#: What a failing read(2) may take beyond the configured bound: the kernel's immediate re-reads of
#: the failed range (each answered within FAIL_FAST_WAIT) and process scheduling on a loaded host.
EIO_MARGIN = 2.0
FIXED_MTIME = 1_650_000_000


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def restartable_registry() -> Iterator[RestartableRegistry]:
    """A registry of the test's own, which it may stop and start again on the same port."""
    with RestartableRegistry(name="devd-restart") as server:
        yield server


def _ref(host: str, repo: str) -> str:
    return f"{host}/{repo}:v1"


def _device_file(daemon: DeviceDaemon) -> Path:
    (name,) = daemon.status()["devices"]
    return Path(daemon.fuse_mountpoint) / str(name)


def _mounted_ro_ext4(mp: Path) -> str:
    info = find_mount(mp)
    assert info is not None, f"{mp} is not mounted"
    assert info.fstype == "ext4" and info.read_only, info
    assert info.source.startswith("/dev/loop"), info
    return info.source


def _eventually_reads(path: Path, offset: int, length: int, within: float) -> bytes:
    """Read until a read succeeds (each read bounded); fail if none does within `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        r = timed_read(path, offset, length, limit=within + 30)
        if r.ok:
            with open(path, "rb") as f:
                return os.pread(f.fileno(), length, offset)
        assert r.errno == errno.EIO, r
        assert time.monotonic() < deadline, f"{path} still fails with EIO {within}s after recovery"
        time.sleep(0.5)


# -- 1. a big tree, from the registry, equal to its source -----------------------------------------


@pytest.mark.slow
def test_image_of_5000_files_mounts_from_the_registry_equal_to_its_source(
    lab: DeviceLab, registry: RegistryServer, pusher: RegistryClient, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_many_files_tree(src, files=5000)
    entries = sum(len(dirs) + len(files) for _, dirs, files in os.walk(src))
    assert entries >= 5000
    image = build_image(src, tmp_path / "image")
    push_layout(pusher, "e2e/many", image.layout, "v1")
    daemon = lab.daemon()
    mp = lab.mount_point("mnt")

    out = daemon.cli("mount", _ref(registry.host, "e2e/many"), str(mp), "--plain-http").stdout
    assert str(mp) in out
    loop = _mounted_ro_ext4(mp)
    device_file = _device_file(daemon)
    assert loops_for(device_file) == [loop]

    assert_same_tree(src, mp)  # content, mode, owner, mtime, link target, xattrs of every entry

    daemon.cli("umount", str(mp))
    assert find_mount(mp) is None
    assert not loops_for(device_file)
    assert daemon.status()["devices"] == {}  # the last user gone, the device is detached


# -- 2. lazy: one small file of a big image costs a small part of it --------------------------------


@pytest.mark.slow
def test_reading_one_small_file_of_a_200_mb_image_fetches_under_a_tenth_of_it(
    lab: DeviceLab, registry: RegistryServer, pusher: RegistryClient, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_big_tree(src, total=200 * MiB)
    image = build_image(src, tmp_path / "image")
    image_bytes = image.image_bytes()
    assert image_bytes >= 200 * MiB  # incompressible: the blob is as big as the data
    push_layout(pusher, "e2e/big", image.layout, "v1")
    daemon = lab.daemon()  # background download delayed past the test
    mp = lab.mount_point("mnt")

    with CountingProxy(registry.host) as proxy:
        daemon.cli("mount", _ref(proxy.host, "e2e/big"), str(mp), "--plain-http")
        assert (mp / "etc" / "motd").read_text() == (src / "etc" / "motd").read_text()
        served = proxy.served
    status = daemon.status()

    (blob,) = status["blobs"].values()
    assert blob["background"] == "waiting" and not blob["complete"]
    assert blob["upstream_bytes"] <= served  # the daemon's own count agrees with the registry side
    print(f"registry served {served} of {image_bytes} image bytes ({served / image_bytes:.2%})")
    assert served < image_bytes / 10
    daemon.cli("umount", str(mp))
    shutil.rmtree(src)  # 400 MB that pytest's kept temporary directories need not hold
    shutil.rmtree(tmp_path / "image")


# -- 3. a registry that goes away ------------------------------------------------------------------


@pytest.mark.slow
def test_stopped_registry_fails_reads_of_missing_chunks_within_the_bound_and_recovers(
    lab: DeviceLab, restartable_registry: RestartableRegistry, tmp_path: Path
) -> None:
    reg = restartable_registry
    src = tmp_path / "src"
    make_big_tree(src, total=24 * MiB)
    image = build_image(src, tmp_path / "image")
    with RegistryClient(reg.host, plain_http=True, retry=FAST_RETRY, timeouts=FAST_TIMEOUTS) as client:
        push_layout(client, "e2e/flaky", image.layout, "v1")
    ref = _ref(reg.host, "e2e/flaky")
    daemon = lab.daemon(read_timeout=READ_TIMEOUT)
    mp = lab.mount_point("mnt")
    daemon.cli("mount", ref, str(mp), "--plain-http")
    motd = mp / "etc" / "motd"
    assert motd.read_text() == (src / "etc" / "motd").read_text()
    for name in os.listdir(mp):  # their inodes are fetched now; their data is not
        os.lstat(mp / name)
    device_file = _device_file(daemon)

    reg.halt()
    r = timed_read(mp / "big1.bin", 3 * MiB, 65536)
    assert not r.ok and r.errno == errno.EIO, r
    assert r.elapsed < READ_TIMEOUT + EIO_MARGIN, f"EIO after {r.elapsed:.2f}s"
    print(f"EIO after {r.elapsed:.2f}s with read-timeout {READ_TIMEOUT}s, registry stopped")
    failures = daemon.status()
    assert failures["read_errors"] + failures["read_timeouts"] >= 1

    # The mount stays usable for what the node has: out of the kernel's caches, from the daemon's.
    drop_page_cache(motd, device_file)
    r = timed_read(motd, 0, 4096)
    assert r.ok and r.nbytes == motd.stat().st_size, r
    assert sorted(os.listdir(mp)) == sorted([*os.listdir(src), "lost+found"])

    reg.resume()
    got = _eventually_reads(mp / "big1.bin", 3 * MiB, 65536, within=READ_TIMEOUT + 10)
    with open(src / "big1.bin", "rb") as f:
        assert got == os.pread(f.fileno(), 65536, 3 * MiB)

    # A second daemon on the same state directory (the cache persists) downloads the rest in the
    # background; once complete, every read succeeds with the registry gone.
    daemon.cli("umount", str(mp))
    lab.stop(daemon)
    daemon = lab.daemon(read_timeout=READ_TIMEOUT, background_delay=0)
    daemon.cli("mount", ref, str(mp), "--plain-http")
    status = daemon.wait_complete(timeout=60)
    (blob,) = status["blobs"].values()
    assert blob["present_units"] == blob["total_units"] and blob["background"] == "complete"
    reg.halt()
    drop_page_cache(_device_file(daemon))  # a fresh mount: only what mounting read is in the kernel
    assert_same_tree(src, mp)
    after = daemon.status()
    assert (after["read_errors"], after["read_timeouts"], after["read_fast_failures"]) == (0, 0, 0)
    daemon.cli("umount", str(mp))


@pytest.mark.slow
def test_hung_registry_fails_reads_after_the_read_timeout_not_the_network_timeouts(
    lab: DeviceLab, registry: RegistryServer, pusher: RegistryClient, tmp_path: Path
) -> None:
    """A dead network that accepts connections and never answers: only the read timeout bounds a read
    (the registry client's own timeouts are far longer), and the reader never sticks in D state."""
    src = tmp_path / "src"
    make_big_tree(src, total=12 * MiB)
    image = build_image(src, tmp_path / "image")
    push_layout(pusher, "e2e/hung", image.layout, "v1")
    daemon = lab.daemon(read_timeout=READ_TIMEOUT)
    mp = lab.mount_point("mnt")
    with CountingProxy(registry.host) as proxy:
        daemon.cli("mount", _ref(proxy.host, "e2e/hung"), str(mp), "--plain-http")
        for name in os.listdir(mp):
            os.lstat(mp / name)
        proxy.hang()
        r = timed_read(mp / "big2.bin", MiB, 65536)
        assert not r.ok and r.errno == errno.EIO, r
        assert READ_TIMEOUT * 0.9 < r.elapsed < READ_TIMEOUT + EIO_MARGIN, f"EIO after {r.elapsed:.2f}s"
        print(f"EIO after {r.elapsed:.2f}s with read-timeout {READ_TIMEOUT}s, registry hung")
        status = daemon.status()
        assert status["read_timeouts"] >= 1
        proxy.unhang()
        got = _eventually_reads(mp / "big2.bin", MiB, 65536, within=READ_TIMEOUT + 30)
        with open(src / "big2.bin", "rb") as f:
            assert got == os.pread(f.fileno(), 65536, MiB)
        daemon.cli("umount", str(mp))


# -- 4. a read-write device, committed and stacked --------------------------------------------------

_FILEFRAG_EXTENT = re.compile(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):")


def _physical_ranges(path: Path) -> list[tuple[int, int]]:
    """The byte ranges of the device that hold `path`'s data (FIEMAP through filefrag, synced first)."""
    out = subprocess.run(
        ["filefrag", "-s", "-e", "-b4096", str(path)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    ranges = []
    for line in out.splitlines():
        m = _FILEFRAG_EXTENT.match(line)
        if m:
            first, last = int(m.group(1)), int(m.group(2))
            ranges.append((first * 4096, (last + 1) * 4096))
    assert ranges, out
    return ranges


def _write_both(rel: str, data: bytes, *roots: Path) -> None:
    for root in roots:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _pwrite_both(rel: str, offset: int, data: bytes, *roots: Path) -> None:
    for root in roots:
        with open(root / rel, "r+b") as f:
            os.pwrite(f.fileno(), data, offset)


def _remove_both(rel: str, *roots: Path) -> None:
    for root in roots:
        p = root / rel
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


@pytest.mark.slow
def test_read_write_device_commits_a_layer_that_stacks_to_what_was_written(
    lab: DeviceLab, tmp_path: Path
) -> None:
    rng = random.Random(4)
    base_src = tmp_path / "base-src"
    make_tree(base_src, files=80, seed=3)
    base = build_image(base_src, tmp_path / "base", vsize=256 * MiB)
    daemon = lab.daemon()
    upper = tmp_path / "upper"
    device = Path(
        daemon.cli("attach", str(base.layout), "--upper", str(upper), "--name", "rw").stdout.strip()
    )
    assert device == Path(daemon.fuse_mountpoint) / "rw"
    loop = lab.kernel.loop(loop_attach(device, read_only=False))
    rw = lab.mount_point("rw")
    mount(loop, rw, "ext4", ())
    expected = tmp_path / "expected"  # the same operations on a plain directory
    subprocess.run(["cp", "-a", str(base_src), str(expected)], check=True, timeout=120)

    # A tree of new files, some big enough for several extents; random writes into new and old files.
    written = []
    for i in range(60):
        rel = f"written/d{i % 7}/sub{i % 3}/file{i}.bin"
        size = rng.choice([0, 100, 4096, 5000, 70_000, 300_000, 1_500_000])
        _write_both(rel, rng.randbytes(size), rw, expected)
        written.append(rel)
    victims = [r for r in written if (rw / r).stat().st_size >= 300_000][:4]
    assert len(victims) == 4
    olds = sorted(str(p.relative_to(base_src)) for p in base_src.glob("dir*/file*.dat"))
    for rel in rng.sample(written, 15) + rng.sample(olds, 10):
        size = (expected / rel).stat().st_size
        for _ in range(5):
            offset = rng.randrange(size + 8192)  # sometimes past the end: the file grows
            _pwrite_both(rel, offset, rng.randbytes(rng.randrange(1, 20_000)), rw, expected)
    os.sync()
    trimmed_ranges = [r for rel in victims for r in _physical_ranges(rw / rel)]

    # Deletions: new files, old files, a whole old directory; then discard the freed blocks.
    for rel in [*victims, *rng.sample(olds, 8), "dir3"]:
        if (expected / rel).exists():
            _remove_both(rel, rw, expected)
    for root in (rw, expected):
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                if name != "lost+found":
                    os.utime(os.path.join(dirpath, name), (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)
    os.sync()
    out = subprocess.run(["fstrim", "-v", str(rw)], capture_output=True, text=True, check=True, timeout=120)
    assert re.search(r"\(([1-9][0-9]*) bytes\) trimmed", out.stdout), out.stdout
    umount(rw)
    loop_detach(loop, backing_file=device)

    blob = tmp_path / "top.blob"
    daemon.cli("commit", "rw", str(blob))
    daemon.cli("detach", "rw")
    assert daemon.status()["devices"] == {}

    # The discards reached the upper: the deleted files' blocks are zeroed extents of the new layer.
    source = FileSource(blob)
    try:
        zeroed = [(e.offset, e.end) for e in LayerReader(source).extents if e.data_offset is None]
        info = ChunkReader(source).info()
    finally:
        source.close()
    for a, b in trimmed_ranges:
        assert any(za <= a and b <= zb for za, zb in zeroed), f"{a}..{b} was not discarded"

    top_annotations = LayerAnnotations(
        info.index_digest, info.uncompressed_size, base.annotations.vsize, "ext4"
    )
    layout = tmp_path / "stacked"
    write_oci_layout(layout, [(base.blob, base.info, base.annotations), (blob, info, top_annotations)])
    ro = lab.mount_point("ro")
    daemon.cli("mount", str(layout), str(ro))
    _mounted_ro_ext4(ro)
    assert_same_tree(expected, ro)
    daemon.cli("umount", str(ro))


# -- 5. nothing leaks ------------------------------------------------------------------------------


def test_nothing_the_device_tests_made_is_left_behind() -> None:
    """Runs last in this module: no mount, loop device or process of any test above remains."""
    assert LEDGER.leaks() == []
