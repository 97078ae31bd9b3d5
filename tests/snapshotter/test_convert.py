"""`damselfly convert`: real conversions (root, FUSE, loop devices, ext4), a real loopback registry.

What containerd itself makes of the same images is compared in tests/e2e/test_convert_containerd.py;
here: every way in and out (layout, registry, docker-save and OCI archives, multi-platform indexes),
determinism, layer reuse, hostile input with nothing published, and the not-root message.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from blockformat.annotations import KEY_REPOSITORY, MEDIA_TYPE_LAYER, LayerAnnotations
from p2p.registry import RegistryClient
from scripts.demolib.procs import attached_loops as _attached_loops
from scripts.demolib.procs import mount_points as _mount_points
from scripts.demolib.procs import processes_naming
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_ERROR, EXIT_OK
from snapshotter.convert.converter import NEEDS_ROOT, ConvertOptions, convert
from snapshotter.convert.layercache import LayerCache
from tests.oci_images import (
    HOSTILE,
    BuiltImage,
    Image,
    Layer,
    busybox_image,
    content,
    directory,
    file,
    hostile_image,
    push_layout,
    whiteout,
    write_index_layout,
    write_layout,
)
from tests.p2p.registry_server import RegistryServer

from .conftest import KernelResources, convert_then_sigterm


def run_convert(*args: str) -> Result:
    return CliRunner().invoke(cli, ["convert", "--quiet", *args], catch_exceptions=False)


def manifest_of(layout: Path, ref: str = "latest") -> dict[str, object]:
    index = json.loads((layout / "index.json").read_text())
    [entry] = [e for e in index["manifests"] if e["annotations"]["org.opencontainers.image.ref.name"] == ref]
    doc: dict[str, object] = json.loads((layout / "blobs" / "sha256" / entry["digest"][7:]).read_text())
    return doc


def config_of(layout: Path, manifest: dict[str, object]) -> dict[str, object]:
    desc = manifest["config"]
    assert isinstance(desc, dict)
    doc: dict[str, object] = json.loads((layout / "blobs" / "sha256" / desc["digest"][7:]).read_text())
    return doc


def base_layer() -> Layer:
    return Layer(
        (
            directory("usr"),
            directory("usr/lib"),
            file("usr/lib/big", content(3 << 20, 7), mode=0o644),
            file("usr/lib/gone", b"removed by the top layer\n"),
        ),
        created_by="ADD base /",
    )


def two_images(root: Path) -> tuple[BuiltImage, BuiltImage]:
    """Two images on the same two base layers (busybox + base), each with its own top layer."""
    a = busybox_image(base_layer(), Layer((file("app-a", b"a\n"), whiteout("usr/lib/gone"))))
    b = busybox_image(base_layer(), Layer((file("app-b", b"b\n"),)))
    return write_layout(a, root / "a"), write_layout(b, root / "b")


# -- layouts in and out, determinism, reuse ---------------------------------------------------------


def test_layout_to_layout_mounts_with_the_image_tree_and_keeps_the_config(
    kernel: KernelResources, tmp_path: Path
) -> None:
    src, _ = two_images(tmp_path / "src")
    out = tmp_path / "out"
    r = run_convert(str(src.layout), str(out), "--cache-dir", str(tmp_path / "cache"))
    assert r.exit_code == EXIT_OK, r.output
    manifest = manifest_of(out)
    layers = manifest["layers"]
    assert isinstance(layers, list) and len(layers) == 3
    config = config_of(out, manifest)
    old = json.loads(src.config)
    # rootfs follows the new layers; everything else (history, runtime config) is kept
    assert config["rootfs"] == {"type": "layers", "diff_ids": [x["digest"] for x in layers]}
    assert {k: v for k, v in config.items() if k != "rootfs"} == {
        k: v for k, v in old.items() if k != "rootfs"
    }
    for x in layers:
        assert x["mediaType"] == MEDIA_TYPE_LAYER
        ann = LayerAnnotations.from_dict(x["annotations"])
        assert ann is not None and ann.fstype == "ext4" and ann.vsize == 64 << 30
    # the original image is untouched
    assert manifest_of(src.layout) == json.loads(src.manifest)

    mnt = kernel.mount_point(tmp_path / "mnt")
    state = tmp_path / "state"
    try:
        r = CliRunner().invoke(cli, ["mount", str(out), str(mnt), "--state-dir", str(state)])
        assert r.exit_code == EXIT_OK, r.output
        assert (mnt / "usr/lib/big").read_bytes() == content(3 << 20, 7)
        assert (mnt / "app-a").read_bytes() == b"a\n"
        assert not (mnt / "usr/lib/gone").exists()
        assert not (mnt / "lost+found").exists()
        assert os.readlink(mnt / "bin/sh") == "busybox"
    finally:
        CliRunner().invoke(cli, ["umount", str(mnt), "--state-dir", str(state)])
        CliRunner().invoke(cli, ["stop-daemon", "--state-dir", str(state)])


def test_converting_twice_gives_the_same_manifest_digest(kernel: KernelResources, tmp_path: Path) -> None:
    src, _ = two_images(tmp_path / "src")
    digests = []
    for run in ("one", "two"):
        result = convert(
            str(src.layout), str(tmp_path / run), ConvertOptions(cache_dir=str(tmp_path / f"c-{run}"))
        )
        assert not any(x.reused for x in result.layers)
        digests.append(result.manifest_digest)
    assert digests[0] == digests[1]
    assert (tmp_path / "one" / "index.json").read_bytes() == (tmp_path / "two" / "index.json").read_bytes()


def test_the_digest_does_not_depend_on_the_disk_under_the_cache(
    kernel: KernelResources, tmp_path: Path
) -> None:
    """A loop device over a file on tmpfs is non-rotational; over this machine's disk, rotational (as on
    an HDD or a virtio disk). ext4's block allocator scans groups differently on the two unless the
    converter pins it (``mb_optimize_scan=0``); the difference shows once small files (the per-CPU
    preallocation path) fill more than a block group (128 MiB): 5,000 of up to 60 KB."""
    small = Layer(tuple(file(f"d/s{i}", b"x" * (i * 7919 % 60000)) for i in range(5000)))
    src = write_layout(busybox_image(Layer((directory("d"),)), small), tmp_path / "src")
    fast = kernel.mount_point(tmp_path / "tmpfs")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g,mode=0700", "tmpfs", str(fast)], check=True)
    digests = [
        convert(str(src.layout), str(tmp_path / name), ConvertOptions(cache_dir=str(where / "cache")))
        for name, where in (("on-disk", tmp_path), ("on-tmpfs", fast))
    ]
    assert [x.blob_digest for x in digests[0].layers] == [x.blob_digest for x in digests[1].layers]
    assert digests[0].manifest_digest == digests[1].manifest_digest


def test_a_second_image_on_the_same_base_converts_only_its_new_layer(
    kernel: KernelResources, tmp_path: Path
) -> None:
    a, b = two_images(tmp_path / "src")
    options = ConvertOptions(cache_dir=str(tmp_path / "cache"))
    first = convert(str(a.layout), str(tmp_path / "out-a"), options)
    second = convert(str(b.layout), str(tmp_path / "out-b"), options)
    assert [x.reused for x in first.layers] == [False, False, False]
    assert [x.reused for x in second.layers] == [True, True, False]
    assert [x.blob_digest for x in second.layers[:2]] == [x.blob_digest for x in first.layers[:2]]
    # other options shape other bytes: nothing is reused across codecs
    zstd = convert(
        str(b.layout), str(tmp_path / "out-z"), ConvertOptions(codec="zstd", cache_dir=options.cache_dir)
    )
    assert [x.reused for x in zstd.layers] == [False, False, False]


def test_the_cache_limit_evicts_the_least_recently_used_layers_when_a_conversion_ends(
    kernel: KernelResources, tmp_path: Path
) -> None:
    a, b = two_images(tmp_path / "src")
    cache = tmp_path / "cache"
    unbounded = ConvertOptions(cache_dir=str(cache), cache_limit=0)
    convert(str(a.layout), str(tmp_path / "out-a"), unbounded)
    second = convert(str(b.layout), str(tmp_path / "out-b"), unbounded)
    b_top = cache / "blobs" / second.layers[2].blob_digest.partition(":")[2]
    assert b_top.exists()
    full = LayerCache(str(cache), 0).usage()
    # a again, with room for less than both images: every layer of a reused (used now), and as the
    # conversion ends b's top layer, the least recently used, is evicted
    limit = full - 1
    again = convert(
        str(a.layout), str(tmp_path / "out-a2"), ConvertOptions(cache_dir=str(cache), cache_limit=limit)
    )
    assert [x.reused for x in again.layers] == [True, True, True]
    assert not b_top.exists()
    assert LayerCache(str(cache), 0).usage() <= limit
    r = run_convert(
        str(b.layout), str(tmp_path / "out-b2"), "--cache-dir", str(cache), "--cache-limit", str(limit)
    )
    assert r.exit_code == EXIT_OK, r.output
    assert "1 layers converted, 2 reused" in r.output
    assert LayerCache(str(cache), 0).usage() <= limit


# -- registries -------------------------------------------------------------------------------------


def test_registry_to_registry_then_mount_from_the_registry(
    kernel: KernelResources, tmp_path: Path, registry: RegistryServer, pusher: RegistryClient
) -> None:
    src, _ = two_images(tmp_path / "src")
    push_layout(pusher, "conv/src", src, "v1")
    r = run_convert(
        f"{registry.host}/conv/src:v1", f"{registry.host}/conv/dst:v1", "--cache-dir", str(tmp_path / "c")
    )
    assert r.exit_code == EXIT_OK, r.output
    manifest = pusher.get_manifest("conv/dst", "v1")
    assert [d.media_type for d in manifest.layers] == [MEDIA_TYPE_LAYER] * 3  # type: ignore[union-attr]
    ann = LayerAnnotations.from_dict(manifest.layers[0].annotations)  # type: ignore[union-attr]
    assert ann is not None and ann.repository == f"{registry.host}/conv/dst"

    mnt = kernel.mount_point(tmp_path / "mnt")
    state = tmp_path / "state"
    try:
        r = CliRunner().invoke(
            cli,
            ["mount", f"{registry.host}/conv/dst:v1", str(mnt), "--state-dir", str(state), "--plain-http"],
        )
        assert r.exit_code == EXIT_OK, r.output
        assert (mnt / "app-a").read_bytes() == b"a\n"
        assert (mnt / "usr/lib/big").read_bytes() == content(3 << 20, 7)
    finally:
        CliRunner().invoke(cli, ["umount", str(mnt), "--state-dir", str(state)])
        CliRunner().invoke(cli, ["stop-daemon", "--state-dir", str(state)])

    # registry in, layout out: the same blobs (only the repository annotation is the registry's)
    r = run_convert(f"{registry.host}/conv/src:v1", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"))
    assert r.exit_code == EXIT_OK, r.output
    layers = manifest_of(tmp_path / "out")["layers"]
    assert isinstance(layers, list)
    assert [x["digest"] for x in layers] == [d.digest for d in manifest.layers]  # type: ignore[union-attr]
    assert all(KEY_REPOSITORY not in x["annotations"] for x in layers)


def test_multi_platform_index_converts_the_chosen_platforms_into_an_index(
    kernel: KernelResources, tmp_path: Path
) -> None:
    amd = write_layout(busybox_image(), tmp_path / "src", "amd64")
    arm = write_layout(
        Image((*busybox_image().layers, Layer((file("arch", b"arm64\n"),))), architecture="arm64"),
        tmp_path / "src",
        "arm64",
    )
    write_index_layout([amd, arm], tmp_path / "src", "multi")
    cache = str(tmp_path / "cache")
    r = run_convert(
        f"{tmp_path / 'src'}:multi", str(tmp_path / "all"), "--platform", "all", "--cache-dir", cache
    )
    assert r.exit_code == EXIT_OK, r.output
    top = manifest_of(tmp_path / "all")
    assert top["mediaType"] == "application/vnd.oci.image.index.v1+json"
    entries = top["manifests"]
    assert isinstance(entries, list)
    assert sorted(e["platform"]["architecture"] for e in entries) == ["amd64", "arm64"]
    r = run_convert(
        f"{tmp_path / 'src'}:multi", str(tmp_path / "one"), "--platform", "linux/arm64", "--cache-dir", cache
    )
    assert r.exit_code == EXIT_OK, r.output
    [entry] = manifest_of(tmp_path / "one")["manifests"]  # type: ignore[misc]
    assert entry["platform"]["architecture"] == "arm64"


# -- archives -------------------------------------------------------------------------------------


def _tar_dir(src: Path, out: Path) -> None:
    with tarfile.open(out, "w") as tf:
        for path in sorted(src.rglob("*")):
            tf.add(path, str(path.relative_to(src)), recursive=False)


def _docker_save(built: BuiltImage, out: Path, tag: str) -> None:
    """What `docker save` writes (pre-OCI form): manifest.json naming the config and layer tars."""
    manifest = json.loads(built.manifest)
    with tarfile.open(out, "w") as tf:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        layers = []
        for i, desc in enumerate(manifest["layers"]):
            layers.append(f"layer{i}/layer.tar")
            add(layers[-1], built.blob(desc["digest"]).read_bytes())
        add("config.json", built.config)
        add(
            "manifest.json",
            json.dumps([{"Config": "config.json", "RepoTags": [tag], "Layers": layers}]).encode(),
        )


def test_oci_archive_and_docker_save_tarballs_convert_like_the_layout(
    kernel: KernelResources, tmp_path: Path
) -> None:
    src, _ = two_images(tmp_path / "src")
    cache = str(tmp_path / "cache")
    want = convert(str(src.layout), str(tmp_path / "from-layout"), ConvertOptions(cache_dir=cache))
    _tar_dir(src.layout, tmp_path / "oci.tar")
    _docker_save(src, tmp_path / "docker.tar", "example/app:1")
    for archive in ("oci.tar", "docker.tar"):
        r = run_convert(str(tmp_path / archive), str(tmp_path / f"out-{archive}"), "--cache-dir", cache)
        assert r.exit_code == EXIT_OK, r.output
        got = manifest_of(tmp_path / f"out-{archive}")
        assert [x["digest"] for x in got["layers"]] == [x.blob_digest for x in want.layers]  # type: ignore[attr-defined]


# -- refusals ---------------------------------------------------------------------------------------


def _registry_has(registry: RegistryServer, repository: str) -> bool:
    r = httpx.get(f"{registry.url}/v2/{repository}/tags/list", timeout=10)
    return r.status_code == 200 and bool(r.json().get("tags"))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_fails_naming_layer_and_entry_with_nothing_published(
    case: str, kernel: KernelResources, tmp_path: Path, registry: RegistryServer, pusher: RegistryClient
) -> None:
    bad = hostile_image(case, tmp_path / "src")
    cache = str(tmp_path / "cache")
    sources = [f"{bad.layout}:{bad.built.ref}"]
    if bad.pushable:
        push_layout(pusher, f"hostile/{case}-src", bad.built, "v1")
        sources.append(f"{registry.host}/hostile/{case}-src:v1")
    for i, src in enumerate(sources):
        out = tmp_path / f"out-{i}"
        r = CliRunner().invoke(cli, ["convert", "--quiet", src, str(out), "--cache-dir", cache])
        assert r.exit_code != EXIT_OK, r.output
        message = r.output
        for fragment in bad.fragments:
            assert fragment in message, (fragment, message)
        assert not out.exists()
        r = CliRunner().invoke(
            cli,
            ["convert", "--quiet", src, f"{registry.host}/hostile/{case}-dst-{i}:v1", "--cache-dir", cache],
        )
        assert r.exit_code != EXIT_OK, r.output
        assert not _registry_has(registry, f"hostile/{case}-dst-{i}")
    assert not any(Path(cache).glob("work-*")), "the work directory was left behind"
    assert not Path("/tmp/damselfly-escaped").exists()
    assert kernel.cleanup() == [], "a failed conversion left mounts or loop devices behind"
    assert not [m for m in _mount_points() if m.startswith(str(tmp_path))]


def test_not_root_gets_one_sentence_saying_why(tmp_path: Path) -> None:
    src = write_layout(busybox_image(), tmp_path / "src")
    os.chmod(tmp_path, 0o755)
    # The CLI (with the convert command: subcommands load lazily) is imported as root, then drops to
    # nobody: the venv may live where nobody can read (a root home is 0700 on Debian), and that is not
    # what this test is about.
    as_nobody = (
        "import os; from snapshotter.cli import cli, main; cli.get_command(None, 'convert'); "
        "os.setgroups([]); os.setgid(65534); os.setuid(65534); main()"
    )
    proc = subprocess.run(
        [
            *(sys.executable, "-c", as_nobody),
            *("convert", "--quiet", str(src.layout), str(tmp_path / "out")),
            *("--cache-dir", str(tmp_path / "cache")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == EXIT_ERROR, proc.stderr
    assert NEEDS_ROOT in proc.stderr
    assert "privileged CI job" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("delay", [0.0, 0.15])
def test_sigterm_mid_conversion_leaves_no_mount_loop_daemon_or_work_dir(delay: float, tmp_path: Path) -> None:
    # A cancelled CI job: the loop device and the mount of the layer being built, the image files and
    # the sealing thread are undone, and nothing is published. (The layer takes the converter ~1 s.)
    big = busybox_image(
        Layer(tuple(file(f"data/f{i:04d}", content(96 << 10, i)) for i in range(2000)), created_by="RUN big")
    )
    src = write_layout(big, tmp_path / "src")
    cache = tmp_path / "cache"
    code, out = convert_then_sigterm(
        [str(src.layout), str(tmp_path / "out"), "--cache-dir", str(cache)], delay
    )
    assert code != EXIT_OK, out
    assert not (tmp_path / "out").exists()
    assert not [m for m in _mount_points() if m.startswith(str(tmp_path))], out
    assert not list(cache.glob("work-*")), f"the work directory was left behind: {out}"
    assert not [d for d, backing in _attached_loops().items() if backing.startswith(str(tmp_path))]
    leftover = processes_naming(cache)
    assert not leftover, f"processes still running under {cache}: {leftover}"
