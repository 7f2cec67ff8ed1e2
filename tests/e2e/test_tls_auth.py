"""Security on the real front-ends over the tiny Triton: TLS (and mutual TLS) for gRPC and HTTP
with a CA and certificates made here by the ``openssl`` CLI, bearer-token auth on both (health
open, everything else closed, constant-time comparison, the token never in an answer or a log),
and ``mofserve serve`` as shipped in the container (all interfaces) with TLS and auth on: Triton
on loopback with its model-control API off.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mofserve.clients import MofServeClient, MofServeError
from mofserve.server.config import ServeConfig, load_config
from mofserve.server.grpc_service import build_grpc_server
from mofserve.server.http_api import build_http_app, start_http
from mofserve.server.metrics import FrontendMetrics
from mofserve.server.security import GrpcBearerAuth, Security, http_bearer_auth
from mofserve.v1 import mofserve_pb2 as pb

from .processes import children, kill_process, start_mofserve
from .test_backpressure import IMAGE, OPTIONS, QUESTION, chat_body, stop_front_ends

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make certificates")]

TOKEN = secrets.token_urlsafe(32)
WRONG = "wrong-" + secrets.token_urlsafe(24)


# ---- certificates ------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN=mofserve test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             cwd=folder)


def _leaf(folder: Path, name: str, ca: str, extensions: str) -> None:
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> SimpleNamespace:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a second CA
    that signed nothing of ours."""
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "other-ca")
    _leaf(folder, "server", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"
                                  "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _leaf(folder, "client", "ca", "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    names = ("ca", "other-ca", "server", "client")
    return SimpleNamespace(folder=folder, **{f"{n.replace('-', '_')}_{kind}": str(folder / f"{n}.{kind}")
                                             for n in names for kind in ("pem", "key")})


def _https_context(ca: str, client: tuple[str, str] | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if client:
        context.load_cert_chain(*client)
    return context


def _get(url: str, context: ssl.SSLContext | None = None, headers: dict[str, str] | None = None,
         body: bytes | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# ---- the front-ends, secured -------------------------------------------------------------------


def _secured(loop_thread, engine, security: Security, metrics: FrontendMetrics) -> SimpleNamespace:
    """Both front-ends wired as ``MofServeApp.start`` wires them."""
    async def start():
        server, port, _ = build_grpc_server(
            engine, metrics, port=0, credentials=security.grpc_credentials(),
            interceptors=[GrpcBearerAuth(security.token, metrics)] if security.token else ())
        await server.start()
        app = build_http_app(engine, metrics,
                             middlewares=[http_bearer_auth(security.token, metrics)] if security.token else ())
        runner, http_port = await start_http(app, port=0, ssl_context=security.http_ssl_context())
        return server, port, runner, http_port

    server, port, runner, http_port = loop_thread.run(start())
    return SimpleNamespace(grpc=f"127.0.0.1:{port}", http=f"https://127.0.0.1:{http_port}", server=server,
                           runner=runner, metrics=metrics)


@pytest.fixture(scope="module")
def secured(loop_thread, engine, pki) -> Iterator[SimpleNamespace]:
    security = Security.from_settings(pki.server_pem, pki.server_key, auth_token=TOKEN)
    servers = _secured(loop_thread, engine, security, FrontendMetrics())
    yield servers
    stop_front_ends(loop_thread, servers)


@pytest.fixture(scope="module")
def mutual(loop_thread, engine, pki) -> Iterator[SimpleNamespace]:
    security = Security.from_settings(pki.server_pem, pki.server_key, tls_client_ca_file=pki.ca_pem)
    servers = _secured(loop_thread, engine, security, FrontendMetrics())
    yield servers
    stop_front_ends(loop_thread, servers)


# ---- gRPC --------------------------------------------------------------------------------------


def test_grpc_over_tls_with_the_token_answers(secured, pki):
    with MofServeClient(secured.grpc, token=TOKEN, root_certificates=pki.ca_pem, retries=False) as client:
        answer = client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=2, timeout=60)
    assert answer.chosen_option in {"a", "b"}


@pytest.mark.parametrize(("token", "expected"), [("", "authorization: missing"),
                                                 (WRONG, "authorization: the bearer token is not valid"),
                                                 (TOKEN[:-1], "authorization: the bearer token is not valid")],
                         ids=["missing", "wrong", "truncated"])
def test_grpc_without_the_right_token_is_unauthenticated_without_echoing_it(secured, pki, token, expected):
    failures = secured.metrics.auth_failures.labels("grpc")._value.get()
    with MofServeClient(secured.grpc, token=token, root_certificates=pki.ca_pem, retries=False) as client:
        with pytest.raises(MofServeError) as caught:
            client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=2, timeout=30)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert caught.value.message.startswith(expected)
        assert WRONG not in str(caught.value) and TOKEN not in str(caught.value)
        with pytest.raises(MofServeError) as info:  # every MofServe RPC, the cheap ones too
            client.server_info(timeout=10)
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert secured.metrics.auth_failures.labels("grpc")._value.get() == failures + 2


def test_grpc_scheme_other_than_bearer_is_refused(secured, pki):
    credentials = grpc.ssl_channel_credentials(Path(pki.ca_pem).read_bytes())
    with grpc.secure_channel(secured.grpc, credentials) as channel:
        client = MofServeClient(channel=channel, token="")
        with pytest.raises(grpc.RpcError) as caught:
            client._stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10,
                                       metadata=(("authorization", f"Basic {TOKEN}"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == "authorization: expected 'Bearer <token>'"


def test_grpc_health_is_open_and_reflection_needs_the_token(secured, pki):
    with MofServeClient(secured.grpc, token="", root_certificates=pki.ca_pem, retries=False) as client:
        assert client.health() == "SERVING"
    credentials = grpc.ssl_channel_credentials(Path(pki.ca_pem).read_bytes())
    with grpc.secure_channel(secured.grpc, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        listing = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(stub.ServerReflectionInfo(iter([listing]), timeout=10)))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        answer = next(iter(stub.ServerReflectionInfo(iter([listing]), timeout=10,
                                                     metadata=(("authorization", f"Bearer {TOKEN}"),))))
        assert "mofserve.v1.MofServe" in {s.name for s in answer.list_services_response.service}


def test_grpc_tls_refuses_plaintext_and_untrusted_roots(secured, pki):
    with MofServeClient(secured.grpc, token=TOKEN, retries=False) as plain, pytest.raises(MofServeError) as caught:
        plain.health(timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    with MofServeClient(secured.grpc, token=TOKEN, root_certificates=pki.other_ca_pem, retries=False) as other, \
            pytest.raises(MofServeError) as caught:
        other.health(timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_grpc_mutual_tls_needs_a_client_certificate_from_the_ca(mutual, pki):
    with MofServeClient(mutual.grpc, root_certificates=pki.ca_pem, retries=False) as anonymous, \
            pytest.raises(MofServeError) as caught:
        anonymous.health(timeout=5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    credentials = grpc.ssl_channel_credentials(Path(pki.ca_pem).read_bytes(), Path(pki.client_key).read_bytes(),
                                               Path(pki.client_pem).read_bytes())
    with grpc.secure_channel(mutual.grpc, credentials) as channel:
        client = MofServeClient(channel=channel)
        assert client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=2,
                          timeout=60).chosen_option in {"a", "b"}


def test_ask_cli_sends_token_and_verifies_with_the_ca(secured, pki, capsys, monkeypatch):
    from mofserve.cli import main

    image = pki.folder / "image.png"
    image.write_bytes(IMAGE)
    base = ["ask", "--server", secured.grpc, "--image", str(image), "--question", QUESTION, "--options", OPTIONS,
            "--mode", "clip", "--max-new-tokens", "2", "--timeout", "60", "--ca-cert", pki.ca_pem, "--json"]
    monkeypatch.delenv("MOFSERVE_AUTH_TOKEN", raising=False)
    assert main(base) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main([*base, "--token", TOKEN]) == 0
    assert json.loads(capsys.readouterr().out)["chosen_option"] in {"a", "b"}
    monkeypatch.setenv("MOFSERVE_AUTH_TOKEN", TOKEN)  # the variable the server reads too
    assert main(base) == 0


# ---- HTTP --------------------------------------------------------------------------------------


def test_https_chat_completion_with_the_openai_client_and_the_token(secured, pki):
    import httpx2 as httpx  # the openai client's HTTP library
    import openai

    with httpx.Client(verify=_https_context(pki.ca_pem)) as http, \
            openai.OpenAI(base_url=f"{secured.http}/v1", api_key=TOKEN, http_client=http, max_retries=0) as client:
        body = chat_body()
        extra = {"options": body.pop("options")}
        reply = client.chat.completions.create(**body, extra_body=extra)
        assert reply.model_extra["mofserve"]["chosen_option"] in {"a", "b"}
        bad = openai.OpenAI(base_url=f"{secured.http}/v1", api_key=WRONG, http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.chat.completions.create(**body, extra_body=extra)
        assert caught.value.status_code == 401 and WRONG not in str(caught.value)


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/v1/nowhere"])
def test_http_without_the_token_is_401_with_a_bearer_challenge(secured, pki, path):
    context = _https_context(pki.ca_pem)
    status, headers, body = _get(secured.http + path, context)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_api_key" and error["message"].startswith("authorization: missing")
    status, headers, body = _get(secured.http + path, context, {"Authorization": f"Bearer {WRONG}"})
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert WRONG.encode() not in body
    status, _, _ = _get(secured.http + path, context, {"Authorization": f"Bearer {TOKEN}"})
    assert status == (404 if path == "/v1/nowhere" else 200)


def test_http_chat_completion_without_the_token_is_401_before_the_body_is_read(secured, pki):
    status, _, _ = _get(secured.http + "/v1/chat/completions", _https_context(pki.ca_pem),
                        body=json.dumps(chat_body()).encode())
    assert status == 401


def test_http_healthz_is_open_and_plain_http_or_untrusted_roots_fail(secured, pki):
    status, _, body = _get(secured.http + "/healthz", _https_context(pki.ca_pem))
    assert status == 200 and json.loads(body)["status"] == "ok"
    with pytest.raises(OSError):
        _get(secured.http.replace("https://", "http://") + "/healthz")
    with pytest.raises(urllib.error.URLError) as caught:
        _get(secured.http + "/healthz", _https_context(pki.other_ca_pem))
    assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)


def test_https_mutual_tls_needs_a_client_certificate(mutual, pki):
    with pytest.raises(OSError):
        _get(mutual.http + "/healthz", _https_context(pki.ca_pem))
    status, _, _ = _get(mutual.http + "/healthz", _https_context(pki.ca_pem, (pki.client_pem, pki.client_key)))
    assert status == 200


# ---- settings ----------------------------------------------------------------------------------


def test_bad_security_settings_are_refused_naming_the_setting(pki, tmp_path):
    cases = [
        (dict(tls_cert_file=pki.server_pem), "tls_cert_file, tls_key_file: give both"),
        (dict(tls_cert_file=str(tmp_path / "missing.pem"), tls_key_file=pki.server_key), "tls_cert_file: cannot read"),
        (dict(tls_cert_file=pki.server_pem, tls_key_file=pki.client_key), "tls_cert_file, tls_key_file: not a PEM"),
        (dict(tls_client_ca_file=pki.ca_pem), "tls_client_ca_file: mutual TLS needs"),
        (dict(auth_token=TOKEN, auth_token_file=str(tmp_path / "t")), "auth_token, auth_token_file: set one"),
        (dict(auth_token=f"two {TOKEN}"), "auth_token: must be visible ASCII"),
        (dict(auth_token_file=str(tmp_path / "absent")), "auth_token_file: cannot read"),
    ]
    for settings, message in cases:
        with pytest.raises(ValueError) as caught:
            Security.from_settings(**settings)
        assert str(caught.value).startswith(message), (settings, caught.value)
        assert TOKEN not in str(caught.value)


def test_token_comes_from_a_file_or_the_environment_and_is_never_printed(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    security = Security.from_settings(auth_token_file=str(token_file))
    assert security.token.check(f"Bearer {TOKEN}") is None
    config = load_config(environ={"MOFSERVE_AUTH_TOKEN": TOKEN})
    assert config.auth_token == TOKEN
    assert TOKEN not in repr(config) and TOKEN not in repr(Security.from_settings(auth_token=config.auth_token))
    assert TOKEN not in repr(ServeConfig(auth_token=TOKEN))


def test_exposed_addresses_start_with_a_loud_warning(pki):
    plain = Security.from_settings()
    assert plain.warnings("127.0.0.1") == [] and plain.warnings("::1") == []
    assert "without auth" in plain.warnings("0.0.0.0")[0]
    token_only = Security.from_settings(auth_token=TOKEN)
    assert "clear text" in token_only.warnings("0.0.0.0")[0]
    assert Security.from_settings(pki.server_pem, pki.server_key, auth_token=TOKEN).warnings("0.0.0.0") == []
    assert "characters" in Security.from_settings(auth_token="short").warnings("127.0.0.1")[0]


# ---- `mofserve serve` as shipped: all interfaces, TLS, auth; Triton on loopback, model control off ----


@pytest.fixture(scope="module")
def shipped(tiny_repository, pki) -> Iterator[dict]:
    """``mofserve serve --host 0.0.0.0`` (the container's entrypoint) with TLS and the token from
    the environment, on free ports."""
    server = start_mofserve(["serve", "--host", "0.0.0.0", "--grpc-port", "0", "--http-port", "0",
                             "--tls-cert-file", pki.server_pem, "--tls-key-file", pki.server_key],
                            env={"MOFSERVE_AUTH_TOKEN": TOKEN})
    yield server
    kill_process(server["process"])


def _triton_command(serve_pid: int) -> list[str]:
    pids = children(serve_pid, "tritonserver")
    assert len(pids) == 1, pids
    return Path(f"/proc/{pids[0]}/cmdline").read_bytes().decode().split("\0")


def test_shipped_serve_keeps_triton_on_loopback_with_model_control_off(shipped):
    import tritonclient.grpc as tritongrpc
    from tritonclient.utils import InferenceServerException

    assert shipped["grpc"].startswith("0.0.0.0:") and shipped["http"].startswith("https://0.0.0.0:")
    command = _triton_command(shipped["process"].pid)
    assert "--model-control-mode=none" in command
    for endpoint in ("http", "grpc", "metrics"):
        assert f"--{endpoint}-address=127.0.0.1" in command
    assert not [arg for arg in command if re.match(r"--(http|grpc|metrics)-address=(?!127\.0\.0\.1$)", arg)]
    grpc_port = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--grpc-port="))
    triton = tritongrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    for call in (triton.load_model, triton.unload_model):
        with pytest.raises(InferenceServerException):
            call("preprocess")
    assert triton.is_model_ready("preprocess")


def test_shipped_serve_answers_over_tls_with_the_token_only(shipped, pki):
    port = shipped["grpc"].rsplit(":", 1)[1]
    with MofServeClient(f"127.0.0.1:{port}", token=TOKEN, root_certificates=pki.ca_pem, retries=False) as client:
        assert client.ask(IMAGE, QUESTION, options=OPTIONS, mode="clip", max_new_tokens=2,
                          timeout=60).chosen_option in {"a", "b"}
    with MofServeClient(f"127.0.0.1:{port}", token=WRONG, root_certificates=pki.ca_pem, retries=False) as client:
        assert client.health() == "SERVING"
        with pytest.raises(MofServeError) as caught:
            client.ask(IMAGE, QUESTION, mode="clip", max_new_tokens=2, timeout=30)
        assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    http = "https://127.0.0.1:" + shipped["http"].rsplit(":", 1)[1]
    context = _https_context(pki.ca_pem)
    assert _get(http + "/healthz", context)[0] == 200
    assert _get(http + "/metrics", context)[0] == 401
    status, _, body = _get(http + "/metrics", context, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and b"mofserve_auth_failures_total" in body


def test_shipped_serve_never_logs_the_token(shipped):
    process = shipped["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0
    shipped["reader"].join(10)
    log = "".join(shipped["lines"])
    assert "stopped" in log
    assert TOKEN not in log and WRONG not in log
    assert "without auth" not in log and "clear text" not in log  # TLS and auth on: nothing to warn about
