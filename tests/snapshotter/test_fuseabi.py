"""`snapshotter.device.fuseabi` against the kernel's own <linux/fuse.h> (linux-libc-dev).

A generated C program prints, for every structure in `fuseabi.LAYOUTS`, its ``sizeof``, the
``offsetof``, ``sizeof`` and signedness of each C field our `struct.Struct` covers, and the
``offsetof`` of the member where ours stops (the nested ``attr``, a ``name[]``); it also prints every
opcode, notify code and flag the module defines. The test compiles it with gcc against the system
header and compares each number with what our formats say: a field's offset is ``struct.calcsize`` of
the format before it (``<`` formats have no padding; an ``Nx`` run or an ``Ns`` is one field).

Field names are those of protocol 7.38 (Debian 12's linux-libc-dev 6.1). They differ across header
versions, so an older or newer header can fail to compile here even though the bytes agree:

- ``fuse_in_header.total_extlen`` appeared in 7.38, splitting ``uint32_t padding`` into
  ``uint16_t total_extlen; uint16_t padding`` (same bytes);
- ``fuse_init_in.flags2`` (where ours stops) and ``fuse_init_out.flags2`` appeared in 7.36, when
  ``fuse_init_in`` grew past ``flags``; ``fuse_init_out.map_alignment`` in 7.31 (both were ``unused``);
- ``fuse_attr.flags`` was ``padding`` before 7.32;
- in 7.40 (FUSE passthrough) ``fuse_init_out.unused[7]`` begins with ``max_stack_depth`` and
  ``fuse_open_out.padding`` became ``int32_t backing_id``: neither is a field we name.

When the program does not compile, the failure names the header's protocol version.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from snapshotter.device import fuseabi

HEADER = Path("/usr/include/linux/fuse.h")

#: Our constant -> its C name, where that is not ``FUSE_`` + ours.
C_NAMES = {
    "KERNEL_MAJOR": "FUSE_KERNEL_VERSION",
    "ROOT_INODE": "FUSE_ROOT_ID",
    "FOPEN_KEEP_CACHE": "FOPEN_KEEP_CACHE",
    "FATTR_SIZE": "FATTR_SIZE",
    "FALLOC_FL_KEEP_SIZE": "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE": "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE": "FALLOC_FL_ZERO_RANGE",
}

#: Constants of ours that the header does not define, and why.
OURS = {
    "KERNEL_MINOR": "the minor we speak: at most FUSE_KERNEL_MINOR_VERSION (a test below)",
    "INIT_FLAGS": "what INIT asks for: a union of the FUSE_* flags checked here",
}

_ITEM = re.compile(r"\s*(\d*)([xcbB?hHiIlLqQnNefdspP])\s*")


@dataclass(frozen=True)
class Item:
    """One field of a struct format: ``fmt`` alone (``I``, ``28x``, ``4s``), whether it is signed."""

    fmt: str
    signed: bool | None  # None: pad bytes or a byte string, no integer to compare


def format_items(st: struct.Struct) -> tuple[str, list[Item]]:
    """The byte-order prefix of `st`'s format and its fields, a count repeating an integer code."""
    fmt = st.format
    order = fmt[0] if fmt and fmt[0] in "@=<>!" else ""
    items: list[Item] = []
    pos = len(order)
    while pos < len(fmt):
        m = _ITEM.match(fmt, pos)
        assert m is not None, f"cannot read struct format {fmt!r} at {pos}"
        count, code = m.group(1), m.group(2)
        if code in "xsp":
            items.append(Item(count + code, None))
        else:
            items.extend(Item(code, code.islower()) for _ in range(int(count or 1)))
        pos = m.end()
    return order, items


def c_program() -> str:
    out = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/fuse.h>",
        "#include <linux/falloc.h>",
        "#define MEMBER(T, f) (((struct T *)0)->f)",
        "#define SIGNED(T, f) ((__typeof__(MEMBER(T, f)))-1 < 0)",
        "int main(void) {",
        '    printf("version %d %d\\n", FUSE_KERNEL_VERSION, FUSE_KERNEL_MINOR_VERSION);',
    ]
    for ctype, (st, names, stop) in fuseabi.LAYOUTS.items():
        out.append(f'    printf("size {ctype} %zu\\n", sizeof(struct {ctype}));')
        _, items = format_items(st)
        for name, item in zip(names, items, strict=False):
            signed = f"SIGNED({ctype}, {name})" if item.signed is not None else "-1"
            out.append(
                f'    printf("field {ctype} {name} %zu %zu %d\\n", offsetof(struct {ctype}, {name}), '
                f"sizeof(MEMBER({ctype}, {name})), (int){signed});"
            )
        if stop is not None:
            out.append(f'    printf("stop {ctype} {stop} %zu\\n", offsetof(struct {ctype}, {stop}));')
    for ours, c in constants().items():
        out.append(f'    printf("const {ours} %lld\\n", (long long){c});')
    out += ["    return 0;", "}", ""]
    return "\n".join(out)


def constants() -> dict[str, str]:
    """Every integer constant of fuseabi -> its C name: opcodes, notify codes, flags, ids."""
    return {
        name: C_NAMES.get(name, f"FUSE_{name}")
        for name, value in vars(fuseabi).items()
        if name.isupper() and isinstance(value, int) and name not in OURS
    }


