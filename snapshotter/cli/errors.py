"""Mapping errors to CLI messages and exit codes: one table for every subcommand."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from blockformat.errors import (
    BlockFormatError,
    CorruptBlobError,
    InvalidArgumentError,
    UnsupportedFormatError,
)
from p2p.errors import (
    DigestMismatchError,
    InvalidReferenceError,
    P2PError,
    UnsupportedMediaTypeError,
)
from snapshotter.errors import ControlError, SnapshotterError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CORRUPT = 3
EXIT_UNSUPPORTED = 4
#: `damselfly check`: the converted image's tree differs from the source's (not an error of the check).
EXIT_DIFFERENT = 5

#: Most specific class first.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (CorruptBlobError, EXIT_CORRUPT),
    (DigestMismatchError, EXIT_CORRUPT),  # a registry, mirror or proxy served wrong bytes
    (UnsupportedFormatError, EXIT_UNSUPPORTED),
    (UnsupportedMediaTypeError, EXIT_UNSUPPORTED),  # e.g. a Docker schema 1 manifest
    (InvalidArgumentError, EXIT_USAGE),
    (InvalidReferenceError, EXIT_USAGE),
    (BlockFormatError, EXIT_ERROR),
    (P2PError, EXIT_ERROR),  # registry unreachable, not found, auth refused, ...
    (SnapshotterError, EXIT_ERROR),  # mounts, devices, images, the device daemon
    (OSError, EXIT_ERROR),
)


def _subclasses(cls: type[BaseException]) -> list[type[BaseException]]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


P = ParamSpec("P")
R = TypeVar("R")


def exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, ControlError):  # raised in the device daemon: its class came by name
        return _BY_NAME.get(exc.kind, EXIT_ERROR)
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return EXIT_ERROR


#: An error the device daemon relays by class name (`ControlError.kind`): the code its class has here,
#: through its subclasses too (e.g. a registry's wrong bytes, `DigestMismatchError`, while resolving).
_BY_NAME = {sub.__name__: code for cls, code in reversed(EXIT_CODES) for sub in (cls, *_subclasses(cls))}


def reports_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn our errors into one line on stderr and the table's exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except (BlockFormatError, P2PError, SnapshotterError, OSError) as e:
            if isinstance(e, OSError):
                where = f"{e.filename}: " if e.filename else ""
                msg = f"{where}{e.strerror or e}"
            else:
                msg = str(e)
            # Notes carry what else failed on the way (mirrors tried first, parallel downloads).
            msg += "".join(f"\n  {note}" for note in getattr(e, "__notes__", ()))
            print(f"damselfly: error: {msg}", file=sys.stderr)
            sys.exit(exit_code_for(e))

    return wrapper
