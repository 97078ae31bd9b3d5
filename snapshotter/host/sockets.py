"""Unix sockets that are never reachable by anyone but root, not even for an instant.

A socket file takes its mode from the umask when it is bound, and a server listens from then on: a
chmod afterwards leaves a window in which any local user may connect (and changing the umask is
process-wide, which a threaded daemon cannot do safely). So the socket is bound inside a fresh
directory of mode 0700 next to its final path, made 0600 there, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

SOCKET_MODE = 0o600


@contextlib.contextmanager
def bind_privately(path: str) -> Iterator[str]:
    """Yield a path to bind the socket at; afterwards the bound socket is mode 0600 at `path`.

    A stale socket file at `path` is replaced. The directory of `path` is created 0700 if missing
    (an existing one keeps its mode: it may be shared, such as /run)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    private = tempfile.mkdtemp(prefix=".bind-", dir=directory)  # mode 0700
    tmp = os.path.join(private, "socket")
    fd = os.open(private, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        # Bound through /proc/self/fd: a short path whatever the directory's (sun_path holds 108 bytes).
        yield f"/proc/self/fd/{fd}/socket"
        os.chmod(tmp, SOCKET_MODE)
        # No fsync of the directory: a socket lives only while its server runs, and a reboot that
        # lost the rename also lost the server; the next start binds afresh.
        os.replace(tmp, path)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.rmdir(private)
