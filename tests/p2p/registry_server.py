"""A real distribution registry (Debian's docker-registry 2.8) for tests, with optional basic or token auth.

`RegistryServer` is the demo's `scripts.demolib.registry.Registry` on a temporary directory of its own:
a free loopback port, its own storage and a generated config (JSON, which is YAML). `stop` ends exactly
the process it started, by pid, and removes the directory; ``with RegistryServer(...) as server`` starts
and stops it.

Token auth follows distribution's token spec: the registry trusts a self-signed certificate
(``rootcertbundle``), and `TokenServer` issues RS256 JWTs signed by its key, carrying the certificate in
the ``x5c`` header, with the ``access`` claim granting what its ACL allows. It serves plain HTTP, or HTTPS
with a `LoopbackTLS` certificate (what a registry with a token service elsewhere, like Docker Hub, looks
like: credentials go only to an HTTPS realm or the registry's own origin).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from scripts.demolib.registry import Registry

from .servers import serve_tls

SERVICE = "damselfly-test-registry"
ISSUER = "damselfly-test-issuer"


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line, made by apache2-utils' htpasswd (the registry accepts only bcrypt)."""
    out = subprocess.run(
        ["htpasswd", "-Bbn", "-C", "4", user, password],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return out.stdout.strip() + "\n"


# -- token server ---------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: x509.Name, issuer: x509.Name, key: rsa.RSAPrivateKey) -> x509.CertificateBuilder:
    """A certificate of `subject`'s `key` by `issuer`, valid from a day ago (clock skew) for a week; the
    caller adds the extensions and signs it."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=7))
    )


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class TokenKey:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = "damselfly test token signer") -> TokenKey:
        key = _new_key()
        name = _name(common_name)
        cert = (
            _certificate(name, name, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def sign_jwt(self, claims: dict[str, Any]) -> str:
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode("ascii")],
        }
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(sig)


@dataclass
class LoopbackTLS:
    """A throwaway CA and a certificate for 127.0.0.1 it signed; files in `directory` (ssl wants paths)."""

    ca_pem: bytes
    cert_path: Path
    key_path: Path

    @classmethod
    def generate(cls, directory: Path) -> LoopbackTLS:
        ca_key = _new_key()
        ca_name = _name("damselfly test CA")
        ca = (
            _certificate(ca_name, ca_name, ca_key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = _new_key()
        cert = (
            _certificate(_name("127.0.0.1"), ca_name, key)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(  # a peer presents the same certificate as a client (mutual TLS)
                x509.ExtendedKeyUsage(
                    [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH, x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / "server.pem", directory / "server.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        return cls(ca.public_bytes(serialization.Encoding.PEM), cert_path, key_path)

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Verifies servers against this CA only (hostname checks included)."""
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))


@dataclass
class SeenTokenRequest:
    """What reached the token server, before any check: to prove what was (not) sent to it."""

    method: str
    path: str
    authorization: str | None
    body: bytes


