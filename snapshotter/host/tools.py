"""Running the host's tools (util-linux, e2fsprogs): one command, a deadline, one error type.

`run_tool` runs an argv list (no shell) with ``LC_ALL=C`` (messages we log and show are the same on
every host) and a timeout, and maps any failure to `MountError` with the command, its exit status and
its stderr: a missing command names the package to install; a command that does not finish in time is
killed — and one stuck in the kernel (D state, e.g. on a dead FUSE device), which cannot die, is
abandoned after a grace period rather than hanging the caller. An interrupt (Ctrl-C, SIGTERM) lets the
command finish first, so that what it did exists by the time the caller's cleanup looks for it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Mapping, Sequence

from ..errors import MountError

DEFAULT_TIMEOUT = 60.0
#: After a timeout the child is killed; a process stuck in the kernel (D state, e.g. on a dead FUSE
#: device) cannot die, so we wait this long for it and then abandon it rather than hang ourselves.
_KILL_GRACE = 5.0

#: Where each command comes from, for the "install it" remedy.
_PACKAGES = {
    "losetup": "util-linux (mount)",
    "mount": "util-linux (mount)",
    "umount": "util-linux (mount)",
    "mkfs.ext4": "e2fsprogs",
}


def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    timeout: float = DEFAULT_TIMEOUT,
    env: Mapping[str, str] | None = None,
    remedy: str = "check the path and the kernel log (dmesg)",
) -> str:
    """Run `argv` (no shell) and return its stdout; raise `MountError` on any failure.

    `what` completes "cannot ..." in the message. The child gets ``LC_ALL=C`` (messages we log and
    show are the same on every host) plus `env`.
    """
    argv = list(argv)
    full_env = {**os.environ, "LC_ALL": "C", **(env or {})}
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            encoding="utf-8",
            errors="replace",
        )
    except FileNotFoundError:
        pkg = _PACKAGES.get(argv[0], "the package that provides it")
        raise MountError(
            what, argv, None, f"{argv[0]}: command not found", f"install {pkg} and check PATH"
        ) from None
    except OSError as e:
        raise MountError(what, argv, None, f"{argv[0]}: {e.strerror or e}", remedy) from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except (KeyboardInterrupt, SystemExit):
        # Interrupted (Ctrl-C, SIGTERM): let the command finish — they are short — so that what it did
        # (a loop device attached, a mount made) exists by the time the caller's cleanup looks for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=timeout)
        raise
    except subprocess.TimeoutExpired:
        proc.kill()
        err = ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            _, err = proc.communicate(timeout=_KILL_GRACE)
        stuck = "" if proc.returncode is not None else " and could not be killed (stuck in the kernel)"
        raise MountError(
            what,
            argv,
            None,
            f"timed out after {timeout:g} s{stuck}" + (f"; it said: {err.strip()}" if err.strip() else ""),
            "a hung FUSE device or a dead network can block I/O; check `damselfly` device logs and dmesg",
        ) from None
    if proc.returncode != 0:
        raise MountError(what, argv, proc.returncode, err, remedy)
    return out
