"""Reads through the FUSE device filesystem: what a small read hands to the page cache, and when not.

A real FUSE mount in this process (`BlockFS`), devices built from real layers in memory. The files are
opened with POSIX_FADV_RANDOM so the kernel reads exactly the pages asked for (no readahead): every
READ the daemon sees is one the test caused, and a page that needs none came from the page cache.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockformat.chunkfile import Part
from blockformat.layer import LayerReader
from blockformat.stack import Stack
from blockformat.upper import WritableUpper
from snapshotter.device.fuse import BlockFS
from snapshotter.device.manager import ImageDevice
from tests.conftest import Extents, layer_reader

from .conftest import KernelResources

VSIZE = 4 << 20
CHUNK = 65536
PAGE = 4096


class CountingDevice(ImageDevice):
    """An image device that counts the reads the filesystem asks of it (one per FUSE READ)."""

    reads = 0

    def read_parts(self, offset: int, length: int) -> list[Part]:
        self.reads += 1
        return super().read_parts(offset, length)


def _layer(extents: Extents) -> LayerReader:
    return layer_reader(extents, VSIZE, CHUNK)


def _data(seed: int, n: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(64) * 8 for _ in range(n // 512))


@pytest.fixture
def fs(kernel: KernelResources, tmp_path: Path) -> Iterator[BlockFS]:
    fs = BlockFS(read_timeout=10)
    fs.mount(str(kernel.mount_point(tmp_path / "dev")))
    try:
        fs.serve()
        yield fs
    finally:
        for name in list(fs.devices()):
            fs.detach(name)
        fs.unmount()


def _open_random(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: one READ per page asked for
    return fd


def _until(cond: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_small_read_hands_the_rest_of_its_chunk_to_the_page_cache(fs: BlockFS) -> None:
    stack = Stack([_layer([(0, _data(1, 1 << 20))])])
    dev = CountingDevice(stack, None)
    fd = _open_random(fs.attach("ro", dev))
    try:
        at = 3 * CHUNK + 5 * PAGE  # a page inside the fourth chunk
        assert os.pread(fd, PAGE, at) == stack.read(at, PAGE)
        assert dev.reads == 1
        _until(lambda: fs.stores >= 1)  # the store follows the reply
        for page in range(3 * CHUNK, 4 * CHUNK, PAGE):
            assert os.pread(fd, PAGE, page) == stack.read(page, PAGE)
        assert dev.reads == 1  # the other 15 pages came from the page cache
        # The next chunk was not decoded, so it was not stored either.
        assert os.pread(fd, PAGE, 4 * CHUNK) == stack.read(4 * CHUNK, PAGE)
        assert dev.reads == 2
    finally:
        os.close(fd)


def test_stored_pages_are_the_devices_bytes_across_layers_holes_and_zeroed_ranges(fs: BlockFS) -> None:
    lower = _layer([(0, _data(2, 600 * 1024)), (1 << 20, _data(3, 300 * 1024))])
    # The upper's extents start and end inside the lower's chunks, and zero a range.
    upper = _layer([(20480, _data(4, 40 * 1024)), (200704, 12288), (1 << 20 | 8192, _data(5, 4096))])
    stack = Stack([lower, upper])
    dev = CountingDevice(stack, None)
    fd = _open_random(fs.attach("layers", dev))
    try:
        pages = list(range(0, 2 << 20, PAGE))
        random.Random(6).shuffle(pages)
        for page in pages:
            assert os.pread(fd, PAGE, page) == stack.read(page, PAGE), f"page at {page}"
        assert fs.stores > 0
        # Holes and zeroed ranges cost no decoding and are not stored; each of their pages is a READ.
        data = {
            p for seg in stack.map if seg.source >= 0 for p in range(seg.start // PAGE * PAGE, seg.end, PAGE)
        }
        assert dev.reads < len(pages) - len(data) + len(data) // 4
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, 2 << 20, 0) == stack.read(0, 2 << 20)
    finally:
        os.close(fd)


def test_a_writable_device_stores_nothing(fs: BlockFS, tmp_path: Path) -> None:
    # Its page cache may hold pages newer than what a read of the device returns until writeback.
    stack = Stack([_layer([(0, _data(7, 256 * 1024))])])
    upper = WritableUpper.create(str(tmp_path / "upper"), VSIZE, stack)
    dev = CountingDevice(stack, upper)
    fd = _open_random(fs.attach("rw", dev))
    try:
        assert os.pread(fd, PAGE, CHUNK + PAGE) == stack.read(CHUNK + PAGE, PAGE)
        assert os.pread(fd, PAGE, CHUNK + 2 * PAGE) == stack.read(CHUNK + 2 * PAGE, PAGE)
        assert dev.reads == 2
        assert fs.stores == 0
    finally:
        os.close(fd)
        upper.close()


def test_one_request_thread_never_stores(kernel: KernelResources, tmp_path: Path) -> None:
    # A store waits for page locks that only a request thread can release: one thread must stay free.
    fs = BlockFS(read_timeout=10, threads=1)
    fs.mount(str(kernel.mount_point(tmp_path / "dev")))
    try:
        fs.serve()
        stack = Stack([_layer([(0, _data(8, 256 * 1024))])])
        fd = _open_random(fs.attach("one", CountingDevice(stack, None)))
        try:
            assert os.pread(fd, PAGE, PAGE) == stack.read(PAGE, PAGE)
        finally:
            os.close(fd)
        assert fs.stores == 0 and fs.stores_skipped == 1
        fs.detach("one")
    finally:
        fs.unmount()


def test_the_device_files_get_the_configured_readahead(fs: BlockFS) -> None:
    assert fs.mountpoint is not None
    st = os.stat(fs.mountpoint)
    with open(f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb") as f:
        assert int(f.read()) == fs.readahead_kb
