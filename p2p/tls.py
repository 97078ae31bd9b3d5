"""TLS for registry endpoints: the system trust store plus what a hosts.toml adds (`p2p.hosts`).

Separate from `p2p.hosts` so that reading the hosts tree imports no ``ssl`` (`damselfly rpull` starts
fast); `p2p.registry` builds each endpoint's context here when it makes the endpoint's HTTP client.
"""

from __future__ import annotations

import functools
import ssl

from .errors import HostsConfigError
from .hosts import HostEndpoint


@functools.cache
def default_ssl_context() -> ssl.SSLContext:
    """The system trust store (honouring SSL_CERT_FILE and SSL_CERT_DIR), made once per process: for
    endpoints that add nothing to it."""
    return ssl.create_default_context()


def ssl_context(endpoint: HostEndpoint) -> ssl.SSLContext:
    """The TLS context of an HTTPS endpoint: the system trust store plus its CAs and client
    certificates, or no verification with `skip_verify`. A file that cannot be used is a
    `HostsConfigError` naming it and the hosts.toml that named it."""
    ctx = ssl.create_default_context()  # the system store; honours SSL_CERT_FILE and SSL_CERT_DIR
    if endpoint.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    where = endpoint.hint or endpoint.url
    for ca in endpoint.ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except FileNotFoundError:
            raise HostsConfigError(ca, f"the CA file named by {where} does not exist") from None
        except ssl.SSLError as e:  # before OSError, of which it is a kind
            raise HostsConfigError(
                ca, f"the CA file named by {where} holds no usable PEM certificate: {e}"
            ) from None
        except OSError as e:
            raise HostsConfigError(
                ca, f"the CA file named by {where} cannot be read: {e.strerror or e}"
            ) from None
    # OpenSSL keeps one client certificate per key type: with several pairs, the last of a type counts.
    for cert, key in endpoint.client:
        try:
            ctx.load_cert_chain(cert, key or None)
        except FileNotFoundError as e:
            raise HostsConfigError(
                e.filename or cert, f"the client certificate or key named by {where} does not exist"
            ) from None
        except ssl.SSLError as e:  # before OSError, of which it is a kind
            raise HostsConfigError(
                cert,
                f"the client certificate and key named by {where} do not load (not PEM, or the key "
                f"does not match the certificate): {e}",
            ) from None
        except OSError as e:
            raise HostsConfigError(
                cert, f"the client certificate named by {where}: {e.strerror or e}"
            ) from None
    return ctx
