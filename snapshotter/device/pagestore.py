"""FUSE_NOTIFY_STORE: handing the kernel the bytes a small read decoded beyond what it asked for.

A small read (a 4 KiB O_DIRECT read through the loop device, a small file) costs the daemon a whole
chunk: fetched, checked, decompressed, and all but the asked-for pages thrown away. So for read-only
devices the read covers the whole window those chunks hold (`window`), the reply takes its part
(`hand_out`), and the rest goes into the kernel's page cache of the device file after the reply
(`store_pending`), where the next read of a neighbour finds it without a request. Every stored byte
comes out of the same checked read path as a reply, and a read-only device's bytes never change, so a
stored page is exactly what a later read would return.

Stores happen on request threads only (reads answered there: their bytes were local), never on the
I/O pool: a store waits for page locks that only an answered READ releases (see `store_pending`).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from blockformat.chunkfile import Part

from .fuseabi import NOTIFY_STORE, NOTIFY_STORE_OUT, OUT_HEADER

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE  # the page cache's unit: only whole pages are stored
#: Reads smaller than this hand the rest of their decoded chunks to the kernel. Larger ones are
#: readahead, which asks for the neighbours itself.
STORE_BELOW = 256 * 1024


class Windowed(Protocol):
    def chunk_window(self, offset: int, end: int) -> tuple[int, int]:
        """A range around [offset, end) whose bytes come with reading [offset, end) at no extra cost."""
        ...


@dataclass(frozen=True, slots=True)
class _Store:
    """What a read decoded beyond its reply: bytes [lo, start of the reply) and [end of it, ...)."""

    nodeid: int
    lo: int
    before: list[Part]
    end: int
    after: list[Part]


def split_parts(parts: list[Part], start: int, length: int) -> tuple[list[Part], list[Part], list[Part]]:
    """Cut a list of pieces into the bytes before `start`, the `length` bytes from it, and the rest."""
    out: tuple[list[Part], list[Part], list[Part]] = ([], [], [])
    cuts = (start, start + length)
    pos = 0
    for part in parts:
        n = len(part)
        a = 0
        for k, cut in enumerate(cuts):
            if a < n and pos + a < cut:
                b = min(n, cut - pos)
                out[k].append(part if a == 0 and b == n else memoryview(part)[a:b])
                a = b
        if a < n:
            out[2].append(part if a == 0 else memoryview(part)[a:])
        pos += n
    return out


class PageStore:
    """The stores of one FUSE connection (`fd`, served by `threads` request threads)."""

    def __init__(self, enabled: bool, threads: int, fd: Callable[[], int]) -> None:
        self.enabled = enabled
        self.threads = threads
        self._fd = fd
        self._pending = threading.local()  # .store: the store a request thread makes after its reply
        self._storing = 0  # request threads storing right now
        self._lock = threading.Lock()
        self.stores = 0  # FUSE_NOTIFY_STORE messages the kernel accepted
        self.skipped = 0  # windows not stored: every other request thread was storing

    def window(self, device: Windowed, offset: int, end: int, writable: bool) -> tuple[int, int]:
        """What to read for a READ of [offset, end): the whole chunk window of a small read of a
        read-only device (a writable device's page cache may hold newer pages than its reads return)."""
        if not self.enabled or end - offset >= STORE_BELOW or writable:
            return offset, end
        lo, hi = device.chunk_window(offset, end)
        # Whole pages only: the kernel marks a stored page up to date only when it gets all of it.
        return min(offset, -(-lo // PAGE) * PAGE), max(end, hi // PAGE * PAGE)

    def hand_out(self, nodeid: int, lo: int, offset: int, end: int, parts: list[Part]) -> list[Part]:
        """The reply's part of `parts` (the bytes of [lo, ...)); the rest is stored after the reply."""
        if not self.enabled or (lo == offset and sum(len(p) for p in parts) <= end - offset):
            return parts
        before, reply, after = split_parts(parts, offset - lo, end - offset)
        self._pending.store = _Store(nodeid, lo, before, end, after)
        return reply

    def store_pending(self) -> None:
        """Store what this request thread's last reply left over (called right after the reply).

        A store waits for the lock of each page it fills, and a page stays locked while a READ of it
        is in flight, which only a request thread can answer. So at least one request thread must
        always be free of stores: then every in-flight READ gets answered, its pages unlocked, and
        every store finishes. A thread stores only while fewer than `threads - 1` others do; otherwise
        the window is dropped (the kernel asks for those pages when it needs them)."""
        pending: _Store | None = getattr(self._pending, "store", None)
        if pending is None:
            return
        self._pending.store = None
        with self._lock:
            if self._storing >= self.threads - 1:
                self.skipped += 1
                return
            self._storing += 1
        try:
            for offset, parts in ((pending.lo, pending.before), (pending.end, pending.after)):
                if parts:
                    self._notify_store(pending.nodeid, offset, parts)
        finally:
            with self._lock:
                self._storing -= 1

    def _notify_store(self, nodeid: int, offset: int, parts: list[Part]) -> None:
        """Hand [offset, ...) to the kernel's page cache of the node (FUSE_NOTIFY_STORE)."""
        size = sum(len(p) for p in parts)
        head = OUT_HEADER.pack(OUT_HEADER.size + NOTIFY_STORE_OUT.size + size, NOTIFY_STORE, 0)
        try:
            os.writev(self._fd(), [head, NOTIFY_STORE_OUT.pack(nodeid, offset, size, 0), *parts])
            with self._lock:
                self.stores += 1
        except OSError as e:
            # ENOENT: the kernel holds no inode for the node (its file is not open): nothing to store.
            # ENODEV/EBADF: unmounted; the request loop notices on its next read.
            if e.errno not in (errno.ENOENT, errno.ENODEV, errno.EBADF):
                log.debug("FUSE_NOTIFY_STORE of %d bytes at %d failed: %s", size, offset, e)
