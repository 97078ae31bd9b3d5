"""`damselfly convert --jobs N`: the platforms of an index converted side by side, for real (root, loop
devices, ext4), giving what converting them one by one gives: the same index digest and blobs, the same
error when a platform is bad, nothing published then, and nothing left behind — after a failure or a
SIGTERM; a registry read by both at once; a layer's unmount undisturbed by the processes the other
platforms start. The ordering rules themselves (which failure wins, who is stopped) are `test_fanout`'s.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, cast

import pytest
from click.testing import CliRunner

from p2p.manifest import Manifest
from p2p.registry import RegistryClient
from scripts.demolib.procs import attached_loops, mount_points, processes_naming
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_OK
from snapshotter.convert.converter import ConvertOptions, convert
from snapshotter.convert.sources import open_source
from snapshotter.errors import LayerError
from tests.oci_images import (
    MT_INDEX,
    BuiltImage,
    Image,
    Layer,
    busybox_image,
    content,
    directory,
    file,
    push_layout,
    whiteout,
    write_index_layout,
    write_layout,
)
from tests.p2p.registry_server import RegistryServer

from .conftest import KernelResources, convert_then_sigterm


def _small_files(prefix: str, n: int, seed: int) -> tuple[Any, ...]:
    """`n` files of 1 to 12 KiB in a few directories: what ext4 allocates from its per-CPU small-file
    groups (the reason the applier is pinned), so a platform converted on another CPU would show it."""
    dirs = [f"{prefix}/d{k}" for k in range(4)]
    return (
        directory(prefix),
        *(directory(d) for d in dirs),
        *(
            file(f"{dirs[i % 4]}/f{i:03d}", content(1024 * (1 + (i * 7 + seed) % 12), seed * 1000 + i))
            for i in range(n)
        ),
    )


def two_platform_index(root: Path, *, big: int = 0) -> tuple[BuiltImage, BuiltImage]:
    """linux/amd64 and linux/arm64 on the same busybox bottom layer (one layer cache key for both),
    each with layers of its own; `big` files of 96 KiB more in each top layer."""
    amd = write_layout(
        Image(
            (
                *busybox_image().layers,
                Layer(_small_files("app", 300, 1)),
                Layer(
                    (
                        whiteout("app/d0/f000"),
                        *(file(f"data/a{i:04d}", content(96 << 10, i)) for i in range(big)),
                    )
                ),
            ),
            architecture="amd64",
        ),
        root,
        "amd64",
    )
    arm = write_layout(
        Image(
            (
                *busybox_image().layers,
                Layer(
                    (
                        *_small_files("opt", 250, 2),
                        file("opt/big", content(2 << 20, 9)),
                        *(file(f"data/b{i:04d}", content(96 << 10, 50_000 + i)) for i in range(big)),
                    )
                ),
            ),
            architecture="arm64",
        ),
        root,
        "arm64",
    )
    write_index_layout([amd, arm], root, "multi")
    return amd, arm


def _corrupt(built: BuiltImage, index: int) -> str:
    """Spoil layer `index`'s blob in place (its gzip trailer: it still inflates); returns its digest."""
    layer = built.layers[index]
    blob = bytearray(layer.path.read_bytes())
    blob[-9] ^= 0xFF
    layer.path.write_bytes(bytes(blob))
    return layer.digest


def _published(layout: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (layout / "blobs" / "sha256").iterdir()}


def _nothing_left(root: Path, cache: Path) -> None:
    assert not list(cache.glob("work-*")), "the work directory was left behind"
    assert not [m for m in mount_points() if m.startswith(str(root))]
    assert not [d for d, backing in attached_loops().items() if backing.startswith(str(root))]


