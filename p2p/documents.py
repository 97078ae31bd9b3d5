"""The node's document store: small whole blobs (image configs) kept so the node can hand them to peers
(`p2p.node.BlobNode.document`). ``<cache>/documents/sha256/<hex>``, root's alone."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os

from blockformat.durable import PRIVATE_FILE_MODE, private_dir, write_file_atomic

from .manifest import MAX_DOCUMENT_SIZE

log = logging.getLogger(__name__)


class DocumentStore:
    """Small whole blobs (image configs) a node fetched, so it can hand them to peers: one file per
    digest, root's (0600 in 0700 directories), written atomically and only after its digest checked,
    and checked again when read (a document is small: hashing it is cheap)."""

    def __init__(self, root: str) -> None:
        self.root = root
        private_dir(root)
        private_dir(os.path.join(root, "sha256"))

    def path(self, digest: str) -> str:
        algo, _, hexpart = digest.partition(":")
        return os.path.join(self.root, algo, hexpart)

    @staticmethod
    def matches(digest: str, size: int, data: bytes) -> bool:
        return len(data) == size and "sha256:" + hashlib.sha256(data).hexdigest() == digest

    def get(self, digest: str, size: int) -> bytes | None:
        try:
            with open(self.path(digest), "rb") as f:
                data = f.read(MAX_DOCUMENT_SIZE + 1)
        except FileNotFoundError:
            return None
        if not self.matches(digest, size, data):
            log.warning("document %s in the node cache is damaged; fetching it again", digest)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(digest))
            return None
        return data

    def put(self, digest: str, data: bytes) -> None:
        write_file_atomic(self.path(digest), data, PRIVATE_FILE_MODE)
