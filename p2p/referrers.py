"""Artifacts stored beside an image as OCI 1.1 referrers: pushed, and found again.

A referrer is an image manifest whose ``subject`` names another manifest, with an ``artifactType``
and one layer holding the artifact (damselfly's access traces: `blockformat.trace`). It leaves the
image as it is (its digest, its tags, its runnability).

- Pushing: the artifact blob and the empty config (``{}``) go up first, then the manifest by digest.
  A registry with the referrers API says so with an ``OCI-Subject`` header on that PUT; for one without
  (docker-registry 2.8) the client maintains the referrers tag schema: the index at tag
  ``sha256-<hex>`` of the subject lists its referrers. `push_referrer` replaces the entries of the same
  artifact type there (the newest artifact of a kind wins), keeping everyone else's.
- Finding: `find_referrers` asks the API, then the tag, and returns the entries of one artifact type,
  newest (last listed) last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from blockformat.digest import Digest, digest_of, parse_digest
from blockformat.errors import InvalidArgumentError, InvalidDigestError

from .errors import InvalidManifestError
from .manifest import MAX_DOCUMENT_SIZE, OCI_INDEX, OCI_MANIFEST, Descriptor
from .registry import RegistryClient, referrers_tag

log = logging.getLogger(__name__)

#: The empty JSON object, the config of an artifact manifest (OCI image spec 1.1).
EMPTY_MEDIA_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
#: At most this many referrers are read from an index.
MAX_REFERRERS = 1000


def artifact_manifest(
    subject: Descriptor, artifact_type: str, blob: Descriptor, annotations: Mapping[str, str]
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_MEDIA_TYPE, "digest": digest_of(EMPTY_JSON), "size": len(EMPTY_JSON)},
        "layers": [blob.to_json()],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def push_referrer(
    client: RegistryClient,
    repository: str,
    subject: Descriptor,
    artifact_type: str,
    data: bytes,
    annotations: Mapping[str, str] | None = None,
) -> Digest:
    """Push `data` as an artifact of `artifact_type` referring to `subject`; the referrer's digest."""
    blob = Descriptor(artifact_type, digest_of(data), len(data))
    client.push_blob(repository, EMPTY_JSON)
    client.push_blob(repository, data)
    raw = artifact_manifest(subject, artifact_type, blob, annotations or {})
    digest = client.push_manifest(repository, raw, OCI_MANIFEST)
    if client.referrers_index(repository, subject.digest, tag_schema=False) is not None:
        return digest  # the registry has the referrers API: it lists the new manifest itself
    entry: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(raw),
        "artifactType": artifact_type,
    }
    if annotations:
        entry["annotations"] = dict(annotations)
    current = client.referrers_index(repository, subject.digest)
    kept = [m for m in _entries(current, "referrers index") if m.get("artifactType") != artifact_type]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*kept, entry]}
    body = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
    client.push_manifest(repository, body, OCI_INDEX, referrers_tag(subject.digest))
    log.info("pushed %s referrer %s of %s@%s (tag schema)", artifact_type, digest, repository, subject.digest)
    return digest


def find_referrers(
    client: RegistryClient, repository: str, subject: str, artifact_type: str
) -> list[Descriptor]:
    """The referrers of `subject` of `artifact_type`, in the order listed (the newest last)."""
    raw = client.referrers_index(repository, parse_digest(subject))
    where = f"referrers of {repository}@{subject}"
    out = []
    for m in _entries(raw, where):
        if m.get("artifactType") != artifact_type:
            continue
        try:
            d = Descriptor(str(m["mediaType"]), parse_digest(str(m["digest"])), int(m["size"]))
        except (KeyError, TypeError, ValueError, InvalidDigestError, InvalidArgumentError) as e:
            raise InvalidManifestError(where, f"a malformed entry: {e}") from None
        if not 0 < d.size <= MAX_DOCUMENT_SIZE:
            raise InvalidManifestError(where, f"a referrer of {d.size} bytes")
        out.append(d)
    return out


def _entries(raw: bytes | None, where: str) -> list[dict[str, Any]]:
    if raw is None:
        return []
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise InvalidManifestError(where, f"not JSON: {e}") from None
    manifests = doc.get("manifests") if isinstance(doc, dict) else None
    if not isinstance(manifests, list) or not all(isinstance(m, dict) for m in manifests):
        raise InvalidManifestError(where, "not an image index with a 'manifests' list")
    return manifests[:MAX_REFERRERS]
