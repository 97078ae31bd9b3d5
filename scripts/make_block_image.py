#!/usr/bin/env python3
"""Make a converted (damselfly block) single-layer image from a directory, without the converter.

    make_block_image.py SRC_DIR LAYOUT_DIR [--ref NAME] [--codec lz4] [--chunk-size 65536] [--vsize BYTES]

SRC_DIR is put into a fresh ext4 (``mkfs.ext4 -d``), its used blocks become one layer blob, and the image
(config + manifest with damselfly annotations) is written to the OCI layout LAYOUT_DIR under the ref
NAME (default ``latest``); other images in the layout are kept. No root needed. Push it with e.g.
``skopeo copy oci:LAYOUT_DIR:NAME docker://localhost:5000/repo:NAME``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from blockformat.chunkfile import DEFAULT_CHUNK_SIZE
from blockformat.codecs import CODEC_NAMES
from snapshotter.errors import SnapshotterError
from snapshotter.image.blockimage import build_layer_from_dir, write_oci_layout

PROG = "make_block_image"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", help="the directory tree to put in the image")
    parser.add_argument("layout_dir", help="the OCI image layout to write (created if missing)")
    parser.add_argument(
        "--ref", default="latest", help="the image's ref name in the layout (default: latest)"
    )
    parser.add_argument(
        "--codec", default="lz4", choices=sorted(CODEC_NAMES), help="chunk codec (default: lz4)"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=f"bytes (default: {DEFAULT_CHUNK_SIZE})"
    )
    parser.add_argument(
        "--vsize", type=int, default=None, help="virtual device bytes (default: fit the tree)"
    )
    args = parser.parse_args(argv)

    start = time.monotonic()
    try:
        os.makedirs(args.layout_dir, exist_ok=True)
        # Build next to the layout so the blob is hard-linked into it, not copied.
        tmp = tempfile.mkdtemp(prefix=".make-block-image-", dir=args.layout_dir)
        try:
            blob = os.path.join(tmp, "layer.blob")
            info, annotations = build_layer_from_dir(
                args.src_dir,
                blob,
                workdir=tmp,
                vsize=args.vsize,
                codec=args.codec,
                chunk_size=args.chunk_size,
            )
            digest = write_oci_layout(args.layout_dir, [(blob, info, annotations)], args.ref)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (SnapshotterError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.layout_dir}:{args.ref} {digest}\n"
        f"  layer {info.blob_digest} {info.blob_size} bytes ({info.codec}, {info.chunk_size} B chunks, "
        f"{info.uncompressed_size} bytes of {annotations.vsize} used)\n"
        f"  built in {time.monotonic() - start:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
