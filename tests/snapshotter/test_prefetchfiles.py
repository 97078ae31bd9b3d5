"""`convert --prefetch-files` patterns (`snapshotter.convert.prefetchfiles`): what names what."""

from __future__ import annotations

import pytest

from snapshotter.convert.prefetchfiles import _matches, check_patterns
from snapshotter.errors import ConvertError


def test_patterns_become_paths_from_the_root() -> None:
    assert check_patterns(["/usr/bin/", "etc/hosts", "/", "*", " /opt "]) == [
        "usr/bin",
        "etc/hosts",
        "*",
        "*",
        "opt",
    ]


@pytest.mark.parametrize("bad", ["", "/a/../../etc", "x\0y", "/" + "a" * 5000])
def test_a_pattern_that_is_no_path_in_the_image_is_refused(bad: str) -> None:
    with pytest.raises(ConvertError, match="--prefetch-files"):
        check_patterns([bad])


@pytest.mark.parametrize(
    ("rel", "pattern", "hit"),
    [
        ("usr/bin/python3", "usr/bin", True),  # a directory: everything below it
        ("usr/bin2/x", "usr/bin", False),
        ("usr/bin/python3.11", "usr/bin/python3*", True),
        ("usr/lib/python3.11/json/__init__.py", "usr/lib/*/json/*", True),
        ("etc/hosts", "etc/hosts", True),
        ("etc/hostname", "etc/hosts", False),
        ("anything/at/all", "*", True),
    ],
)
def test_what_a_pattern_names(rel: str, pattern: str, hit: bool) -> None:
    assert _matches(rel, pattern) is hit
