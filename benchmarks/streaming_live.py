"""Live subscriptions under load: `junction gateway` on Redis beside a bare XREAD + websockets peer.

Events are published to Redis at `--rate` events/s (from a process of its own, what is due every
10 ms, each payload carrying its publish time) while N WebSocket clients (1, 100, 1,000; each
subscription with a filter that every event passes) receive them; per N: publish → receive latency
p50/p99 and the events/s delivered to all clients together. The same for the peer, a ~40-line
server (Redis `XREAD` in a loop, the raw events broadcast with the `websockets` library, no auth, no
filters, no resume), in the same run.
Then: memory per idle connection (gateway RSS with 1,000 idle subscribed connections, less before),
and 20 clients forced to reconnect every 0.5 s resuming from their last id, with gaps and duplicates
counted against what was published.

The clients run in this process (asyncio, orjson); at 1,000 subscribers they share 2 cores with the
gateway, so the figures are a floor for the server.

    .venv/bin/python benchmarks/streaming_live.py [--seconds 5] [--rate 1000] [--json live.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.support import free_port, pct, start_bench_gateway  # noqa: E402

STREAM = "bench.live"
FILTER = {"field": "n", "op": "gte", "value": 0}

PEER = """
import asyncio, sys
import orjson, redis.asyncio
from websockets.asyncio.server import broadcast, serve

port, url, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
clients = set()

async def handler(socket):
    clients.add(socket)
    try:
        await socket.wait_closed()
    finally:
        clients.discard(socket)

async def tail():
    client = redis.asyncio.Redis.from_url(url)
    last = "$"
    while True:
        reply = await client.xread({key: last}, block=1000, count=500)
        for _, entries in reply or []:
            last = entries[-1][0]
            events = [{"id": i.decode(), "payload": orjson.loads(f[b"payload"])} for i, f in entries]
            broadcast(clients, orjson.dumps({"type": "events", "events": events}).decode())

async def main():
    async with serve(handler, "127.0.0.1", port, max_queue=None):
        await tail()

asyncio.run(main())
"""


def start_gateway(folder: Path, redis_url: str) -> tuple[subprocess.Popen, str, str, dict]:
    process, base, key, env = start_bench_gateway(
        folder, redis_url, STREAM, f"events:read:{STREAM}", {"JUNCTION_LIVE_MAX_CONNECTIONS_PER_KEY": "5000"}
    )
    return process, base.replace("http://", "ws://") + "/v1/streams/ws", key, env


def stream_key() -> str:
    from resources.event_stream.redis_backend import stream_key as key_of

    return key_of(STREAM)


PUBLISHER = """
import json, sys, time
from resources.event_stream import open_event_stream

rate, seconds, start = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
events, ids, n = open_event_stream(), [], start
# Paced by what is due (not by slots, which drop a batch whenever a publish overruns its slot).
started = time.perf_counter()
while (elapsed := time.perf_counter() - started) < seconds:
    due = min(int(elapsed * rate) - len(ids), 100)
    if due <= 0:
        time.sleep(0.01)  # so about 10 events every 10 ms at 1,000/s
        continue
    result = events.publish_batch("STREAM", [{"n": n + i, "t": time.time()} for i in range(due)])
    ids.extend(item.id for item in result.results)
    n += due
print(json.dumps(ids))
""".replace("STREAM", STREAM)


class Publisher:
    """`rate` events/s into the stream through the resource (Lua publish), from a process of its own
    (so that the clients in this process do not slow it down); the ids recorded."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.ids: list[str] = []

    async def run(self, rate: int, seconds: float) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PUBLISHER,
            str(rate),
            str(seconds),
            str(len(self.ids)),
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
        )
        output, _ = await process.communicate()
        self.ids.extend(json.loads(output))


