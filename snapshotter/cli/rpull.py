"""`damselfly rpull`: pull an image into containerd, letting the snapshotter take converted layers
lazily (`snapshotter.remote.rpull`)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import click

from blockformat.annotations import IMAGE_ARTIFACT_TYPE
from blockformat.digest import Digest
from p2p.errors import InvalidReferenceError
from p2p.hosts import RegistrySettings, Resolver
from p2p.manifest import Manifest, Platform, Resolved, variant_problem
from p2p.reference import Reference, parse_reference

from ..config import DeviceSection
from ..device.client import DeviceClient
from ..errors import DeviceError
from ..remote.containerd import DEFAULT_ADDRESS, ContainerdClient
from ..remote.rpull import Puller, Registry, host_platform
from .errors import reports_errors
from .registryopts import registry_options, settings_from

if TYPE_CHECKING:
    from p2p.registry import RegistryClient


def registry_client(registry: str, plain_http: bool | None, settings: RegistrySettings) -> RegistryClient:
    """A registry client over the registry's hosts.toml endpoints, its module imported only now (httpx,
    and the trio that httpcore imports: `Resolver.client` imports them)."""
    return Resolver(settings).client(registry, plain_http)


class NodeRegistry:
    """The registry through the node's device daemon, which `damselfly serve` keeps running: it resolves
    the reference and fetches the image config (from peers that have it, else the registry) with its
    warm connections, so `rpull` starts no HTTP client of its own — importing one costs a start-up
    more than the pull's own work. Layer blobs of plain layers, which containerd must have, are
    downloaded here with a client made on first use."""

    def __init__(
        self, node: DeviceClient, registry: str, plain_http: bool | None, settings: RegistrySettings
    ) -> None:
        self.node = node
        self.registry = registry
        self.plain_http = plain_http
        self.settings = settings
        self._client: RegistryClient | None = None

    def resolve(self, ref: Reference, platform: Platform) -> Resolved:
        return self.node.resolve(str(ref), platform, self.plain_http)

    def get_config(self, repository: str, manifest: Manifest) -> bytes:
        d = manifest.config
        return self.node.document(self.registry, repository, d.digest, d.size, self.plain_http)

    def download_blob(self, repository: str, digest: Digest, out: BinaryIO, size: int | None = None) -> int:
        if self._client is None:  # only plain layers need one
            self._client = registry_client(self.registry, self.plain_http, self.settings)
        return self._client.download_blob(repository, digest, out, size)

    def find_variant(self, ref: Reference, manifest: Manifest) -> Manifest | None:
        """The converted variant of `manifest`, looked up by the daemon (its client, its connections);
        by this command's own client if the daemon predates the lookup."""
        where = f"{ref.registry}/{ref.repository}"
        try:
            return self.node.variant(where, manifest.digest, self.plain_http)
        except DeviceError as e:
            if "unknown operation" not in str(e):
                raise
        if self._client is None:
            self._client = registry_client(self.registry, self.plain_http, self.settings)
        return find_variant(self._client, ref, manifest)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def find_variant(client: RegistryClient, ref: Reference, manifest: Manifest) -> Manifest | None:
    """The converted variant of `manifest` among its referrers (`convert --referrer`), or None."""
    from p2p.referrers import find_variant as find  # noqa: PLC0415  # imports httpx: only when needed

    return find(client, ref.repository, manifest.digest, IMAGE_ARTIFACT_TYPE, variant_problem)


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
@click.option(
    "--no-referrers",
    "no_referrers",
    is_flag=True,
    help="Pull REF as it is: do not look for a converted variant among its referrers (convert --referrer).",
)
@registry_options
@reports_errors
def rpull(
    reference: str,
    address: str,
    namespace: str,
    snapshotter: str,
    platform: Platform,
    plain_http: bool,
    state_dir: str,
    no_referrers: bool,
    config_path: Path | None,
    hosts_dir: str | None,
) -> None:
    """Pull the image REF into containerd and unpack it into the damselfly snapshotter.

    Converted layers are not downloaded: the snapshotter records them and fetches blocks when a
    container reads them. Plain (tar) layers are fetched and unpacked as `ctr image pull` would, so any
    image works. Afterwards: `ctr run --snapshotter damselfly REF ID`. Registry credentials come from
    Docker's config.json ($DOCKER_CONFIG). With a device daemon running (`damselfly serve`), the
    reference is resolved and the config fetched through it, with its [registry] settings; plain layers
    are fetched here, with this command's.
    """
    ref = parse_reference(reference)
    plain = True if plain_http else None
    settings = settings_from(config_path, hosts_dir)
    with contextlib.ExitStack() as stack:
        containerd = stack.enter_context(ContainerdClient(address, namespace))
        node = DeviceClient(state_dir)
        registry: Registry
        variants: Callable[[Reference, Manifest], Manifest | None]
        if node.ping() is not None:
            via_node = NodeRegistry(node, ref.registry, plain, settings)
            stack.callback(via_node.close)
            registry, variants = via_node, via_node.find_variant
        else:  # no device daemon here (no `damselfly serve`?): the registry directly
            client = stack.enter_context(registry_client(ref.registry, plain, settings))
            registry, variants = client, functools.partial(find_variant, client)
        others: dict[str, RegistryClient] = {}

        def registry_for(host: str) -> Registry:
            """Another registry (a converted image's source's), with this command's client."""
            if host not in others:
                others[host] = stack.enter_context(registry_client(host, plain, settings))
            return others[host]

        Puller(
            containerd,
            registry,
            snapshotter=snapshotter,
            report=click.echo,
            variants=None if no_referrers else variants,
            registry_for=registry_for,
        ).pull(ref, platform)
