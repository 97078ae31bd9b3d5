"""Sizes as people read them, in the command lines' reports (``3.2 MiB``)."""

from __future__ import annotations


def binary_size(n: int) -> str:
    """`n` bytes in B, KiB, MiB or GiB, one decimal past bytes (``512 B``, ``1.5 KiB``, ``12.0 GiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
