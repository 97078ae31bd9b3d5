"""What the benchmarks (``scripts/bench_*.py``) share: sizes as their options and reports write them
(``64K``, ``1M``), what they say about the machine they ran on, and how a report is published: written
to its file, printed, and the file named on stderr."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

KIB = 1024
MIB = 1024 * KIB


def parse_size(text: str) -> int:
    """``4096``, ``64K``, ``64KiB``, ``1M``, ``1G`` (binary units) as bytes."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KIB, "M": MIB, "G": 1024 * MIB}.get(t[-1:], 1)
    return int(t[:-1] if mult != 1 else t) * mult


def fmt_size(n: int) -> str:
    """`parse_size` in reverse: the largest binary unit that divides `n` (``64K``), else bytes."""
    if n >= MIB and n % MIB == 0:
        return f"{n // MIB}M"
    if n >= KIB and n % KIB == 0:
        return f"{n // KIB}K"
    return str(n)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where it has none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine(*more: str) -> str:
    """One line of facts about the machine: CPU, CPU count, kernel, Python, then `more`."""
    facts = [f"CPU: {cpu_model()}, {os.cpu_count()} CPUs", f"kernel {platform.release()}"]
    return "; ".join([*facts, f"Python {platform.python_version()}", *more])


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages ("?" if unreadable): a busy machine skews every figure."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def git(*args: str) -> str:
    """``git ARGS`` in the repository, its output stripped ("" if git fails): which code was measured."""
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()


def publish(output: Path, text: str, log: Callable[[str], None]) -> None:
    """Write the report `text` to `output` (making its directory), print it, and log where it went."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    log(f"wrote {output}")
