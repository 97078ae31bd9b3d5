"""`damselfly fetch` against a real docker-registry on loopback: the OCI layout it writes (checked by
skopeo), re-fetches, multi-platform indexes, auth, and failures — exit code, one clear message, bounded
time, and never a half-written blob file.

Most cases run in-process through click's CliRunner; the bounded-time and concurrency cases run the
installed `damselfly` command in subprocesses with timeouts, so a hang fails the test.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from click.testing import CliRunner, Result

from blockformat.digest import digest_of
from p2p.auth import static_credentials
from p2p.manifest import DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST, Platform
from p2p.registry import RegistryClient
from scripts.demolib.registry import free_port
from snapshotter.cli import cli
from snapshotter.cli.errors import EXIT_CORRUPT, EXIT_ERROR, EXIT_OK, EXIT_USAGE
from snapshotter.cli.fetch import CONTAINERD_NAME
from snapshotter.image.ocilayout import REF_NAME
from tests.conftest import ALICE, FAST_RETRY, FAST_TIMEOUTS
from tests.p2p.faultproxy import Fault, FaultProxy
from tests.p2p.images import TestImage, make_image, push_image, push_multiarch
from tests.p2p.registry_server import RegistryServer

DAMSELFLY = Path(sys.executable).with_name("damselfly")
SKOPEO = shutil.which("skopeo")


def _require_skopeo() -> str:
    # CI installs skopeo (.ci/run); a missing tool is a failure, never a skip.
    if SKOPEO is None:
        pytest.fail("skopeo is not installed: apt-get install skopeo")
    return SKOPEO


needs_skopeo = pytest.mark.usefixtures("skopeo_bin")


@pytest.fixture
def skopeo_bin() -> str:
    return _require_skopeo()


BIG_LAYER = random.Random(7).randbytes(3 * 1024 * 1024 + 5)  # several network reads, a visible progress bar


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_ambient_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty DOCKER_CONFIG, so the machine's own config.json never leaks in."""
    d = tmp_path / "docker-config"
    d.mkdir()
    monkeypatch.setenv("DOCKER_CONFIG", str(d))
    monkeypatch.delenv("DAMSELFLY_PASSWORD", raising=False)
    return d


