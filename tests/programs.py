"""Small native programs the tests put into images, compiled here (gcc, static: they run in any root).

`euid_program` prints its effective and real user ids — made setuid root, it shows whether a mount
honours setuid (``euid=0``) or not (``euid=<caller>``). Busybox cannot stand in: it drops a setuid
bit on purpose for applets such as ``id``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

EUID_C = r"""
#include <stdio.h>
#include <unistd.h>
int main(void) {
    printf("euid=%d uid=%d\n", (int)geteuid(), (int)getuid());
    return 0;
}
"""


def euid_program(where: Path) -> bytes:
    """The bytes of a static x86-64/arm64 (host) executable that prints ``euid=E uid=U``."""
    where.mkdir(parents=True, exist_ok=True)
    src = where / "euid.c"
    out = where / "euid"
    if not out.exists():
        src.write_text(EUID_C)
        subprocess.run(
            ["gcc", "-static", "-O2", "-o", str(out), str(src)], check=True, capture_output=True, timeout=120
        )
    return out.read_bytes()
