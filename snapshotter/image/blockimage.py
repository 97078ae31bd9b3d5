"""Converted block images made from a directory, without the converter (issue 4, item 5).

Until ``damselfly convert`` exists this is how tests, benchmarks and demos make images::

    src_dir ──mkfs.ext4 -d──► sparse ext4 file (vsize bytes, in workdir)
            ──SEEK_DATA/SEEK_HOLE──► its data extents, 4 KiB aligned ──► WritableUpper
            ──commit──► layer blob (temp file, fsync, rename)
    layer blobs + image config + manifest ──► OCI image layout (oci-layout, index.json, blobs/sha256/)

The layer goes through the same `WritableUpper.commit` the converter uses, so the blob is exactly what a
converted single-layer image holds. Building needs no privileges (``mkfs.ext4 -d`` reads owners and modes
with ``lstat``); only mounting the result does.

What the image holds is the source tree as ``mkfs.ext4 -d`` copies it (contents, modes, owners, times,
hard links, symlinks, special files, xattrs), plus ``lost+found``; the root directory is 0755 root:root.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from blockformat.annotations import MEDIA_TYPE_LAYER, LayerAnnotations
from blockformat.chunkfile import DEFAULT_CHUNK_SIZE, BlobInfo
from blockformat.digest import Digest
from blockformat.durable import atomic_write
from blockformat.errors import BlockFormatError
from blockformat.extents import HOLE, ZERO
from blockformat.stack import Stack
from blockformat.upper import WritableUpper
from p2p.errors import P2PError
from p2p.manifest import (
    DEFAULT_PLATFORM,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    build_manifest,
)

from ..errors import ImageError
from ..host.mkfs import mkfs_ext4
from ..host.sparse import data_extents
from ..host.umask import shared_file_mode
from .ocilayout import REF_NAME, LayoutReader, LayoutWriter, blob_path, file_digest

MiB = 1 << 20
BLOCK = 4096
#: The smallest virtual device we make: ext4 needs some room for its own metadata, and a sparse
#: device costs nothing for the space it does not use.
MIN_VSIZE = 64 * MiB
#: Room for what the estimate leaves out: group descriptors, bitmaps, reserved GDT blocks, extent trees.
VSIZE_SLACK = 16 * MiB
INODE_SIZE = 256
#: Copy granularity from the ext4 file into the upper (bounded memory).
COPY_PIECE = 4 * MiB


# -- sizing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeSize:
    """What a directory tree needs in ext4, estimated from ``lstat`` alone."""

    inodes: int  # distinct inodes (hard links counted once), the root included
    data_bytes: int  # file data, symlink and directory blocks, in 4 KiB blocks

    def vsize(self) -> int:
        """A virtual device size that holds the tree: max(64 MiB, 1.5 x (data + inode tables) + slack)."""
        need = self.data_bytes + self.inode_count() * INODE_SIZE
        return max(MIN_VSIZE, _round_up(need * 3 // 2 + VSIZE_SLACK, MiB))

    def inode_count(self) -> int:
        """Inodes to ask mkfs for (``-N``): twice the tree plus headroom. Unused inode tables of a
        prezeroed device are never written, so headroom costs no layer bytes."""
        return max(16384, 2 * self.inodes + 1024)


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def measure_tree(src_dir: str | os.PathLike[str]) -> TreeSize:
    """Walk `src_dir` without following symlinks and estimate its ext4 footprint."""
    seen: set[tuple[int, int]] = set()
    inodes = 0
    data = 0
    stack = [os.fspath(src_dir)]
    while stack:
        path = stack.pop()
        inodes += 1
        entry_bytes = 24  # "." and ".."
        with os.scandir(path) as it:
            for e in it:
                # An ext4 directory entry is 8 bytes plus the name, padded to 4.
                entry_bytes += 8 + _round_up(len(os.fsencode(e.name)), 4)
                st = e.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
                    continue
                if st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                inodes += 1
                if stat.S_ISREG(st.st_mode):
                    data += _round_up(st.st_size, BLOCK)
                    data += BLOCK * (st.st_size // (128 * MiB))  # extent tree blocks of big files
                elif stat.S_ISLNK(st.st_mode) and st.st_size >= 60:  # longer targets leave the inode
                    data += BLOCK
                if _has_big_xattrs(e.path):
                    data += BLOCK
        # Hashed directories need index blocks and leave their leaves partly empty.
        data += _round_up(entry_bytes * 3 // 2, BLOCK) + BLOCK
    return TreeSize(inodes, data)


def _has_big_xattrs(path: str) -> bool:
    """Xattrs that may not fit in the inode's spare ~100 bytes and need an extra block."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return False
    return sum(len(n) + 16 for n in names) > 64 or any(
        len(os.getxattr(path, n, follow_symlinks=False)) > 32 for n in names
    )


# -- the layer -----------------------------------------------------------------------------------


