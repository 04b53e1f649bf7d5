"""Webhook deliveries per second: a `junction gateway`'s dispatcher on Redis beside a bare peer.

`--events` events are published to a stream at once; a subscription delivers them to a local
receiver (uvicorn, a process of its own, answering 200 at once and counting events). Timed: from the
first publish to the receiver holding every event, for batch sizes 1 and 10. The peer, in the same
run and against the same receiver: a ~30-line loop of Redis `XREADGROUP` + httpx POST + `XACK` with
the same concurrency, unsigned, no filter, no retries, no breaker.

    .venv/bin/python benchmarks/streaming_webhooks.py [--events 5000] [--json webhooks.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.support import free_port, start_bench_gateway, wait_for  # noqa: E402

STREAM = "bench.hooks"
CONCURRENCY = 8

RECEIVER = """
import sys, orjson, uvicorn
count = 0
async def app(scope, receive, send):
    global count
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/count":
        answer = str(count).encode()
    else:
        count += len(orjson.loads(body)["events"])
        answer = b"ok"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""

PEER = """
import asyncio, sys
import httpx, orjson, redis.asyncio

url, key, target, batch, concurrency = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

async def worker(client, http, name):
    while True:
        reply = await client.xreadgroup("peer", name, {key: ">"}, count=batch, block=1000)
        for _, entries in reply or []:
            events = [{"id": i.decode(), "payload": orjson.loads(f[b"payload"])} for i, f in entries]
            answer = await http.post(target, content=orjson.dumps({"events": events}))
            if answer.status_code < 300:
                await client.xack(key, "peer", *[i for i, _ in entries])

async def main():
    client = redis.asyncio.Redis.from_url(url)
    async with httpx.AsyncClient() as http:
        await asyncio.gather(*(worker(client, http, f"c{n}") for n in range(concurrency)))

asyncio.run(main())
"""


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def received(receiver_url: str) -> int:
    import httpx

    return int(httpx.get(f"{receiver_url}/count", timeout=5).text)


def publish(gateway, count: int) -> None:
    """Through the gateway's API, a thousand events per call."""
    for start in range(0, count, 1000):
        batch = [{"payload": {"n": n}} for n in range(start, min(count, start + 1000))]
        gateway.post(f"/v1/streams/{STREAM}/events", json=batch).raise_for_status()


def timed_until(receiver_url: str, goal: int, timeout_s: float = 300) -> float:
    started = time.perf_counter()
    deadline = started + timeout_s
    while received(receiver_url) < goal:
        if time.perf_counter() > deadline:
            raise SystemExit(f"only {received(receiver_url)} of {goal} events arrived in {timeout_s:g} s")
        time.sleep(0.02)
    return time.perf_counter() - started


def run(args, folder: Path) -> dict:
    import httpx
    import redis

    from resources.event_stream.redis_backend import stream_key

    redis.Redis.from_url(args.redis_url).flushdb()
    gateway, base, key, _ = start_bench_gateway(
        folder,
        args.redis_url,
        STREAM,
        "admin",
        {"JUNCTION_SUBSCRIPTIONS_DIR": str(folder / "subscriptions"), "JUNCTION_DISPATCHER_REFRESH_S": "0.2"},
    )
    receiver_port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(receiver_port)])
    receiver_url = f"http://127.0.0.1:{receiver_port}"
    wait_for(lambda: _answers(f"{receiver_url}/count"), process=receiver, timeout_s=30)
    results: dict = {}
    peer = None
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as events:
            for batch in (1, 10):
                name = f"bench-{batch}"
                answer = httpx.put(
                    f"{base}/v1/subscriptions/{name}",
                    json={
                        "stream": STREAM,
                        "url": f"{receiver_url}/hook",
                        "batch_size": batch,
                        "concurrency": CONCURRENCY,
                    },
                    headers={"Authorization": f"Bearer {key}"},
                )
                answer.raise_for_status()
                time.sleep(1.0)  # the dispatcher picks it up
                before = received(receiver_url)
                publish(events, args.events)
                seconds = timed_until(receiver_url, before + args.events)
                results[f"junction_batch_{batch}_deliveries_per_s"] = args.events / seconds
                httpx.delete(f"{base}/v1/subscriptions/{name}", headers={"Authorization": f"Bearer {key}"})
                print(f"  junction, batch {batch}: {args.events / seconds:,.0f} events/s", file=sys.stderr)
            for batch in (1, 10):
                redis_client = redis.Redis.from_url(args.redis_url)
                try:
                    redis_client.xgroup_destroy(stream_key(STREAM), "peer")
                except redis.ResponseError:
                    pass
                redis_client.xgroup_create(stream_key(STREAM), "peer", id="$")
                peer = subprocess.Popen(
                    [
                        sys.executable,
                        "-c",
                        PEER,
                        args.redis_url,
                        stream_key(STREAM),
                        f"{receiver_url}/hook",
                        str(batch),
                        str(CONCURRENCY),
                    ]
                )
                time.sleep(1.0)
                before = received(receiver_url)
                publish(events, args.events)
                seconds = timed_until(receiver_url, before + args.events)
                results[f"bare_batch_{batch}_deliveries_per_s"] = args.events / seconds
                peer.terminate()
                peer.wait(10)
                peer = None
                print(f"  bare peer, batch {batch}: {args.events / seconds:,.0f} events/s", file=sys.stderr)
    finally:
        for process in (gateway, receiver, peer):
            if process is not None:
                process.terminate()
                process.wait(10)
    for batch in (1, 10):
        results[f"ratio_vs_bare_batch_{batch}"] = (
            results[f"junction_batch_{batch}_deliveries_per_s"]
            / results[f"bare_batch_{batch}_deliveries_per_s"]
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=5000, help="Events per measurement.")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/13")
    parser.add_argument("--json", type=Path, help="Write the figures as one flat JSON object here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = run(args, Path(folder))
    print(f"\nWebhook deliveries of {args.events:,} events on Redis, {CONCURRENCY} requests in flight\n")
    print(f"{'batch size':>10} {'junction ev/s':>14} {'bare peer ev/s':>15} {'ratio':>6}")
    for batch in (1, 10):
        print(
            f"{batch:>10} {results[f'junction_batch_{batch}_deliveries_per_s']:>14,.0f} "
            f"{results[f'bare_batch_{batch}_deliveries_per_s']:>15,.0f} {results[f'ratio_vs_bare_batch_{batch}']:>6.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps({k: round(v, 3) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
