"""Artifacts stored beside an image as OCI 1.1 referrers: pushed, and found again.

A referrer is a manifest whose ``subject`` names another manifest, with an ``artifactType``: an
artifact manifest with one layer holding the artifact (damselfly's access traces:
`blockformat.trace`), or a whole image (a converted variant of its subject, ``convert --referrer``).
It leaves the subject as it is (its digest, its tags, its runnability).

- Pushing: the artifact blob and the empty config (``{}``) go up first, then the manifest by digest.
  A registry with the referrers API says so with an ``OCI-Subject`` header on that PUT; for one without
  (docker-registry 2.8) the client maintains the referrers tag schema: the index at tag
  ``sha256-<hex>`` of the subject lists its referrers. `push_referrer` replaces the entries of the same
  artifact type there (the newest artifact of a kind wins), keeping everyone else's.
  `list_referrer` is that second half alone, for a manifest pushed by someone else (the converter's
  images): the entry carries the manifest's ``artifactType`` and ``annotations``, as the API's would,
  so a reader needs no GET of the manifest to choose.
- Finding: `find_referrers` asks the API, then the tag, and returns the entries of one artifact type
  (with their annotations), newest (last listed) last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from typing import Any

from blockformat.digest import Digest, digest_of, parse_digest
from blockformat.errors import InvalidArgumentError, InvalidDigestError

from .errors import InvalidManifestError, NotFoundError
from .manifest import MAX_DOCUMENT_SIZE, OCI_INDEX, OCI_MANIFEST, Descriptor, Manifest
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
    entry = Descriptor(OCI_MANIFEST, digest, len(raw), dict(annotations or {}))
    list_referrer(client, repository, subject.digest, entry, artifact_type)
    return digest


def list_referrer(
    client: RegistryClient, repository: str, subject: Digest, entry: Descriptor, artifact_type: str
) -> str:
    """Make the pushed manifest `entry` (whose ``subject`` is `subject`) findable: nothing to do where
    the registry has the referrers API (it lists the manifest itself); else add it to the referrers
    tag's index, replacing the entries of the same `artifact_type` (the newest of a kind wins) and
    keeping everyone else's. ``"api"`` or ``"tag"``: how it is listed."""
    if client.referrers_index(repository, subject, tag_schema=False) is not None:
        return "api"
    listed: dict[str, Any] = {
        "mediaType": entry.media_type,
        "digest": entry.digest,
        "size": entry.size,
        "artifactType": artifact_type,
    }
    if entry.annotations:
        listed["annotations"] = dict(entry.annotations)
    current = client.referrers_index(repository, subject)
    kept = [m for m in _entries(current, "referrers index") if m.get("artifactType") != artifact_type]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [*kept, listed]}
    body = json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
    client.push_manifest(repository, body, OCI_INDEX, referrers_tag(subject))
    log.info("listed %s referrer %s of %s@%s (tag schema)", artifact_type, entry.digest, repository, subject)
    return "tag"


def find_referrers(
    client: RegistryClient, repository: str, subject: str, artifact_type: str
) -> list[Descriptor]:
    """The referrers of `subject` of `artifact_type`, in the order listed (the newest last), each with
    the annotations its entry carries (a manifest's own, as the referrers API lists them)."""
    raw = client.referrers_index(repository, parse_digest(subject))
    where = f"referrers of {repository}@{subject}"
    out = []
    for m in _entries(raw, where):
        if m.get("artifactType") != artifact_type:
            continue
        try:
            annotations = m.get("annotations") or {}
            if not isinstance(annotations, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
            ):
                raise TypeError("annotations are not an object of strings")
            d = Descriptor(str(m["mediaType"]), parse_digest(str(m["digest"])), int(m["size"]), annotations)
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


def find_variant(
    client: RegistryClient,
    repository: str,
    subject: Digest,
    artifact_type: str,
    accept: Callable[[Manifest], str],
) -> Manifest | None:
    """The newest manifest listed as a referrer of `subject` with `artifact_type` that is still there
    and that `accept` finds nothing wrong with (it returns why not, or ""); None if there is none.

    Each candidate is fetched by digest (verified) and must name `subject` as its own ``subject``: the
    list is mutable like a tag, the manifest is not. A listed manifest that is gone (deleted from the
    registry, the listing left behind) or refused is logged and the next older one is tried."""
    for entry in reversed(find_referrers(client, repository, subject, artifact_type)):
        where = f"{repository}@{entry.digest}"
        try:
            doc = client.get_manifest(repository, entry.digest)
        except NotFoundError:
            log.warning("referrer %s of %s is listed but gone from the registry", where, subject)
            continue
        why = ""
        if not isinstance(doc, Manifest):
            why = "it is not an image manifest"
        elif doc.subject is None or doc.subject.digest != subject:
            why = f"its subject is {None if doc.subject is None else doc.subject.digest}, not {subject}"
        else:
            why = accept(doc)
        if why:
            log.warning("referrer %s of %s is not used: %s", where, subject, why)
            continue
        assert isinstance(doc, Manifest)
        return doc
    return None