def test_two_platforms_side_by_side_give_the_index_one_by_one_gives(
    kernel: KernelResources, tmp_path: Path
) -> None:
    two_platform_index(tmp_path / "src")
    src = f"{tmp_path / 'src'}:multi"
    results = {}
    events: list[tuple[str, str]] = []
    for jobs in (1, 2):
        results[jobs] = convert(
            src,
            str(tmp_path / f"out-{jobs}"),
            # A cache each: the second run must build every layer again, not reuse the first's.
            ConvertOptions(platforms=("all",), cache_dir=str(tmp_path / f"cache-{jobs}"), jobs=jobs),
            progress=(lambda e, label, v: events.append((e, label))) if jobs == 2 else None,
        )
    one, two = results[1], results[2]
    assert two.manifest_digest == one.manifest_digest
    assert [p.platform for p in two.platforms] == [p.platform for p in one.platforms]
    assert [p.platform for p in one.platforms] == ["linux/amd64", "linux/arm64"]
    assert [x.blob_digest for x in two.layers] == [x.blob_digest for x in one.layers]
    assert _published(tmp_path / "out-2") == _published(tmp_path / "out-1")
    assert (tmp_path / "out-2" / "index.json").read_bytes() == (
        tmp_path / "out-1" / "index.json"
    ).read_bytes()
    # Side by side indeed: both platforms started before either finished a layer.
    first_done = next(i for i, (e, _) in enumerate(events) if e == "done")
    started = {label.split(" ")[0] for e, label in events[:first_done] if e == "start"}
    assert started == {"linux/amd64", "linux/arm64"}, events
    # The shared bottom layer, built by both at once, is in the cache once, whole.
    cache = tmp_path / "cache-2"
    assert sorted(p.name for p in (cache / "blobs").iterdir()) == sorted(
        {x.blob_digest.partition(":")[2] for x in two.layers}
    )
    assert not [p for p in (cache / "layers").iterdir() if not p.name.endswith(".json")]
    assert len(list((cache / "layers").iterdir())) == len({x.blob_digest for x in two.layers})
    _nothing_left(tmp_path, cache)


def test_two_platforms_from_a_registry_side_by_side_give_what_one_by_one_gives(
    kernel: KernelResources, tmp_path: Path, registry: RegistryServer, pusher: RegistryClient
) -> None:
    # One registry client downloads both platforms' layers at once (each into a spool file of its own).
    amd, arm = two_platform_index(tmp_path / "src")
    for built in (amd, arm):
        push_layout(pusher, "parallel/src", built, None)
    index = json.loads((tmp_path / "src" / "index.json").read_text())
    [entry] = [
        e for e in index["manifests"] if e["annotations"]["org.opencontainers.image.ref.name"] == "multi"
    ]
    raw = (tmp_path / "src" / "blobs" / "sha256" / entry["digest"][7:]).read_bytes()
    pusher.push_manifest("parallel/src", raw, MT_INDEX, "multi")
    digests = {}
    for jobs in (1, 2):
        result = convert(
            f"{registry.host}/parallel/src:multi",
            str(tmp_path / f"out-{jobs}"),
            ConvertOptions(platforms=("all",), cache_dir=str(tmp_path / f"cache-{jobs}"), jobs=jobs),
        )
        digests[jobs] = result.manifest_digest
        _nothing_left(tmp_path, tmp_path / f"cache-{jobs}")
    assert digests[2] == digests[1]
    assert _published(tmp_path / "out-2") == _published(tmp_path / "out-1")


def test_a_stopped_platform_gives_up_its_registry_download(
    tmp_path: Path, registry: RegistryServer, pusher: RegistryClient
) -> None:
    # A platform converting beside others downloads in a thread no signal reaches: its stop event is
    # what ends the download (at the next piece written), leaving no spool file behind.
    built = write_layout(busybox_image(), tmp_path / "src")
    push_layout(pusher, "parallel/stop", built, "v1")
    spool = tmp_path / "spool"
    spool.mkdir()
    source = open_source(f"{registry.host}/parallel/stop:v1", plain_http=None, spool_dir=str(spool))
    try:
        manifest = source.top().doc
        assert isinstance(manifest, Manifest)
        desc = manifest.layers[0]
        stop = threading.Event()
        with source.open_layer(desc, "0", stop) as blob:  # not stopped: the whole verified blob
            blob.drain()
            assert blob.verified
        stop.set()
        with (
            pytest.raises(LayerError, match="the conversion was interrupted"),
            source.open_layer(desc, "0", stop),
        ):
            pass
    finally:
        source.close()
    assert list(spool.iterdir()) == []