class Client:
    def __init__(self, url: str, key: str | None, measure: bool):
        self.url, self.key, self.measure = url, key, measure
        self.received = 0
        self.latencies: list[float] = []
        self.ids: list[str] = []
        self.socket = None
        self.last_id: str | None = None

    async def open(self, position: str = "latest") -> None:
        from websockets.asyncio.client import connect

        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self.socket = await connect(self.url, additional_headers=headers, max_size=None, open_timeout=60)
        if self.key:
            await self.socket.recv()  # welcome
            message = {"type": "subscribe", "id": "s", "stream": STREAM, "filter": FILTER, "from": position}
            await self.socket.send(json.dumps(message))
            subscribed = orjson.loads(await self.socket.recv())
            assert subscribed["type"] == "subscribed", subscribed
            self.last_id = self.last_id or subscribed["position"]

    async def read(self, keep_ids: bool = False) -> None:
        try:
            async for frame in self.socket:
                message = orjson.loads(frame)
                if message["type"] == "ping":
                    await self.socket.send('{"type":"pong"}')
                    continue
                if message["type"] != "events":
                    continue
                events = message["events"]
                self.received += len(events)
                if self.measure:
                    now = time.time()
                    self.latencies.extend(now - event["payload"]["t"] for event in events)
                if keep_ids:
                    self.ids.extend(event["id"] for event in events)
                self.last_id = events[-1]["id"]
        except Exception:  # noqa: BLE001 - the connection closed (a forced reconnect or the end)
            return


async def fan_out(
    url: str, key: str | None, subscribers: int, publisher: Publisher, rate: int, seconds: float
) -> dict:
    clients = [Client(url, key, measure=index < 20) for index in range(subscribers)]
    for start in range(0, subscribers, 100):
        await asyncio.gather(*(client.open() for client in clients[start : start + 100]))
    readers = [asyncio.create_task(client.read()) for client in clients]
    await asyncio.sleep(0.5)
    before = sum(client.received for client in clients)
    published_before = len(publisher.ids)
    await publisher.run(rate, seconds)
    await asyncio.sleep(1.0)  # the tail of the run drains
    delivered = sum(client.received for client in clients) - before
    for client in clients:
        await client.socket.close()
    await asyncio.gather(*readers)
    latencies = [value for client in clients for value in client.latencies]
    return {
        "p50_ms": pct(latencies, 50) * 1000 if latencies else float("nan"),
        "p99_ms": pct(latencies, 99) * 1000 if latencies else float("nan"),
        # Per second of publishing (every event was published within `seconds`; the drain after it
        # only lets the last ones arrive).
        "delivered_per_s": delivered / seconds,
        "expected_per_s": subscribers * (len(publisher.ids) - published_before) / seconds,
    }


async def reconnects(url: str, key: str, publisher: Publisher, rate: int, seconds: float) -> dict:
    clients = [Client(url, key, measure=False) for _ in range(20)]
    for client in clients:
        await client.open()
    first_position = {id(client): client.last_id for client in clients}
    readers = {id(client): asyncio.create_task(client.read(keep_ids=True)) for client in clients}
    publishing = asyncio.create_task(publisher.run(rate, seconds))
    forced = 0
    while not publishing.done():
        await asyncio.sleep(0.5)
        for client in clients[::2]:
            await client.socket.close()
            await readers[id(client)]
            await client.open(position=client.last_id)
            readers[id(client)] = asyncio.create_task(client.read(keep_ids=True))
            forced += 1
    await asyncio.sleep(1.0)
    for client in clients:
        await client.socket.close()
    await asyncio.gather(*readers.values())
    gaps = duplicates = 0
    published = publisher.ids
    index_of = {event_id: index for index, event_id in enumerate(published)}
    for client in clients:
        start = first_position[id(client)]
        expected = [event_id for event_id in published if start is None or _after(event_id, start)]
        duplicates += len(client.ids) - len(set(client.ids))
        gaps += len(set(expected) - set(client.ids))
        assert all(event_id in index_of for event_id in client.ids)
    return {"forced_reconnects": forced, "gaps": gaps, "duplicates": duplicates}


def _after(event_id: str, position: str) -> bool:
    def parsed(text: str) -> tuple[int, int]:
        ms, _, seq = text.partition("-")
        return int(ms), int(seq or 0)

    return parsed(event_id) > parsed(position)