@dataclass
class Kernel:
    """What the compiled program printed."""

    version: tuple[int, int]
    sizes: dict[str, int]
    fields: dict[tuple[str, str], tuple[int, int, int]]  # offset, size, signed (1/0, -1 not asked)
    stops: dict[str, int]
    constants: dict[str, int]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Kernel:
    assert HEADER.is_file(), f"{HEADER} is missing: apt-get install linux-libc-dev (scripts/system_deps.sh)"
    work = tmp_path_factory.mktemp("fuseabi")
    src, exe = work / "fuseabi.c", work / "fuseabi"
    src.write_text(c_program())
    built = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if built.returncode != 0:
        minor = re.search(r"#define FUSE_KERNEL_MINOR_VERSION (\d+)", HEADER.read_text())
        pytest.fail(
            f"the program compiled from fuseabi.LAYOUTS does not build against {HEADER} "
            f"(protocol 7.{minor.group(1) if minor else '?'}; our field names are those of 7.38, see "
            f"this module's docstring; a constant of ours that the header lacks belongs in OURS, one "
            f"named otherwise in C in C_NAMES):\n{built.stderr}\n{src}"
        )
    ran = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=60)
    k = Kernel((0, 0), {}, {}, {}, {})
    for line in ran.stdout.splitlines():
        kind, *rest = line.split()
        if kind == "version":
            k.version = (int(rest[0]), int(rest[1]))
        elif kind == "size":
            k.sizes[rest[0]] = int(rest[1])
        elif kind == "field":
            k.fields[rest[0], rest[1]] = (int(rest[2]), int(rest[3]), int(rest[4]))
        elif kind == "stop":
            k.stops[rest[0]] = int(rest[2])
        elif kind == "const":
            k.constants[rest[0]] = int(rest[1])
    return k


def mismatches(
    ctype: str, st: struct.Struct, names: tuple[str, ...], stop: str | None, k: Kernel
) -> list[str]:
    """How `st` (covering the C `names`, up to `stop`) differs from `ctype` in the header; [] if not."""
    order, items = format_items(st)
    assert order == "<", f"{ctype}: {st.format!r} is not little-endian and unpadded ('<')"
    assert len(names) <= len(items), f"{ctype}: {len(names)} names for {len(items)} fields of {st.format!r}"
    bad: list[str] = []
    for i, name in enumerate(names):
        offset = struct.calcsize(order + "".join(it.fmt for it in items[:i]))
        size = struct.calcsize(order + items[i].fmt)
        c_offset, c_size, c_signed = k.fields[ctype, name]
        if (offset, size) != (c_offset, c_size):
            bad.append(
                f"{ctype}.{name}: ours {items[i].fmt!r} at offset {offset}, {size} bytes; "
                f"<linux/fuse.h>: offset {c_offset}, {c_size} bytes"
            )
        if items[i].signed is not None and items[i].signed != bool(c_signed):
            bad.append(
                f"{ctype}.{name}: ours {items[i].fmt!r} is signed={items[i].signed}, C signed={c_signed}"
            )
    end, what = (k.sizes[ctype], "sizeof") if stop is None else (k.stops[ctype], f"offsetof {stop}")
    if st.size != end:
        bad.append(f"{ctype}: ours {st.format!r} is {st.size} bytes; <linux/fuse.h>: {what} = {end}")
    return bad


@pytest.mark.parametrize("ctype", sorted(fuseabi.LAYOUTS))
def test_structure_matches_linux_fuse_h(kernel: Kernel, ctype: str) -> None:
    st, names, stop = fuseabi.LAYOUTS[ctype]
    assert mismatches(ctype, st, names, stop, kernel) == []


def test_every_structure_of_fuseabi_is_checked() -> None:
    listed = {id(st) for st, _, _ in fuseabi.LAYOUTS.values()}
    unlisted = [n for n, v in vars(fuseabi).items() if isinstance(v, struct.Struct) and id(v) not in listed]
    assert unlisted == [], f"structures missing from fuseabi.LAYOUTS: {unlisted}"


def test_changed_format_is_caught(kernel: Kernel) -> None:
    """The comparison itself sees a widened, narrowed, re-signed or dropped field, and a short tail."""
    st, names, stop = fuseabi.LAYOUTS["fuse_init_out"]
    assert st.format == "<IIIIHHIIHHI28x", "update this test's mutations with fuseabi.INIT_OUT"
    for fmt in ("<IIIIHHIIIHI28x", "<IIIIHHIIHHI24x", "<IIIIHHIIhHI28x", "<IIIHHIIHHI32x", "<IIIIHHIIHHQ24x"):
        assert mismatches("fuse_init_out", struct.Struct(fmt), names, stop, kernel), fmt
    st, names, stop = fuseabi.LAYOUTS["fuse_entry_out"]
    assert mismatches("fuse_entry_out", struct.Struct(st.format + "I"), names, stop, kernel)


def test_constants_match_linux_fuse_h(kernel: Kernel) -> None:
    """Opcodes (enum fuse_opcode), notify codes, init/open/setattr flags, FUSE_ROOT_ID, falloc modes."""
    expected = {name: getattr(fuseabi, name) for name in constants()}
    assert {"LOOKUP", "LSEEK", "NOTIFY_STORE", "ASYNC_READ", "MAX_PAGES", "ROOT_INODE"} <= expected.keys()
    assert kernel.constants == expected


def test_init_flags_we_ask_for_are_checked_kernel_flags() -> None:
    checked = ("ASYNC_READ", "BIG_WRITES", "AUTO_INVAL_DATA", "ASYNC_DIO", "PARALLEL_DIROPS", "MAX_PAGES")
    known = {getattr(fuseabi, name) for name in checked}
    asked = getattr(fuseabi, "INIT_FLAGS", 0)
    assert {1 << bit for bit in range(64) if asked >> bit & 1} <= known


def test_spoken_minor_is_one_the_header_knows(kernel: Kernel) -> None:
    major, minor = kernel.version
    assert (major, minor) >= (fuseabi.KERNEL_MAJOR, fuseabi.KERNEL_MINOR)
