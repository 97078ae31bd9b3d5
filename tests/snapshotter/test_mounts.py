"""Loop devices, mkfs.ext4 and mounts against the real kernel; every test leaves nothing attached."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from snapshotter.errors import MountError
from snapshotter.host import loop
from snapshotter.host.loop import loop_attach, loop_detach, loop_info, loops_for
from snapshotter.host.mkfs import mkfs_ext4
from snapshotter.host.mountinfo import find_mount, is_mounted, mountinfo, parse_mountinfo
from snapshotter.host.mounts import mount, mount_loop, umount, umount_loop
from snapshotter.host.tools import run_tool

from .conftest import KernelResources

MiB = 1 << 20
UUID = "6e1f2d3c-0000-4000-8000-000000000001"
SEED = "6e1f2d3c-0000-4000-8000-000000000002"


def _sparse(path: Path, size: int = 16 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _features(image: Path) -> set[str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("Filesystem features:"))
    return set(line.split(":", 1)[1].split())


# -- mountinfo -----------------------------------------------------------------------------------


def test_parse_mountinfo_reads_optional_fields_and_octal_escapes() -> None:
    text = (
        b"36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 shared:7 - "
        b"ext3 /dev/root rw,errors=continue\n"
        b"37 36 7:3 / /a\\011b\\012c\\134d ro,relatime - ext4 /dev/loop3 ro,norecovery\n"
    )
    first, second = parse_mountinfo(text)
    assert (first.mount_id, first.parent_id, first.major, first.minor) == (36, 35, 98, 0)
    assert first.root == "/mnt1"
    assert first.mount_point == "/mnt/with space"
    assert first.options == ("rw", "noatime")
    assert first.optional == ("master:1", "shared:7")
    assert (first.fstype, first.source) == ("ext3", "/dev/root")
    assert first.super_options == ("rw", "errors=continue")
    assert not first.read_only
    assert second.mount_point == "/a\tb\nc\\d"
    assert second.optional == ()
    assert second.read_only
    assert second.super_options == ("ro", "norecovery")


def test_parse_mountinfo_rejects_a_garbled_line() -> None:
    with pytest.raises(MountError, match="line 1"):
        parse_mountinfo(b"36 35 98:0 /mnt1 /mnt rw no-separator-here\n")


def test_find_mount_sees_a_mount_point_with_spaces_tabs_newlines_and_backslashes(
    kernel: KernelResources, tmp_path: Path
) -> None:
    target = kernel.mount_point(tmp_path / "odd name\twith\nnewline\\and backslash")
    mount("damselfly-test-tmpfs", target, "tmpfs", ["size=1m", "mode=0700"])
    m = find_mount(target)
    assert m is not None
    assert m.mount_point == str(target)
    assert (m.fstype, m.source) == ("tmpfs", "damselfly-test-tmpfs")
    assert "size=1024k" in m.super_options
    assert any(x.mount_point == str(target) for x in mountinfo())
    umount(target)
    assert not is_mounted(target)


def test_find_mount_through_a_symlinked_parent(kernel: KernelResources, tmp_path: Path) -> None:
    target = kernel.mount_point(tmp_path / "real" / "mnt")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    mount("damselfly-test-tmpfs", tmp_path / "link" / "mnt", "tmpfs", ["size=1m"])
    assert is_mounted(target)
    assert find_mount(tmp_path / "link" / "mnt") == find_mount(target)
    umount(tmp_path / "link" / "mnt")
    assert not is_mounted(target)


# -- mount and umount ----------------------------------------------------------------------------


def test_mount_again_with_the_same_source_is_a_no_op(kernel: KernelResources, tmp_path: Path) -> None:
    target = kernel.mount_point(tmp_path / "mnt")
    mount("damselfly-test-tmpfs", target, "tmpfs", ["size=1m"])
    mount("damselfly-test-tmpfs", target, "tmpfs", ["size=1m"])
    assert [m.mount_point for m in mountinfo()].count(str(target)) == 1
    umount(target)


def test_mount_over_a_different_mount_is_refused(kernel: KernelResources, tmp_path: Path) -> None:
    target = kernel.mount_point(tmp_path / "mnt")
    mount("damselfly-test-tmpfs", target, "tmpfs", ["size=1m"])
    with pytest.raises(MountError, match="already has tmpfs damselfly-test-tmpfs mounted") as info:
        mount("damselfly-test-other", target, "tmpfs", ["size=1m"])
    assert "unmount it first" in str(info.value)
    with pytest.raises(MountError, match=r"\(rw\)"):
        mount("damselfly-test-tmpfs", target, "tmpfs", ["ro", "size=1m"])
    umount(target)


def test_mount_refuses_options_with_commas(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="contain a comma"):
        mount("x", tmp_path, "tmpfs", ["size=1m,mode=0700"])


def test_umount_of_something_not_mounted_is_fine(tmp_path: Path) -> None:
    umount(tmp_path)
    umount(tmp_path / "does-not-exist")
    umount_loop(tmp_path)


def test_umount_lazy_detaches_a_busy_mount(kernel: KernelResources, tmp_path: Path) -> None:
    target = kernel.mount_point(tmp_path / "mnt")
    mount("damselfly-test-tmpfs", target, "tmpfs", ["size=1m"])
    fd = os.open(target / "busy", os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        with pytest.raises(MountError, match="target is busy") as info:
            umount(target)
        assert info.value.returncode == 32
        assert "fuser" in str(info.value)
        umount(target, lazy=True)
        assert not is_mounted(target)
    finally:
        os.close(fd)


# -- loop devices --------------------------------------------------------------------------------


def test_loop_attach_read_only_then_detach_twice(kernel: KernelResources, tmp_path: Path) -> None:
    image = _sparse(tmp_path / "disk.img")
    dev = kernel.loop(loop_attach(image))
    info = loop_info(dev)
    assert info is not None
    assert (info.backing_file, info.read_only, info.offset, info.deleted) == (str(image), True, 0, False)
    assert loops_for(image) == [dev]
    loop_detach(dev, backing_file=image)
    assert loops_for(image) == []
    loop_detach(dev, backing_file=image)  # already detached (or the number reused by others): fine


def test_loop_attach_read_write_with_direct_io_and_4k_sectors(
    kernel: KernelResources, tmp_path: Path
) -> None:
    image = _sparse(tmp_path / "disk.img")
    dev = kernel.loop(loop_attach(image, read_only=False, direct_io=True, sector_size=4096))
    info = loop_info(dev)
    assert info is not None
    assert not info.read_only
    assert info.direct_io  # /tmp is ext4 here, which supports O_DIRECT
    name = dev.removeprefix("/dev/")
    assert Path(f"/sys/block/{name}/queue/logical_block_size").read_text().strip() == "4096"
    loop_detach(dev)


def test_loop_attach_reuse_returns_the_existing_device(kernel: KernelResources, tmp_path: Path) -> None:
    image = _sparse(tmp_path / "disk.img")
    dev = kernel.loop(loop_attach(image))
    assert loop_attach(image, reuse=True) == dev
    rw = kernel.loop(loop_attach(image, read_only=False, reuse=True))  # other mode: a new device
    assert rw != dev
    assert sorted(loops_for(image)) == sorted([dev, rw])
    loop_detach(rw)
    loop_detach(dev)


def test_loops_for_ignores_a_deleted_file_at_the_same_path(kernel: KernelResources, tmp_path: Path) -> None:
    image = _sparse(tmp_path / "disk.img")
    dev = kernel.loop(loop_attach(image))
    image.unlink()
    _sparse(image)
    assert loops_for(image) == []
    info = loop_info(dev)
    assert info is not None and info.deleted
    loop_detach(dev)


def test_loop_detach_leaves_a_device_bound_to_another_file_alone(
    kernel: KernelResources, tmp_path: Path
) -> None:
    mine, other = _sparse(tmp_path / "mine.img"), _sparse(tmp_path / "other.img")
    dev = kernel.loop(loop_attach(other))
    loop_detach(dev, backing_file=mine)  # as if `dev` had been ours and its number was reused
    assert loops_for(other) == [dev]
    loop_detach(dev, backing_file=other)
    assert loops_for(other) == []


def test_loop_attach_of_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="No such file or directory") as info:
        loop_attach(tmp_path / "missing.img")
    assert info.value.returncode == 1
    assert info.value.command[0] == "losetup"


def test_loop_attach_refuses_an_odd_sector_size(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="sector size 1000"):
        loop_attach(_sparse(tmp_path / "disk.img"), sector_size=1000)


def test_loop_detach_refuses_a_non_loop_device() -> None:
    with pytest.raises(MountError, match="pass a /dev/loopN path"):
        loop_detach("/dev/vda")


def test_loop_detach_of_a_device_that_never_existed_is_fine() -> None:
    loop_detach("/dev/loop987654")


def test_loop_detach_of_a_mounted_device_completes_at_umount(kernel: KernelResources, tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs_ext4(image, 16 * MiB)
    target = kernel.mount_point(tmp_path / "mnt")
    dev = mount_loop(image, target)
    loop_detach(dev)  # busy: the kernel marks it for autoclear instead
    assert is_mounted(target)
    umount(target)
    deadline = time.monotonic() + 5
    while loops_for(image) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert loops_for(image) == []


# -- mkfs.ext4 -----------------------------------------------------------------------------------


def test_mkfs_makes_a_sparse_journal_less_ext4(tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs_ext4(image, 256 * MiB, uuid=UUID, label="dfly-test")
    assert image.stat().st_size == 256 * MiB
    assert image.stat().st_blocks * 512 < 2 * MiB  # metadata only: inode tables are not written
    features = _features(image)
    assert "has_journal" not in features
    assert {"extent", "dir_index"} <= features
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    assert f"Filesystem UUID:          {UUID}" in out
    assert "Filesystem volume name:   dfly-test" in out
    assert "Reserved block count:     0" in out
    assert "Block size:               4096" in out


def test_mkfs_with_fixed_uuid_seed_and_time_is_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    for i in range(50):
        (src / "dir" / f"file{i}").write_bytes(os.urandom(i * 100))
    # mkfs -d copies atimes, and its own reads of the source update them (relatime) unless they lie in
    # the future, so pin them there; without this the images differ when the runs straddle a second.
    for p in [src, src / "dir", *(src / "dir").iterdir()]:
        os.utime(p, ns=(4_000_000_000 * 10**9, 1_600_000_000 * 10**9))
    digests = []
    for name in ("a.img", "b.img"):
        mkfs_ext4(tmp_path / name, 64 * MiB, uuid=UUID, hash_seed=SEED, fake_time=1_700_000_000, root_dir=src)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_mkfs_rejects_bad_arguments_before_touching_the_target(tmp_path: Path) -> None:
    with pytest.raises(MountError, match="is not a UUID"):
        mkfs_ext4(tmp_path / "a.img", 64 * MiB, uuid="not-a-uuid")
    with pytest.raises(MountError, match="not a positive multiple of 4096"):
        mkfs_ext4(tmp_path / "a.img", 64 * MiB + 1)
    with pytest.raises(MountError, match="longer than 16 bytes"):
        mkfs_ext4(tmp_path / "a.img", 64 * MiB, label="x" * 17)
    assert not (tmp_path / "a.img").exists()


def test_mkfs_failure_removes_the_file_it_created(tmp_path: Path) -> None:
    with pytest.raises(MountError) as info:
        mkfs_ext4(tmp_path / "a.img", 64 * MiB, root_dir=tmp_path / "missing")
    assert info.value.returncode not in (0, None)
    assert "missing" in info.value.stderr
    assert "missing" in str(info.value)
    assert not (tmp_path / "a.img").exists()


def test_a_tree_that_does_not_fit_fails_with_mkfs_s_reason(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(12 * MiB))
    with pytest.raises(MountError, match="Could not allocate block") as info:
        mkfs_ext4(tmp_path / "a.img", 8 * MiB, root_dir=src)
    assert "must hold the source tree" in str(info.value)
    assert not (tmp_path / "a.img").exists()


# -- combined helpers ----------------------------------------------------------------------------


def test_mount_loop_write_umount_and_remount_read_only(kernel: KernelResources, tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs_ext4(image, 64 * MiB)
    target = kernel.mount_point(tmp_path / "mnt")
    dev = mount_loop(image, target, options=["rw"])
    assert loop_info(dev) is not None and not loop_info(dev).read_only  # type: ignore[union-attr]
    (target / "hello").write_text("damselfly\n")
    umount_loop(target)
    assert not is_mounted(target)
    assert loops_for(image) == []

    dev = mount_loop(image, target)  # ro,noload
    m = find_mount(target)
    assert m is not None and m.read_only and m.source == dev and m.fstype == "ext4"
    assert "norecovery" in m.super_options  # noload
    assert (target / "hello").read_text() == "damselfly\n"
    with pytest.raises(OSError, match="Read-only file system"):
        (target / "new").write_text("x")
    umount_loop(target)
    assert loops_for(image) == []


def test_mount_loop_twice_is_one_mount_on_one_device(kernel: KernelResources, tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs_ext4(image, 64 * MiB)
    target = kernel.mount_point(tmp_path / "mnt")
    dev = mount_loop(image, target)
    assert mount_loop(image, target) == dev
    assert loops_for(image) == [dev]
    assert [m.mount_point for m in mountinfo()].count(str(target)) == 1
    umount_loop(target)
    umount_loop(target)
    assert loops_for(image) == []


def test_mount_loop_of_a_non_ext4_file_raises_and_leaves_no_loop_device(
    kernel: KernelResources, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(4 * MiB))
    target = kernel.mount_point(tmp_path / "mnt")
    with pytest.raises(MountError) as info:
        mount_loop(junk, target)
    err = info.value
    assert err.returncode == 32  # mount(8): mount failure
    assert "wrong fs type" in err.stderr
    assert "wrong fs type" in str(err) and str(target) in str(err) and "dmesg" in str(err)
    assert err.command[0] == "mount"
    assert loops_for(junk) == []
    assert not is_mounted(target)


def test_mount_loop_over_another_image_leaves_no_loop_device(kernel: KernelResources, tmp_path: Path) -> None:
    first, second = tmp_path / "a.img", tmp_path / "b.img"
    mkfs_ext4(first, 64 * MiB)
    mkfs_ext4(second, 64 * MiB)
    target = kernel.mount_point(tmp_path / "mnt")
    dev = mount_loop(first, target)
    with pytest.raises(MountError, match="already has ext4"):
        mount_loop(second, target)
    assert loops_for(second) == []
    assert find_mount(target) is not None and find_mount(target).source == dev  # type: ignore[union-attr]
    umount_loop(target)


def test_umount_loop_keeps_a_device_another_mount_still_uses(kernel: KernelResources, tmp_path: Path) -> None:
    image = tmp_path / "fs.img"
    mkfs_ext4(image, 64 * MiB)
    one = kernel.mount_point(tmp_path / "one")
    two = kernel.mount_point(tmp_path / "two")
    dev = mount_loop(image, one)
    mount(dev, two, "ext4", ["ro", "noload"])
    umount_loop(one)
    assert loops_for(image) == [dev]
    assert is_mounted(two)
    umount_loop(two)
    assert loops_for(image) == []


# -- running commands ----------------------------------------------------------------------------


def test_a_command_that_hangs_is_killed_after_its_timeout() -> None:
    start = time.monotonic()
    with pytest.raises(MountError, match=r"timed out after 0\.2 s") as info:
        run_tool(["sleep", "30"], what="wait", timeout=0.2)
    assert time.monotonic() - start < 5
    assert info.value.returncode is None
    assert "did not complete" in str(info.value)


def test_a_missing_command_names_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(loop, "LOSETUP", "damselfly-no-such-losetup")
    with pytest.raises(MountError, match="command not found") as info:
        loop_attach(_sparse(tmp_path / "disk.img"))
    assert "install" in str(info.value)
    assert info.value.returncode is None
