"""Model-based tests: random writes, trims, commits, stacking, flattening and crashes against a
plain bytearray model of the device. Every step compares the whole device with the model."""

from __future__ import annotations

import io
import shutil
import tempfile

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blockformat.layer import SECTOR, LayerReader
from blockformat.source import BytesSource
from blockformat.stack import Stack, flatten
from blockformat.upper import WritableUpper

VSIZE = 128 * 1024
SECTORS = VSIZE // SECTOR

sector_ranges = st.tuples(st.integers(0, SECTORS - 1), st.integers(1, 24)).map(
    lambda t: (t[0] * SECTOR, min(t[1], SECTORS - t[0]) * SECTOR)
)


class DeviceModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="damselfly-model-")
        self.model = bytearray(VSIZE)  # what the device must read as
        self.durable = bytearray(VSIZE)  # what it must read as after a crash (last flush)
        self.committed = bytearray(VSIZE)  # what the stack alone reads as
        self.layers: list[LayerReader] = []
        self.codec = "lz4"
        self.chunk_size = 4096
        self.upper_n = 0
        self.upper: WritableUpper | None = None

    def _stack(self) -> Stack:
        return Stack(self.layers, VSIZE)

    def _new_upper(self) -> None:
        self.upper_n += 1
        self.upper = WritableUpper.create(
            f"{self.dir}/upper{self.upper_n}", VSIZE, self._stack(), flush_bytes=1 << 40
        )

    @initialize(codec=st.sampled_from(["lz4", "zstd", "snappy", "none"]), shift=st.integers(12, 14))
    def setup(self, codec: str, shift: int) -> None:
        self.codec = codec
        self.chunk_size = 1 << shift
        self._new_upper()

    @rule(
        r=sector_ranges,
        fill=st.one_of(st.binary(min_size=1, max_size=64), st.just(b"\0")),
        seed=st.integers(0, 255),
    )
    def write(self, r: tuple[int, int], fill: bytes, seed: int) -> None:
        off, length = r
        data = (bytes([seed]) + fill) * (length // (len(fill) + 1) + 1)
        data = data[:length]
        assert self.upper is not None
        self.upper.write(off, data)
        self.model[off : off + length] = data

    @rule(r=sector_ranges)
    def trim(self, r: tuple[int, int]) -> None:
        off, length = r
        assert self.upper is not None
        self.upper.trim(off, length)
        self.model[off : off + length] = bytes(length)

    @rule()
    def flush(self) -> None:
        assert self.upper is not None
        self.upper.flush()
        self.durable[:] = self.model

    @rule()
    def crash_and_recover(self) -> None:
        assert self.upper is not None
        path = self.upper.path
        self.upper.close(flush=False)
        self.upper = WritableUpper.open(path, self._stack(), flush_bytes=1 << 40)
        self.model[:] = self.durable

    @rule()
    def reopen(self) -> None:
        assert self.upper is not None
        path = self.upper.path
        self.upper.close()
        self.upper = WritableUpper.open(path, self._stack(), flush_bytes=1 << 40)
        self.durable[:] = self.model

    @precondition(lambda self: len(self.layers) < 12)
    @rule()
    def commit(self) -> None:
        assert self.upper is not None
        out = io.BytesIO()
        info = self.upper.commit(out, self.codec, self.chunk_size)
        self.upper.remove()
        self.layers.append(
            LayerReader(BytesSource(out.getvalue(), f"layer{len(self.layers)}"), info.index_digest)
        )
        self.committed[:] = self.model
        self.durable[:] = self.model
        self._new_upper()

    @precondition(lambda self: len(self.layers) >= 1)
    @rule()
    def flatten_stack(self) -> None:
        out = io.BytesIO()
        info = flatten(self._stack(), out, self.codec, self.chunk_size)
        self.layers = [LayerReader(BytesSource(out.getvalue(), "flat"), info.index_digest)]
        assert self.upper is not None
        self.upper.lower = self._stack()

    @rule(r=st.tuples(st.integers(0, VSIZE), st.integers(0, VSIZE)))
    def read_range(self, r: tuple[int, int]) -> None:
        off, length = r
        assert self.upper is not None
        assert self.upper.read(off, length) == bytes(self.model[off : off + length])

    @invariant()
    def device_equals_model(self) -> None:
        if self.upper is None:
            return
        assert self.upper.read(0, VSIZE) == bytes(self.model)
        assert self._stack().read(0, VSIZE) == bytes(self.committed)

    def teardown(self) -> None:
        if self.upper is not None:
            self.upper.close()
        shutil.rmtree(self.dir, ignore_errors=True)


DeviceModel.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_device_matches_bytearray_model = DeviceModel.TestCase
