"""Which proxy a registry request goes through: the ``[registry]`` table's, or the environment's.

`proxy_for`: ``[registry] proxy`` for every request; else, with ``use_proxy_env``, ``HTTPS_PROXY`` (for
HTTPS endpoints) or ``HTTP_PROXY`` (for HTTP ones), upper case first, unless ``NO_PROXY`` exempts the
host by Go's ``httpproxy`` rules, which containerd follows (`no_proxy_matches`): a name matches itself
and its subdomains (``example.com``, ``.example.com``, ``*.example.com``), ``host:port`` only that port,
an IP or a CIDR block the addresses in it, ``*`` everything. Loopback hosts are never proxied.
"""

from __future__ import annotations

import ipaddress
import os
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .reference import is_loopback

if TYPE_CHECKING:
    from .hosts import RegistrySettings


def _split_host_port(netloc: str) -> tuple[str, int | None]:
    u = urllib.parse.urlsplit("//" + netloc)
    try:
        return (u.hostname or "").lower(), u.port
    except ValueError:
        return (u.hostname or "").lower(), None


def no_proxy_matches(no_proxy: str, scheme: str, netloc: str) -> bool:
    """Whether ``NO_PROXY`` exempts `netloc` (Go's ``httpproxy`` rules, which containerd follows)."""
    host, port = _split_host_port(netloc)
    if port is None:
        port = 443 if scheme == "https" else 80
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        if "/" in entry:
            try:
                if ip is not None and ip in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        ehost, eport = _split_host_port(entry)
        if not ehost:
            continue
        if eport is not None and eport != port:
            continue
        try:
            if ip is not None and ip == ipaddress.ip_address(ehost):
                return True
            ipaddress.ip_address(ehost)
            continue  # an IP entry matches only that IP
        except ValueError:
            pass
        domain = ehost.removeprefix("*").lstrip(".")
        if host == domain or host.endswith("." + domain):
            return True
    return False


def proxy_for(
    settings: RegistrySettings, scheme: str, netloc: str, environ: Mapping[str, str] | None = None
) -> str | None:
    """The proxy for requests to ``scheme://netloc``, or None (see the module docstring)."""
    if settings.proxy:
        return settings.proxy
    if not settings.use_proxy_env:
        return None
    env = os.environ if environ is None else environ
    host, _ = _split_host_port(netloc)
    if is_loopback(host) or host == "localhost":
        return None  # Go's rule: loopback is never proxied

    def get(name: str) -> str:
        return env.get(name.upper()) or env.get(name.lower()) or ""

    proxy = get("https_proxy") if scheme == "https" else get("http_proxy")
    if not proxy or no_proxy_matches(get("no_proxy"), scheme, netloc):
        return None
    return proxy if "://" in proxy else "http://" + proxy
