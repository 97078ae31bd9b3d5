"""OCI images built by code, byte for byte the same on every run: the converter's test inputs.

An `Image` is a list of `Layer`s; a layer is a list of `TarEntry`s (made by `file`, `directory`,
`symlink`, `hardlink`, `char_device`, `block_device`, `fifo`, `whiteout`, `opaque`, `sparse_file`),
written as a PAX tar (nanosecond mtimes and xattrs as PAX records, GNU sparse 1.0 for sparse files) and
compressed with gzip (default), zstd or nothing. `write_layout` writes an OCI image layout (blobs,
config with ``rootfs.diff_ids``, history and runtime config, manifest, ``index.json`` with a ref name)
and returns a `BuiltImage` naming every digest; `push_layout` pushes one to a registry as it is.

Like the layers ``docker build`` writes, every layer lists the parent directories of its entries
before them (added here when the layer does not list them itself, with the attributes the directory
has so far): both containerd's applier and ours then set every directory's times from the layer, so
the trees they produce can be compared to the nanosecond. `Layer(auto_parents=False)` writes the
entries exactly as given (hostile layers).

The images themselves (busybox, the semantics image, the hostile ones) are in `catalog`.
Determinism: fixed times, no wall clock, gzip without name or time, JSON with sorted keys.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import random
import struct
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import zstandard

if TYPE_CHECKING:
    from p2p.registry import RegistryClient

MiB = 1 << 20
S = 1_000_000_000
#: Default entry time: nanoseconds that a seconds-only or microseconds-only path would lose.
T0 = 1_600_000_000 * S + 123_456_789
#: Default time of directories the builder adds.
T_DIR = 1_600_000_100 * S + 5
CREATED = "2024-01-02T03:04:05Z"

OCI_LAYOUT_VERSION = "1.0.0"
REF_NAME = "org.opencontainers.image.ref.name"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
Compression = Literal["gzip", "zstd", "none"]
Kind = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]

#: security.capability, VFS_CAP_REVISION_2 with the effective bit: CAP_NET_BIND_SERVICE (10) and
#: CAP_NET_RAW (13) permitted (linux/capability.h: magic_etc, then {permitted, inheritable} x 2).
CAP_NET_BIND_RAW = struct.pack("<IIIII", 0x02000001, (1 << 10) | (1 << 13), 0, 0, 0)
BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = ("sh", "echo", "cat", "ls", "stat", "true", "sleep", "id", "env")


def host_arch() -> str:
    """The OCI architecture of this machine (what containerd's default platform matcher wants)."""
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}.get(
        machine, machine
    )


