"""The reverse proxy under load, beside nginx and a bare aiohttp proxy, all in front of the same nginx.

Upstream: Debian's nginx serving a small JSON document on two ports (the two targets). Load: Debian's
`wrk` (C, not the bottleneck), 16 connections, `--seconds` each. Measured:
(a) the upstream directly; (b) nginx as a reverse proxy over both targets (the ceiling);
(c) a bare aiohttp proxy of ~30 lines (the Python peer); (d) `junction gateway` with a route that has
key auth, a Redis-shared token bucket, a breaker, round robin over both targets and analytics on;
then (a) and (d) at a fixed ~1,000 req/s (wrk's per-request delay) for the added p99; and the time
from both targets dying to the gateway's first fast 503.

Needs nginx and wrk (installed with apt-get when missing, as root), aiohttp (`--install` or the
`bench` extra) and Redis (`--redis-url`, default redis://127.0.0.1:6379/13).

    .venv/bin/python benchmarks/proxy.py [--seconds 10] [--workers 1] [--json proxy.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.support import free_port, platform_env, wait_for  # noqa: E402

CONNECTIONS = 16
BODY = '{"id": 7, "name": "customer 7", "tier": "gold", "tags": ["a", "b"]}'

BARE_PROXY = """
import itertools, sys
from aiohttp import ClientSession, TCPConnector, web

targets = itertools.cycle(sys.argv[2:])

async def forward(request):
    async with request.app["session"].request(
        request.method, next(targets) + request.path_qs, headers=request.headers, data=await request.read()
    ) as answer:
        body = await answer.read()
        return web.Response(body=body, status=answer.status, headers={"Content-Type": answer.content_type})

async def session(app):
    app["session"] = ClientSession(connector=TCPConnector(limit=256))
    yield
    await app["session"].close()

app = web.Application()
app.cleanup_ctx.append(session)
app.router.add_route("*", "/{tail:.*}", forward)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def ensure_tools(install: bool) -> None:
    missing = [
        name
        for name in ("nginx", "wrk")
        if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()
    ]
    if missing:
        print(f"installing {', '.join(missing)} (apt-get) ...", flush=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *("nginx-light" if m == "nginx" else m for m in missing)],
            check=True,
        )
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        if not install:
            raise SystemExit("aiohttp is missing: pass --install or install the bench extra") from None
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "aiohttp>=3.9"], check=True)


