"""`damselfly record-trace`: run an image once, record what its start-up reads, store that with the image.

The image is pulled lazily (`damselfly rpull`), the device daemon records the reads of the image's
chain device (`snapshotter.device.prefetch.Recorder`) while ``ctr run`` runs the command in a
temporary container, and the trace (`blockformat.trace`) is pushed to the image's repository as an
OCI referrer of its manifest (`p2p.referrers`). Nodes that mount the image later replay it.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import time
import uuid
from pathlib import Path

import click

from blockformat.annotations import PREFIX
from blockformat.trace import TRACE_MEDIA_TYPE, Trace
from p2p.hosts import Resolver
from p2p.manifest import Descriptor, Manifest, Platform
from p2p.reference import Reference, parse_reference
from p2p.referrers import push_referrer
from p2p.registry import RegistryClient

from ..config import load, registry_settings
from ..device.client import DeviceClient
from ..errors import SnapshotterError
from ..image.spec import device_name
from ..remote.containerd import DEFAULT_ADDRESS, ContainerdClient
from ..remote.rpull import Puller, host_platform
from .errors import reports_errors
from .registryopts import HOSTS_DIR_OPTION

#: Seconds `ctr` gets to remove a container that was killed.
KILL_WAIT = 30.0


class TraceError(SnapshotterError):
    pass


def chain_device(manifest: Manifest, where: str) -> str:
    """The name of the device the image's converted layers are mounted from (the chain mount's)."""
    digests: list[str] = [
        d.digest for d in manifest.layers if any(k.startswith(PREFIX) for k in d.annotations)
    ]
    if not digests:
        raise TraceError(
            f"{where} has no converted layers: only images made by `damselfly convert` have traces"
        )
    if len(digests) != len(manifest.layers):
        raise TraceError(f"{where} mixes converted and plain layers; its traces cannot be replayed")
    return device_name(digests)


def _daemon_answers(daemon: DeviceClient, wait: float = 15.0) -> bool:
    """Whether the daemon answers, waiting `wait` seconds for one that may be starting (`damselfly
    serve` starts it in the background)."""
    until = time.monotonic() + wait
    while daemon.ping() is None:
        if time.monotonic() > until:
            return False
        time.sleep(0.1)
    return True


def drop_page_cache() -> None:
    """Drop clean page-cache pages, so every read of the image reaches the device (and the trace)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_container(
    address: str,
    namespace: str,
    snapshotter: str,
    name: str,
    command: tuple[str, ...],
    seconds: float,
    run_args: tuple[str, ...] = (),
) -> int:
    """``ctr run --rm`` the command; killed after `seconds`. Its exit status (or -9)."""
    cid = f"damselfly-trace-{uuid.uuid4().hex[:12]}"
    base = ["ctr", "--address", address, "--namespace", namespace]
    argv = [*base, "run", "--rm", "--snapshotter", snapshotter, *run_args, name, cid, *command]
    proc = subprocess.Popen(argv)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        click.echo(
            f"the command still runs after {seconds:.0f}s: stopping it (the trace ends here)", err=True
        )
        subprocess.run([*base, "task", "kill", "--signal", "SIGKILL", cid], check=False)
        try:
            proc.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        subprocess.run([*base, "container", "rm", cid], check=False, capture_output=True)
        return -9


