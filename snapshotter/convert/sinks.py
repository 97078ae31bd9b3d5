"""Where a converted image goes: an OCI layout directory or a registry repository.

A sink is only touched after every layer of every platform converted, and in dependency order — layer
blobs, configs, platform manifests, then the one name (tag, or ``index.json`` entry) that makes the
image visible. A failure before that leaves the destination without the image; a failure in the
middle leaves only unreferenced, content-addressed blobs.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from blockformat.digest import Digest, digest_of, parse_digest
from p2p.errors import P2PError
from p2p.hosts import Resolver
from p2p.manifest import Descriptor
from p2p.reference import Reference, parse_reference

from ..errors import ImageError
from ..image.ocilayout import REF_NAME, LayoutWriter, split_ref
from .sources import is_local

if TYPE_CHECKING:  # httpx: imported when a registry client is made (`Resolver.client`)
    from p2p.registry import RegistryClient


class Sink(abc.ABC):
    """The interface; see the module docstring."""

    name: str
    #: What the converter records in the layer annotations as where the blobs live (or None).
    repository: str | None = None

    @abc.abstractmethod
    def put_file(self, path: str, digest: str, size: int) -> None: ...

    @abc.abstractmethod
    def put_bytes(self, data: bytes) -> Digest: ...

    @abc.abstractmethod
    def put_manifest(self, raw: bytes, media_type: str) -> Digest:
        """A platform manifest, referenced by digest only."""
        ...

    @abc.abstractmethod
    def publish(self, raw: bytes, media_type: str) -> Digest:
        """The top document, under the destination's name."""
        ...

    def close(self) -> None:  # noqa: B027 - an optional hook: most have nothing to release
        """Release connections and files."""


class LayoutSink(Sink):
    """An OCI layout directory (`LayoutWriter`): created on the first blob, named in ``index.json`` last."""

    def __init__(self, path: str, ref: str | None) -> None:
        self.path = path
        self.ref = ref or "latest"
        self.name = f"{path}:{self.ref}"
        self.layout = LayoutWriter(path, remedy="pass an empty or new directory, or an OCI layout")
        self.layout.check()  # before anything is converted: a bad destination fails first

    def put_file(self, path: str, digest: str, size: int) -> None:
        self.layout.put_file(path, digest, size)

    def put_bytes(self, data: bytes) -> Digest:
        return self.layout.put_bytes(data)

    def put_manifest(self, raw: bytes, media_type: str) -> Digest:
        return self.put_bytes(raw)

    def publish(self, raw: bytes, media_type: str) -> Digest:
        digest = self.put_bytes(raw)
        self.layout.add_to_index(Descriptor(media_type, digest, len(raw), {REF_NAME: self.ref}))
        return digest


class RegistrySink(Sink):
    def __init__(self, ref: Reference, client: RegistryClient) -> None:
        self.ref = ref
        self.client = client
        self.name = str(ref)
        self.repository = f"{ref.registry}/{ref.repository}"

    def put_file(self, path: str, digest: str, size: int) -> None:
        with open(path, "rb") as f:
            self.client.push_blob(self.ref.repository, f, parse_digest(digest))

    def put_bytes(self, data: bytes) -> Digest:
        digest = digest_of(data)
        self.client.push_blob(self.ref.repository, data, digest)
        return digest

    def put_manifest(self, raw: bytes, media_type: str) -> Digest:
        return self.client.push_manifest(self.ref.repository, raw, media_type)

    def publish(self, raw: bytes, media_type: str) -> Digest:
        tag = self.ref.tag or ("latest" if self.ref.digest is None else None)
        return self.client.push_manifest(self.ref.repository, raw, media_type, tag)

    def close(self) -> None:
        self.client.close()


def open_sink(
    dst: str, *, plain_http: bool | None, oci_layout: bool, resolver: Resolver | None = None
) -> Sink:
    """Where the converted image goes: a layout, or a registry reference (pushed to the first endpoint
    of `resolver`'s with the push capability: the registry itself, unless its hosts.toml says
    otherwise)."""
    if oci_layout or is_local(dst):
        path, ref = split_ref(dst)
        return LayoutSink(path, ref)
    try:
        reference = parse_reference(dst)
    except P2PError as e:
        raise ImageError(dst, str(e), "pass a registry reference or an OCI layout directory") from e
    if reference.digest is not None and reference.tag is None:
        raise ImageError(dst, "a destination names a tag, not a digest", "pass host/repo:tag")
    return RegistrySink(reference, (resolver or Resolver()).client(reference.registry, plain_http))