def start_nginx(folder: Path, targets: list[int], proxy_port: int) -> subprocess.Popen:
    servers = "\n".join(
        f"server {{ listen 127.0.0.1:{port}; access_log off; location / {{ default_type application/json; "
        f"return 200 '{BODY}'; }} }}"
        for port in targets
    )
    conf = folder / "nginx.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            worker_processes 1; daemon off; pid {folder}/nginx.pid; error_log {folder}/error.log;
            events {{ worker_connections 1024; }}
            http {{
              access_log off;
              upstream both {{ {" ".join(f"server 127.0.0.1:{p};" for p in targets)} keepalive 32; }}
              {servers}
              server {{ listen 127.0.0.1:{proxy_port}; location / {{ proxy_pass http://both;
                proxy_http_version 1.1; proxy_set_header Connection ""; }} }}
            }}
            """
        )
    )
    process = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(folder)], stderr=subprocess.DEVNULL)
    wait_for(lambda: _answers(f"http://127.0.0.1:{proxy_port}/"), process=process, timeout_s=20)
    return process


def _answers(url: str, headers: dict | None = None) -> bool:
    try:
        return httpx.get(url, headers=headers, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def wrk(url: str, seconds: int, key: str | None = None, rate: int | None = None) -> dict:
    """req/s and latency percentiles (ms) from wrk; `rate`: about that many requests a second in all."""
    command = ["wrk", "-t2", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", url]
    if key:
        command[1:1] = ["-H", f"Authorization: Bearer {key}"]
    script = None
    if rate:
        script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
        script.write(f"function delay() return {1000 * CONNECTIONS / rate:.1f} end\n")
        script.close()
        command[1:1] = ["-s", script.name]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    if script:
        os.unlink(script.name)
    figures = {"req_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))}
    for label, quantile in (("p50", "50%"), ("p99", "99%")):
        value, unit = re.search(rf"{quantile}\s+([\d.]+)(us|ms|s)", output).groups()
        figures[f"{label}_ms"] = float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    figures["non_2xx"] = int(non_2xx.group(1)) if non_2xx else 0
    return figures


def start_gateway(
    folder: Path, targets: list[int], redis_url: str, workers: int
) -> tuple[subprocess.Popen, str, str]:
    import yaml

    routes = folder / "routes.yaml"
    routes.write_text(
        yaml.safe_dump(
            {
                "upstreams": {
                    "both": {
                        "algorithm": "round_robin",
                        "targets": [{"url": f"http://127.0.0.1:{port}"} for port in targets],
                        "breaker": {"error_ratio": 0.5, "min_requests": 5, "window": "5s", "open_for": "30s"},
                        "retries": 0,
                    }
                },
                "routes": {
                    "bench": {
                        "path": "/bench",
                        "upstream": "both",
                        "auth": {"type": "key"},
                        "rate_limits": [
                            {
                                "algorithm": "token_bucket",
                                "rate": 1_000_000,
                                "per": "1s",
                                "by": ["route"],
                                "shared": True,
                            }
                        ],
                    }
                },
            }
        )
    )
    env = {
        **platform_env(),
        "JUNCTION_HOME": str(folder / "home"),
        "JUNCTION_ROUTES_FILE": str(routes),
        "JUNCTION_REDIS_URL": redis_url,
    }
    created = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "keys", "create", "bench", "--scope", "proxy:call:bench"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    key = re.search(r"jk_[\w-]+", created).group(0)  # urlsafe: letters, digits, _ and -
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestration.cli",
            "gateway",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(folder / "gateway.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}/gateway/proxy/bench/"
    try:
        wait_for(lambda: _answers(url, {"Authorization": f"Bearer {key}"}), process=process, timeout_s=60)
    except TimeoutError:
        process.terminate()
        raise TimeoutError(
            f"the gateway did not answer:\n{(folder / 'gateway.log').read_text()[-3000:]}"
        ) from None
    return process, url, key


def time_to_fast_503(nginx: subprocess.Popen, url: str, key: str) -> float:
    """Seconds from the upstream's death to the first 503 answered in under 50 ms."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(timeout=5) as client:
        nginx.send_signal(signal.SIGTERM)
        nginx.wait(timeout=10)
        died = time.perf_counter()
        while time.perf_counter() - died < 30:
            asked = time.perf_counter()
            answer = client.get(url, headers=headers)
            if answer.status_code == 503 and time.perf_counter() - asked < 0.05:
                return time.perf_counter() - died
    raise RuntimeError("the breaker never opened")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="Per measurement.")
    parser.add_argument("--workers", type=int, default=1, help="junction gateway --workers.")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--json", type=Path, help="Write the figures as one flat JSON object here.")
    parser.add_argument("--install", action="store_true", help="pip install aiohttp first.")
    args = parser.parse_args()
    ensure_tools(args.install)
    folder = Path(tempfile.mkdtemp(prefix="junction-proxy-bench-"))
    targets, nginx_proxy = [free_port(), free_port()], free_port()
    nginx = start_nginx(folder, targets, nginx_proxy)
    bare_port = free_port()
    bare_script = folder / "bare_proxy.py"
    bare_script.write_text(BARE_PROXY)
    bare = subprocess.Popen(
        [sys.executable, str(bare_script), str(bare_port), *(f"http://127.0.0.1:{p}" for p in targets)]
    )
    gateway = None
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{bare_port}/"), process=bare, timeout_s=20)
        gateway, gateway_url, key = start_gateway(folder, targets, args.redis_url, args.workers)
        rows = {}
        for name, url, with_key in [
            ("(a) upstream directly (nginx)", f"http://127.0.0.1:{targets[0]}/", False),
            ("(b) nginx reverse proxy", f"http://127.0.0.1:{nginx_proxy}/", False),
            ("(c) bare aiohttp proxy", f"http://127.0.0.1:{bare_port}/", False),
            (f"(d) junction gateway (workers={args.workers})", gateway_url, True),
        ]:
            print(f"{name} ...", flush=True)
            rows[name] = wrk(url, args.seconds, key if with_key else None)
        print("fixed ~1,000 req/s ...", flush=True)
        direct_fixed = wrk(f"http://127.0.0.1:{targets[0]}/", args.seconds, rate=1000)
        gateway_fixed = wrk(gateway_url, args.seconds, key, rate=1000)
        print("upstream dies ...", flush=True)
        fast_503_s = time_to_fast_503(nginx, gateway_url, key)
    finally:
        for process in (gateway, bare, nginx):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)

    names = list(rows)
    gateway_row, bare_row, nginx_row = rows[names[3]], rows[names[2]], rows[names[1]]
    print()
    print(
        f"| {CONNECTIONS} connections, {args.seconds} s each | req/s | p50 ms | p99 ms | non-2xx | ÷ bare aiohttp |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(
            f"| {name} | {row['req_per_s']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['non_2xx']} | "
            f"{row['req_per_s'] / bare_row['req_per_s']:.2f}x |"
        )
    added_p99 = gateway_fixed["p99_ms"] - direct_fixed["p99_ms"]
    print()
    print(
        f"at ~1,000 req/s: upstream p99 {direct_fixed['p99_ms']:.2f} ms ({direct_fixed['req_per_s']:,.0f} req/s), "
        f"through the gateway {gateway_fixed['p99_ms']:.2f} ms ({gateway_fixed['req_per_s']:,.0f} req/s): "
        f"added p99 {added_p99:.2f} ms"
    )
    print(f"both targets die -> first fast 503 after {fast_503_s:.3f} s")
    figures = {
        "gateway_req_per_s": round(gateway_row["req_per_s"]),
        "bare_proxy_req_per_s": round(bare_row["req_per_s"]),
        "nginx_proxy_req_per_s": round(nginx_row["req_per_s"]),
        "upstream_req_per_s": round(rows[names[0]]["req_per_s"]),
        "ratio_vs_bare_proxy": round(gateway_row["req_per_s"] / bare_row["req_per_s"], 3),
        "ratio_vs_nginx": round(gateway_row["req_per_s"] / nginx_row["req_per_s"], 3),
        "gateway_p99_ms": gateway_row["p99_ms"],
        "added_p99_ms": round(added_p99, 3),
        "breaker_fast_503_s": round(fast_503_s, 3),
    }
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
