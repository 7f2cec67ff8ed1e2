"""The Grafana dashboard's Triton and model metrics exist on a real tritonserver serving the tiny
repository (tests/unit/test_deploy.py checks the front-end's metrics against its registry)."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.unit.test_deploy import DASHBOARD, TRITON_METRICS, _model_metric_names, _panels, metric_names_in

pytestmark = pytest.mark.integration


def test_dashboard_triton_metrics_are_served_by_triton(tiny_triton) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(tiny_triton.metrics_url, timeout=10) as response:
        text = response.read().decode()
    served = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    dashboard = json.loads(DASHBOARD.read_text())
    used = {name for panel in _panels(dashboard) for target in panel.get("targets", [])
            for name in metric_names_in(target["expr"])}
    triton_side = used & (TRITON_METRICS | _model_metric_names())
    assert triton_side, "the dashboard has no Triton panels"
    assert triton_side <= served, f"not served by Triton: {sorted(triton_side - served)}"
    missing = TRITON_METRICS - served
    assert not missing, f"TRITON_METRICS lists names Triton does not serve: {sorted(missing)}"


def test_front_end_relays_the_real_triton_metrics_page(tiny_triton) -> None:
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from mofserve.server.http_api import build_http_app
    from mofserve.server.metrics import FrontendMetrics

    async def scrape() -> tuple[int, str]:
        app = build_http_app(None, FrontendMetrics(), max_body_bytes=1 << 20,
                             triton_metrics_url=lambda: tiny_triton.metrics_url)
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            response = await client.get("/metrics/triton")
            return response.status, await response.text()
        finally:
            await client.close()

    status, text = asyncio.run(scrape())
    assert status == 200 and "nv_inference_request_success" in text and "mofserve_encoder_cache_total" in text
