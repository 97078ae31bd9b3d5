"""The converter against containerd: a converted image, mounted lazily with ``damselfly mount``, has
the tree containerd's own overlayfs snapshotter makes of the original image (``ctr image pull`` and a
view of its chain) — content, type, mode, owners, mtimes, link targets, device numbers, hardlink groups
and xattrs — except that damselfly applies the ``trusted.*`` xattrs containerd 1.6 drops.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_OK
from tests import oci_images as oi
from tests import trees
from tests.p2p.registry_server import RegistryServer

from .containerd import Containerd, overlay_tree


@pytest.fixture
def lazy_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A mount point and a device-daemon state dir; unmounted and stopped at teardown."""
    mnt, state = tmp_path / "mnt", tmp_path / "state"
    mnt.mkdir()
    yield mnt, state
    CliRunner().invoke(cli, ["umount", str(mnt), "--state-dir", str(state)])
    CliRunner().invoke(cli, ["stop-daemon", "--state-dir", str(state)])


def convert_and_mount(src: str, dst: str, cache: Path, mnt: Path, state: Path) -> trees.Tree:
    r = CliRunner().invoke(
        cli, ["convert", "--quiet", src, dst, "--cache-dir", str(cache)], catch_exceptions=False
    )
    assert r.exit_code == EXIT_OK, r.output
    r = CliRunner().invoke(cli, ["mount", dst, str(mnt), "--state-dir", str(state), "--plain-http"])
    assert r.exit_code == EXIT_OK, r.output
    return trees.snapshot(mnt)


def test_converted_semantics_image_has_containerds_overlay_tree(
    containerd: Containerd, registry: RegistryServer, tmp_path: Path, lazy_mount: tuple[Path, Path]
) -> None:
    built = oi.write_layout(oi.semantics_image(), tmp_path / "layout")
    ref = oi.push_image(registry.host, built, f"e2e/convert-semantics-{os.getpid()}", "v1")
    want = overlay_tree(containerd, ref)

    dst = f"{registry.host}/e2e/convert-semantics-{os.getpid()}:damselfly"
    got = convert_and_mount(ref, dst, tmp_path / "cache", *lazy_mount)

    assert dict(got["xattrs/trusted"].xattrs)["trusted.damselfly"]  # applied, where containerd drops it
    trees.assert_same(want, got.without_xattrs("trusted."), what="containerd overlay vs damselfly convert")


def test_converted_hardlink_to_a_lower_layer_file_is_one_inode(
    registry: RegistryServer, tmp_path: Path, lazy_mount: tuple[Path, Path]
) -> None:
    # containerd 1.6's overlay applier cannot pull this image (see test_containerd_overlay.py); the
    # image-spec allows it, and the converted image keeps the link.
    built = oi.write_layout(oi.lower_hardlink_image(), tmp_path / "layout")
    ref = oi.push_image(registry.host, built, f"e2e/convert-lower-link-{os.getpid()}", "v1")
    dst = f"{registry.host}/e2e/convert-lower-link-{os.getpid()}:damselfly"
    got = convert_and_mount(ref, dst, tmp_path / "cache", *lazy_mount)
    assert frozenset({"data/target", "data/dir/link-to-lower"}) in got.hardlinks
    assert got["data/dir/link-to-lower"].sha256 == oi.sha256_digest(b"made by layer 1\n").removeprefix(
        "sha256:"
    )
