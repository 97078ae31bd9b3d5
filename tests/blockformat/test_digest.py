"""Content digests: the one validation of ``algorithm:hex`` every package uses, and streaming checks."""

from __future__ import annotations

import pytest

from blockformat.annotations import KEY_INDEX_DIGEST, KEY_SIZE, KEY_VSIZE, LayerAnnotations
from blockformat.digest import (
    SHA256_ONLY,
    Verifier,
    digest_bytes,
    digest_of,
    parse_digest,
    sha256_digest,
)
from blockformat.errors import DigestMismatchError, InvalidArgumentError, InvalidDigestError

D = "sha256:" + "ab" * 32


def test_digest_parsing() -> None:
    assert parse_digest(D) == D
    assert parse_digest("sha512:" + "0" * 128).startswith("sha512:")
    with pytest.raises(InvalidDigestError, match="128 hex digits"):
        parse_digest("sha512:" + "0" * 64)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "sha256",
        "sha256:",
        "sha256:" + "AB" * 32,  # OCI: lowercase hex only
        "sha256:" + "ab" * 31,
        "sha256:" + "ab" * 33,
        "sha256:" + "zz" * 32,
        "md5:" + "a" * 32,
        " sha256:" + "ab" * 32,
        "sha256:" + "ab" * 32 + "\n",
        "sha256:../../etc",
    ],
)
def test_malformed_digests_are_refused_with_the_text_and_why(text: str) -> None:
    with pytest.raises(InvalidDigestError) as e:
        parse_digest(text)
    assert e.value.text == text and e.value.why
    assert isinstance(e.value, InvalidArgumentError) and isinstance(e.value, ValueError)


def test_where_the_format_says_sha256_only_sha256_is_accepted() -> None:
    assert parse_digest(D, SHA256_ONLY) == D
    with pytest.raises(InvalidDigestError, match="only sha256"):
        parse_digest("sha512:" + "0" * 128, SHA256_ONLY)


def test_raw_sha256_round_trips() -> None:
    raw = bytes(range(32))
    d = sha256_digest(raw)
    assert d == "sha256:" + raw.hex() and parse_digest(d) == d
    assert digest_bytes(d) == raw


def test_verifier_names_expected_and_got() -> None:
    v = Verifier(digest_of(b"right"), 5)
    v.update(b"wrong")
    assert v.mismatch() == ("digest", digest_of(b"right"), digest_of(b"wrong"))
    with pytest.raises(DigestMismatchError) as e:
        v.check("http://r/v2/a/blobs/x")
    assert e.value.expected == digest_of(b"right") and e.value.got == digest_of(b"wrong")
    assert str(e.value).startswith("http://r/v2/a/blobs/x: digest mismatch: expected sha256:")

    short = Verifier(digest_of(b"right"), 5)
    short.update(b"rig")
    with pytest.raises(DigestMismatchError, match="size mismatch: expected 5 bytes, got 3 bytes"):
        short.check("somewhere")

    good = Verifier(digest_of(b"right"), 5)
    good.update(b"right")
    assert good.mismatch() is None
    good.check("here")


@pytest.mark.parametrize("bad", ["sha256:" + "AB" * 32, "sha512:" + "0" * 128, "sha256:xyz"])
def test_annotations_validate_their_digests_with_the_same_function(bad: str) -> None:
    labels = {KEY_INDEX_DIGEST: bad, KEY_SIZE: "4096", KEY_VSIZE: "8192"}
    with pytest.raises(InvalidDigestError, match="index-digest"):
        LayerAnnotations.from_dict(labels)
    ann = LayerAnnotations.from_dict({**labels, KEY_INDEX_DIGEST: D})
    assert ann is not None and ann.index_digest == D