_counter = iter(range(1_000_000))


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository unique to the test (and so blobs unique to it, safe to corrupt)."""
    return f"fetch/case-{next(_counter)}"


def unique_image(platform: Platform | None = None, docker: bool = False) -> TestImage:
    """An image whose blobs no other test shares (the registry deduplicates blobs across repositories)."""
    salt = os.urandom(16)
    layers = [salt + BIG_LAYER, salt + b"small second layer"]
    if platform is None:
        return make_image(layers, docker=docker)
    return make_image(layers, platform, docker=docker)


# -- helpers --------------------------------------------------------------------------------------


def fetch(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, ["fetch", *map(str, args)], catch_exceptions=False)


def damselfly(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DAMSELFLY, *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )


def blob_path(layout: Path, digest: str) -> Path:
    algorithm, _, hexpart = digest.partition(":")
    return layout / "blobs" / algorithm / hexpart


def index_entries(layout: Path) -> list[dict[str, Any]]:
    doc = json.loads((layout / "index.json").read_text())
    assert doc["schemaVersion"] == 2
    entries: list[dict[str, Any]] = doc["manifests"]
    return entries


def leftovers(layout: Path) -> list[Path]:
    """Temporary files a fetch must never leave behind."""
    return [p for p in layout.rglob("*") if p.name.endswith(".partial")] if layout.exists() else []


def partial_of(layout: Path, digest: str) -> bool:
    """Whether a fetch has written bytes into the partial file of the blob `digest`."""
    for p in leftovers(layout):
        with contextlib.suppress(FileNotFoundError):  # renamed away meanwhile
            if p.name.startswith(f".{digest.partition(':')[2]}.") and p.stat().st_size:
                return True
    return False


def push_v1(pusher: RegistryClient, repo: str) -> TestImage:
    """A fresh image, pushed as `repo`:v1."""
    image = unique_image()
    push_image(pusher, repo, image, "v1")
    return image


@contextlib.contextmanager
def faulty_layer(
    registry: RegistryServer,
    layer: str,
    kind: Literal["reset", "stall"],
    *,
    times: int = 1,
    seconds: float = 5.0,
) -> Iterator[FaultProxy]:
    """A proxy to `registry` whose GETs of blob `layer` meet the fault `kind` (see `Fault`)."""
    with FaultProxy(registry.host) as proxy:
        fault = Fault(kind, path_contains=layer.partition(":")[2], method="GET", times=times, seconds=seconds)
        proxy.add(fault)
        yield proxy


def assert_error(result: Result, code: int, *needles: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    # Progress rows (if any) come first; the error is the last line, and the only one.
    errors = [line for line in result.stderr.splitlines() if line.startswith("damselfly: error: ")]
    assert len(errors) == 1 and result.stderr.splitlines()[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"


def assert_fetched(ref: str, dest: Path, image: TestImage, *options: str) -> None:
    """``damselfly fetch -q REF --dest DEST OPTIONS`` succeeds, and DEST holds `image`."""
    result = fetch(ref, "--dest", dest, "-q", *options)
    assert result.exit_code == EXIT_OK, result.stderr
    assert_holds_image(dest, image)


def assert_holds_image(layout: Path, image: TestImage) -> None:
    for data in (image.config, image.manifest, *image.layers):
        assert blob_path(layout, digest_of(data)).read_bytes() == data


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    assert SKOPEO is not None
    return subprocess.run([SKOPEO, *args], capture_output=True, text=True, timeout=60, check=False)


def flip_byte(path: Path, offset: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


# -- the layout -----------------------------------------------------------------------------------


@needs_skopeo
def test_fetch_writes_an_oci_layout_that_skopeo_reads(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = push_v1(pusher, repo)
    dest = tmp_path / "layout"

    result = fetch(f"{registry.host}/{repo}:v1", "--dest", dest)

    assert result.exit_code == EXIT_OK, result.stderr
    assert "4 blob(s) fetched" in result.stdout and image.manifest_digest in result.stdout
    assert json.loads((dest / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert_holds_image(dest, image)
    [entry] = index_entries(dest)
    assert entry["mediaType"] == OCI_MANIFEST
    assert entry["digest"] == image.manifest_digest and entry["size"] == len(image.manifest)
    assert entry["annotations"] == {REF_NAME: "v1", CONTAINERD_NAME: f"{registry.host}/{repo}:v1"}
    assert leftovers(dest) == []

    inspected = skopeo("inspect", f"oci:{dest}:v1")
    assert inspected.returncode == 0, inspected.stderr
    info = json.loads(inspected.stdout)
    assert info["Digest"] == image.manifest_digest
    assert info["Layers"] == [digest_of(layer) for layer in image.layers]
    copied = skopeo("copy", f"oci:{dest}:v1", f"dir:{tmp_path / 'copy'}")
    assert copied.returncode == 0, copied.stderr
    for layer in image.layers:
        assert (tmp_path / "copy" / digest_of(layer).partition(":")[2]).read_bytes() == layer


def test_blob_files_are_readable_like_ordinary_files(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = push_v1(pusher, repo)
    umask = os.umask(0o022)
    try:
        assert fetch(f"{registry.host}/{repo}:v1", "--dest", tmp_path / "l", "-q").exit_code == EXIT_OK
    finally:
        os.umask(umask)
    for data in (image.config, image.manifest, *image.layers):
        assert blob_path(tmp_path / "l", digest_of(data)).stat().st_mode & 0o777 == 0o644


@needs_skopeo
@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker"])
def test_index_is_stored_with_only_the_selected_platform(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path, docker: bool
) -> None:
    amd = unique_image(Platform("linux", "amd64"), docker)
    arm = unique_image(Platform("linux", "arm64"), docker)
    index_digest, index_raw = push_multiarch(pusher, repo, [amd, arm], "multi", docker)
    dest = tmp_path / "layout"

    result = fetch(f"{registry.host}/{repo}:multi", "--dest", dest, "--platform", "linux/arm64", "-q")

    assert result.exit_code == EXIT_OK, result.stderr
    assert blob_path(dest, index_digest).read_bytes() == index_raw
    assert_holds_image(dest, arm)
    for data in (amd.manifest, *amd.layers):
        assert not blob_path(dest, digest_of(data)).exists()
    [entry] = index_entries(dest)
    assert entry["mediaType"] == (DOCKER_MANIFEST_LIST if docker else OCI_INDEX)
    assert entry["digest"] == index_digest

    # skopeo (containers/image) looks a tag up among OCI-typed index.json entries only; a Docker-typed
    # entry is still read when it is the layout's only one and no tag is given.
    where = f"oci:{dest}" if docker else f"oci:{dest}:multi"
    inspected = skopeo("inspect", "--override-arch", "arm64", where)
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Layers"] == [digest_of(layer) for layer in arm.layers]


@needs_skopeo
def test_docker_schema2_manifest_is_kept_byte_for_byte(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = unique_image(docker=True)
    push_image(pusher, repo, image, "v1")
    dest = tmp_path / "layout"
    assert fetch(f"{registry.host}/{repo}:v1", "--dest", dest, "-q").exit_code == EXIT_OK
    [entry] = index_entries(dest)
    assert entry["mediaType"] == DOCKER_MANIFEST
    assert_holds_image(dest, image)
    inspected = skopeo("inspect", f"oci:{dest}")  # no tag: see the index test above
    assert inspected.returncode == 0, inspected.stderr
    assert json.loads(inspected.stdout)["Digest"] == image.manifest_digest


def test_fetch_by_digest_is_listed_without_a_tag(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = unique_image()
    digest = push_image(pusher, repo, image, None)
    dest = tmp_path / "layout"
    ref = f"{registry.host}/{repo}@{digest}"
    assert fetch(ref, "--dest", dest, "-q").exit_code == EXIT_OK
    assert fetch(ref, "--dest", dest, "-q").exit_code == EXIT_OK  # listed once, not twice
    [entry] = index_entries(dest)
    assert entry["digest"] == digest
    assert entry["annotations"] == {CONTAINERD_NAME: ref}


def test_default_destination_is_the_repository_name(
    registry: RegistryServer,
    pusher: RegistryClient,
    repo: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = push_v1(pusher, repo)
    monkeypatch.chdir(tmp_path)
    assert fetch(f"{registry.host}/{repo}:v1", "-q").exit_code == EXIT_OK
    assert_holds_image(tmp_path / repo.rsplit("/", 1)[1], image)


# -- fetching again -------------------------------------------------------------------------------


def test_second_fetch_keeps_valid_blobs_and_replaces_a_damaged_one(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = push_v1(pusher, repo)
    dest = tmp_path / "layout"
    ref = f"{registry.host}/{repo}:v1"
    assert fetch(ref, "--dest", dest, "-q").exit_code == EXIT_OK
    config = blob_path(dest, image.config_descriptor.digest)
    before = config.stat().st_ino

    again = fetch(ref, "--dest", dest, "-q")
    assert again.exit_code == EXIT_OK
    assert "0 blob(s) fetched (0 B), 4 already present" in again.stdout
    assert config.stat().st_ino == before  # not rewritten

    big = blob_path(dest, digest_of(image.layers[0]))
    flip_byte(big, 12345)
    repaired = fetch(ref, "--dest", dest, "-q")
    assert repaired.exit_code == EXIT_OK
    assert "1 blob(s) fetched" in repaired.stdout and "3 already present" in repaired.stdout
    assert_holds_image(dest, image)


def test_fetching_two_tags_lists_both_and_a_moved_tag_replaces_its_entry(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    one, two = unique_image(), unique_image()
    push_image(pusher, repo, one, "one")
    push_image(pusher, repo, two, "two")
    dest = tmp_path / "layout"
    for tag in ("one", "two"):
        assert fetch(f"{registry.host}/{repo}:{tag}", "--dest", dest, "-q").exit_code == EXIT_OK
    assert {(e["annotations"][REF_NAME], e["digest"]) for e in index_entries(dest)} == {
        ("one", one.manifest_digest),
        ("two", two.manifest_digest),
    }
    push_image(pusher, repo, two, "one")  # move the tag
    assert fetch(f"{registry.host}/{repo}:one", "--dest", dest, "-q").exit_code == EXIT_OK
    assert sorted(e["digest"] for e in index_entries(dest)) == [two.manifest_digest] * 2


def test_concurrent_fetches_into_one_directory_keep_both_entries(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    images = {f"t{i}": unique_image() for i in range(4)}
    for tag, image in images.items():
        push_image(pusher, repo, image, tag)
    dest = tmp_path / "layout"
    dest.mkdir()
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    procs = [
        subprocess.Popen(
            [DAMSELFLY, "fetch", "-q", "--dest", str(dest), f"{registry.host}/{repo}:{tag}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in images
    ]
    for p in procs:
        _out, err = p.communicate(timeout=60)
        assert p.returncode == EXIT_OK, err
    entries = {e["annotations"][REF_NAME]: e["digest"] for e in index_entries(dest)}
    assert entries == {tag: image.manifest_digest for tag, image in images.items()}
    for image in images.values():
        assert_holds_image(dest, image)
    assert leftovers(dest) == []


def test_partial_files_of_dead_processes_are_removed(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    push_v1(pusher, repo)
    dest = tmp_path / "layout"
    assert fetch(f"{registry.host}/{repo}:v1", "--dest", dest, "-q").exit_code == EXIT_OK
    ended = subprocess.Popen(["true"])
    ended.wait()
    dead_pid = ended.pid  # a process that has ended (and been reaped)
    blobs = dest / "blobs" / "sha256"
    stale = blobs / f".{'a' * 64}.{dead_pid}.abc123_x.partial"
    alive = blobs / f".{'b' * 64}.{os.getpid()}.abc123_x.partial"  # this process: still running
    stranger = blobs / "notes.partial"  # not ours: left alone
    for p in (stale, alive, stranger):
        p.write_bytes(b"half a blob")

    assert fetch(f"{registry.host}/{repo}:v1", "--dest", dest, "-q").exit_code == EXIT_OK
    assert not stale.exists()
    assert alive.exists() and stranger.exists()


def test_a_fetch_killed_mid_blob_leaves_only_a_partial_file_which_the_next_fetch_removes(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = push_v1(pusher, repo)
    layer = digest_of(image.layers[0])
    dest = tmp_path / "layout"
    with faulty_layer(registry, layer, "stall", seconds=30) as proxy:
        proc = subprocess.Popen(
            [DAMSELFLY, "fetch", "-q", "-j", "1", "--dest", str(dest), f"{proxy.host}/{repo}:v1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 20
            while not partial_of(dest, layer) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            proc.kill()  # SIGKILL: no cleanup code runs
            proc.wait(timeout=10)
        [partial] = leftovers(dest)
        assert partial.name.startswith(f".{layer.partition(':')[2]}.{proc.pid}.")
        assert not blob_path(dest, layer).exists()
        assert not (dest / "index.json").exists()

    assert_fetched(f"{registry.host}/{repo}:v1", dest, image)
    assert leftovers(dest) == []


# -- failures -------------------------------------------------------------------------------------


def test_unknown_tag_fails_with_not_found_and_writes_nothing(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    push_image(pusher, repo, unique_image(), "v1")
    dest = tmp_path / "layout"
    result = fetch(f"{registry.host}/{repo}:no-such-tag", "--dest", dest)
    assert_error(result, EXIT_ERROR, f"{repo}:no-such-tag not found", "MANIFEST_UNKNOWN", "check the")
    assert not dest.exists()


def test_unknown_repository_fails_with_not_found(registry: RegistryServer, tmp_path: Path) -> None:
    result = fetch(f"{registry.host}/fetch/never-pushed:v1", "--dest", tmp_path / "l")
    assert_error(result, EXIT_ERROR, "not found")


def test_registry_down_fails_in_bounded_time_with_a_clear_message(tmp_path: Path) -> None:
    host = f"127.0.0.1:{free_port()}"  # nothing listens there
    dest = tmp_path / "layout"
    start = time.monotonic()
    result = damselfly("fetch", f"{host}/fetch/x:v1", "--dest", dest, timeout=90)
    elapsed = time.monotonic() - start
    assert result.returncode == EXIT_ERROR, result.stderr
    assert elapsed < 30, elapsed
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"damselfly: error: http://{host}/v2/fetch/x/manifests/v1: "), (
        result.stderr
    )
    assert "registry unavailable after" in result.stderr and "reachable" in result.stderr
    assert not dest.exists()


def test_wrong_bytes_from_the_registry_fail_as_corrupt_and_leave_no_blob(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = push_v1(pusher, repo)
    bad = digest_of(image.layers[0])
    flip_byte(registry.blob_data_path(bad), 1000)
    dest = tmp_path / "layout"

    result = fetch(f"{registry.host}/{repo}:v1", "--dest", dest, "-j", "1")

    assert_error(result, EXIT_CORRUPT, bad, "digest mismatch", "the bytes were discarded")
    assert not blob_path(dest, bad).exists()
    assert not (dest / "index.json").exists()
    assert leftovers(dest) == []


def test_a_connection_reset_mid_blob_is_retried_and_the_blob_is_whole(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = push_v1(pusher, repo)
    layer = digest_of(image.layers[0])
    with faulty_layer(registry, layer, "reset", times=2) as proxy:
        result = fetch(f"{proxy.host}/{repo}:v1", "--dest", tmp_path / "l", "-q")
        assert proxy.faults_applied("reset") == 2
    assert result.exit_code == EXIT_OK, result.stderr
    assert_holds_image(tmp_path / "l", image)
    assert leftovers(tmp_path / "l") == []


def test_a_blob_that_keeps_failing_leaves_no_partial_file(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = push_v1(pusher, repo)
    layer = digest_of(image.layers[0])
    dest = tmp_path / "layout"
    with faulty_layer(registry, layer, "reset", times=1000) as proxy:
        result = fetch(f"{proxy.host}/{repo}:v1", "--dest", dest)
    assert_error(result, EXIT_ERROR, "registry unavailable", layer)
    assert not blob_path(dest, layer).exists()
    assert not (dest / "index.json").exists()
    assert leftovers(dest) == []


def test_invalid_reference_is_a_usage_error(tmp_path: Path) -> None:
    result = fetch("127.0.0.1:5000/Bad_Repo:v1", "--dest", tmp_path / "l")
    assert_error(result, EXIT_USAGE, "invalid image reference", "Bad_Repo")


def test_malformed_platform_is_a_usage_error(tmp_path: Path) -> None:
    result = fetch("127.0.0.1:5000/x:v1", "--platform", "linux", "--dest", tmp_path / "l")
    assert result.exit_code == EXIT_USAGE
    assert "os/architecture" in result.stderr


def test_missing_platform_names_the_available_ones(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    push_multiarch(pusher, repo, [unique_image(Platform("linux", "amd64"))], "multi")
    result = fetch(f"{registry.host}/{repo}:multi", "--platform", "linux/s390x", "--dest", tmp_path / "l")
    assert_error(result, EXIT_ERROR, "no manifest for platform linux/s390x", "available: linux/amd64")


def test_a_non_empty_directory_that_is_not_a_layout_is_refused(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    push_image(pusher, repo, unique_image(), "v1")
    (tmp_path / "precious.txt").write_text("do not mix blobs into me")
    result = fetch(f"{registry.host}/{repo}:v1", "--dest", tmp_path)
    assert_error(result, EXIT_ERROR, "not empty and not an OCI image layout", "--dest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docker-config", "precious.txt"]


def test_a_layout_of_another_version_is_refused(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    push_image(pusher, repo, unique_image(), "v1")
    (tmp_path / "l").mkdir()
    (tmp_path / "l" / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    result = fetch(f"{registry.host}/{repo}:v1", "--dest", tmp_path / "l")
    assert_error(result, EXIT_ERROR, "imageLayoutVersion is '2.0.0'")


def test_a_broken_index_json_is_reported_not_overwritten(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    push_image(pusher, repo, unique_image(), "v1")
    dest = tmp_path / "l"
    dest.mkdir()
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text("{not json")
    result = fetch(f"{registry.host}/{repo}:v1", "--dest", dest, "-q")
    assert_error(result, EXIT_ERROR, "index.json: not valid JSON", "repair or remove it")
    assert (dest / "index.json").read_text() == "{not json"


# -- auth and output ------------------------------------------------------------------------------


def _push_to_basic(server: RegistryServer, repo: str) -> TestImage:
    image = unique_image()
    with RegistryClient(
        server.host,
        retry=FAST_RETRY,
        timeouts=FAST_TIMEOUTS,
        credentials=static_credentials({server.host: ALICE}),
    ) as c:
        push_image(c, repo, image, "v1")
    return image


def test_auth_without_credentials_fails_and_with_them_succeeds(
    basic_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    image = _push_to_basic(basic_registry, repo)
    ref = f"{basic_registry.host}/{repo}:v1"
    assert_error(
        fetch(ref, "--dest", tmp_path / "a"),
        EXIT_ERROR,
        "requires basic authentication",
        "no credentials for",
    )
    assert_error(
        fetch(ref, "--dest", tmp_path / "b", "-u", ALICE.username, "-p", "wrong"), EXIT_ERROR, "refused"
    )
    assert_fetched(ref, tmp_path / "c", image, "-u", ALICE.username, "-p", ALICE.password)


def test_auth_from_docker_config_json(
    basic_registry: RegistryServer, repo: str, tmp_path: Path, no_ambient_credentials: Path
) -> None:
    image = _push_to_basic(basic_registry, repo)
    auth = base64.b64encode(f"{ALICE.username}:{ALICE.password}".encode()).decode()
    (no_ambient_credentials / "config.json").write_text(
        json.dumps({"auths": {basic_registry.host: {"auth": auth}}})
    )
    assert_fetched(f"{basic_registry.host}/{repo}:v1", tmp_path / "l", image)


def test_progress_goes_to_stderr_and_quiet_silences_it(
    registry: RegistryServer, pusher: RegistryClient, repo: str, tmp_path: Path
) -> None:
    image = push_v1(pusher, repo)
    ref = f"{registry.host}/{repo}:v1"
    loud = fetch(ref, "--dest", tmp_path / "a")
    assert loud.exit_code == EXIT_OK
    big = digest_of(image.layers[0]).partition(":")[2][:12]
    assert big in loud.stderr and "layer 1/2" in loud.stderr and "manifest" in loud.stderr
    assert len(loud.stdout.splitlines()) == 1

    quiet = fetch(ref, "--dest", tmp_path / "b", "--quiet")
    assert quiet.exit_code == EXIT_OK
    assert quiet.stderr == ""
    assert quiet.stdout.splitlines() == [
        f"{ref}@{image.manifest_digest} -> {tmp_path / 'b'}: "
        f"4 blob(s) fetched ({_mib(image)}), 0 already present"
    ]


def _mib(image: TestImage) -> str:
    total = len(image.config) + len(image.manifest) + sum(len(x) for x in image.layers)
    return f"{total / 1024 / 1024:.1f} MiB"
