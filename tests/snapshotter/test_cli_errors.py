"""Exit codes (`snapshotter.cli.errors`): also for an error the device daemon relays by class name."""

from __future__ import annotations

import pytest

from blockformat.errors import CorruptBlobError
from p2p.errors import DigestMismatchError, NotFoundError
from snapshotter.cli.errors import EXIT_CORRUPT, EXIT_ERROR, EXIT_UNSUPPORTED, EXIT_USAGE, exit_code_for
from snapshotter.errors import ControlError


def test_local_errors_get_their_class_code() -> None:
    assert exit_code_for(DigestMismatchError("m", "sha256:a", "sha256:b")) == EXIT_CORRUPT
    assert exit_code_for(NotFoundError("u", "manifest")) == EXIT_ERROR
    assert exit_code_for(CorruptBlobError("b", 0, "chunk", "x", "y")) == EXIT_CORRUPT


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("DigestMismatchError", EXIT_CORRUPT),  # a registry's wrong bytes, found by the daemon
        ("UnsupportedMediaTypeError", EXIT_UNSUPPORTED),
        ("InvalidReferenceError", EXIT_USAGE),
        ("NotFoundError", EXIT_ERROR),
        ("ControlError", EXIT_ERROR),  # the daemon could not be reached
        ("SomethingNew", EXIT_ERROR),
    ],
)
def test_an_error_relayed_by_the_daemon_keeps_its_class_code(kind: str, code: int) -> None:
    assert exit_code_for(ControlError("message", kind)) == code