def test_a_process_forked_while_a_layer_is_applied_does_not_fail_its_unmount(
    kernel: KernelResources, tmp_path: Path
) -> None:
    # What other platforms do all the time (losetup, mount, umount): a child forked while a layer is
    # applied holds copies of the builder's descriptors in the mounted filesystem (the writeback
    # thread's, at least) until it closes them before exec. Here the child keeps them 0.5 s, across the
    # layer's unmount: forked once 90% of the 32 MiB layer's blob was read (the read-ahead holds 8 MiB
    # of tar, so the layer is being applied then, and ends well within those 0.5 s).
    top = Layer(tuple(file(f"data/m{i:02d}", content(1 << 20, 70 + i)) for i in range(32)))
    src = write_layout(busybox_image(top), tmp_path / "src")
    children: list[int] = []
    total, read = 0, 0

    def fork_once(event: str, label: str, value: object) -> None:
        nonlocal total, read
        if "layer 2/2" not in label or children:
            return
        if event == "start":
            total = cast(int, value)
        elif event == "advance":
            read += cast(int, value)
            if read >= 0.9 * total:
                pid = os.fork()
                if pid == 0:
                    time.sleep(0.5)
                    os._exit(0)
                children.append(pid)

    try:
        convert(
            str(src.layout),
            str(tmp_path / "out"),
            ConvertOptions(cache_dir=str(tmp_path / "cache")),
            fork_once,
        )
    finally:
        for pid in children:
            os.waitpid(pid, 0)
    assert children
    _nothing_left(tmp_path, tmp_path / "cache")


@pytest.mark.parametrize("bad", ["amd64", "arm64"])
def test_a_bad_layer_in_one_platform_fails_like_one_by_one_and_publishes_nothing(
    bad: str, kernel: KernelResources, tmp_path: Path
) -> None:
    # The other platform has a layer that takes a while: it is still converting when the bad one fails
    # (stopped if it comes after it in the index, converted to its end if it comes before).
    amd, arm = two_platform_index(tmp_path / "src", big=300)
    digest = _corrupt(amd, 1) if bad == "amd64" else _corrupt(arm, 1)
    outputs = {}
    for jobs in ("1", "2"):
        cache = tmp_path / f"cache-{jobs}"
        out = tmp_path / f"out-{jobs}"
        r = CliRunner().invoke(
            cli,
            [
                *("convert", "--quiet", f"{tmp_path / 'src'}:multi", str(out)),
                *("--platform", "all", "--jobs", jobs, "--cache-dir", str(cache)),
            ],
        )
        assert r.exit_code != EXIT_OK, r.output
        assert digest in r.output, r.output
        assert not out.exists(), "a failed conversion published something"
        _nothing_left(tmp_path, cache)
        outputs[jobs] = (r.exit_code, r.output)
    assert outputs["2"] == outputs["1"]
    assert kernel.cleanup() == [], "a failed conversion left mounts or loop devices behind"


def test_sigterm_while_two_platforms_convert_leaves_nothing_behind(tmp_path: Path) -> None:
    two_platform_index(tmp_path / "src", big=1500)
    cache = tmp_path / "cache"
    code, out = convert_then_sigterm(
        [
            *(f"{tmp_path / 'src'}:multi", str(tmp_path / "out")),
            *("--platform", "all", "--jobs", "2", "--cache-dir", str(cache)),
        ],
        0.1,
    )
    assert code != EXIT_OK, out
    assert not (tmp_path / "out").exists()
    _nothing_left(tmp_path, cache)
    leftover = processes_naming(cache)
    assert not leftover, f"processes still running under {cache}: {leftover}"
