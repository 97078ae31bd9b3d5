"""Security and bounded I/O of the device daemon (issue 11), tried the way an attacker and an unlucky
operator would: as the unprivileged user ``nobody`` (``setpriv``) against a root daemon, with a
registry that hangs (SIGSTOP), and with bytes flipped in the cache while the daemon was down.

Paths an unprivileged user must reach for a test to mean anything (a mount point, a bind mount of a
device file) live in a world-traversable directory under /tmp; everything is undone by exact path.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockformat.chunkfile import ChunkReader
from blockformat.layer import LayerWriter
from blockformat.source import FileSource
from p2p.registry import RegistryClient
from snapshotter.host.loop import loops_for
from snapshotter.host.mountinfo import find_mount
from snapshotter.image.blockimage import write_oci_layout
from tests.conftest import FAST_RETRY, FAST_TIMEOUTS
from tests.p2p.registry_server import RegistryServer
from tests.programs import euid_program

from .devd import DeviceDaemon, DeviceLab, MiB, TimedRead, build_image, push_layout, timed_read
from .test_blockimage import assert_same_tree

NOBODY = 65534
READ_TIMEOUT = 5.0


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[DeviceLab]:
    """Daemons, mount points and state in a directory every user may traverse (what /run or /mnt
    are), so that what keeps ``nobody`` out is our modes and mount options, not a parent directory."""
    if os.geteuid() != 0:
        pytest.fail("the security tests need root: FUSE, loop devices, mounts and setpriv")
    root = Path(tempfile.mkdtemp(prefix="dfly-sec-", dir="/tmp"))
    os.chmod(root, 0o755)
    lab = DeviceLab(root)
    try:
        yield lab
    finally:
        problems = lab.close()
        shutil.rmtree(root, ignore_errors=True)
    assert not problems, problems


def as_nobody(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `argv` as uid/gid 65534 with no supplementary groups."""
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def hostile_tree(root: Path, programs: Path) -> None:
    """An image a local user might mount: a setuid-root program, a world-writable device node of
    /dev/null's numbers, and a root-only secret."""
    root.mkdir(parents=True)
    (root / "euid").write_bytes(euid_program(programs))
    os.chmod(root / "euid", 0o4755)
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(root / "null", 0o666)
    (root / "secret").write_text("root's eyes only\n")
    os.chmod(root / "secret", 0o600)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# -- 1. writable devices: no write by anyone but root ----------------------------------------------


def test_a_non_root_user_cannot_write_or_read_a_device_even_with_a_path_to_it(
    lab: DeviceLab, tmp_path: Path
) -> None:
    image = build_image(_small_tree(tmp_path / "src"), tmp_path / "image")
    daemon = lab.daemon()
    upper = tmp_path / "upper"
    path = daemon.cli("attach", str(image.layout), "--upper", str(upper), "--name", "rw").stdout.strip()
    assert _mode(Path(path)) == 0o600 and os.stat(path).st_uid == 0
    # The state directory keeps nobody out by path; a bind mount opens a path to the file itself, so
    # what refuses below is the FUSE filesystem (default_permissions, modes, the uid check in OPEN).
    exposed = lab.root / "device"
    exposed.touch()
    lab.kernel.file_mount_point(exposed)
    subprocess.run(["mount", "--bind", path, str(exposed)], check=True)
    log_before = (upper / "upper.log").read_bytes()
    w = as_nobody("dd", "if=/dev/zero", f"of={exposed}", "bs=4096", "count=1", "conv=notrunc,fsync")
    assert w.returncode != 0 and "Permission denied" in w.stderr, w
    r = as_nobody("dd", f"if={exposed}", "of=/dev/null", "bs=4096", "count=1")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    assert (upper / "upper.log").read_bytes() == log_before  # nothing landed in the upper
    with open(exposed, "rb") as f:  # root still reads it
        assert len(f.read(4096)) == 4096
    subprocess.run(["umount", str(exposed)], check=True)
    daemon.cli("detach", "rw")


def _small_tree(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "hello").write_text("hello\n")
    (root / "data.bin").write_bytes(os.urandom(300_000))
    return root


# -- 2. mounted images: no setuid, no devices -------------------------------------------------------


