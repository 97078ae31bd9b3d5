"""The process umask, read without changing it, and the mode it gives files meant for everyone.

``os.umask`` can only read the mask by setting it; setting and restoring it is process-wide, so a thread
that creates a file in between gets the wrong mode. Linux (4.7 and later) shows the mask in
``/proc/self/status``, which is read instead; the set-and-restore fallback is for older kernels.

`shared_file_mode` is what ``cp`` or ``gzip`` would give a new file (``0666 & ~umask``): blobs and
layout documents that other users (a registry, skopeo) must be able to read, written through a temp
file whose own mode would otherwise be 0600 (`blockformat.durable.atomic_write` sets a mode exactly).
"""

from __future__ import annotations

import os


def current_umask() -> int:
    """This process's umask."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def shared_file_mode() -> int:
    """The mode of a new file that the umask lets everyone read: ``0666 & ~umask``."""
    return 0o666 & ~current_umask()
