"""Every URL the gateway hands out leads somewhere, on the combined server and on `junction gateway`.

A crawl from every GET endpoint of the OpenAPI document (path parameters filled from the lists'
own answers) follows each absolute URL in the JSON bodies and each link of the HTML pages. A link
under the gateway must be answered by the gateway (not 404); any other link must be a Dagster UI
page that exists. On the combined server a gateway link that lost its `/gateway` prefix is still
answered 200 by the Dagster UI's catch-all route (the app's overview), which is why the second rule
matters. Links in run metadata and e-mails carry the port the platform was started on.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from support import free_port

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
PIPELINE = "station_readings"
RUN_PAGE = re.compile(r"^/runs/[0-9a-f-]{36}$")
HREF = re.compile(r'href="([^"#]+)"')


def follow_run(client: httpx.Client, run_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(f"/v1/runs/{run_id}").json()
        if run["status"] in {"SUCCESS", "FAILURE", "CANCELED"}:
            return run
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish in {timeout_s}s")


@pytest.fixture(scope="module")
def pipeline_run(live_platform, admin_key) -> str:
    """One finished run of a shipped pipeline, so the pipeline endpoints have reports to link."""
    with httpx.Client(
        base_url=f"{live_platform.base_url}/gateway", headers={"X-API-Key": admin_key}, timeout=30
    ) as client:
        launched = client.post(f"/v1/jobs/{PIPELINE}_pipeline/runs", json={})
        assert launched.status_code == 201, launched.text
        run = follow_run(client, launched.json()["run_id"])
        assert run["status"] == "SUCCESS", run
        return run["run_id"]


def is_link_field(key: str | None) -> bool:
    return key is not None and (key in {"url", "href", "older", "newer", "next"} or key.endswith("_url"))


def urls_in(value, key: str | None = None, in_links: bool = False) -> Iterator[str]:
    """The links of a JSON body: strings in link fields (`url`, `*_url`, `older`...) and in `links`
    mappings; other strings that look like URLs are data (a workflow input's default)."""
    if isinstance(value, str):
        if (in_links or is_link_field(key)) and value.startswith(("http://", "https://")):
            yield value
    elif isinstance(value, dict):
        for name, item in value.items():
            yield from urls_in(item, name, in_links or name == "links")
    elif isinstance(value, list):
        for item in value:
            yield from urls_in(item, key, in_links)


def seeds(client: httpx.Client) -> list[str]:
    """Every GET path of the OpenAPI document, path parameters filled from the lists' answers."""
    names = {
        "pipelines": [p["name"] for p in client.get("/v1/pipelines").json()["pipelines"]],
        "streams": [s["name"] for s in client.get("/v1/streams").json()["streams"]],
        "workflows": [w["name"] for w in client.get("/v1/workflows").json()["workflows"]],
    }
    paths = []
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        if "get" not in operations or "{request_id}" in path:  # confirm pages need a signed token
            continue
        if "{" not in path:
            paths.append(path)
            continue
        family = path.split("/")[2]
        if "{run_id}" in path:
            continue  # reached through the URLs the lists return
        paths += [path.replace("{name}", name) for name in names.get(family, [])[:2]]
    return paths


def crawl(gateway_base: str, ui_base: str, key: str) -> dict[str, int]:
    """{url: status} of every URL reached; fails on the first that leads nowhere."""
    seen: dict[str, int] = {}
    with httpx.Client(headers={"X-API-Key": key}, timeout=30) as client:
        with httpx.Client(base_url=gateway_base, headers={"X-API-Key": key}, timeout=30) as api:
            queue = [f"{gateway_base}{path}" for path in seeds(api)]
        while queue and len(seen) < 300:
            url = queue.pop(0)
            if url in seen:
                continue
            parts = urlsplit(url)
            if url.startswith(gateway_base + "/"):
                with client.stream("GET", url) as response:
                    kind = response.headers.get("content-type", "")
                    if not kind.startswith("text/event-stream"):  # an event stream never ends: its head
                        response.read()
                assert response.status_code != 404, f"{url}: 404 {response.text[:300]}"
                assert response.status_code < 500, f"{url}: {response.status_code} {response.text[:300]}"
                seen[url] = response.status_code
                if kind.startswith("application/json"):
                    queue += list(urls_in(response.json()))
                elif kind.startswith("text/html"):
                    queue += [urljoin(url, href) for href in HREF.findall(response.text)]
            else:
                assert url.startswith(ui_base + "/") and RUN_PAGE.match(parts.path), (
                    f"{url} is neither under the gateway ({gateway_base}) nor a Dagster UI run page"
                )
                response = client.get(url)
                assert response.status_code == 200, url
                seen[url] = response.status_code
    return seen


def test_every_url_of_the_combined_server_leads_somewhere(live_platform, admin_key, pipeline_run):
    reached = crawl(f"{live_platform.base_url}/gateway", live_platform.base_url, admin_key)
    report = f"{live_platform.base_url}/gateway/v1/pipelines/{PIPELINE}/reports/{pipeline_run}"
    assert any(url.startswith(report) for url in reached), "the pipeline list links the run's report"
    assert f"{live_platform.base_url}/runs/{pipeline_run}" in reached


def test_report_links_in_run_metadata_carry_the_platforms_port(live_platform, pipeline_run):
    """JUNCTION_PUBLIC_URL is not set: `junction dev --port N` derives it, so the link the Dagster UI
    shows in the staged materialization's metadata points at this platform (not at port 3000)."""
    query = """query($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
        assetMaterializations(limit: 1) { runId metadataEntries { label ... on UrlMetadataEntry { url } } } } } }"""
    answer = httpx.post(
        f"{live_platform.base_url}/graphql",
        json={"query": query, "variables": {"key": {"path": [f"{PIPELINE}_staged"]}}},
        timeout=30,
    ).json()
    (materialization,) = answer["data"]["assetOrError"]["assetMaterializations"]
    assert materialization["runId"] == pipeline_run
    links = {e["label"]: e.get("url") for e in materialization["metadataEntries"]}
    link = links["quality_report"]
    assert link.startswith(
        f"{live_platform.base_url}/gateway/v1/pipelines/{PIPELINE}/reports/{pipeline_run}?token="
    )
    # The signed link opens the report without a key.
    assert httpx.get(link, timeout=30).status_code == 200
    assert f"links in reports and notifications start with {live_platform.base_url}" in live_platform.log()


def test_every_url_of_the_standalone_gateway_leads_somewhere(
    live_platform, admin_key, pipeline_run, tmp_path
):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUNCTION_") and k != "DAGSTER_HOME"}
    env.update({"JUNCTION_HOME": str(live_platform.home), "JUNCTION_DAGSTER_URL": live_platform.base_url})
    log = open(tmp_path / "gateway.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestration.cli", "gateway", "--port", str(port)],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/gateway"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError((tmp_path / "gateway.log").read_text())
        reached = crawl(base, live_platform.base_url, admin_key)
        assert any(
            url.startswith(f"{base}/v1/pipelines/{PIPELINE}/reports/{pipeline_run}") for url in reached
        )
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        log.close()