def build_layer_from_dir(
    src_dir: str | os.PathLike[str],
    blob_path: str | os.PathLike[str],
    *,
    workdir: str | os.PathLike[str],
    vsize: int | None = None,
    codec: str = "lz4",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int | None = None,
    uuid: str | None = None,
    hash_seed: str | None = None,
    fake_time: int | None = None,
) -> tuple[BlobInfo, LayerAnnotations]:
    """Make an ext4 of the tree at `src_dir` and write it as one layer blob at `blob_path`.

    `workdir` holds the temporary ext4 file (sparse, `vsize` bytes apparent) and the writable upper;
    both are removed before returning, on success and on failure. `blob_path` appears only complete
    (temp file in its directory, fsync, rename). `uuid`, `hash_seed` and `fake_time` pin what mkfs
    would otherwise draw at random or from the clock.
    """
    src = os.fspath(src_dir)
    if not os.path.isdir(src):
        raise ImageError(src, "is not a directory", "pass the root of the tree to put in the image")
    if vsize is not None and (vsize <= 0 or vsize % BLOCK):
        raise ImageError(src, f"virtual size {vsize} is not a positive multiple of {BLOCK}", "fix the vsize")
    try:
        tree = measure_tree(src)
        tmp = tempfile.mkdtemp(prefix="damselfly-image-", dir=workdir)
    except OSError as e:
        raise ImageError(e.filename or src, e.strerror or str(e), "check the paths and permissions") from e
    if vsize is None:
        vsize = tree.vsize()
    try:
        image = os.path.join(tmp, "ext4.img")
        mkfs_ext4(
            image,
            vsize,
            root_dir=src,
            inodes=tree.inode_count(),
            uuid=uuid,
            hash_seed=hash_seed,
            fake_time=fake_time,
        )
        try:
            upper = WritableUpper.create(os.path.join(tmp, "upper"), vsize)
            try:
                copy_extents(image, upper)
                info = _commit(upper, os.fspath(blob_path), codec, chunk_size, level)
            finally:
                upper.remove()
        except BlockFormatError as e:
            raise ImageError(os.fspath(blob_path), f"cannot write the layer: {e}", "check the options") from e
        except OSError as e:
            where = e.filename or os.fspath(blob_path)
            raise ImageError(where, e.strerror or str(e), "check free space and permissions") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info, LayerAnnotations(info.index_digest, info.uncompressed_size, vsize, "ext4")


def copy_extents(image: str, upper: WritableUpper) -> int:
    """Copy the data extents of the sparse file `image` into `upper`; return the bytes copied.

    Extents are widened to 4 KiB (the layer alignment); holes are left out, so they read as zeros from
    the layer at the bottom of a stack.
    """
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        copied = 0
        for start, end in data_extents(fd, BLOCK):
            for off in range(start, end, COPY_PIECE):
                n = min(COPY_PIECE, end - off)
                upper.write(off, _pread_exact(fd, n, off, image))
                copied += n
        return copied
    finally:
        os.close(fd)


def _pread_exact(fd: int, n: int, off: int, name: str) -> bytes:
    parts = []
    got = 0
    while got < n:
        b = os.pread(fd, n - got, off + got)
        if not b:
            raise OSError(errno.EIO, f"unexpected end of file at {off + got}", name)
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _commit(upper: WritableUpper, blob_path: str, codec: str, chunk_size: int, level: int | None) -> BlobInfo:
    with atomic_write(blob_path, shared_file_mode()) as f:
        return upper.commit(f, codec, chunk_size, level)


def write_device_file(stack: Stack, path: str | os.PathLike[str]) -> int:
    """Write the device a stack describes to a sparse file (only its data extents); return bytes written.

    For tests and benchmarks: the same ext4 on a plain loop device, without FUSE.
    """
    written = 0
    with open(path, "wb") as f:
        f.truncate(stack.vsize)
        for seg in stack.map:
            if seg.source in (HOLE, ZERO):
                continue
            for off in range(seg.start, seg.start + seg.length, COPY_PIECE):
                n = min(COPY_PIECE, seg.start + seg.length - off)
                os.pwrite(f.fileno(), stack.read(off, n), off)
                written += n
        f.flush()
        os.fsync(f.fileno())
    return written


# -- the OCI image layout (image-spec v1.1, "image-layout.md") -----------------------------------