# -- entries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TarEntry:
    """One tar member. `name` is written as given (hostile names too); `sparse` holds the data regions
    ``(offset, bytes)`` of a sparse file of `size` bytes, written in GNU sparse 1.0 (PAX) form."""

    name: str
    kind: Kind
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = T0
    linkname: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, bytes], ...] = ()
    sparse: tuple[tuple[int, bytes], ...] | None = None
    size: int | None = None
    pax: tuple[tuple[str, str], ...] = ()

    @property
    def path(self) -> str:
        """The name as a plain relative path ("./a//b/" → "a/b"); only for well-formed names."""
        return "/".join(c for c in self.name.split("/") if c not in ("", "."))

    def tarinfo(self) -> tuple[tarfile.TarInfo, bytes]:
        """The header and the member's data (for a sparse file: the map block, then the regions)."""
        types = {
            "file": tarfile.REGTYPE,
            "dir": tarfile.DIRTYPE,
            "symlink": tarfile.SYMTYPE,
            "hardlink": tarfile.LNKTYPE,
            "char": tarfile.CHRTYPE,
            "block": tarfile.BLKTYPE,
            "fifo": tarfile.FIFOTYPE,
        }
        data = self.data if self.kind == "file" else b""
        pax: dict[str, str] = {"mtime": _pax_time(self.mtime_ns)}
        name = self.name
        if self.sparse is not None:
            # GNU tar's --sparse --format=pax (1.0): the real name and size in PAX records, the member
            # named DIR/GNUSparseFile.0/BASE, its data a decimal map padded to a block, then the regions.
            head, _, base = self.name.rpartition("/")
            name = f"{head}/GNUSparseFile.0/{base}" if head else f"GNUSparseFile.0/{base}"
            mapping = f"{len(self.sparse)}\n" + "".join(f"{o}\n{len(d)}\n" for o, d in self.sparse)
            block = mapping.encode().ljust(-(-len(mapping) // 512) * 512, b"\0")
            data = block + b"".join(d for _, d in self.sparse)
            pax |= {
                "GNU.sparse.major": "1",
                "GNU.sparse.minor": "0",
                "GNU.sparse.name": self.name,
                "GNU.sparse.realsize": str(self.size),
            }
        ti = tarfile.TarInfo(name)
        ti.type = types[self.kind]
        ti.mode = self.mode
        ti.uid, ti.gid = self.uid, self.gid
        ti.uname = ti.gname = ""
        ti.mtime = max(self.mtime_ns // S, 0)  # the ustar field; the PAX record has the exact time
        ti.linkname = self.linkname
        ti.devmajor, ti.devminor = self.rdev
        ti.size = len(data)
        for key, value in self.xattrs:
            # Binary values travel as surrogate-escaped str; tarfile then writes hdrcharset=BINARY.
            pax[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
        pax |= dict(self.pax)
        ti.pax_headers = pax
        return ti, data


def _pax_time(ns: int) -> str:
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    return f"{sign}{ns // S}.{ns % S:09d}"


def _x(xattrs: dict[str, bytes] | None) -> tuple[tuple[str, bytes], ...]:
    return tuple(sorted((xattrs or {}).items()))


def file(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime_ns: int = T0,
    xattrs: dict[str, bytes] | None = None,
) -> TarEntry:
    return TarEntry(name, "file", data, mode, uid, gid, mtime_ns, xattrs=_x(xattrs))


def directory(
    name: str,
    *,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    mtime_ns: int = T_DIR,
    xattrs: dict[str, bytes] | None = None,
) -> TarEntry:
    return TarEntry(name, "dir", b"", mode, uid, gid, mtime_ns, xattrs=_x(xattrs))


def symlink(name: str, target: str, *, uid: int = 0, gid: int = 0, mtime_ns: int = T0) -> TarEntry:
    return TarEntry(name, "symlink", b"", 0o777, uid, gid, mtime_ns, linkname=target)


def hardlink(
    name: str, target: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime_ns: int = T0
) -> TarEntry:
    """A hard link to `target` (a path from the root). Its mode/owner/time should be the target's:
    the link is the same inode, and appliers set the entry's attributes on it."""
    return TarEntry(name, "hardlink", b"", mode, uid, gid, mtime_ns, linkname=target)


def char_device(name: str, major: int, minor: int, *, mode: int = 0o666, **kw: int) -> TarEntry:
    return TarEntry(name, "char", b"", mode, rdev=(major, minor), **kw)  # type: ignore[arg-type]


def block_device(name: str, major: int, minor: int, *, mode: int = 0o660, **kw: int) -> TarEntry:
    return TarEntry(name, "block", b"", mode, rdev=(major, minor), **kw)  # type: ignore[arg-type]


def fifo(name: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime_ns: int = T0) -> TarEntry:
    return TarEntry(name, "fifo", b"", mode, uid, gid, mtime_ns)


def whiteout(path: str, *, mtime_ns: int = T0) -> TarEntry:
    """``DIR/.wh.NAME``: hides `path` (a file or a whole tree) of the lower layers (OCI layer.md)."""
    head, _, base = path.rpartition("/")
    return TarEntry(f"{head}/.wh.{base}" if head else f".wh.{base}", "file", mode=0o600, mtime_ns=mtime_ns)


def opaque(dir_path: str, *, mtime_ns: int = T0) -> TarEntry:
    """``DIR/.wh..wh..opq``: hides everything lower layers put in `dir_path`."""
    return TarEntry(f"{dir_path}/.wh..wh..opq", "file", mode=0o600, mtime_ns=mtime_ns)


def sparse_file(
    name: str, size: int, regions: Sequence[tuple[int, bytes]], *, mode: int = 0o644, mtime_ns: int = T0
) -> TarEntry:
    """A file of `size` bytes holding `regions` (sorted ``(offset, data)``) and holes elsewhere."""
    return TarEntry(name, "file", mode=mode, mtime_ns=mtime_ns, sparse=tuple(regions), size=size)


def content(size: int, seed: int) -> bytes:
    """Deterministic bytes, half text that compresses, half random that does not."""
    rng = random.Random(seed)
    words = [b"damselfly ", b"layer ", b"overlay ", b"whiteout\n", b"opaque ", b"chunk\n"]
    half = size // 2
    text = b"".join(rng.choice(words) for _ in range(half // 5 + 1))[:half]
    return text + rng.randbytes(size - half)


# -- layers and images ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One layer: its entries in tar order, its compression, and its history line."""

    entries: tuple[TarEntry, ...]
    compression: Compression = "gzip"
    created_by: str = "damselfly test layer"
    auto_parents: bool = True
    media_type: str | None = None  # override (e.g. an unsupported type); default from compression


@dataclass(frozen=True)
class Image:
    layers: tuple[Layer, ...]
    env: tuple[str, ...] = ("PATH=/bin:/usr/bin",)
    cmd: tuple[str, ...] = ("/bin/sh",)
    working_dir: str = "/"
    #: History lines of instructions that made no layer (``ENV``...), inserted after the first layer.
    empty_history: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    user: str = ""  # the config's User ("uid:gid"); empty: root
    os: str = "linux"
    architecture: str = field(default_factory=host_arch)


@dataclass(frozen=True)
class BuiltLayer:
    digest: str  # of the blob as stored (compressed)
    diff_id: str  # of the uncompressed tar
    size: int
    media_type: str
    path: Path  # the blob in the layout


@dataclass(frozen=True)
class BuiltImage:
    """An image written into an OCI layout: what every digest is, and where its blobs are."""

    layout: Path
    ref: str
    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: bytes
    layers: tuple[BuiltLayer, ...]

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    @property
    def chain_ids(self) -> list[str]:
        """containerd's snapshot names of the layer stack, bottom first (image-spec config.md)."""
        return chain_ids(self.diff_ids)

    @property
    def chain_id(self) -> str:
        return self.chain_ids[-1]

    def blob(self, digest: str) -> Path:
        return blob_path(self.layout, digest)


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """ChainID(L0) = DiffID(L0); ChainID(L0..n) = sha256(ChainID(L0..n-1) + " " + DiffID(Ln))."""
    out: list[str] = []
    for diff_id in diff_ids:
        out.append(diff_id if not out else sha256_digest(f"{out[-1]} {diff_id}".encode()))
    return out


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexd = digest.partition(":")
    return layout / "blobs" / algorithm / hexd


def canonical_json(doc: object) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def layer_tar(entries: Iterable[TarEntry]) -> bytes:
    """The uncompressed PAX tar of `entries`, in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tf:
        for entry in entries:
            ti, data = entry.tarinfo()
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return buf.getvalue()


def compress(tar: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(tar, compresslevel=6, mtime=0)  # no name, no time: the same bytes every run
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_content_size=True, threads=0).compress(tar)
    return tar


class _DirState:
    """The directories the layers so far left, with their latest entry: what a layer's implied
    parents look like (docker lists a changed file's parents with their current attributes)."""

    def __init__(self) -> None:
        self.dirs: dict[str, TarEntry] = {}

    def expand(self, layer: Layer) -> list[TarEntry]:
        if not layer.auto_parents:
            return list(layer.entries)
        explicit = {e.path: e for e in layer.entries if e.kind == "dir"}
        emitted: set[str] = set()
        out: list[TarEntry] = []

        def emit_dir(path: str) -> None:
            if path in emitted:
                return
            head = path.rpartition("/")[0]
            if head:
                emit_dir(head)
            entry = explicit.get(path) or self.dirs.get(path) or directory(path)
            out.append(replace(entry, name=path + "/"))
            emitted.add(path)

        for entry in layer.entries:
            path = entry.path
            head = path.rpartition("/")[0]
            if head:
                emit_dir(head)
            if entry.kind == "dir":
                emit_dir(path)
            else:
                out.append(entry)
        self._record(out)
        return out

    def _record(self, entries: list[TarEntry]) -> None:
        for e in entries:
            path = e.path
            base = path.rpartition("/")[2]
            if base == ".wh..wh..opq":
                parent = path.rpartition("/")[0]
                self._drop_below(parent)
            elif base.startswith(".wh."):
                self._drop(f"{path.rpartition('/')[0]}/{base[4:]}".lstrip("/"))
            elif e.kind == "dir":
                self.dirs[path] = e
            else:
                self._drop(path)

    def _drop(self, path: str) -> None:
        self.dirs.pop(path, None)
        self._drop_below(path)

    def _drop_below(self, path: str) -> None:
        for d in [d for d in self.dirs if d.startswith(path + "/")]:
            del self.dirs[d]


def write_layout(image: Image, layout: Path, ref: str = "latest") -> BuiltImage:
    """Write `image` into the OCI layout `layout` (created; other refs in it are kept) under `ref`."""
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    state = _DirState()
    built: list[BuiltLayer] = []
    for layer in image.layers:
        tar = layer_tar(state.expand(layer))
        blob = compress(tar, layer.compression)
        digest = _put_blob(layout, blob)
        media_type = layer.media_type or MT_LAYER[layer.compression]
        built.append(BuiltLayer(digest, sha256_digest(tar), len(blob), media_type, blob_path(layout, digest)))
    history: list[dict[str, object]] = []
    for i, layer in enumerate(image.layers):
        history.append({"created": CREATED, "created_by": layer.created_by})
        if i == 0:
            history += [
                {"created": CREATED, "created_by": h, "empty_layer": True} for h in image.empty_history
            ]
    runtime: dict[str, object] = {
        "Env": list(image.env),
        "Cmd": list(image.cmd),
        "WorkingDir": image.working_dir,
    }
    if image.labels:
        runtime["Labels"] = dict(image.labels)
    if image.user:
        runtime["User"] = image.user
    config = canonical_json(
        {
            "architecture": image.architecture,
            "os": image.os,
            "created": CREATED,
            "config": runtime,
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in built]},
            "history": history,
        }
    )
    config_digest = _put_blob(layout, config)
    manifest = canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": {"mediaType": MT_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in built],
        }
    )
    manifest_digest = _put_blob(layout, manifest)
    _set_ref(layout, {"mediaType": MT_MANIFEST, "digest": manifest_digest, "size": len(manifest)}, ref)
    return BuiltImage(layout, ref, manifest_digest, manifest, config_digest, config, tuple(built))


def write_index_layout(images: Sequence[BuiltImage], layout: Path, ref: str) -> str:
    """Add an image index over `images` (already written into `layout`, one per platform) as `ref`;
    return the index digest."""
    manifests = []
    for im in images:
        cfg = json.loads(im.config)
        manifests.append(
            {
                "mediaType": MT_MANIFEST,
                "digest": im.manifest_digest,
                "size": len(im.manifest),
                "platform": {"architecture": cfg["architecture"], "os": cfg["os"]},
            }
        )
    index = canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests})
    digest = _put_blob(layout, index)
    _set_ref(layout, {"mediaType": MT_INDEX, "digest": digest, "size": len(index)}, ref)
    return digest


def _put_blob(layout: Path, data: bytes) -> str:
    digest = sha256_digest(data)
    path = blob_path(layout, digest)
    if not path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return digest


def _set_ref(layout: Path, descriptor: dict[str, object], ref: str) -> None:
    index_path = layout / "index.json"
    entries: list[dict[str, object]] = []
    if index_path.exists():
        old = json.loads(index_path.read_text())
        entries = [m for m in old.get("manifests", []) if m.get("annotations", {}).get(REF_NAME) != ref]
    entries.append({**descriptor, "annotations": {REF_NAME: ref}})
    index_path.write_bytes(canonical_json({"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": entries}))
    (layout / "oci-layout").write_bytes(canonical_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))