@dataclass
class TokenServer:
    """Issues registry tokens. `users` maps user → password; `acl(user, repo)` → allowed actions.

    ``user`` is ``None`` for anonymous requests. Identity tokens (``refresh_tokens``) map to users.
    `requests` lists the tokens issued; `seen`, every request as it arrived. With `tls`, it serves HTTPS.
    """

    key: TokenKey
    users: dict[str, str]
    acl: Callable[[str | None, str], set[str]]
    refresh_tokens: dict[str, str] = field(default_factory=dict)
    expires_in: int = 300
    requests: list[dict[str, Any]] = field(default_factory=list)
    bad_signer: TokenKey | None = None  # when set, tokens are signed by this untrusted key
    tls: ssl.SSLContext | None = None
    seen: list[SeenTokenRequest] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def realm(self) -> str:
        assert self._server is not None
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}/token"

    def start(self) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.seen.append(SeenTokenRequest("GET", self.path, self.headers.get("Authorization"), b""))
                url = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(url.query)
                user: str | None = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
                    if owner.users.get(name) != password:
                        self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                        return
                    user = name
                owner.requests.append({"method": "GET", "user": user, "scope": q.get("scope", [])})
                self._issue(user, q.get("service", [""])[0], q.get("scope", []))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                owner.seen.append(
                    SeenTokenRequest("POST", self.path, self.headers.get("Authorization"), body)
                )
                form = urllib.parse.parse_qs(body.decode())
                if form.get("grant_type") != ["refresh_token"]:
                    self._send(400, {"error": "unsupported_grant_type"})
                    return
                user = owner.refresh_tokens.get(form.get("refresh_token", [""])[0])
                if user is None:
                    self._send(401, {"error": "invalid_grant"})
                    return
                scopes = form.get("scope", [""])[0].split()
                owner.requests.append({"method": "POST", "user": user, "scope": scopes})
                self._issue(user, form.get("service", [""])[0], scopes, oauth=True)

            def _issue(self, user: str | None, service: str, scopes: list[str], oauth: bool = False) -> None:
                access = []
                for scope in scopes:
                    kind, _, rest = scope.partition(":")
                    name, _, actions = rest.rpartition(":")
                    if kind != "repository":
                        continue
                    allowed = owner.acl(user, name)
                    granted = [a for a in actions.split(",") if a in allowed]
                    access.append({"type": "repository", "name": name, "actions": granted})
                now = int(time.time())
                claims = {
                    "iss": ISSUER,
                    "sub": user or "",
                    "aud": service,
                    "exp": now + owner.expires_in,
                    "nbf": now - 10,
                    "iat": now,
                    "jti": uuid.uuid4().hex,
                    "access": access,
                }
                token = (owner.bad_signer or owner.key).sign_jwt(claims)
                body = {"access_token": token} if oauth else {"token": token}
                self._send(200, {**body, "expires_in": owner.expires_in})

            def _send(self, status: int, doc: dict[str, Any]) -> None:
                raw = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            serve_tls(self._server, self.tls)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


# -- registry -------------------------------------------------------------------------------------


class RegistryServer(Registry):
    """One docker-registry process on 127.0.0.1 with its own storage; `auth` is a registry auth config.

    With `tls` it serves HTTPS with that certificate (`url` is then ``https://``); with `upstream` (a
    registry's URL) it is a pull-through cache of it (distribution's ``proxy.remoteurl``): it fetches
    what it lacks from there and refuses pushes. `access_log` logs every request (Apache combined
    format, with the client's User-Agent) to `log`."""

    def __init__(
        self,
        auth: dict[str, Any] | None = None,
        name: str = "registry",
        *,
        tls: LoopbackTLS | None = None,
        upstream: str | None = None,
        access_log: bool = False,
    ) -> None:
        directory = Path(tempfile.mkdtemp(prefix=f"damselfly-{name}-"))
        super().__init__(directory, directory / "registry.log", auth=auth, access_log=access_log)
        self.tls = tls
        self.upstream = upstream

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.host}"

    def config(self) -> dict[str, Any]:
        config = super().config()
        if self.tls is not None:
            config["http"]["tls"] = {"certificate": str(self.tls.cert_path), "key": str(self.tls.key_path)}
        if self.upstream is not None:
            config["proxy"] = {"remoteurl": self.upstream}
        return config

    def _answers(self) -> bool:
        if self.tls is None:
            return super()._answers()
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.tls.client_context())
        )
        try:
            with opener.open(f"{self.url}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def blob_data_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to corrupt them in tests)."""
        algo, _, hexd = digest.partition(":")
        return self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def error(self, message: str) -> Exception:
        return RuntimeError(f"{message}; log:\n{self.log_tail()}")

    def stop(self) -> str | None:
        note = super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        return note

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def token_auth_config(server: TokenServer, cert_path: Path) -> dict[str, Any]:
    return {
        "token": {
            "realm": server.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(cert_path),
        }
    }
