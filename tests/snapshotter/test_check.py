"""`damselfly check SRC CONVERTED`: real conversions, real mounts, a real loopback registry.

Equal images pass (layouts and registries, a multi-layer and a multi-platform image, the semantics
image with every layer rule); a converted image of an altered source fails naming each path that
differs; bad arguments and unreachable images give a message and the table's exit code; nothing the
check made (mounts, loop devices, the private device daemon, the work directory) outlives it, also
when it is killed with SIGTERM midway. The wording of differences is tested on trees built by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from p2p.registry import RegistryClient
from scripts.demolib.procs import attached_loops, mount_points, processes_naming
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_DIFFERENT, EXIT_ERROR, EXIT_OK, EXIT_USAGE
from snapshotter.convert.check import NEEDS_ROOT, Difference, compare
from snapshotter.convert.treewalk import Node, Tree
from tests.oci_images import (
    Image,
    Layer,
    busybox_image,
    content,
    directory,
    file,
    hardlink,
    push_layout,
    semantics_image,
    sha256_digest,
    whiteout,
    write_index_layout,
    write_layout,
)
from tests.p2p.registry_server import RegistryServer

from .conftest import KernelResources

DAMSELFLY = Path(sys.executable).with_name("damselfly")


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def convert_to(src: str, dst: str, cache: Path) -> None:
    r = run("convert", "--quiet", src, dst, "--cache-dir", str(cache))
    assert r.exit_code == EXIT_OK, r.output


def check(kernel: KernelResources, src: str, converted: str, *args: str) -> Result:
    """`damselfly check`, then: nothing it made is left (work dir, mounts, loop devices)."""
    work = kernel.dir / "check-work"
    r = CliRunner().invoke(
        cli, ["check", "--quiet", src, converted, "--work-dir", str(work), *args], catch_exceptions=False
    )
    assert not list(work.iterdir()), "the work directory was left behind"
    assert kernel.cleanup() == [], "the check left mounts or loop devices behind"
    return r


def app_image(hello: bytes = b"hello\n", *, variant: bool = False) -> Image:
    """busybox plus two layers: files, a hardlink, xattrs, a whiteout of a lower file. With `variant`,
    the second layer differs in four ways (a missing file, a mode, an owner, an xattr)."""
    base = Layer(
        (
            directory("usr/bin"),
            file("usr/bin/x", b"#!/bin/sh\n", mode=0o755),
            file("usr/lib/data", content(1 << 20, 3)),
            file("usr/lib/gone", b"removed by the top layer\n"),
        ),
        created_by="ADD base /",
    )
    top = Layer(
        (
            file("etc/hello", hello),
            file("etc/conf", b"k=v\n", mode=0o600 if variant else 0o644),
            file("etc/owned", b"o\n", uid=1000 if variant else 0, gid=1000),
            file("etc/attr", b"a\n", xattrs={"user.k": b"changed" if variant else b"v"}),
            hardlink("etc/hello-link", "etc/hello"),
            whiteout("usr/lib/gone"),
            *((whiteout("usr/bin/x"),) if variant else ()),
        ),
        created_by="RUN app",
    )
    return busybox_image(base, top)


def assert_nothing_left(root: Path, work: Path) -> None:
    assert not [m for m in mount_points() if m.startswith(str(root))]
    assert not [d for d, backing in attached_loops().items() if backing.startswith(str(root))]
    if work.exists():
        assert not list(work.iterdir()), "the work directory was left behind"
    leftover = processes_naming(work)
    assert not leftover, f"processes still running under {work}: {leftover}"


# -- equal images ---------------------------------------------------------------------------------


def test_the_semantics_image_checks_equal(kernel: KernelResources, tmp_path: Path) -> None:
    src = write_layout(semantics_image(), tmp_path / "src")
    convert_to(str(src.layout), str(tmp_path / "out"), tmp_path / "cache")
    r = check(kernel, str(src.layout), str(tmp_path / "out"))
    assert r.exit_code == EXIT_OK, r.output
    [summary] = r.output.splitlines()
    assert summary.startswith(f"{tmp_path / 'out'} vs {src.layout} (linux/amd64): equal; ")
    # every entry, root included, both sides' files hashed (the 6 MiB big file at least twice)
    entries = int(summary.split("; ")[1].split()[0])
    assert entries > 100
    assert "MB hashed" in summary
    # the converted image as an OCI archive (its blobs copied out and checked, not read in place)
    archive = tmp_path / "out.tar"
    with tarfile.open(archive, "w") as tf:
        for path in sorted((tmp_path / "out").rglob("*")):
            tf.add(path, str(path.relative_to(tmp_path / "out")), recursive=False)
    r = check(kernel, str(src.layout), str(archive))
    assert r.exit_code == EXIT_OK, r.output
    assert f"{archive} vs {src.layout} (linux/amd64): equal; {entries} entries compared" in r.output


def test_a_multi_layer_image_in_a_registry_checks_equal(
    kernel: KernelResources, tmp_path: Path, registry: RegistryServer, pusher: RegistryClient
) -> None:
    built = write_layout(app_image(), tmp_path / "src")
    push_layout(pusher, "check/app", built, "v1")
    src, dst = f"{registry.host}/check/app:v1", f"{registry.host}/check/app:v1-damselfly"
    convert_to(src, dst, tmp_path / "cache")
    r = check(kernel, src, dst, "--plain-http")
    assert r.exit_code == EXIT_OK, r.output
    assert ": equal; " in r.output
    # the converted image from a registry against the source from its layout: the same answer
    r = check(kernel, str(built.layout), dst)
    assert r.exit_code == EXIT_OK, r.output


def test_every_platform_of_an_index_is_checked(kernel: KernelResources, tmp_path: Path) -> None:
    amd = write_layout(busybox_image(), tmp_path / "src", "amd64")
    arm = write_layout(
        Image((*busybox_image().layers, Layer((file("arch", b"arm64\n"),))), architecture="arm64"),
        tmp_path / "src",
        "arm64",
    )
    write_index_layout([amd, arm], tmp_path / "src", "multi")
    src = f"{tmp_path / 'src'}:multi"
    r = run(
        "convert",
        "--quiet",
        src,
        str(tmp_path / "out"),
        "--platform",
        "all",
        "--cache-dir",
        str(tmp_path / "c"),
    )
    assert r.exit_code == EXIT_OK, r.output
    r = check(kernel, src, str(tmp_path / "out"), "--platform", "all")
    assert r.exit_code == EXIT_OK, r.output
    assert "(linux/amd64, linux/arm64): equal; " in r.output
    # one platform against the other's conversion: each difference names its platform
    convert_to(str(amd.layout) + ":amd64", str(tmp_path / "amd-only"), tmp_path / "c")
    r = check(kernel, f"{src}", str(tmp_path / "amd-only"), "--platform", "linux/arm64")
    assert r.exit_code == EXIT_DIFFERENT, r.output
    assert "arch: missing in converted (file 0644 0:0" in r.output


# -- differences ----------------------------------------------------------------------------------


def test_a_converted_image_whose_one_file_was_altered_fails_naming_it(
    kernel: KernelResources, tmp_path: Path
) -> None:
    a = write_layout(app_image(b"hello\n"), tmp_path / "a")
    altered = write_layout(app_image(b"HELLO\n"), tmp_path / "a2")
    convert_to(str(altered.layout), str(tmp_path / "out"), tmp_path / "cache")
    r = check(kernel, str(a.layout), str(tmp_path / "out"))
    assert r.exit_code == EXIT_DIFFERENT, r.output
    want, got = sha256_digest(b"hello\n"), sha256_digest(b"HELLO\n")
    lines = r.output.splitlines()
    # the hardlink is the same inode: both names differ, nothing else does
    assert lines[:2] == [f"etc/hello: content {want} != {got}", f"etc/hello-link: content {want} != {got}"]
    assert ": 2 differences; " in lines[2] and len(lines) == 3
    # the arguments swapped
    r = check(kernel, str(tmp_path / "out"), str(a.layout))
    assert r.exit_code == EXIT_ERROR, r.output
    assert "is a damselfly image" in r.output and "SRC CONVERTED" in r.output


def test_missing_files_modes_owners_and_xattrs_are_named_up_to_the_limit(
    kernel: KernelResources, tmp_path: Path
) -> None:
    a = write_layout(app_image(), tmp_path / "a")
    variant = write_layout(app_image(variant=True), tmp_path / "a2")
    convert_to(str(variant.layout), str(tmp_path / "out"), tmp_path / "cache")
    r = check(kernel, str(a.layout), str(tmp_path / "out"))
    assert r.exit_code == EXIT_DIFFERENT, r.output
    assert r.output.splitlines()[:4] == [
        "etc/attr: xattr user.k b'v' != b'changed'",
        "etc/conf: mode 0644 != 0600",
        "etc/owned: owner 0:1000 != 1000:1000",
        "usr/bin/x: missing in converted (file 0755 0:0 "
        + sha256_digest(b"#!/bin/sh\n").removeprefix("sha256:")[:12]
        + ")",
    ]
    assert ": 4 differences; " in r.output
    r = check(kernel, str(a.layout), str(tmp_path / "out"), "--max-differences", "1")
    assert r.exit_code == EXIT_DIFFERENT, r.output
    assert r.output.splitlines()[:2] == [
        "etc/attr: xattr user.k b'v' != b'changed'",
        "... and 3 more differences",
    ]


# -- errors ---------------------------------------------------------------------------------------


def test_usage_errors_and_unusable_images_get_a_message_and_the_exit_code(
    kernel: KernelResources, tmp_path: Path
) -> None:
    r = CliRunner().invoke(cli, ["check", "only-one-argument"])
    assert r.exit_code == EXIT_USAGE
    assert "Missing argument 'CONVERTED'" in r.output
    r = CliRunner().invoke(cli, ["check", "a", "b", "--max-differences", "-1"])
    assert r.exit_code == EXIT_USAGE

    src = write_layout(busybox_image(), tmp_path / "src")
    # nothing listens on port 9 of loopback
    r = check(kernel, str(src.layout), "127.0.0.1:9/check/none:v1", "--plain-http")
    assert r.exit_code == EXIT_ERROR, r.output
    assert "damselfly: error:" in r.output and "127.0.0.1:9" in r.output
    r = check(kernel, str(tmp_path / "no-such-dir"), str(src.layout))
    assert r.exit_code == EXIT_ERROR, r.output
    assert "no-such-dir" in r.output and "does not exist" in r.output
    # the arguments swapped (or a CONVERTED that was never converted)
    r = check(kernel, str(src.layout), str(src.layout))
    assert r.exit_code == EXIT_ERROR, r.output
    assert "is not a damselfly layer" in r.output and "SRC CONVERTED" in r.output


def test_not_root_gets_one_sentence_saying_why(tmp_path: Path) -> None:
    src = write_layout(busybox_image(), tmp_path / "src")
    os.chmod(tmp_path, 0o755)
    as_nobody = (
        "import os; from snapshotter.cli import cli, main; cli.get_command(None, 'check'); "
        "os.setgroups([]); os.setgid(65534); os.setuid(65534); main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", as_nobody, "check", str(src.layout), str(src.layout)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == EXIT_ERROR, proc.stderr
    assert NEEDS_ROOT in proc.stderr


@pytest.mark.parametrize("when", ["applying source layer 2/2", "comparing"])
def test_sigterm_mid_check_leaves_no_mount_loop_daemon_or_work_dir(
    when: str, kernel: KernelResources, tmp_path: Path
) -> None:
    big = busybox_image(
        Layer(tuple(file(f"data/f{i:03d}", content(256 << 10, i)) for i in range(160)), created_by="RUN big")
    )
    src = write_layout(big, tmp_path / "src")
    convert_to(str(src.layout), str(tmp_path / "out"), tmp_path / "cache")
    work = tmp_path / "work"
    proc = subprocess.Popen(
        [str(DAMSELFLY), "check", str(src.layout), str(tmp_path / "out"), "--work-dir", str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if when in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != EXIT_OK, "".join(seen) + out
    assert_nothing_left(tmp_path, work)


# -- the wording, on trees built by hand ----------------------------------------------------------


def _tree(nodes: dict[str, Node], *links: frozenset[str]) -> Tree:
    return Tree(nodes, frozenset(links))


def test_differences_read_as_one_line_per_path_source_value_first() -> None:
    f = Node("file", 0o644, 0, 0, 5, 3, sha256="aa" * 32, xattrs=(("user.a", b"1"),))
    d = Node("dir", 0o755, 0, 0, 5, 0)
    want = _tree(
        {".": d, "a": f, "b": f, "dev": Node("char", 0o666, 0, 0, 5, 0, rdev=(1, 3)), "l": f, "gone": f},
        frozenset({"a", "b"}),
    )
    got = _tree(
        {
            ".": d,
            "a": Node("file", 0o4755, 1, 2, 6_000_000_001, 4, sha256="bb" * 32),
            "b": f,
            "dev": Node("char", 0o666, 0, 0, 5, 0, rdev=(1, 5)),
            "l": Node("symlink", 0o777, 0, 0, 5, 3, target="x"),
            "new": d,
        }
    )
    assert [str(x) for x in compare(want, got)] == [
        "a: mode 0644 != 4755; owner 0:0 != 1:2; mtime 1970-01-01T00:00:00.000000005Z != "
        "1970-01-01T00:00:06.000000001Z; size 3 != 4; content sha256:"
        + "aa" * 32
        + " != sha256:"
        + "bb" * 32
        + "; xattr user.a b'1' != (none)",
        "a: one inode with b in the source, not in converted",
        "dev: device 1:3 != 1:5",
        "gone: missing in converted (file 0644 0:0 aaaaaaaaaaaa)",
        "l: type file != symlink",
        "new: only in converted (dir 0755 0:0)",
    ]
    assert compare(want, want) == []
    assert Difference("etc/x", "what").__str__() == "etc/x: what"
