"""Sizes as people write and read them: ``10G`` in a config file or an option (`parse_size`), ``3.2 MiB``
in the command lines' reports (`binary_size`)."""

from __future__ import annotations


def binary_size(n: int) -> str:
    """`n` bytes in B, KiB, MiB or GiB, one decimal past bytes (``512 B``, ``1.5 KiB``, ``12.0 GiB``)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``4096``, ``4K``, ``64KiB``, ``1M``, ``10G``, ``1TiB`` (binary units, case ignored).

    Raises ValueError, naming the text and the forms accepted, for anything else."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = _UNITS.get(t[-1:], 1)
    if mult != 1:
        t = t[:-1]
    if not t.strip().isdigit():
        raise ValueError(f"{text!r} is not a size (bytes, or a number with K, M, G or T: 65536, 64K, 10G)")
    return int(t) * mult