def write_oci_layout(
    layout_dir: str | os.PathLike[str],
    layers: Sequence[tuple[str | os.PathLike[str], BlobInfo, LayerAnnotations]],
    ref_name: str = "latest",
    config_extra: Mapping[str, Any] | None = None,
) -> Digest:
    """Write an image of `layers` (bottom first) into an OCI layout; return the manifest digest.

    The layout is created if missing; an existing one keeps its other images, and the entry named
    `ref_name` is replaced. Layer blobs are hard-linked into ``blobs/sha256/`` (copied across
    filesystems). `config_extra` adds top-level fields to the image config (e.g. ``{"config": {"Cmd":
    ["/bin/sh"]}}``); ``rootfs`` is ours.
    """
    layout = os.fspath(layout_dir)
    if config_extra and "rootfs" in config_extra:
        raise ImageError(layout, "config_extra may not set rootfs", "leave rootfs to write_oci_layout")
    writer = LayoutWriter(layout, remedy="pass an empty or new directory, or an OCI layout")
    try:
        writer.open()
        descriptors: list[Descriptor] = []
        for blob, info, annotations in layers:
            path = os.fspath(blob)
            size = os.path.getsize(path)
            if size != info.blob_size:
                raise ImageError(path, f"is {size} bytes, its BlobInfo says {info.blob_size}", "rebuild it")
            digest = Digest(info.blob_digest) if info.blob_digest else file_digest(path)
            writer.put_file(path, digest, size)
            descriptors.append(Descriptor(MEDIA_TYPE_LAYER, digest, size, annotations.to_dict()))
        config_doc: dict[str, Any] = {
            "architecture": DEFAULT_PLATFORM.architecture,
            "os": DEFAULT_PLATFORM.os,
            "config": {},
            **(config_extra or {}),
            # A block layer is not a tar: it is applied by stacking it, never unpacked, so it is its
            # own uncompressed diff and its diff_id is its blob digest. containerd derives the chain
            # IDs (the snapshot names our Prepare answers AlreadyExists to) from these.
            "rootfs": {"type": "layers", "diff_ids": [d.digest for d in descriptors]},
        }
        config = json.dumps(config_doc, sort_keys=True, separators=(",", ":")).encode()
        config_desc = Descriptor(OCI_CONFIG, writer.put_bytes(config), len(config))
        manifest = build_manifest(config_desc, descriptors, OCI_MANIFEST)
        manifest_digest = writer.put_bytes(manifest)
        writer.add_to_index(Descriptor(OCI_MANIFEST, manifest_digest, len(manifest), {REF_NAME: ref_name}))
    except OSError as e:
        raise ImageError(
            e.filename or layout, e.strerror or str(e), "check free space and permissions"
        ) from e
    return manifest_digest


@dataclass(frozen=True)
class LayoutLayer:
    descriptor: Descriptor
    annotations: LayerAnnotations
    path: str  # the blob file in the layout


@dataclass(frozen=True)
class LayoutImage:
    layout_dir: str
    manifest: Manifest
    config: Mapping[str, Any]
    layers: tuple[LayoutLayer, ...]


def layer_annotations(where: str, i: int, desc: Descriptor) -> LayerAnnotations:
    """The damselfly annotations of layer `i`, or an ImageError naming the layer when it has none."""
    try:
        annotations = LayerAnnotations.from_dict(desc.annotations)
    except BlockFormatError as e:
        raise ImageError(where, f"layer {i} ({desc.digest}): {e}") from e
    if annotations is None:
        raise ImageError(
            where,
            f"layer {i} ({desc.digest}, {desc.media_type}) is not a damselfly layer",
            "convert the image with `damselfly convert` first",
        )
    return annotations


def read_oci_layout(layout_dir: str | os.PathLike[str], ref: str | None = None) -> LayoutImage:
    """Read the damselfly image named `ref` from an OCI layout (the only image when `ref` is None).

    The manifest and config are checked against their digests; layer blobs must exist with the size
    their descriptors give (their bytes are verified chunk by chunk when read, against the index
    digest in the annotations). Every layer must be a damselfly layer.
    """
    layout = os.fspath(layout_dir)
    reader = LayoutReader(layout)
    reader.check()
    entry = reader.select(ref)
    where = f"{layout}@{entry.digest}"
    doc = reader.read_document(entry, "manifest")
    if isinstance(doc, Index):
        try:
            chosen = doc.select(DEFAULT_PLATFORM, where)
        except P2PError as e:
            raise ImageError(where, str(e)) from e
        doc = reader.read_document(chosen, "manifest")
    if not isinstance(doc, Manifest) or doc.media_type not in MANIFEST_TYPES:
        raise ImageError(where, "is not an image manifest")
    try:
        config = json.loads(reader.read_blob(doc.config, "config"))
    except ValueError as e:
        raise ImageError(where, f"config is not JSON ({e})") from e
    if not isinstance(config, dict):
        raise ImageError(where, "config is not a JSON object")
    layers = []
    for i, desc in enumerate(doc.layers):
        annotations = layer_annotations(where, i, desc)
        path = blob_path(layout, desc.digest)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise ImageError(path, f"layer {i} blob: {e.strerror or e}", "the layout is incomplete") from e
        if size != desc.size:
            raise ImageError(
                path, f"layer {i} blob is {size} bytes, not {desc.size}", "the layout is damaged"
            )
        layers.append(LayoutLayer(desc, annotations, path))
    return LayoutImage(layout, doc, config, tuple(layers))