@click.command("record-trace")
@click.argument("reference", metavar="REF")
@click.argument("command", nargs=-1, required=True)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="damselfly's config file.")
@HOSTS_DIR_OPTION
@click.option("--address", "-a", default=DEFAULT_ADDRESS, show_default=True, envvar="CONTAINERD_ADDRESS")
@click.option("--namespace", "-n", default="default", show_default=True, envvar="CONTAINERD_NAMESPACE")
@click.option("--snapshotter", default="damselfly", show_default=True)
@click.option("--plain-http", is_flag=True, help="HTTP instead of HTTPS to the registry.")
@click.option(
    "--state-dir", default=None, help="The device daemon's state directory (default: the config's)."
)
@click.option(
    "--seconds",
    type=click.FloatRange(1, 3600),
    default=30.0,
    show_default=True,
    help="Record at most this long; a command still running then is killed.",
)
@click.option(
    "--run-arg",
    "run_args",
    multiple=True,
    help="An extra argument of `ctr run` (repeatable), e.g. --run-arg=--net-host.",
)
@click.option("--output", type=click.Path(dir_okay=False), help="Also write the trace to this file.")
@click.option("--no-push", is_flag=True, help="Do not push the trace (with --output).")
@reports_errors
def record_trace(
    reference: str,
    command: tuple[str, ...],
    config_path: str | None,
    hosts_dir: str | None,
    address: str,
    namespace: str,
    snapshotter: str,
    plain_http: bool,
    state_dir: str | None,
    seconds: float,
    run_args: tuple[str, ...],
    output: str | None,
    no_push: bool,
) -> None:
    """Record what the image REF reads while COMMAND starts in it, and store that with the image.

    Runs COMMAND (after ``--``) once in a temporary container of REF (``ctr run --rm`` on the damselfly
    snapshotter, pulled lazily first), records the device ranges the container reads in its first
    SECONDS, and pushes them to REF's repository as an OCI referrer of REF's manifest (artifact type
    application/vnd.damselfly.trace.v1+json), replacing an older damselfly trace of that manifest. The
    image itself is not changed. Nodes that mount REF later fetch those ranges ahead of their
    container's reads. Needs a running `damselfly serve` registered with containerd, and root.
    """
    if no_push and output is None:
        raise click.UsageError("--no-push needs --output: the trace would go nowhere")
    cfg = load(Path(config_path) if config_path else None)
    settings = registry_settings(Path(config_path) if config_path else None, hosts_dir)
    ref = parse_reference(reference)
    plain = True if plain_http or cfg.remote.plain_http else None
    daemon = DeviceClient(state_dir or cfg.device.state_dir)
    if not _daemon_answers(daemon):
        raise TraceError(f"no device daemon answers at {daemon.paths.state}: is `damselfly serve` running?")
    with Resolver(settings).client(ref.registry, plain) as registry:
        platform: Platform = host_platform()
        manifest = registry.resolve(ref, platform).manifest
        name = chain_device(manifest, str(ref))
        with ContainerdClient(address, namespace) as containerd:
            Puller(containerd, registry, snapshotter=snapshotter, report=click.echo).pull(ref, platform)
        if name in daemon.devices():
            click.echo("the image is mounted already: dropping the page cache so the trace sees every read")
            drop_page_cache()
        daemon.record(name, seconds)
        try:
            status = run_container(address, namespace, snapshotter, str(ref), command, seconds, run_args)
        finally:
            raw, reads = daemon.record_stop(name)
        trace = Trace.from_json(raw, "the recorded trace")
        if not trace.ranges:
            raise TraceError(f"the container read nothing from {ref}'s device in {seconds:.0f}s: no trace")
        click.echo(
            f"recorded {reads} reads (command exit status {status}): {len(trace.ranges)} ranges, "
            f"{trace.total / 2**20:.1f} MiB of the device"
        )
        data = trace.to_json()
        if output is not None:
            with open(output, "wb") as f:
                f.write(data)
        if not no_push:
            _push(registry, ref, manifest, data)


def _push(registry: RegistryClient, ref: Reference, manifest: Manifest, data: bytes) -> None:
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    subject = Descriptor(manifest.media_type, manifest.digest, manifest.size)
    digest = push_referrer(
        registry,
        ref.repository,
        subject,
        TRACE_MEDIA_TYPE,
        data,
        {"org.opencontainers.image.created": created},
    )
    click.echo(
        f"pushed the trace as {ref.registry}/{ref.repository}@{digest}, a referrer of {manifest.digest}"
    )