async def idle_memory(url: str, key: str, gateway: subprocess.Popen, count: int) -> float:
    process = psutil.Process(gateway.pid)
    await asyncio.sleep(1.0)
    before = process.memory_info().rss
    clients = [Client(url, key, measure=False) for _ in range(count)]
    for start in range(0, count, 100):
        await asyncio.gather(*(client.open() for client in clients[start : start + 100]))
    await asyncio.sleep(2.0)
    after = process.memory_info().rss
    for client in clients:
        await client.socket.close()
    return (after - before) / count / 1024


async def run(args, folder: Path) -> dict:
    import redis

    redis.Redis.from_url(args.redis_url).flushdb()
    gateway, url, key, env = start_gateway(folder, args.redis_url)
    peer_port = free_port()
    peer = subprocess.Popen([sys.executable, "-c", PEER, str(peer_port), args.redis_url, stream_key()])
    publisher = Publisher({**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    results: dict = {}
    try:
        time.sleep(1.0)
        # First, on fresh processes: the memory freed by a later phase would be reused by these.
        results["kb_per_connection"] = await idle_memory(url, key, gateway, 1000)
        results["bare_kb_per_connection"] = await idle_memory(f"ws://127.0.0.1:{peer_port}", None, peer, 1000)
        for subscribers in args.subscribers:
            results[("junction", subscribers)] = await fan_out(
                url, key, subscribers, publisher, args.rate, args.seconds
            )
            print(f"  junction, {subscribers} subscribers: done", file=sys.stderr)
            results[("peer", subscribers)] = await fan_out(
                f"ws://127.0.0.1:{peer_port}", None, subscribers, publisher, args.rate, args.seconds
            )
            print(f"  peer, {subscribers} subscribers: done", file=sys.stderr)
        results["reconnects"] = await reconnects(url, key, publisher, args.rate, args.seconds)
    finally:
        for process in (gateway, peer):
            process.terminate()
            process.wait(10)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5, help="Publishing time per measurement.")
    parser.add_argument("--rate", type=int, default=1000, help="Events published per second.")
    parser.add_argument("--subscribers", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    parser.add_argument("--json", type=Path, help="Write the figures as one flat JSON object here.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        results = asyncio.run(run(args, Path(folder)))

    print(
        f"\nLive subscriptions on Redis, {args.rate} events/s for {args.seconds:g} s per row (filters on)\n"
    )
    print(
        f"{'server':<10} {'subscribers':>11} {'p50 ms':>8} {'p99 ms':>8} {'delivered/s':>12} {'expected/s':>11}"
    )
    for (server, subscribers), row in ((k, v) for k, v in results.items() if isinstance(k, tuple)):
        print(
            f"{server:<10} {subscribers:>11} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
            f"{row['delivered_per_s']:>12,.0f} {row['expected_per_s']:>11,.0f}"
        )
    figures = {}
    for (server, subscribers), row in ((k, v) for k, v in results.items() if isinstance(k, tuple)):
        prefix = "ws" if server == "junction" else "bare"
        figures[f"{prefix}_p50_ms_{subscribers}"] = round(row["p50_ms"], 3)
        figures[f"{prefix}_p99_ms_{subscribers}"] = round(row["p99_ms"], 3)
        figures[f"{prefix}_fanout_events_per_s_{subscribers}"] = round(row["delivered_per_s"], 1)
    largest = max(args.subscribers)
    figures["ratio_vs_bare_fanout"] = round(
        results[("junction", largest)]["delivered_per_s"] / results[("peer", largest)]["delivered_per_s"], 3
    )
    figures.update(results["reconnects"])
    figures["kb_per_connection"] = round(results["kb_per_connection"], 1)
    figures["bare_kb_per_connection"] = round(results["bare_kb_per_connection"], 1)
    print(
        f"\nfan-out ratio vs bare peer at {largest} subscribers: {figures['ratio_vs_bare_fanout']:.2f}x"
        f"\nforced reconnects: {figures['forced_reconnects']}, gaps: {figures['gaps']}, "
        f"duplicates: {figures['duplicates']}\nmemory per idle subscribed connection: "
        f"{figures['kb_per_connection']:.1f} KB (bare peer: {figures['bare_kb_per_connection']:.1f} KB)\n(webhook deliveries/s: benchmarks/streaming_webhooks.py)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
