"""The images the tests build by code: busybox (every converter test), the semantics image (every item of
the layer semantics the converter must reproduce), and the hostile inputs it must refuse, each with the
fragments its error must name."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    pass

from .build import (
    BUSYBOX,
    BUSYBOX_APPLETS,
    CAP_NET_BIND_RAW,
    MT_MANIFEST,
    T0,
    T_DIR,
    BuiltImage,
    Image,
    Layer,
    MiB,
    S,
    TarEntry,
    _put_blob,
    _set_ref,
    blob_path,
    block_device,
    canonical_json,
    char_device,
    content,
    directory,
    fifo,
    file,
    hardlink,
    opaque,
    sparse_file,
    symlink,
    whiteout,
    write_layout,
)

# -- the image every converter test uses ---------------------------------------------------------


def busybox_entries(*, mtime_ns: int = T0) -> list[TarEntry]:
    """A static busybox as /bin/busybox with applet symlinks (bin/sh...), plus /etc/passwd and /tmp:
    enough for ``ctr run IMAGE ID /bin/sh -c ...``."""
    data = BUSYBOX.read_bytes()
    out = [
        directory("bin", mtime_ns=mtime_ns),
        file("bin/busybox", data, mode=0o755, mtime_ns=mtime_ns),
        *(symlink(f"bin/{a}", "busybox", mtime_ns=mtime_ns) for a in BUSYBOX_APPLETS),
        directory("etc", mtime_ns=mtime_ns),
        file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
        file("etc/group", b"root:x:0:\nuser:x:1000:\n"),
        directory("tmp", mode=0o1777, mtime_ns=mtime_ns),
        directory("root", mode=0o700, mtime_ns=mtime_ns),
    ]
    return out


def busybox_image(*extra: Layer, cmd: Sequence[str] = ("/bin/sh", "-c", "echo busybox")) -> Image:
    """A one-layer busybox image (plus `extra` layers on top)."""
    return Image((Layer(tuple(busybox_entries()), created_by="ADD busybox /"), *extra), cmd=tuple(cmd))


def _t(i: int) -> int:
    """Distinct times with distinct nanoseconds, so a lost or swapped mtime shows."""
    return T0 + i * 1_000_000_007


SEMANTICS_MESSAGE = "damselfly semantics image"
#: A 255-byte name (ext4's limit) and a path longer than ustar's 100+155 bytes.
LONG_NAME = "n" * 200 + "-long-name-" + "m" * 44
DEEP_DIR = "/".join(f"level-{i:02d}-{'d' * 8}" for i in range(24))


def semantics_image(*, big_size: int = 6 * MiB) -> Image:
    """Four layers (gzip, gzip, zstd, plain tar) exercising every item of the OCI layer semantics.

    Layer 0 (busybox base) puts down what later layers change. Layer 1: whiteouts of a file and of a
    directory, an opaque directory, hardlinks within the layer, symlinks (relative, absolute, dangling,
    one pointing out of the root: stored, never followed), xattrs (user.*, security.capability v2,
    trusted.*, on files and a directory), setuid/setgid/sticky, char and block devices (one with a
    minor > 255), a fifo, owners above 65535 and above the ustar limit, nanosecond mtimes (and one
    before 1970, which becomes the epoch), a sparse file (GNU sparse 1.0) and a large file of zeros,
    an empty file, a file replaced by a directory and a directory replaced by a file, a deep path and
    a 255-byte name, unicode names, a big file. Layer 2 (zstd): a whiteout of a layer-1 entry, changed
    content and mode, new content inside the opaque directory, a dir replaced by a file again. Layer 3
    (uncompressed): a directory whose owner and mode change while it keeps its lower children.

    containerd 1.6 never applies the ``trusted.*`` xattrs (compare with ``without_xattrs("trusted.")``).
    Avoided, because containerd's overlay applier departs from the image-spec there (see
    `tests.e2e.test_containerd_overlay`): a hardlink to a file of a lower layer (`lower_hardlink_image`
    has one), a directory entry whose xattrs differ from those a lower layer gave the directory (the
    applier makes a fresh directory in the new upper, so the lower xattrs vanish from the view), and a
    whiteout of a directory recreated in the same layer (the new upper directory is not opaque).
    """
    cmd = ("/bin/sh", "-c", f"echo {SEMANTICS_MESSAGE}")
    u = 0  # time counter
    base = busybox_entries()
    base += [
        directory("lower"),
        file("lower/file-to-whiteout", b"whited out in layer 1\n", mtime_ns=_t(u := u + 1)),
        directory("lower/dir-to-whiteout", mode=0o750, uid=1000, gid=1000, mtime_ns=_t(u := u + 1)),
        file("lower/dir-to-whiteout/a", b"a\n", mtime_ns=_t(u := u + 1)),
        directory("lower/dir-to-whiteout/sub", mtime_ns=_t(u := u + 1)),
        file("lower/dir-to-whiteout/sub/b", b"b\n", mtime_ns=_t(u := u + 1)),
        directory("lower/opaque", mode=0o775, mtime_ns=_t(u := u + 1)),
        file("lower/opaque/old-1", b"hidden by the opaque marker\n", mtime_ns=_t(u := u + 1)),
        directory("lower/opaque/old-dir", mtime_ns=_t(u := u + 1)),
        file("lower/opaque/old-dir/old-2", b"hidden too\n", mtime_ns=_t(u := u + 1)),
        file("lower/file-becomes-dir", b"a file in layer 0\n", mtime_ns=_t(u := u + 1)),
        directory("lower/dir-becomes-file", mtime_ns=_t(u := u + 1)),
        file("lower/dir-becomes-file/child", b"gone with its dir\n", mtime_ns=_t(u := u + 1)),
        file("lower/changes-content", b"layer 0 content\n", mtime_ns=_t(u := u + 1)),
        file("lower/changes-mode", b"same content\n", mode=0o644, mtime_ns=_t(u := u + 1)),
        directory("meta"),
        directory("meta/dir", mode=0o755, mtime_ns=_t(u := u + 1)),
        file("meta/dir/kept", b"kept below a dir whose attributes change\n", mtime_ns=_t(u := u + 1)),
    ]
    big = content(big_size, seed=5)
    l1: list[TarEntry] = [
        # Whiteouts and an opaque directory.
        whiteout("lower/file-to-whiteout", mtime_ns=_t(u := u + 1)),
        whiteout("lower/dir-to-whiteout", mtime_ns=_t(u := u + 1)),
        opaque("lower/opaque", mtime_ns=_t(u := u + 1)),
        file("lower/opaque/new", b"the only child after the opaque marker\n", mtime_ns=_t(u := u + 1)),
        # A file replaced by a directory and a directory replaced by a file.
        directory("lower/file-becomes-dir", mode=0o700, mtime_ns=_t(u := u + 1)),
        file("lower/file-becomes-dir/inside", b"now a directory\n", mtime_ns=_t(u := u + 1)),
        file("lower/dir-becomes-file", b"now a file\n", mode=0o600, mtime_ns=_t(u := u + 1)),
        # Hardlinks within the layer: three names, one inode (setuid and an xattr on it).
        directory("links"),
        file(
            "links/original",
            b"one inode, three names\n",
            mode=0o4750,
            uid=1000,
            gid=1000,
            mtime_ns=_t(u := u + 1),
            xattrs={"user.link": b"shared"},
        ),
        hardlink("links/hard-1", "links/original", mode=0o4750, uid=1000, gid=1000, mtime_ns=_t(u)),
        directory("links/sub"),
        hardlink("links/sub/hard-2", "links/original", mode=0o4750, uid=1000, gid=1000, mtime_ns=_t(u)),
        # Symlinks: stored as given, never followed.
        symlink("links/relative", "../etc/passwd", mtime_ns=_t(u := u + 1)),
        symlink("links/absolute", "/etc/passwd", uid=1234, gid=5678, mtime_ns=_t(u := u + 1)),
        symlink("links/dangling", "no/such/target", mtime_ns=_t(u := u + 1)),
        symlink("links/escape", "../../../../etc/passwd", mtime_ns=_t(u := u + 1)),
        symlink("links/to-dir", "../lower", mtime_ns=_t(u := u + 1)),
        symlink("links/long-target", "x/" * 100 + "end", mtime_ns=_t(u := u + 1)),
        # Extended attributes.
        directory("xattrs", xattrs={"user.dir": b"on a directory"}, mtime_ns=_t(u := u + 1)),
        file(
            "xattrs/user",
            b"user xattrs\n",
            xattrs={"user.damselfly": b"value", "user.empty": b"", "user.binary": bytes(range(256))},
            mtime_ns=_t(u := u + 1),
        ),
        file(
            "xattrs/capability",
            b"#!/bin/sh\n",
            mode=0o755,
            xattrs={"security.capability": CAP_NET_BIND_RAW},
            mtime_ns=_t(u := u + 1),
        ),
        file(
            "xattrs/trusted",
            b"trusted xattr\n",
            xattrs={"trusted.damselfly": b"\x00\x01binary\xff", "user.also": b"1"},
            mtime_ns=_t(u := u + 1),
        ),
        # Modes.
        directory("modes"),
        file("modes/setuid", b"#!/bin/sh\n", mode=0o4755, mtime_ns=_t(u := u + 1)),
        file("modes/setgid", b"#!/bin/sh\n", mode=0o2755, uid=0, gid=50, mtime_ns=_t(u := u + 1)),
        file("modes/all-bits", b"", mode=0o7777, mtime_ns=_t(u := u + 1)),
        file("modes/none", b"unreadable\n", mode=0o000, mtime_ns=_t(u := u + 1)),
        directory("modes/sticky", mode=0o1777, mtime_ns=_t(u := u + 1)),
        directory("modes/setgid-dir", mode=0o2775, gid=100, mtime_ns=_t(u := u + 1)),
        file("modes/setgid-dir/inherits-nothing", b"x\n", gid=0, mtime_ns=_t(u := u + 1)),
        # Devices and a fifo.
        directory("devices"),
        char_device("devices/null", 1, 3, mtime_ns=_t(u := u + 1)),
        char_device("devices/tty-ish", 4, 64, mode=0o620, gid=5, mtime_ns=_t(u := u + 1)),
        block_device("devices/loop", 7, 0, mtime_ns=_t(u := u + 1)),
        block_device("devices/big-minor", 259, 70000, mtime_ns=_t(u := u + 1)),
        fifo("devices/fifo", mode=0o622, mtime_ns=_t(u := u + 1)),
        # Owners (ustar holds ids up to 2097151; beyond that they are PAX records).
        directory("owners", uid=1000, gid=1000, mode=0o750, mtime_ns=_t(u := u + 1)),
        file("owners/above-16-bit", b"x\n", uid=70000, gid=100000, mtime_ns=_t(u := u + 1)),
        file("owners/above-ustar", b"x\n", uid=3_000_000, gid=4_000_000, mtime_ns=_t(u := u + 1)),
        file("owners/nobody", b"x\n", uid=65534, gid=65534, mtime_ns=_t(u := u + 1)),
        # Times.
        directory("times"),
        file("times/whole-second", b"x\n", mtime_ns=1_650_000_000 * S),
        file("times/one-ns", b"x\n", mtime_ns=1_650_000_000 * S + 1),
        file("times/max-ns", b"x\n", mtime_ns=1_650_000_000 * S + 999_999_999),
        file("times/before-1970", b"becomes the epoch\n", mtime_ns=-86_400 * S - 5),
        file("times/year-2100", b"x\n", mtime_ns=4_102_444_800 * S + 42),
        # Files: empty, sparse, zeros, big.
        directory("files"),
        file("files/empty", b"", mtime_ns=_t(u := u + 1)),
        sparse_file(
            "files/sparse",
            32 * MiB,
            [(0, b"head" * 1024), (10 * MiB + 123, content(8192, 1)), (32 * MiB - 100, b"t" * 100)],
            mtime_ns=_t(u := u + 1),
        ),
        sparse_file("files/sparse-all-hole", 4 * MiB, [], mtime_ns=_t(u := u + 1)),
        file("files/zeros", bytes(4 * MiB), mtime_ns=_t(u := u + 1)),
        file("files/big", big, mode=0o640, mtime_ns=_t(u := u + 1)),
        # Names.
        directory("names"),
        file("names/" + LONG_NAME, b"255-byte name\n", mtime_ns=_t(u := u + 1)),
        directory("names/" + DEEP_DIR, mtime_ns=_t(u := u + 1)),
        file("names/" + DEEP_DIR + "/deep-file", b"deep\n", mtime_ns=_t(u := u + 1)),
        file("names/ümlaut ß", b"latin\n", mtime_ns=_t(u := u + 1)),
        file("names/日本語.txt", b"cjk\n", mtime_ns=_t(u := u + 1)),
        file("names/emoji-🐟", b"4-byte utf-8\n", mtime_ns=_t(u := u + 1)),
        file("names/with space\tand tab", b"blanks\n", mtime_ns=_t(u := u + 1)),
        file("names/.hidden", b"dot\n", mtime_ns=_t(u := u + 1)),
        file("names/-dash", b"dash\n", mtime_ns=_t(u := u + 1)),
    ]
    l2: list[TarEntry] = [
        whiteout("links/dangling", mtime_ns=_t(u := u + 1)),
        file("lower/changes-content", b"layer 2 content, longer than before\n", mtime_ns=_t(u := u + 1)),
        file("lower/changes-mode", b"same content\n", mode=0o600, uid=1000, mtime_ns=_t(u := u + 1)),
        file("lower/opaque/added-in-layer-2", b"next to the opaque layer's child\n", mtime_ns=_t(u := u + 1)),
        file("lower/file-becomes-dir", b"a file again\n", mtime_ns=_t(u := u + 1)),
        directory("lower/dir-becomes-file", mode=0o711, mtime_ns=_t(u := u + 1)),
        symlink("lower/dir-becomes-file/link", "../changes-mode", mtime_ns=_t(u := u + 1)),
    ]
    l3: list[TarEntry] = [
        directory("meta/dir", mode=0o700, uid=1000, gid=1000, mtime_ns=_t(u := u + 1)),
        file("meta/added-last", b"in the uncompressed layer\n", mtime_ns=_t(u := u + 1)),
    ]
    return Image(
        (
            Layer(tuple(base), "gzip", "ADD busybox and lower entries /"),
            Layer(tuple(l1), "gzip", "RUN layer semantics"),
            Layer(tuple(l2), "zstd", "RUN changes on top"),
            Layer(tuple(l3), "none", "RUN directory attributes"),
        ),
        env=("PATH=/bin", "DAMSELFLY=semantics"),
        cmd=cmd,
        empty_history=("ENV DAMSELFLY=semantics",),
        labels=(("org.example.damselfly", "semantics"),),
    )


def lower_hardlink_image() -> Image:
    """A hardlink whose target a lower layer made (the image-spec allows it; containerd 1.6's overlay
    applier fails on it: it links inside the new upper directory only)."""
    return busybox_image(
        Layer(
            (
                file("data/target", b"made by layer 1\n", mode=0o640, mtime_ns=_t(900)),
                directory("data/dir"),
            ),
            created_by="RUN make target",
        ),
        Layer(
            (hardlink("data/dir/link-to-lower", "data/target", mode=0o640, mtime_ns=_t(900)),),
            created_by="RUN ln",
        ),
    )


def absolute_names_image() -> Image:
    """Entry names with a leading ``/``: containerd applies them relative to the root (``/abs/file``
    becomes ``abs/file``), docker-archive tools write such names."""
    return busybox_image(
        Layer(
            (
                TarEntry("/abs/", "dir", mode=0o755, mtime_ns=T_DIR),
                TarEntry("/abs/file", "file", b"absolute name\n", mtime_ns=_t(901)),
            ),
            auto_parents=False,
            created_by="RUN absolute names",
        )
    )


# -- hostile input -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostileImage:
    """An image the converter must refuse: `fragments` must all appear in its error message.

    `layer_index`/`layer_digest` name the bad layer (None for manifest-level damage), `entry` the tar
    entry (None for stream or descriptor damage). `pushable`: a registry accepts it (else only usable
    as an OCI layout source).
    """

    name: str
    built: BuiltImage
    fragments: tuple[str, ...]
    layer_index: int | None
    layer_digest: str | None
    entry: str | None
    pushable: bool = True

    @property
    def layout(self) -> Path:
        return self.built.layout


def _base_layer() -> Layer:
    return Layer(
        (directory("ok"), file("ok/file", b"a good first layer\n"), file("victim", b"inside the root\n")),
        created_by="ADD ok /",
    )


def _with_bad_layer(name: str, root: Path, entries: Sequence[TarEntry], entry: str) -> HostileImage:
    image = Image((_base_layer(), Layer(tuple(entries), auto_parents=False, created_by=f"RUN {name}")))
    built = write_layout(image, root / name)
    digest = built.layers[1].digest
    return HostileImage(name, built, (digest, entry), 1, digest, entry)


def _dotdot(root: Path) -> HostileImage:
    bad = "ok/../../../../tmp/damselfly-escaped"
    return _with_bad_layer("dotdot", root, [file("ok/fine", b"fine\n"), file(bad, b"escaped!\n")], bad)


def _absolute_escape(root: Path) -> HostileImage:
    bad = "/../../../../tmp/damselfly-escaped-abs"
    return _with_bad_layer("absolute-escape", root, [file(bad, b"escaped!\n")], bad)


def _hardlink_missing(root: Path) -> HostileImage:
    return _with_bad_layer("hardlink-missing", root, [hardlink("ok/link", "no/such/file")], "ok/link")


def _hardlink_escape(root: Path) -> HostileImage:
    return _with_bad_layer(
        "hardlink-escape", root, [hardlink("ok-link", "../../../../etc/passwd")], "ok-link"
    )


def _through_symlink(root: Path) -> HostileImage:
    """``link -> /`` then ``link/tmp/x``: written through the symlink, it would land outside the root."""
    return _with_bad_layer(
        "through-symlink",
        root,
        [symlink("link", "/"), file("link/tmp/damselfly-through-symlink", b"escaped!\n")],
        "link/tmp/damselfly-through-symlink",
    )


def _stream_damage(name: str, root: Path, damage: Callable[[bytes], bytes]) -> HostileImage:
    """A second layer whose gzip stream `damage` spoils; its descriptor matches the damaged bytes, so
    only decompression can notice."""
    entries = (directory("data"), file("data/text", content(256 * 1024, 3)[: 128 * 1024] * 2))
    layout = root / name
    good = write_layout(Image((_base_layer(), Layer(entries, created_by="RUN data"))), layout)
    blob = good.layers[1].path.read_bytes()
    bad = damage(blob)
    digest = _put_blob(layout, bad)
    manifest = json.loads(good.manifest)
    manifest["layers"][1] |= {"digest": digest, "size": len(bad)}
    built = _rewrite_manifest(good, manifest)
    return HostileImage(name, built, (digest,), 1, digest, None)


def _truncated_gzip(root: Path) -> HostileImage:
    return _stream_damage("truncated-gzip", root, lambda blob: blob[: len(blob) // 2])


def _corrupt_gzip(root: Path) -> HostileImage:
    def flip(blob: bytes) -> bytes:
        i = len(blob) // 3  # inside the deflate data: past the 10-byte header, before the trailer
        return blob[:i] + bytes([blob[i] ^ 0x55]) + blob[i + 1 :]

    return _stream_damage("corrupt-gzip", root, flip)


def _digest_mismatch(root: Path) -> HostileImage:
    """The layer blob stored under its digest holds other bytes (same size): only hashing finds it."""
    built = write_layout(
        Image((_base_layer(), Layer((file("data", content(64 * 1024, 4)),), created_by="RUN data"))),
        root / "digest-mismatch",
    )
    layer = built.layers[1]
    blob = bytearray(layer.path.read_bytes())
    blob[-9] ^= 0xFF  # in the gzip trailer's CRC: still a gzip stream, of other bytes
    layer.path.write_bytes(bytes(blob))
    return HostileImage("digest-mismatch", built, (layer.digest,), 1, layer.digest, None, pushable=False)


def _bad_manifest(root: Path) -> HostileImage:
    layout = root / "bad-manifest"
    good = write_layout(Image((_base_layer(),)), layout)
    raw = good.manifest[: len(good.manifest) // 2]  # cut JSON
    digest = _put_blob(layout, raw)
    _set_ref(layout, {"mediaType": MT_MANIFEST, "digest": digest, "size": len(raw)}, good.ref)
    built = replace(good, manifest_digest=digest, manifest=raw)
    return HostileImage("bad-manifest", built, (digest,), None, None, None, pushable=False)


def _unsupported_media_type(root: Path) -> HostileImage:
    media_type = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted"
    built = write_layout(
        Image((_base_layer(), Layer((file("secret", b"x"),), media_type=media_type))),
        root / "unsupported-media-type",
    )
    digest = built.layers[1].digest
    return HostileImage("unsupported-media-type", built, (digest, media_type), 1, digest, None)


def _rewrite_manifest(built: BuiltImage, manifest: dict[str, object]) -> BuiltImage:
    raw = canonical_json(manifest)
    digest = _put_blob(built.layout, raw)
    _set_ref(built.layout, {"mediaType": MT_MANIFEST, "digest": digest, "size": len(raw)}, built.ref)
    descriptors = cast("list[dict[str, Any]]", manifest["layers"])
    layers = tuple(
        replace(b, digest=d["digest"], size=d["size"], path=blob_path(built.layout, d["digest"]))
        for b, d in zip(built.layers, descriptors, strict=True)
    )
    return replace(built, manifest_digest=digest, manifest=raw, layers=layers)


HOSTILE: dict[str, Callable[[Path], HostileImage]] = {
    "dotdot": _dotdot,
    "absolute-escape": _absolute_escape,
    "hardlink-missing": _hardlink_missing,
    "hardlink-escape": _hardlink_escape,
    "through-symlink": _through_symlink,
    "truncated-gzip": _truncated_gzip,
    "corrupt-gzip": _corrupt_gzip,
    "digest-mismatch": _digest_mismatch,
    "bad-manifest": _bad_manifest,
    "unsupported-media-type": _unsupported_media_type,
}


def hostile_image(name: str, root: Path) -> HostileImage:
    """One hostile case (a key of `HOSTILE`), written as an OCI layout in ``root/name``."""
    return HOSTILE[name](root)


def hostile_images(root: Path) -> dict[str, HostileImage]:
    """Every hostile case, each in its own OCI layout below `root`."""
    return {name: build(root) for name, build in HOSTILE.items()}
