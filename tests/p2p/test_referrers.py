"""OCI 1.1 referrers on a real docker-registry 2.8 (no referrers API: the tag schema), `p2p.referrers`."""

from __future__ import annotations

import json
import re
from typing import cast

import httpx
import pytest

from blockformat.digest import digest_of
from p2p.errors import InvalidManifestError
from p2p.manifest import OCI_INDEX, OCI_MANIFEST, Descriptor, Manifest
from p2p.referrers import EMPTY_MEDIA_TYPE, find_referrers, find_variant, list_referrer, push_referrer
from p2p.registry import RegistryClient, referrers_tag

from .images import make_image, push_image
from .registry_server import RegistryServer

TRACE = "application/vnd.damselfly.trace.v1+json"
OTHER = "application/vnd.example.sbom+json"


def subject(client: RegistryClient, repo: str) -> Descriptor:
    image = make_image([b"layer bytes"])
    digest = push_image(client, repo, image)
    return Descriptor(image.media_type, digest, len(image.manifest))


def test_no_referrers_is_an_empty_list(client: RegistryClient, repo: str) -> None:
    s = subject(client, repo)
    assert find_referrers(client, repo, s.digest, TRACE) == []


def test_a_pushed_referrer_is_found_and_leaves_the_image_as_it_was(client: RegistryClient, repo: str) -> None:
    s = subject(client, repo)
    before = client.get_manifest(repo, "latest")
    digest = push_referrer(
        client, repo, s, TRACE, b'{"trace": 1}', {"org.opencontainers.image.created": "now"}
    )
    found = find_referrers(client, repo, s.digest, TRACE)
    assert [d.digest for d in found] == [digest]
    # The artifact manifest: subject, artifactType, the empty config, one layer with the bytes.
    m = client.get_manifest(repo, digest)
    assert isinstance(m, Manifest) and m.media_type == OCI_MANIFEST
    doc = json.loads(m.raw)
    assert doc["subject"]["digest"] == s.digest and doc["artifactType"] == TRACE
    assert m.config.media_type == EMPTY_MEDIA_TYPE and client.get_blob(repo, m.config.digest) == b"{}"
    assert [x.media_type for x in m.layers] == [TRACE]
    assert client.get_blob(repo, m.layers[0].digest) == b'{"trace": 1}'
    # The image's tag still names the same manifest.
    assert client.get_manifest(repo, "latest").digest == before.digest


def test_a_new_referrer_of_a_kind_replaces_the_old_one_and_keeps_other_kinds(
    client: RegistryClient, repo: str
) -> None:
    s = subject(client, repo)
    other = push_referrer(client, repo, s, OTHER, b"sbom")
    push_referrer(client, repo, s, TRACE, b"first")
    newest = push_referrer(client, repo, s, TRACE, b"second")
    assert [d.digest for d in find_referrers(client, repo, s.digest, TRACE)] == [newest]
    assert [d.digest for d in find_referrers(client, repo, s.digest, OTHER)] == [other]
    index = client.get_manifest(repo, referrers_tag(s.digest))
    assert index.media_type == OCI_INDEX


class IndexOnly:
    """What `find_referrers` asks of a registry client: a referrers index (a registry refuses to
    store a malformed one, so this part is a unit test)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def referrers_index(self, repository: str, digest: str, tag_schema: bool = True) -> bytes:
        return self.raw


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"{", "not JSON"),
        (b'{"manifests": 1}', "'manifests' list"),
        (json.dumps({"manifests": [{"artifactType": TRACE}]}).encode(), "malformed entry"),
        (
            json.dumps(
                {
                    "manifests": [
                        {
                            "artifactType": TRACE,
                            "mediaType": OCI_MANIFEST,
                            "digest": "sha256:" + "a" * 64,
                            "size": 1 << 40,
                        }
                    ]
                }
            ).encode(),
            "a referrer of",
        ),
    ],
)
def test_a_malformed_referrers_index_is_refused_saying_so(raw: bytes, says: str) -> None:
    client = cast(RegistryClient, IndexOnly(raw))
    with pytest.raises(InvalidManifestError, match=re.escape(says)):
        find_referrers(client, "repo", "sha256:" + "b" * 64, TRACE)


def test_the_registry_has_no_referrers_api(client: RegistryClient, repo: str) -> None:
    """What the tag schema is for: docker-registry 2.8 answers 404 to the 1.1 endpoint."""
    s = subject(client, repo)
    url = client.origin.url(f"/v2/{repo}/referrers/{s.digest}")
    assert httpx.get(url, timeout=10).status_code == 404


# -- converted variants: whole images listed as referrers (`list_referrer`, `find_variant`) --------

VARIANT = "application/vnd.damselfly.image.v1+json"


def variant_of(
    client: RegistryClient, repo: str, s: Descriptor, payload: bytes, subject_digest: str = ""
) -> Descriptor:
    """An image manifest referring to `s` (pushed by digest) and listed among its referrers."""
    image = make_image([payload])
    raw = json.loads(image.manifest)
    raw["subject"] = {"mediaType": s.media_type, "digest": subject_digest or s.digest, "size": s.size}
    raw["artifactType"] = VARIANT
    raw["annotations"] = {"x.source": s.digest}
    body = json.dumps(raw).encode()
    client.push_blob(repo, image.config)
    client.push_blob(repo, payload)
    digest = client.push_manifest(repo, body, OCI_MANIFEST)
    entry = Descriptor(OCI_MANIFEST, digest, len(body), raw["annotations"])
    assert list_referrer(client, repo, s.digest, entry, VARIANT) == "tag"  # docker-registry 2.8
    return entry


def test_a_listed_variant_is_found_with_its_annotations_and_checked(
    client: RegistryClient, repo: str
) -> None:
    s = subject(client, repo)
    push_referrer(client, repo, s, TRACE, b"a trace of the source")  # other kinds stay listed
    v = variant_of(client, repo, s, b"variant layer")
    (listed,) = find_referrers(client, repo, s.digest, VARIANT)
    assert listed.digest == v.digest and listed.annotations == {"x.source": s.digest}
    assert len(find_referrers(client, repo, s.digest, TRACE)) == 1

    found = find_variant(client, repo, s.digest, VARIANT, lambda m: "")
    assert found is not None and found.digest == v.digest
    assert found.subject is not None and found.subject.digest == s.digest and found.artifact_type == VARIANT
    # what the caller refuses is not returned
    assert find_variant(client, repo, s.digest, VARIANT, lambda m: "not ours") is None


def test_a_variant_deleted_from_the_registry_is_skipped(
    client: RegistryClient, repo: str, registry: RegistryServer
) -> None:
    s = subject(client, repo)
    v = variant_of(client, repo, s, b"gone")
    assert httpx.delete(f"{registry.url}/v2/{repo}/manifests/{v.digest}", timeout=10).status_code == 202
    assert [d.digest for d in find_referrers(client, repo, s.digest, VARIANT)] == [v.digest]  # still listed
    assert find_variant(client, repo, s.digest, VARIANT, lambda m: "") is None


def test_a_listed_manifest_with_another_subject_is_not_a_variant(client: RegistryClient, repo: str) -> None:
    s = subject(client, repo)
    variant_of(client, repo, s, b"lying", subject_digest=digest_of(b"another manifest"))
    assert find_variant(client, repo, s.digest, VARIANT, lambda m: "") is None
