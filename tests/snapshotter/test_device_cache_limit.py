"""The device daemon with a cache limit smaller than its image (issue 15, "Done when"): the image, read
through FUSE, a loop device and ext4 from a real docker-registry, is equal to its source, read twice
(the second time with the kernel's page cache dropped, so the units the cache could not keep are
fetched again); the cache directory's size on disk (``du``) never exceeds the limit; the background
download stops in state ``cache-full``; and the blob held partial is logged once and counted in
`damselfly devices`.

Everything a test makes is undone by the `DeviceLab` (mounts, loop devices, the daemon by pid).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from p2p.registry import RegistryClient
from tests.p2p.registry_server import RegistryServer

from .devd import (
    LEDGER,
    DeviceDaemon,
    DeviceLab,
    MiB,
    build_image,
    drop_page_cache,
    make_big_tree,
    push_layout,
)
from .test_blockimage import assert_same_tree

LIMIT = 8 * MiB
UNIT = 64 << 10


def du(path: str) -> int:
    """``du --block-size=1 -s PATH``: bytes allocated to the tree."""
    out = subprocess.run(["du", "--block-size=1", "-s", path], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def _files(root: Path) -> list[Path]:
    return [Path(d) / f for d, _dirs, files in os.walk(root) for f in files]


def _wait_background(daemon: DeviceDaemon, state: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        st = daemon.status()
        (blob,) = st["blobs"].values()
        if blob.get("background") == state:
            return st
        assert time.monotonic() < deadline, f"background download not {state} after {timeout}s: {st}"
        time.sleep(0.2)


def test_an_image_larger_than_the_cache_limit_reads_back_equal_and_the_cache_stays_under_it(
    lab: DeviceLab, registry: RegistryServer, pusher: RegistryClient, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_big_tree(src, total=24 * MiB, files=6)  # incompressible: the blob is three times the limit
    image = build_image(src, tmp_path / "image")
    assert image.info.blob_size > 2 * LIMIT
    digest = push_layout(pusher, "limit/big", image.layout, "v1")
    assert digest
    daemon = lab.daemon(
        read_timeout=20.0,
        background_delay=0.5,
        unit_size=UNIT,
        extra_args=("--cache-limit", "8M"),
    )
    cache_dir = str(daemon.state_dir / "cache")
    mp = lab.mount_point("mnt")
    daemon.cli("mount", f"{registry.host}/limit/big:v1", str(mp), "--plain-http")

    st = _wait_background(daemon, "cache-full")  # the background download ran into the limit
    assert du(cache_dir) <= LIMIT
    ((blob_digest, blob),) = st["blobs"].items()
    assert blob["limit_partial"] and not blob["complete"]
    assert 0 < blob["present_units"] < blob["total_units"]

    assert_same_tree(src, mp)  # every file's bytes, read through the device
    assert du(cache_dir) <= LIMIT
    drop_page_cache(*_files(mp))
    device = Path(daemon.fuse_mountpoint) / next(iter(daemon.status()["devices"]))
    drop_page_cache(device)
    assert_same_tree(src, mp)  # again: what the cache could not keep comes from the registry again
    assert du(cache_dir) <= LIMIT

    cache = daemon.status()["cache"]
    assert cache["limit_bytes"] == LIMIT
    assert cache["usage_bytes"] <= LIMIT
    assert cache["limit_partial_blobs"] == [blob_digest]
    assert cache["limit_partial_total"] == 1
    assert cache["uncached_reads"] > 0 and cache["uncached_bytes"] > 0
    print(f"blob {image.info.blob_size} bytes, cache limit {LIMIT}, du {du(cache_dir)}: {cache}")
    log = daemon.log_path.read_text()
    held = [line for line in log.splitlines() if "stays partial" in line]
    assert len(held) == 1, held  # once for the blob, however many reads and background tries
    assert blob_digest in held[0] and "cache_limit" in held[0]

    daemon.cli("umount", str(mp))
    assert du(cache_dir) <= LIMIT


def test_a_state_directory_too_long_for_a_socket_path_still_serves(lab: DeviceLab) -> None:
    state = "state-" + "s" * 100
    daemon = lab.daemon(state=state)
    assert len(daemon.socket.encode()) > 107  # sockaddr_un holds 108 bytes with the NUL
    status = daemon.status()  # the CLI reaches it through /proc/self/fd
    assert status["devices"] == {}
    assert status["cache"]["dir"] == str(daemon.state_dir / "cache")


def test_nothing_the_cache_limit_tests_made_is_left_behind() -> None:
    assert LEDGER.leaks() == []
