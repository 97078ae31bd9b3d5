"""The writable upper: crash recovery from its append-only log, and commit."""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from blockformat.errors import CorruptBlobError, InvalidArgumentError
from blockformat.layer import LayerReader
from blockformat.source import BytesSource
from blockformat.stack import Stack
from blockformat.upper import DATA_FILE, LOG_FILE, RECORD, WritableUpper

VSIZE = 1 << 20


def test_unflushed_writes_are_lost_on_crash_flushed_ones_survive(tmp_path: Path) -> None:
    up = WritableUpper.create(str(tmp_path / "u"), VSIZE, flush_bytes=1 << 40)
    up.write(0, b"a" * 4096)
    up.trim(8192, 4096)
    up.flush()
    up.write(4096, b"b" * 4096)
    up.close(flush=False)
    again = WritableUpper.open(str(tmp_path / "u"))
    assert again.read(0, 8192) == b"a" * 4096 + bytes(4096)
    assert again.recovered_records == 2
    # The orphaned bytes of the lost write are cut from the data file.
    assert os.path.getsize(tmp_path / "u" / DATA_FILE) == 4096
    again.close()


def test_torn_log_tail_is_cut_and_appending_continues(tmp_path: Path) -> None:
    up = WritableUpper.create(str(tmp_path / "u"), VSIZE)
    up.write(0, b"x" * 512)
    up.close()
    with open(tmp_path / "u" / LOG_FILE, "ab") as f:
        f.write(b"\x01" + b"\xff" * 20)  # a record torn in the middle of its append
    up = WritableUpper.open(str(tmp_path / "u"))
    assert up.dropped_log_bytes == 21
    up.write(512, b"y" * 512)
    up.close()
    up = WritableUpper.open(str(tmp_path / "u"))
    assert up.read(0, 1024) == b"x" * 512 + b"y" * 512
    assert up.recovered_records == 2
    up.close()


def test_record_with_bad_crc_or_pointing_past_data_ends_replay(tmp_path: Path) -> None:
    up = WritableUpper.create(str(tmp_path / "u"), VSIZE)
    for i in range(3):
        up.write(i * 512, bytes([65 + i]) * 512)
        up.flush()
    up.close()
    log = tmp_path / "u" / LOG_FILE
    raw = bytearray(log.read_bytes())
    raw[32 + RECORD.size + 9] ^= 0xFF  # damage the second record's device offset
    log.write_bytes(bytes(raw))
    up = WritableUpper.open(str(tmp_path / "u"))
    assert up.recovered_records == 1
    assert up.read(0, 1536) == b"A" * 512 + bytes(1024)
    up.close()
    # Shorten the data file under the first record: nothing is replayed, nothing wrong is read.
    os.truncate(tmp_path / "u" / DATA_FILE, 100)
    up = WritableUpper.open(str(tmp_path / "u"))
    assert up.recovered_records == 0
    assert up.read(0, 512) == bytes(512)
    up.close()


def test_damaged_log_header_is_a_clear_error(tmp_path: Path) -> None:
    WritableUpper.create(str(tmp_path / "u"), VSIZE).close()
    log = tmp_path / "u" / LOG_FILE
    raw = bytearray(log.read_bytes())
    raw[17] ^= 1  # vsize
    log.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlobError, match="upper log header CRC32"):
        WritableUpper.open(str(tmp_path / "u"))


def test_create_refuses_an_existing_upper_and_unaligned_io(tmp_path: Path) -> None:
    up = WritableUpper.create(str(tmp_path / "u"), VSIZE)
    with pytest.raises(InvalidArgumentError, match="already holds"):
        WritableUpper.create(str(tmp_path / "u"), VSIZE)
    with pytest.raises(InvalidArgumentError, match="sectors"):
        up.write(100, b"x" * 512)
    with pytest.raises(InvalidArgumentError, match="beyond the device"):
        up.trim(VSIZE - 512, 1024)
    up.close()


