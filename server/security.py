"""TLS and bearer-token auth for both front-ends.

* TLS: ``tls_cert_file`` + ``tls_key_file`` (PEM) turn on TLS for gRPC and HTTP alike;
  ``tls_client_ca_file`` adds mutual TLS (clients must present a certificate that CA signed).
* Auth: ``auth_token`` (or ``auth_token_file``; env ``MOFSERVE_AUTH_TOKEN``) makes every request
  carry ``authorization: Bearer <token>`` (gRPC metadata, HTTP header), compared in constant
  time. Health stays open so that probes need no secret (``grpc.health.v1.Health``, ``/healthz``,
  ``/livez``, ``/readyz``); everything else needs the token, reflection included (it maps the
  API for whoever asks; ``grpcurl -H 'authorization: Bearer ...'`` sends the token) and
  ``/metrics`` (Prometheus sends it with ``authorization.credentials_file``).
* The token never appears in a log line, an error message or a repr.

Binding a non-loopback address without auth, or with auth but without TLS, starts with a loud
warning rather than a refusal: the shipped container binds 0.0.0.0 inside a pod, where TLS is
often terminated in front of the server (ingress, service mesh) and the network is private.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from . import openai_protocol as P

TOKEN_ENV = "MOFSERVE_AUTH_TOKEN"
#: gRPC services that answer without a token: probes must not need a secret.
OPEN_GRPC_SERVICES = frozenset({"grpc.health.v1.Health"})
#: HTTP paths that answer without a token (health, and the probe names readiness work may add).
OPEN_HTTP_PATHS = frozenset({"/healthz", "/livez", "/readyz"})
#: Shorter tokens start with a warning: guessable.
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- the token -------------------------------------------------------------------------------


class BearerToken:
    """The secret, held as a SHA-256 digest and compared in constant time; never printed."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("auth_token: empty; set a token or leave auth off")
        if not all(33 <= ord(c) <= 126 for c in token):
            raise ValueError(f"auth_token: must be visible ASCII characters without spaces "
                             f"({len(token)} characters given)")
        self._digest = hashlib.sha256(token.encode()).digest()
        self.chars = len(token)

    def __repr__(self) -> str:
        return "BearerToken(<hidden>)"

    def matches(self, presented: str) -> bool:
        # digests of equal length: the comparison leaks neither content nor length
        return hmac.compare_digest(hashlib.sha256(presented.encode("utf-8", "replace")).digest(), self._digest)

    def check(self, authorization: str | None) -> str | None:
        """None when ``authorization`` (the header's value) carries the token, else why not
        (a message naming the field, never repeating what was sent)."""
        if not authorization:
            return "authorization: missing; send 'authorization: Bearer <token>'"
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return "authorization: expected 'Bearer <token>'"
        if not self.matches(credentials.strip()):
            return "authorization: the bearer token is not valid"
        return None


def load_token(auth_token: str | None, auth_token_file: str | None) -> BearerToken | None:
    """The configured token (``auth_token`` or the first line of ``auth_token_file``), or None."""
    if auth_token and auth_token_file:
        raise ValueError("auth_token, auth_token_file: set one of them, not both")
    if auth_token_file:
        try:
            text = Path(auth_token_file).read_text()
        except OSError as error:
            raise ValueError(f"auth_token_file: cannot read {auth_token_file} ({error.strerror})") from None
        auth_token = text.strip()
        if not auth_token:
            raise ValueError(f"auth_token_file: {auth_token_file} is empty")
    if auth_token is None or auth_token == "":
        return None
    return BearerToken(auth_token.strip())


# ---- TLS -------------------------------------------------------------------------------------


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{setting}: cannot read {path} ({error.strerror})") from None


