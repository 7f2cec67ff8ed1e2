"""``mofserve serve`` settings: defaults < config file (TOML) < environment (MOFSERVE_*) < flags.

Every field is documented in docs/api.md; ``mofserve serve --help`` lists the flags.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mofserve.core.profiles import profile_environment

from .engine import Limits


@dataclass(frozen=True)
class ServeConfig:
    profile: str = "tiny"
    host: str = "127.0.0.1"  # front-end bind address (gRPC and HTTP); Triton always binds loopback
    grpc_port: int = 50051
    http_port: int = 8080
    triton_http_port: int = 0  # 0: a free loopback port
    triton_grpc_port: int = 0
    triton_metrics_port: int = 0
    # split deployment (server/remote_triton.py): the front-end alone, before a Triton it does not own
    triton_url: str | None = None  # grpc://HOST:PORT; set: no export, no Triton child, no restarts
    triton_metrics_url: str | None = None  # http://HOST:PORT/metrics of that Triton, relayed at /metrics/triton
    target: str = "cpu"
    clip: str | None = None  # checkpoint overrides (paper profile)
    dinov2: str | None = None
    llava: str | None = None
    max_restarts: int = 5  # Triton restarts by the supervisor before the server gives up
    health_interval_s: float = 1.0
    shutdown_grace_s: float = 10.0
    # readiness (server/probe.py): a real inference through every python-backend model, because
    # Triton says ready while a stub process is dead; K failures in a row restart Triton
    probe_interval_s: float = 10.0  # between probes while ready (0: probe only after a (re)start)
    probe_timeout_s: float = 30.0
    probe_failures_before_restart: int = 3
    # limits and backpressure (server/admission.py; docs/reliability.md)
    max_in_flight: int = 8  # requests executing at once, both transports together
    max_queue: int = 32  # requests waiting for a slot; beyond: RESOURCE_EXHAUSTED / 429 with retry advice
    default_deadline_s: float = 300.0  # a request's deadline when the caller sends none
    max_deadline_s: float = 600.0  # longer deadlines are clamped to this
    max_message_bytes: int = 0  # largest gRPC request message; 0: max_image_bytes + 1 MiB
    max_body_bytes: int = 0  # largest HTTP body; 0: max_image_bytes base64-encoded + 1 MiB
    # security (server/security.py): TLS for gRPC and HTTP, bearer-token auth on both
    tls_cert_file: str | None = None  # PEM certificate chain; with tls_key_file turns TLS on
    tls_key_file: str | None = None
    tls_client_ca_file: str | None = None  # mutual TLS: clients need a certificate this CA signed
    auth_token: str | None = field(default=None, repr=False)  # a secret: never printed
    auth_token_file: str | None = None  # the token's file (first line), instead of auth_token
    playground: bool = True  # the web playground at / of the HTTP port (server/playground; serve --no-playground)
    limits: Limits = field(default_factory=Limits)

    def merged(self, values: Mapping[str, Any]) -> ServeConfig:
        """A copy with ``values`` applied (None leaves a field as it is); limits by their own names."""
        own = {f.name: f for f in fields(self)}
        limit_names = {f.name for f in fields(Limits)}
        top, limits = {}, {}
        for key, value in values.items():
            if value is None:
                continue
            if key in limit_names:
                limits[key] = int(value)
            elif key in own and key != "limits":
                top[key] = _coerce(own[key].type, value, key)
            else:
                raise ValueError(f"config: unknown setting {key!r}")
        return replace(self, **top, limits=replace(self.limits, **limits))


def _coerce(kind: Any, value: Any, key: str) -> Any:
    text = str(kind)
    if text == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    try:
        if text.startswith("int"):
            return int(value)
        if text.startswith("float"):
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None
    return str(value)


ENV_PREFIX = "MOFSERVE_"


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``MOFSERVE_GRPC_PORT=50052`` -> {"grpc_port": "50052"}; only known settings are read."""
    environ = os.environ if environ is None else environ
    names = {f.name for f in fields(ServeConfig)} | {f.name for f in fields(Limits)}
    names.discard("limits")
    # a variable a profile reads is the profile's (paper's MOFSERVE_CLIP/DINOV2/LLAVA: its sources,
    # which the clip/dinov2/llava settings of a file or flags then override); MOFSERVE_HOME is the
    # artefact root
    profiles = profile_environment()
    return {name: environ[ENV_PREFIX + name.upper()] for name in names
            if ENV_PREFIX + name.upper() in environ and ENV_PREFIX + name.upper() not in profiles}


def from_file(path: Path) -> dict[str, Any]:
    """A TOML file with the settings at top level or under ``[serve]`` (limits may sit in ``[limits]``)."""
    data = tomllib.loads(Path(path).read_text())
    values = dict(data.get("serve", {k: v for k, v in data.items() if not isinstance(v, dict)}))
    values.update(data.get("limits", {}))
    return values


def load_config(file: Path | None = None, flags: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> ServeConfig:
    config = ServeConfig()
    if file is not None:
        config = config.merged(from_file(file))
    config = config.merged(from_environment(environ))
    return config.merged(flags or {})