def test_a_mounted_image_runs_no_setuid_program_and_opens_no_device_node(
    lab: DeviceLab, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    hostile_tree(src, tmp_path / "programs")
    image = build_image(src, tmp_path / "image")
    daemon = lab.daemon()
    mp = lab.mount_point("mnt")
    daemon.cli("mount", str(image.layout), str(mp))
    info = find_mount(mp)
    assert info is not None and {"ro", "nosuid", "nodev"} <= set(info.options), info
    ran = as_nobody(str(mp / "euid"))
    assert ran.returncode == 0 and ran.stdout == f"euid={NOBODY} uid={NOBODY}\n", ran
    wrote = as_nobody("sh", "-c", f"echo x > {mp / 'null'}")
    assert wrote.returncode != 0 and "Permission denied" in wrote.stderr, wrote
    read = as_nobody("cat", str(mp / "secret"))
    assert read.returncode != 0, read  # the image's own modes hold too
    daemon.cli("umount", str(mp))
    assert daemon.status()["devices"] == {}


def test_the_same_image_mounts_twice_and_a_failed_mount_leaves_no_device(
    lab: DeviceLab, tmp_path: Path
) -> None:
    image = build_image(_small_tree(tmp_path / "src"), tmp_path / "image")
    daemon = lab.daemon()
    a, b = lab.mount_point("a"), lab.mount_point("b")
    daemon.cli("mount", str(image.layout), str(a))
    daemon.cli("mount", str(image.layout), str(b))  # a second place: the same device
    assert (a / "hello").read_text() == (b / "hello").read_text() == "hello\n"
    (device,) = daemon.status()["devices"].values()
    assert len(loops_for(device["path"])) == 1
    daemon.cli("umount", str(a))
    assert (b / "hello").read_text() == "hello\n"  # the other mount keeps working
    daemon.cli("umount", str(b))
    assert daemon.status()["devices"] == {}
    # A mount that fails (something is already mounted there) detaches the device it attached.
    busy = lab.mount_point("busy")
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(busy)], check=True)
    failed = daemon.cli("mount", str(image.layout), str(busy), check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed
    assert daemon.status()["devices"] == {}
    subprocess.run(["umount", str(busy)], check=True)


def test_umount_after_the_daemon_died_removes_what_it_left(lab: DeviceLab, tmp_path: Path) -> None:
    image = build_image(_small_tree(tmp_path / "src"), tmp_path / "image")
    daemon = lab.daemon()
    mp = lab.mount_point("mnt")
    daemon.cli("mount", str(image.layout), str(mp))
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait(10)
    done = daemon.cli("umount", str(mp), check=False)
    assert done.returncode == 0, done
    assert find_mount(mp) is None
    assert find_mount(daemon.fuse_mountpoint) is None
    assert not os.path.exists(daemon.socket)
    assert not os.path.exists(daemon.state_dir / "devd.pid")
    again = lab.daemon()  # and a new daemon mounts it again
    again.cli("mount", str(image.layout), str(mp))
    assert (mp / "hello").read_text() == "hello\n"
    again.cli("umount", str(mp))


# -- 3. the state directory is root's alone ---------------------------------------------------------


def test_no_local_user_can_list_or_read_the_state_directory_devices_or_cache(
    lab: DeviceLab, registry: RegistryServer, pusher: RegistryClient, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    hostile_tree(src, tmp_path / "programs")
    image = build_image(src, tmp_path / "image")
    push_layout(pusher, "security/state", image.layout, "v1")
    state = lab.root / "state"
    (state / "cache").mkdir(parents=True)  # made by an earlier command with a lax umask
    for d in (state, state / "cache"):
        os.chmod(d, 0o755)
    daemon = lab.daemon(background_delay=0)
    mp = lab.mount_point("mnt")
    daemon.cli("mount", f"{registry.host}/security/state:v1", str(mp), "--plain-http")
    daemon.wait_complete(60)
    (name,) = daemon.status()["devices"]
    device = Path(daemon.fuse_mountpoint) / name
    for d in (state, state / "dev", state / "cache"):
        assert _mode(d) == 0o700, d
    assert _mode(device) == 0o400
    for dirpath, _dirs, files in os.walk(state / "cache"):
        assert _mode(Path(dirpath)) == 0o700, dirpath
        for f in files:
            assert _mode(Path(dirpath) / f) == 0o600, f
    assert _mode(Path(daemon.socket)) == 0o600
    for target in (state, state / "dev", state / "cache"):
        listed = as_nobody("ls", str(target))
        assert listed.returncode != 0 and "Permission denied" in listed.stderr, (target, listed)
    for target in (device, *(state / "cache").rglob("data")):
        read = as_nobody("cat", str(target))
        assert read.returncode != 0 and "Permission denied" in read.stderr, (target, read)
    dumped = as_nobody("debugfs", "-R", "cat /secret", str(device))
    assert "root's eyes only" not in dumped.stdout, dumped
    daemon.cli("umount", str(mp))


# -- 4. damage at rest is never served --------------------------------------------------------------


def test_bytes_flipped_in_a_sealed_cache_blob_while_the_daemon_was_down_are_never_served(
    lab: DeviceLab, registry: RegistryServer, pusher: RegistryClient, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"f{i}.bin").write_bytes(os.urandom(2 * MiB))
    image = build_image(src, tmp_path / "image")
    push_layout(pusher, "security/flip", image.layout, "v1")
    ref = f"{registry.host}/security/flip:v1"
    daemon = lab.daemon(background_delay=0)
    mp = lab.mount_point("mnt")
    daemon.cli("mount", ref, str(mp), "--plain-http")
    daemon.wait_complete(60)  # complete and sealed
    daemon.cli("umount", str(mp))
    lab.stop(daemon)

    # While no daemon runs, the disk flips one bit in every stored chunk of the cached blob.
    (data,) = (lab.root / "state" / "cache").rglob("data")
    chunks = ChunkReader(FileSource(image.blob), image.info.index_digest)
    with open(data, "r+b") as f:
        for i in range(chunks.chunk_count):
            start, n = chunks.chunk_range(i)
            if n:
                f.seek(start + n // 2)
                b = f.read(1)
                f.seek(start + n // 2)
                f.write(bytes([b[0] ^ 0x10]))

    daemon = lab.daemon(background_delay=3600)  # no re-verification in the background: reads find it
    daemon.cli("mount", ref, str(mp), "--plain-http")
    assert_same_tree(src, mp)  # every damaged chunk caught, forgotten and fetched again
    status = daemon.status()
    assert status["read_errors"] == 0
    (blob,) = status["blobs"].values()
    assert blob["repairs"] >= 1 and blob["upstream_bytes"] > 0
    daemon.cli("umount", str(mp))


# -- 5. a hung registry: bounded reads, no D state --------------------------------------------------


def test_a_hung_registry_fails_forty_readers_within_the_bound_while_a_cached_image_reads_at_once(
    lab: DeviceLab, tmp_path: Path
) -> None:
    hung = RegistryServer(name="security-hung")
    hung.start()
    try:
        _hung_registry(lab, hung, tmp_path)
    finally:
        if hung.proc is not None:
            os.kill(hung.proc.pid, signal.SIGCONT)
        hung.stop()


def _hung_registry(lab: DeviceLab, hung: RegistryServer, tmp_path: Path) -> None:
    with RegistryClient(hung.host, plain_http=True, retry=FAST_RETRY, timeouts=FAST_TIMEOUTS) as client:
        lazy_src = tmp_path / "lazy"
        lazy_src.mkdir()
        for i in range(40):
            (lazy_src / f"f{i:02d}").write_bytes(os.urandom(MiB))
        push_layout(client, "security/lazy", build_image(lazy_src, tmp_path / "lazy-image").layout, "v1")
        cached_src = _small_tree(tmp_path / "cached")
        push_layout(
            client, "security/cached", build_image(cached_src, tmp_path / "cached-image").layout, "v1"
        )
    cached_ref, lazy_ref = f"{hung.host}/security/cached:v1", f"{hung.host}/security/lazy:v1"
    lazy, cached = lab.mount_point("lazy"), lab.mount_point("cached")
    # A first daemon downloads the cached image completely; the second finds it so in its cache.
    first = lab.daemon(background_delay=0, unit_size=64 * 1024)
    first.cli("mount", cached_ref, str(cached), "--plain-http")
    first.wait_complete(60)
    first.cli("umount", str(cached))
    lab.stop(first)
    daemon = lab.daemon(read_timeout=READ_TIMEOUT, background_delay=3600, unit_size=64 * 1024)
    daemon.cli("mount", cached_ref, str(cached), "--plain-http")
    daemon.cli("mount", lazy_ref, str(lazy), "--plain-http")
    assert len([n for n in os.listdir(lazy) if n.startswith("f")]) == 40  # their data is not here
    blobs = daemon.status()["blobs"]
    assert sorted(b["complete"] for b in blobs.values()) == [False, True]

    assert hung.proc is not None
    os.kill(hung.proc.pid, signal.SIGSTOP)  # a hung network: connections open, nothing answers
    try:
        with concurrent.futures.ThreadPoolExecutor(41) as pool:
            lazy_reads = [
                pool.submit(timed_read, lazy / f"f{i:02d}", MiB // 2, 65536, READ_TIMEOUT + 60)
                for i in range(40)
            ]
            time.sleep(0.5)  # the lazy readers wait in the kernel and the daemon by now
            cached_read = timed_read(cached / "data.bin", 0, 300_000)
            results = [f.result() for f in lazy_reads]
        assert cached_read.ok and cached_read.nbytes == 300_000, cached_read
        assert cached_read.elapsed < 2.0, f"the cached image waited {cached_read.elapsed:.2f}s"
        assert all(not r.ok and r.errno == errno.EIO for r in results), results
        slowest = max(r.elapsed for r in results)
        print(
            f"40 readers of a hung registry: EIO within {slowest:.2f}s (read_timeout {READ_TIMEOUT}s); "
            f"the cached image read in {cached_read.elapsed:.3f}s"
        )
        assert slowest < READ_TIMEOUT + 5, f"a reader waited {slowest:.2f}s"
        assert not _in_d_state(lab.root), _in_d_state(lab.root)
    finally:
        os.kill(hung.proc.pid, signal.SIGCONT)
    got = _eventually(lambda: timed_read(lazy / "f07", MiB // 2, 65536), within=READ_TIMEOUT + 20)
    assert got.ok and got.nbytes == 65536, got
    assert (lazy / "f07").read_bytes() == (tmp_path / "lazy" / "f07").read_bytes()
    assert daemon.status()["read_fast_failures"] > 0  # the cool-down answered most of them at once
    daemon.cli("umount", str(lazy))
    daemon.cli("umount", str(cached))


def _in_d_state(root: Path) -> list[str]:
    """Processes in uninterruptible sleep that read below `root` or serve it (readers, the daemon)."""
    stuck = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state == b"D" and (str(root) in cmdline or "device-daemon" in cmdline):
            stuck.append(f"{name}: {cmdline}")
    return stuck


def _eventually(read: Callable[[], TimedRead], within: float) -> TimedRead:
    """`read` until it succeeds or `within` seconds passed; the last result."""
    deadline = time.monotonic() + within
    while True:
        r = read()
        if r.ok or time.monotonic() > deadline:
            return r
        time.sleep(0.5)


def test_a_state_directory_someone_else_made_open_is_taken_over(lab: DeviceLab) -> None:
    """A state directory another user owns and left open becomes root's, mode 0700, at start."""
    state = lab.root / "other"
    state.mkdir()
    os.chown(state, NOBODY, NOBODY)
    os.chmod(state, 0o777)
    daemon = DeviceDaemon(state)
    lab.daemons.append(daemon.start())
    st = os.stat(state)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


# -- 7. annotations are checked against the layer ---------------------------------------------------


def test_annotations_that_disagree_with_the_layer_are_refused_at_attach(
    lab: DeviceLab, tmp_path: Path
) -> None:
    image = build_image(_small_tree(tmp_path / "src"), tmp_path / "image")
    daemon = lab.daemon()
    wrong_vsize = dataclasses.replace(image.annotations, vsize=image.annotations.vsize * 2)
    write_oci_layout(tmp_path / "vsize", [(image.blob, image.info, wrong_vsize)])
    r = daemon.cli("attach", str(tmp_path / "vsize"), check=False)
    assert r.returncode == 1 and "virtual size" in r.stderr and "Traceback" not in r.stderr, r
    # A layer of zeros annotated as ext4: not an ext4, whatever the annotation says.
    blank = tmp_path / "blank.blob"
    with open(blank, "wb") as f:
        info = LayerWriter(f, image.annotations.vsize).close()
    ann = dataclasses.replace(image.annotations, index_digest=info.index_digest, size=info.blob_size)
    write_oci_layout(tmp_path / "blank", [(blank, info, ann)])
    r = daemon.cli("attach", str(tmp_path / "blank"), check=False)
    assert r.returncode == 1 and "no ext4 superblock" in r.stderr and "Traceback" not in r.stderr, r
    assert daemon.status()["devices"] == {}
