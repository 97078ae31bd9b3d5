"""The device daemon's one client: errors cross the control socket as themselves (so exit codes hold),
and the daemon's settings cross the process boundary as one typed object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blockformat.errors import CorruptBlobError, SourceError, UnsupportedFormatError
from snapshotter.cli.errors import EXIT_CORRUPT
from snapshotter.config import DeviceSection
from snapshotter.device.client import DeviceClient
from snapshotter.device.control import ControlServer
from snapshotter.errors import ControlError, DeviceError, ImageError, MountError

from .devd import DeviceLab, build_image

RAISED: list[Exception] = [
    CorruptBlobError("cache:sha256:ab", 4096, "chunk 3", "sha256:00", "sha256:ff", "fetch it again"),
    SourceError("registry/x@sha256:ab", 10, 20, "timed out"),
    UnsupportedFormatError("blob: format 9.0; upgrade damselfly"),
    DeviceError("device 'x' is attached with a different spec"),
    ImageError("/layout", "has no image 'v2'", "pass one of those"),
    MountError("mount /dev/loop9 at /mnt", ["mount", "/dev/loop9", "/mnt"], 32, "wrong fs type"),
]


@pytest.fixture
def server(tmp_path: Path) -> Any:
    raised = iter([*RAISED, KeyError("not on the wire")])

    def handler(request: dict[str, Any]) -> dict[str, Any]:
        if request["op"] == "ping":
            return {"pid": 1}
        raise next(raised)

    s = ControlServer(str(tmp_path / "devd.sock"), handler)
    s.start()
    yield s
    s.close()


def test_errors_cross_the_socket_as_the_same_class_with_the_same_fields(server: Any, tmp_path: Path) -> None:
    client = DeviceClient(str(tmp_path))
    for sent in RAISED:
        with pytest.raises(type(sent)) as caught:
            client.detach("x")
        got = caught.value
        assert type(got) is type(sent) and str(got) == str(sent)
        assert vars(got) == vars(sent) or isinstance(got, MountError)
    with pytest.raises(ControlError) as other:  # anything else: the message and its class name
        client.detach("x")
    assert other.value.kind == "KeyError" and "not on the wire" in str(other.value)


def test_the_socket_is_the_owners_alone_from_the_start(server: Any, tmp_path: Path) -> None:
    assert (tmp_path / "devd.sock").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["devd.sock"]  # the private bind directory is gone


def test_device_settings_cross_to_the_daemon_as_one_json_object() -> None:
    section = DeviceSection(state_dir="/run/x", read_timeout=12.5, fail_cooldown=0.5, unit_size=1 << 20)
    assert DeviceSection.from_json(section.to_json()) == section
    with pytest.raises(Exception, match="unit_size"):
        DeviceSection.from_json(json.dumps({"unit_size": 1000}))
    with pytest.raises(Exception, match="unknown key"):
        DeviceSection.from_json(json.dumps({"read_timout": 1.0}))


def test_a_corrupt_layer_found_by_the_daemon_exits_3_in_the_cli(tmp_path: Path) -> None:
    lab = DeviceLab(tmp_path / "lab")
    try:
        image = build_image(_tree(tmp_path / "src"), tmp_path / "image")
        daemon = lab.daemon()
        (blob,) = [
            p
            for p in (image.layout / "blobs" / "sha256").iterdir()
            if p.stat().st_size == image.info.blob_size
        ]
        data = bytearray(blob.read_bytes())
        data[-100] ^= 0xFF  # inside the index: its digest no longer matches the trailer's
        blob.chmod(0o644)
        blob.write_bytes(bytes(data))
        r = daemon.cli("attach", str(image.layout), check=False)
        assert r.returncode == EXIT_CORRUPT, r
        assert "corrupt" in r.stderr and "Traceback" not in r.stderr, r
    finally:
        assert not lab.close()


def _tree(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "f").write_text("x" * 10000)
    return root


def test_the_cli_can_print_the_daemons_help_without_a_daemon() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "snapshotter.cli", "device-daemon", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0 and "--settings" in r.stdout and "--fail-cooldown" in r.stdout
