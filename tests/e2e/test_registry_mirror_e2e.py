"""A converted image started lazily through a pull-through-cache mirror that containerd's hosts.toml names
(issue 15): a real containerd 1.6 whose proxy plugin is a `damselfly serve` started by the test, whose
``[registry] config_path`` is a temporary hosts tree naming the mirror for the origin registry.
`damselfly rpull` and ``ctr run`` start the container; the Prepare check, the block reads and the
background download all go to the mirror, and the origin's access log shows no request from damselfly
(only the mirror's own fetches, which carry Go's User-Agent).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from scripts.demolib.serve import release as release_remote
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_OK
from tests import oci_images as oi
from tests.p2p.registry_server import RegistryServer
from tests.snapshotter import serving

from .conftest import ContainerdFactory
from .containerd import Containerd
from .test_snapshotter_e2e import remove_container, wait_task

SNAPSHOTTER = "damselfly"
NS = "mirror-test"
DAMSELFLY_UA = b'"damselfly/'
DAMSELFLY = Path(sys.executable).with_name("damselfly")


@pytest.fixture
def origin_and_mirror() -> Iterator[tuple[RegistryServer, RegistryServer]]:
    with (
        RegistryServer(name="e2e-origin", access_log=True) as origin,
        RegistryServer(name="e2e-mirror", upstream=origin.url, access_log=True) as mirror,
    ):
        yield origin, mirror


@pytest.fixture
def serve_dir() -> Iterator[Path]:
    """A short directory for `damselfly serve` (its socket path must fit in sun_path)."""
    d = Path(tempfile.mkdtemp(prefix="dfly-mirror-", dir="/tmp"))
    try:
        yield d
    finally:
        serving.unmount_under(d)
        shutil.rmtree(d, ignore_errors=True)


def _log_since(registry: RegistryServer, offset: int) -> list[bytes]:
    with registry.log.open("rb") as f:
        f.seek(offset)
        return [line for line in f.read().split(b"\n") if b'"HEAD ' in line or b'"GET ' in line]


def _wait_complete(state: Path, timeout: float = 120.0) -> dict[str, object]:
    """Poll `damselfly devices` until every registry blob of the daemon at `state` is complete."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            [str(DAMSELFLY), "devices", "--state-dir", str(state)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        status: dict[str, object] = json.loads(out)
        blobs = [b for b in status["blobs"].values() if not b["local"]]  # type: ignore[attr-defined]
        if blobs and all(b["complete"] for b in blobs):
            return status
        assert time.monotonic() < deadline, f"background download did not complete in {timeout}s: {status}"
        time.sleep(0.3)


def test_lazy_start_goes_through_the_mirror_hosts_toml_names(
    make_containerd: ContainerdFactory,
    origin_and_mirror: tuple[RegistryServer, RegistryServer],
    serve_dir: Path,
    tmp_path: Path,
) -> None:
    origin, mirror = origin_and_mirror
    src = oi.push_image(
        origin.host, oi.write_layout(oi.busybox_image(), tmp_path / "layout"), "mirror/bb", "v1"
    )
    dst = f"{origin.host}/mirror/bb:damselfly"
    empty_hosts = tmp_path / "no-hosts"
    empty_hosts.mkdir()
    conv = CliRunner().invoke(
        cli,
        [
            "convert",
            "--quiet",
            src,
            dst,
            "--cache-dir",
            str(tmp_path / "cache"),
            "--hosts-dir",
            str(empty_hosts),
        ],
        catch_exceptions=False,
    )
    assert conv.exit_code == EXIT_OK, conv.output

    certs = serve_dir / "certs.d"
    (certs / origin.host).mkdir(parents=True)
    (certs / origin.host / "hosts.toml").write_text(
        f'server = "{origin.url}"\n[host."{mirror.url}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    state = serve_dir / "state"
    config = serve_dir / "config.toml"
    config.write_text(
        f'[device]\nstate_dir = "{state}"\nbackground_delay = 2.0\nread_timeout = 20.0\n\n'
        f'[registry]\nconfig_path = "{certs}"\n'
    )
    offset = origin.log_offset()  # from here on, damselfly must not ask the origin for anything

    served = serving.start(serve_dir, "--config", str(config))
    c: Containerd | None = None
    try:
        c = make_containerd(proxy_plugins={SNAPSHOTTER: str(served.socket)}, namespace=NS)
        r = CliRunner().invoke(
            cli,
            [
                "rpull",
                dst,
                "--address",
                c.address,
                "--namespace",
                NS,
                "--state-dir",
                str(state),
                "--config",
                str(config),
            ],
            catch_exceptions=False,
        )
        assert r.exit_code == EXIT_OK, r.output
        assert "remote" in r.output, r.output  # the layer went lazy: Prepare's check answered
        # A container that holds the chain's device while its background download completes.
        c.run(
            dst, ["/bin/sh", "-c", "sleep 600"], container_id="holder", snapshotter=SNAPSHOTTER, detach=True
        )
        wait_task(c, "holder", "RUNNING")
        assert c.run(dst, ["/bin/sh", "-c", "echo through the mirror"], snapshotter=SNAPSHOTTER).stdout == (
            "through the mirror\n"
        )
        _wait_complete(state)
        remove_container(c, "holder")
        c.ctr("image", "rm", "--sync", dst)
    finally:
        if c is not None:
            forced = c.stop()  # before the snapshotter goes: containerd may still call it
            assert not forced, forced
        served.stop()
        release_remote(served.root, state)

    from_damselfly = [line for line in _log_since(origin, offset) if DAMSELFLY_UA in line]
    assert not from_damselfly, from_damselfly
    assert any(b"/blobs/" in line for line in _log_since(origin, offset)), "the mirror never fetched upstream"
    ours = [line for line in _log_since(mirror, 0) if DAMSELFLY_UA in line]
    assert any(line.startswith(b"127.0.0.1") and b'"HEAD ' in line and b"/blobs/" in line for line in ours), (
        ours
    )
    assert any(b'"GET ' in line and b"/blobs/" in line and b'" 206 ' in line for line in ours), ours
    assert any(b"/manifests/damselfly" in line for line in ours), ours