def test_commit_seals_only_the_diff_over_the_lower_stack(tmp_path: Path) -> None:
    base = WritableUpper.create(str(tmp_path / "base"), VSIZE)
    base.write(0, b"B" * 65536)
    out = io.BytesIO()
    info = base.commit(out, "zstd", 16384)
    base.remove()
    lower = Stack([LayerReader(BytesSource(out.getvalue()), info.index_digest)])
    up = WritableUpper.create(str(tmp_path / "top"), VSIZE, lower)
    up.write(4096, b"T" * 4096)
    up.trim(16384, 8192)
    assert up.read(0, 32768) == b"B" * 4096 + b"T" * 4096 + b"B" * 8192 + bytes(8192) + b"B" * 8192
    out2 = io.BytesIO()
    info2 = up.commit(out2, "lz4", 4096)
    top = LayerReader(BytesSource(out2.getvalue()), info2.index_digest)
    assert [(e.offset, e.length, e.data_offset is None) for e in top.extents] == [
        (4096, 4096, False),
        (16384, 8192, True),
    ]
    assert Stack([*lower.layers, top]).read(0, 65536) == up.read(0, 65536)
    up.remove()
    assert not os.path.exists(tmp_path / "top" / LOG_FILE)


WRITER = textwrap.dedent(
    """
    import sys
    from blockformat.upper import WritableUpper
    up = WritableUpper.create(sys.argv[1], 1 << 24, flush_bytes=1 << 40)
    i = 0
    while True:
        block = (i * 7919) % 4096
        up.write(block * 4096, i.to_bytes(4, "little") * 1024)
        if i % 3 == 0:
            up.trim(((block + 1) % 4096) * 4096, 4096)
        up.flush()
        print(i, flush=True)
        i += 1
    """
)


def test_sigkill_mid_write_recovers_every_flushed_write(tmp_path: Path) -> None:
    """A real process writing and flushing in a loop is killed; the recovered upper holds exactly a
    prefix of its writes: at least every one it reported durable, none torn."""
    path = str(tmp_path / "u")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, path], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    last = -1
    for line in proc.stdout:
        last = int(line)
        if last >= 300 or time.monotonic() > deadline:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert last >= 0, "the writer never reported a durable write"
    up = WritableUpper.open(path)
    n = up.recovered_records
    # Replay the writer's sequence up to what was recovered and compare the whole device.
    model = bytearray(1 << 24)
    records = 0
    i = 0
    while records < n:
        block = (i * 7919) % 4096
        model[block * 4096 : (block + 1) * 4096] = i.to_bytes(4, "little") * 1024
        records += 1
        if i % 3 == 0 and records < n:
            nxt = ((block + 1) % 4096) * 4096
            model[nxt : nxt + 4096] = bytes(4096)
            records += 1
        i += 1
    assert i - 1 >= last, f"write {last} was reported durable but only {i} writes recovered"
    assert up.read(0, 1 << 24) == bytes(model)
    up.close()


def test_reads_racing_writes_only_ever_see_whole_old_or_new_blocks(tmp_path: Path) -> None:
    # The device daemon serves reads on some threads while another writes (the converter's ext4):
    # a read must never see the extent map half-updated (bytes of another block, or of nothing).
    block, blocks = 4096, 256
    up = WritableUpper.create(str(tmp_path / "u"), block * blocks)

    def content(i: int, version: int) -> bytes:
        return (i.to_bytes(4, "little") + version.to_bytes(4, "little")) * (block // 8)

    stop = threading.Event()
    bad: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(blocks - 3)
            try:
                data = up.read(i * block, 3 * block)
            except Exception as e:  # a map caught half-updated can also make a read fail
                bad.append(f"read of block {i}: {e!r}")
                continue
            for k in range(3):
                got = data[k * block : (k + 1) * block]
                if got != bytes(block) and got[:4] != (i + k).to_bytes(4, "little"):
                    bad.append(f"block {i + k} read as block {int.from_bytes(got[:4], 'little')}")
                if got != bytes(block) and got != got[:8] * (block // 8):
                    bad.append(f"block {i + k} mixes two writes")

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    rng = random.Random(1)
    try:
        for version in range(4000):
            i = rng.randrange(blocks - 1)
            n = rng.choice((1, 2))  # runs of one or two blocks split and merge map segments
            up.write(i * block, b"".join(content(i + k, version) for k in range(n)))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not bad, bad[:5]
    up.close()