def push_layout(client: RegistryClient, repository: str, built: BuiltImage, tag: str | None = None) -> str:
    """Push a built image to a registry as it is (same bytes, same digests); return the manifest digest.

    Unlike ``skopeo copy``, nothing is re-encoded, so the registry serves exactly the layout's blobs.
    """
    from blockformat.digest import Digest  # noqa: PLC0415  # only pushing needs the registry client

    manifest = json.loads(built.manifest)
    for desc in [manifest["config"], *manifest["layers"]]:
        with open(built.blob(desc["digest"]), "rb") as f:
            client.push_blob(repository, f, Digest(desc["digest"]))
    return str(client.push_manifest(repository, built.manifest, MT_MANIFEST, tag or built.ref))


def push_image(host: str, built: BuiltImage, repository: str, tag: str | None = None) -> str:
    """Push `built` to the loopback registry `host` (plain HTTP, no credentials) as `repository:tag`
    (default tag: the layout's ref); return the reference to pull (``HOST/REPOSITORY:TAG``)."""
    from p2p.auth import static_credentials  # noqa: PLC0415
    from p2p.registry import RegistryClient  # noqa: PLC0415

    tag = tag or built.ref
    with RegistryClient(host, plain_http=True, credentials=static_credentials({})) as client:
        push_layout(client, repository, built, tag)
    return f"{host}/{repository}:{tag}"
