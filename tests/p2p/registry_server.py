"""A real distribution registry (Debian's docker-registry 2.8) for tests, with optional basic or token auth.

Each server gets a free loopback port, its own temporary storage directory and a generated config (JSON,
which is YAML). `stop` ends exactly the process it started, by pid, and removes the directory.

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
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
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

REGISTRY_BIN = "/usr/bin/docker-registry"
SERVICE = "damselfly-test-registry"
ISSUER = "damselfly-test-issuer"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


@dataclass
class TokenKey:
    key: rsa.RSAPrivateKey
    cert: x509.Certificate

    @classmethod
    def generate(cls, common_name: str = "damselfly test token signer") -> TokenKey:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
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
        now = dt.datetime.now(dt.UTC)
        ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "damselfly test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=7))
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
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


def serve_tls(server: ThreadingHTTPServer, context: ssl.SSLContext) -> None:
    """Make `server` speak HTTPS. The handshake happens on the first read, in the request's own thread,
    so a client that stalls in it does not hold up accept()."""
    server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)


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


class RegistryServer:
    """One docker-registry process on 127.0.0.1 with its own storage; `auth` is a registry auth config."""

    def __init__(self, auth: dict[str, Any] | None = None, name: str = "registry") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"damselfly-{name}-"))
        self.auth = auth
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "registry.log"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        return self.dir / "data"

    def blob_data_path(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes (to corrupt them in tests)."""
        algo, _, hexd = digest.partition(":")
        return self.storage / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def start(self, timeout: float = 15.0) -> None:
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise RuntimeError(
                f"{REGISTRY_BIN} is missing: apt-get install docker-registry apache2-utils skopeo"
            )
        for _ in range(3):  # a free port can be taken between probing and binding; try again then
            self.port = free_port()
            config: dict[str, Any] = {
                "version": "0.1",
                "log": {"level": "warn", "accesslog": {"disabled": True}},
                "storage": {
                    "filesystem": {"rootdirectory": str(self.storage)},
                    "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}},
                },
                "http": {"addr": self.host, "secret": uuid.uuid4().hex},
            }
            if self.auth is not None:
                config["auth"] = self.auth
            cfg = self.dir / "config.yml"
            cfg.write_text(json.dumps(config, indent=2))
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
            log.close()
            if self._wait_ready(timeout):
                return
            self._terminate()
        raise RuntimeError(
            f"docker-registry did not start; log:\n{self.log_path.read_text(errors='replace')}"
        )

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                    return True
            except urllib.error.HTTPError:
                return True  # 401 with auth: the API answers
            except OSError:
                time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    def stop(self) -> None:
        self._terminate()
        shutil.rmtree(self.dir, ignore_errors=True)


def token_auth_config(server: TokenServer, cert_path: Path) -> dict[str, Any]:
    return {
        "token": {
            "realm": server.realm,
            "service": SERVICE,
            "issuer": ISSUER,
            "rootcertbundle": str(cert_path),
        }
    }