@dataclass(frozen=True)
class Security:
    """What ``mofserve serve`` applies to both front-ends (built once from the settings)."""

    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None
    token: BearerToken | None = None

    @classmethod
    def from_settings(cls, tls_cert_file: str | None = None, tls_key_file: str | None = None,
                      tls_client_ca_file: str | None = None, auth_token: str | None = None,
                      auth_token_file: str | None = None) -> Security:
        """Validates everything up front (files readable, key matching the certificate), so a
        bad setting stops ``serve`` before Triton starts, with the setting's name."""
        if bool(tls_cert_file) != bool(tls_key_file):
            raise ValueError("tls_cert_file, tls_key_file: give both (PEM certificate chain and its private key)")
        if tls_client_ca_file and not tls_cert_file:
            raise ValueError("tls_client_ca_file: mutual TLS needs tls_cert_file and tls_key_file too")
        security = cls(tls_cert_file or None, tls_key_file or None, tls_client_ca_file or None,
                       load_token(auth_token, auth_token_file))
        security.http_ssl_context()  # reads and checks the files
        return security

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    def grpc_credentials(self) -> grpc.ServerCredentials | None:
        """Server credentials for ``add_secure_port`` (None: plaintext)."""
        if not self.tls:
            return None
        chain = _read("tls_cert_file", self.tls_cert_file)
        key = _read("tls_key_file", self.tls_key_file)
        client_ca = _read("tls_client_ca_file", self.tls_client_ca_file) if self.tls_client_ca_file else None
        return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def http_ssl_context(self) -> ssl.SSLContext | None:
        """The aiohttp server's SSL context, TLS 1.2 or newer (None: plaintext)."""
        if not self.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        for setting, path in (("tls_cert_file", self.tls_cert_file), ("tls_key_file", self.tls_key_file)):
            _read(setting, path)  # a clear error for a missing file
        try:
            context.load_cert_chain(self.tls_cert_file, self.tls_key_file)
        except ssl.SSLError as error:
            raise ValueError(f"tls_cert_file, tls_key_file: not a PEM certificate chain and its private key "
                             f"({error.reason or error})") from None
        if self.tls_client_ca_file:
            _read("tls_client_ca_file", self.tls_client_ca_file)
            try:
                context.load_verify_locations(self.tls_client_ca_file)
            except ssl.SSLError as error:
                raise ValueError(f"tls_client_ca_file: not a PEM CA certificate ({error.reason or error})") from None
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def warnings(self, host: str) -> list[str]:
        """What ``serve`` logs at start for an exposed address (docs/reliability.md, Security)."""
        if is_loopback(host):
            found = []
        elif self.token is None:
            found = [f"WARNING: serving on {host} without auth: anyone who reaches the ports can use the server "
                     "(set auth_token or auth_token_file, and TLS)"]
        elif not self.tls:
            found = [f"WARNING: auth is on but TLS is off on {host}: the bearer token crosses the network in "
                     "clear text (set tls_cert_file and tls_key_file, or terminate TLS in front of the server)"]
        else:
            found = []
        if self.token is not None and self.token.chars < MIN_TOKEN_CHARS:
            found.append(f"WARNING: the auth token has {self.token.chars} characters; use at least "
                         f"{MIN_TOKEN_CHARS} random ones")
        return found


# ---- gRPC ------------------------------------------------------------------------------------

_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind that answers UNAUTHENTICATED without reading the request."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = _HANDLERS[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, request_deserializer=None, response_serializer=handler.response_serializer)


class GrpcBearerAuth(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any RPC outside ``open_services`` without the bearer token."""

    def __init__(self, token: BearerToken, metrics=None, open_services: Iterable[str] = OPEN_GRPC_SERVICES) -> None:
        self.token = token
        self.metrics = metrics
        self.open_services = frozenset(open_services)

    async def intercept_service(self, continuation, handler_call_details):
        service = handler_call_details.method.lstrip("/").partition("/")[0]
        if service in self.open_services:
            return await continuation(handler_call_details)
        authorization = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
                break
        problem = self.token.check(authorization)
        handler = await continuation(handler_call_details)
        if problem is None or handler is None:  # an unknown method is UNIMPLEMENTED either way
            return handler
        if self.metrics is not None:
            self.metrics.auth_failures.labels("grpc").inc()
        return _refusal(handler, problem)


# ---- HTTP ------------------------------------------------------------------------------------


def http_bearer_auth(token: BearerToken, metrics=None, open_paths: Iterable[str] = OPEN_HTTP_PATHS):
    """aiohttp middleware: 401 in OpenAI's error shape, with ``WWW-Authenticate: Bearer``, for any
    path outside ``open_paths`` without the token. Put it first: it answers before routing, so
    an unauthenticated caller learns nothing about the routes."""
    open_paths = frozenset(open_paths)

    @web.middleware
    async def bearer_auth(request: web.Request, handler):
        if request.path in open_paths:
            return await handler(request)
        problem = token.check(request.headers.get("Authorization"))
        if problem is None:
            return await handler(request)
        if metrics is not None:
            metrics.auth_failures.labels("http").inc()
        challenge = 'Bearer realm="mofserve"'
        if "Authorization" in request.headers:
            challenge += ', error="invalid_token"'
        body = P.error_body(P.ProtocolError(401, problem, None, "invalid_api_key"))
        return web.json_response(body, status=401, headers={"WWW-Authenticate": challenge})

    return bearer_auth
