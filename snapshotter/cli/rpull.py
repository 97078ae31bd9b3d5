"""`damselfly rpull`: pull an image into containerd, letting the snapshotter take converted layers
lazily (`snapshotter.remote.rpull`)."""

from __future__ import annotations

import click

from p2p.errors import InvalidReferenceError
from p2p.manifest import Descriptor, Platform
from p2p.reference import parse_reference
from p2p.registry import RegistryClient

from ..config import DeviceSection
from ..device.client import DeviceClient
from ..remote.containerd import DEFAULT_ADDRESS, ContainerdClient
from ..remote.rpull import Puller, host_platform
from .errors import reports_errors


def _platform(ctx: click.Context, param: click.Parameter, value: str | None) -> Platform:
    if value is None:
        return host_platform()
    try:
        return Platform.parse(value)
    except InvalidReferenceError:
        raise click.BadParameter(f"{value!r} is not os/architecture[/variant], e.g. linux/arm64") from None


@click.command("rpull")
@click.argument("reference", metavar="REF")
@click.option(
    "--address",
    "-a",
    default=DEFAULT_ADDRESS,
    show_default=True,
    envvar="CONTAINERD_ADDRESS",
    help="containerd's gRPC socket (or $CONTAINERD_ADDRESS).",
)
@click.option(
    "--namespace",
    "-n",
    default="default",
    show_default=True,
    envvar="CONTAINERD_NAMESPACE",
    help="containerd namespace (or $CONTAINERD_NAMESPACE); Kubernetes uses k8s.io.",
)
@click.option(
    "--snapshotter",
    default="damselfly",
    show_default=True,
    help="The snapshotter to unpack into: damselfly's [proxy_plugins.NAME] in containerd's config.",
)
@click.option(
    "--platform",
    default=None,
    callback=_platform,
    help="Platform to take from an image index (os/architecture[/variant]; default: this machine's).",
)
@click.option(
    "--plain-http", is_flag=True, help="HTTP instead of HTTPS to the registry (automatic for loopback)."
)
@click.option(
    "--state-dir",
    envvar="DAMSELFLY_STATE_DIR",
    default=DeviceSection.state_dir,
    show_default=True,
    help="The device daemon's state directory: when its daemon runs the peer network, the image "
    "config comes through it (from peers that have it, else the registry).",
)
@reports_errors
def rpull(
    reference: str,
    address: str,
    namespace: str,
    snapshotter: str,
    platform: Platform,
    plain_http: bool,
    state_dir: str,
) -> None:
    """Pull the image REF into containerd and unpack it into the damselfly snapshotter.

    Converted layers are not downloaded: the snapshotter records them and fetches blocks when a
    container reads them. Plain (tar) layers are fetched and unpacked as `ctr image pull` would, so any
    image works. Afterwards: `ctr run --snapshotter damselfly REF ID`. Registry credentials come from
    Docker's config.json ($DOCKER_CONFIG).
    """
    ref = parse_reference(reference)
    with (
        ContainerdClient(address, namespace) as containerd,
        RegistryClient(ref.registry, plain_http=True if plain_http else None) as registry,
    ):
        node = DeviceClient(state_dir)
        documents = None
        if node.peer_network():

            def documents(repository: str, desc: Descriptor) -> bytes:
                return node.document(
                    ref.registry, repository, desc.digest, desc.size, True if plain_http else None
                )

        Puller(containerd, registry, snapshotter=snapshotter, report=click.echo, documents=documents).pull(
            ref, platform
        )
