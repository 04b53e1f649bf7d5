"""The Redis Streams backend (`JUNCTION_REDIS_URL`): one Redis stream per Junction stream.

Keys: `junction:events:{<stream>}` holds the events (one field, `payload`, the JSON text) and
`junction:events:{<stream>}:idem:<key>` an idempotency key's event id (expiring after the stream's
window). The braces are a Redis Cluster hash tag: a stream and its keys live in one slot, so the
Lua scripts below may touch them together.

- Ids are Redis's own `ms-seq`, in the order Redis appended them.
- Publishing runs one Lua script call (`PUBLISH`) per publish, or per thousand events of a batch:
  the payloads are its arguments; the `XADD`s and, for an event with an idempotency key, the key's
  check and `SET PX` run atomically in it, so a crash can never store the key without the event or
  the event twice; it also counts the publish rate and applies the retention. One round trip, and
  for redis-py one command to pack and one string reply to parse instead of a command per event.
- Retention: Redis 7.0 records only `XDEL` in `max-deleted-entry-id`, not what `XTRIM` or
  `XADD MAXLEN` removed, so gap detection could not tell trimmed events from events never published.
  The publish script therefore trims itself (the `trim` Lua function, also the `TRIM` script of
  `trim()`) and records the highest trimmed id in `junction:events:{<stream>}:trimmed`. It is
  approximate like `MAXLEN ~`: it trims (exactly down to `max_count`) only once `TRIM_SLACK` events
  too many have accumulated, so the cost is amortised over publishes; age (`MINID`) is checked on
  each publish at O(log n).
- Reads run `XINFO STREAM`, the trimmed marker and `XRANGE` in one Lua script, so the highest removed
  id that decides `EventsLost` and the events read belong to the same instant. Blocking reads wait
  with `XREAD BLOCK` and then read again through the script.
- Consumer groups: `XREADGROUP` inside a script that first compares the group's last-delivered id
  with max-deleted-entry-id; `XACK`; `XAUTOCLAIM` for entries a dead consumer left pending;
  dead-lettering (`XACK` + `XADD` to `<stream>:dead-letter`, atomically in a script) for entries
  delivered `max_deliveries` times.
- A connection failure raises `EventStreamUnavailable`: nothing is dropped silently.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from resources.event_stream.core import (
    RATE_WINDOWS_S,
    ZERO_ID,
    ClaimResult,
    Event,
    EventId,
    EventsLost,
    EventStream,
    EventStreamUnavailable,
    GroupNotFound,
    GroupStats,
    Page,
    PendingEvent,
    PublishResult,
    StreamStats,
    ValidEvent,
    dead_letter_record,
    dead_letter_stream,
    decode_payload,
    encode_payload,
    now_ms,
)
from resources.event_stream.registry import StreamDefinition, StreamRegistry

# Lua helpers shared by the scripts: XINFO STREAM's flat reply as fields, and id comparison
# (ms and seq fit a Lua double exactly up to 2^53).
_LUA_HELPERS = """
local function info_field(reply, name)
  for i = 1, #reply, 2 do
    if reply[i] == name then return reply[i + 1] end
  end
  return nil
end
local function id_less(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
-- highest id removed: XDEL's (max-deleted-entry-id) or our trims' (the marker key)
local function max_removed(info, marker_key)
  local removed = info_field(info, 'max-deleted-entry-id')
  local trimmed = redis.call('GET', marker_key)
  if trimmed and id_less(removed, trimmed) then return trimmed end
  return removed
end
"""

# Trim a stream to its retention and record the highest id removed in the marker key. max_count ''
# or a number, slack: the events beyond max_count tolerated before trimming, min_id '' or an id.
# Returns how many events were removed.
_LUA_TRIM = """
local function trim(stream, marker, max_count, slack, min_id)
  local removed = 0
  local function record(id)
    local current = redis.call('GET', marker)
    if (not current) or id_less(current, id) then redis.call('SET', marker, id) end
  end
  if max_count ~= '' then
    local excess = redis.call('XLEN', stream) - tonumber(max_count)
    if excess > tonumber(slack) then
      local doomed = redis.call('XRANGE', stream, '-', '+', 'COUNT', excess)
      record(doomed[#doomed][1])
      removed = removed + redis.call('XTRIM', stream, 'MAXLEN', '=', max_count)
    end
  end
  if min_id ~= '' then
    local below = redis.call('XREVRANGE', stream, '(' .. min_id, '-', 'COUNT', 1)
    if #below > 0 then
      record(below[1][1])
      removed = removed + redis.call('XTRIM', stream, 'MINID', '=', min_id)
    end
  end
  return removed
end
"""

# KEYS: stream, the current publish-rate bucket, trimmed marker, then the batch's idempotency keys.
# ARGV: window ms, the bucket's lifetime ms, each event's idempotency key as an index into KEYS ('':
# no event has one; else a JSON array, 0 for none), max count, trim slack, min id (as for trim()),
# then one payload (JSON text) per event. One call per publish, one round trip, whatever the batch
# holds: the XADDs, the idempotency checks (atomic with their XADD: a crash can never store the key
# without the event or the event twice), the rate count and the retention trim. Payloads are plain
# arguments, which Redis hands to Lua as they are (no JSON array for Lua to parse) and redis-py
# packs in C with hiredis. Returns one string, space-separated per event: the new id, or `d` and
# the original's id for a duplicate.
PUBLISH = (
    _LUA_HELPERS
    + _LUA_TRIM
    + """
local stream = KEYS[1]
local first = 7
local ids = {}
local added = 0
if ARGV[3] == '' then
  for i = first, #ARGV do
    ids[i - first + 1] = redis.call('XADD', stream, '*', 'payload', ARGV[i])
  end
  added = #ids
else
  local keyed = cjson.decode(ARGV[3])
  for i = first, #ARGV do
    local n = i - first + 1
    local k = keyed[n]
    local existing = k > 0 and redis.call('GET', KEYS[k])
    if existing then
      ids[n] = 'd' .. existing
    else
      ids[n] = redis.call('XADD', stream, '*', 'payload', ARGV[i])
      if k > 0 then redis.call('SET', KEYS[k], ids[n], 'PX', ARGV[1]) end
      added = added + 1
    end
  end
end
-- the bucket's lifetime is set once, when the first publish of its 10 s creates it
if added > 0 and redis.call('INCRBY', KEYS[2], added) == added then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
if ARGV[4] ~= '' or ARGV[6] ~= '' then trim(stream, KEYS[3], ARGV[4], ARGV[5], ARGV[6]) end
return table.concat(ids, ' ')
"""
)

# KEYS: stream, trimmed marker. ARGV: max count ('' = none), slack, min id ('' = none).
TRIM = _LUA_HELPERS + _LUA_TRIM + "return trim(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3])"

# KEYS: stream, trimmed marker. ARGV: start, end, count. Returns {max removed id, last id, entries}.
READ_PAGE = (
    _LUA_HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'0-0', '0-0', {}} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local entries = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2], 'COUNT', ARGV[3])
return {max_removed(info, KEYS[2]), info_field(info, 'last-generated-id'), entries}
"""
)

# KEYS: stream, trimmed marker. ARGV: group, consumer, count.
# Returns {'lost', last delivered, max removed} or {'ok', last id, XREADGROUP reply}.
READ_GROUP = (
    _LUA_HELPERS
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'nogroup'} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local max_deleted = max_removed(info, KEYS[2])
local delivered = nil
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if info_field(group, 'name') == ARGV[1] then delivered = info_field(group, 'last-delivered-id') end
end
if not delivered then return {'nogroup'} end
if id_less(delivered, max_deleted) then return {'lost', delivered, max_deleted} end
local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3], 'STREAMS', KEYS[1], '>')
return {'ok', info_field(info, 'last-generated-id'), reply}
"""
)

# KEYS: stream, dead-letter stream. ARGV: group, id, dead-letter record.
# Acknowledge and dead-letter together: a crash between the two would lose or duplicate the event.
DEAD_LETTER = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', 'payload', ARGV[3])
return 1
"""

# KEYS: stream. ARGV: group, consumer, ids... Reset the idle time of the consumer's own pending events
# (XCLAIM ... JUSTID leaves the delivery count alone); an event another consumer claimed is left to it.
TOUCH = """
local touched = 0
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if entry[1] and entry[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""

# Events beyond max_count tolerated before a publish trims (like MAXLEN ~'s macro nodes).
TRIM_SLACK = 100
# Publish rates are counted per bucket of this many seconds (one INCRBY per publish call).
RATE_BUCKET_S = 10
# A bucket lives from its first publish until the longest rate window no longer reads it.
RATE_BUCKET_TTL_MS = (max(RATE_WINDOWS_S) + 2 * RATE_BUCKET_S) * 1000
# Events per PUBLISH call: the script holds Redis for about a millisecond per thousand.
SCRIPT_BATCH = 1000


def redacted_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def _unavailable(method):
    """Turn connection failures into `EventStreamUnavailable` naming the (redacted) server."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            raise unavailable_error(self.url, exc) from None

    return wrapper


def stream_key(stream: str) -> str:
    return f"junction:events:{{{stream}}}"


def rate_bucket_key(stream: str, bucket: int) -> str:
    """Events published in the `RATE_BUCKET_S` seconds starting at `bucket * RATE_BUCKET_S`."""
    return f"junction:events:{{{stream}}}:added:{bucket}"


def publish_rates(stream: str, counts_of) -> tuple[float, ...]:
    """Events/s over each of `RATE_WINDOWS_S`, from the buckets' counts (`counts_of(keys)`)."""
    now_s = now_ms() / 1000
    current = int(now_s // RATE_BUCKET_S)
    into_current = now_s - current * RATE_BUCKET_S
    buckets = max(RATE_WINDOWS_S) // RATE_BUCKET_S
    counts = counts_of([rate_bucket_key(stream, current - back) for back in range(buckets)])
    rates = []
    for window in RATE_WINDOWS_S:
        n = window // RATE_BUCKET_S  # the current bucket and the n - 1 before it
        total = sum(int(count or 0) for count in counts[:n])
        rates.append(round(total / ((n - 1) * RATE_BUCKET_S + into_current), 3))
    return tuple(rates)


def trimmed_marker(stream: str) -> str:
    return f"junction:events:{{{stream}}}:trimmed"


def idempotency_key(stream: str, key: str) -> str:
    return f"junction:events:{{{stream}}}:idem:{key}"


def _entry_event(stream: str, entry) -> Event:
    event_id, fields = entry
    if isinstance(fields, dict):
        payload = fields["payload"]
    else:  # a raw Lua reply: [field, value, ...]
        payload = dict(zip(fields[::2], fields[1::2], strict=True))["payload"]
    return Event(stream, event_id, decode_payload(payload))


def retention_args(definition: StreamDefinition, slack: int) -> list:
    """The TRIM arguments of the stream's retention: max count, slack, min id ('' for none)."""
    minid = f"{now_ms() - definition.max_age_s * 1000}-0" if definition.max_age_s else ""
    return [definition.max_count or "", slack, minid]


def publish_calls(definition: StreamDefinition, events: list[ValidEvent]) -> list[tuple[list, list]]:
    """The PUBLISH script calls (keys, args) appending `events`: one per `SCRIPT_BATCH` events.

    Sync and asyncio clients run the same calls, one after the other: a pipeline holding scripts
    would first ask the server whether it knows them (`SCRIPT EXISTS`), one more round trip.
    """
    name = definition.name
    window_ms = definition.idempotency_window_s * 1000
    retention = retention_args(definition, TRIM_SLACK)
    calls = []
    for start in range(0, len(events), SCRIPT_BATCH):
        chunk = events[start : start + SCRIPT_BATCH]
        keys = [
            stream_key(name),
            rate_bucket_key(name, now_ms() // 1000 // RATE_BUCKET_S),
            trimmed_marker(name),
        ]
        keyed = ""
        if any(event.idempotency_key for event in chunk):
            positions = []
            for event in chunk:
                if event.idempotency_key:
                    keys.append(idempotency_key(name, event.idempotency_key))
                    positions.append(len(keys))
                else:
                    positions.append(0)
            keyed = encode_payload(positions)
        calls.append((keys, [window_ms, RATE_BUCKET_TTL_MS, keyed, *retention, *(e.encoded for e in chunk)]))
    return calls


def append_results(events: list[ValidEvent], replies: list[str]) -> list[PublishResult]:
    """The events' results from the PUBLISH replies (one per call of `publish_calls`)."""
    results = []
    for start, reply in zip(range(0, len(events), SCRIPT_BATCH), replies, strict=True):
        chunk = events[start : start + SCRIPT_BATCH]
        outcomes = reply.split(" ")
        if "d" not in reply:  # every event accepted: its outcome is its id
            results += [
                PublishResult(event.index, "accepted", outcome)
                for event, outcome in zip(chunk, outcomes, strict=True)
            ]
            continue
        for event, outcome in zip(chunk, outcomes, strict=True):
            if outcome[0] == "d":
                results.append(PublishResult(event.index, "duplicate", outcome[1:]))
            else:
                results.append(PublishResult(event.index, "accepted", outcome))
    return results


def read_page_call(stream: str, after: EventId | None, until: EventId | None, limit: int) -> dict:
    start = f"({after}" if after is not None else "-"
    end = str(until) if until is not None else "+"
    return {"keys": [stream_key(stream), trimmed_marker(stream)], "args": [start, end, limit]}


def page_from_reply(stream: str, reply) -> Page:
    max_deleted, last_id, entries = reply
    return Page(
        [_entry_event(stream, entry) for entry in entries], EventId.parse(max_deleted), EventId.parse(last_id)
    )


def unavailable_error(url: str, exc: Exception) -> EventStreamUnavailable:
    return EventStreamUnavailable(
        f"Redis at {redacted_url(url)} is unreachable: {exc}; nothing was published or read"
    )


class RedisEventStream(EventStream):
    backend = "redis"

    def __init__(self, url: str, registry: StreamRegistry | None = None):
        super().__init__(registry or StreamRegistry.for_url())
        self.url = url
        # RESP2 pinned: the Lua replies and XINFO shapes parsed here are RESP2's. No socket timeout:
        # blocking reads hold the connection for up to block_ms.
        self.client = redis.Redis.from_url(url, decode_responses=True, protocol=2, socket_connect_timeout=3)
        self._publish_script = self.client.register_script(PUBLISH)
        self._read_page_script = self.client.register_script(READ_PAGE)
        self._read_group_script = self.client.register_script(READ_GROUP)
        self._dead_letter_script = self.client.register_script(DEAD_LETTER)
        self._touch_script = self.client.register_script(TOUCH)
        self._trim_script = self.client.register_script(TRIM)

    def close(self) -> None:
        self.client.close()

    # -- publishing ------------------------------------------------------------------------------

    @_unavailable
    def _append(self, definition: StreamDefinition, events: list[ValidEvent]) -> list[PublishResult]:
        replies = [
            self._publish_script(keys=keys, args=args) for keys, args in publish_calls(definition, events)
        ]
        return append_results(events, replies)

    # -- reading ---------------------------------------------------------------------------------

    @_unavailable
    def _read_page(self, stream: str, after: EventId | None, until: EventId | None, limit: int) -> Page:
        return page_from_reply(stream, self._read_page_script(**read_page_call(stream, after, until, limit)))

    @_unavailable
    def _last_id(self, stream: str) -> EventId:
        try:
            return EventId.parse(self.client.xinfo_stream(stream_key(stream))["last-generated-id"])
        except ResponseError:  # no such key: nothing was ever published
            return ZERO_ID

    @_unavailable
    def _wait_for_new(self, stream: str, after: EventId, timeout_ms: int) -> None:
        self.client.xread({stream_key(stream): str(after)}, count=1, block=max(1, timeout_ms))

    # -- consumer groups -------------------------------------------------------------------------

    @_unavailable
    def create_group(self, stream: str, group: str, start_id: str = "$") -> bool:
        self.registry.get(stream)
        start = start_id if start_id == "$" else str(EventId.parse(start_id))
        try:
            self.client.xgroup_create(stream_key(stream), group, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise
        return True

    @_unavailable
    def set_group_position(self, stream: str, group: str, last_delivered_id: str) -> None:
        try:
            self.client.xgroup_setid(stream_key(stream), group, str(EventId.parse(last_delivered_id)))
        except ResponseError as exc:
            raise GroupNotFound(stream, group) from exc

    @_unavailable
    def _read_group_page(
        self, stream: str, group: str, consumer: str, limit: int
    ) -> tuple[list[Event], EventId]:
        reply = self._read_group_script(
            keys=[stream_key(stream), trimmed_marker(stream)], args=[group, consumer, limit]
        )
        if reply[0] == "nogroup":
            raise GroupNotFound(stream, group)
        if reply[0] == "lost":
            delivered, max_deleted = EventId.parse(reply[1]), reply[2]
            raise EventsLost(stream, str(delivered.next()), max_deleted)
        entries = reply[2][0][1] if reply[2] else []
        return [_entry_event(stream, entry) for entry in entries], EventId.parse(reply[1])

    @_unavailable
    def ack(self, stream: str, group: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        return self.client.xack(stream_key(stream), group, *[str(EventId.parse(i)) for i in ids])

    @_unavailable
    def touch(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> int:
        if not ids:
            return 0
        try:
            return self._touch_script(
                keys=[stream_key(stream)], args=[group, consumer, *[str(EventId.parse(i)) for i in ids]]
            )
        except ResponseError as exc:
            raise GroupNotFound(stream, group) from exc

    @_unavailable
    def dead_letter(self, stream: str, group: str, records: Mapping[str, Mapping[str, Any]]) -> list[str]:
        dead_key = stream_key(self.registry.get(dead_letter_stream(stream)).name)
        moved = []
        for event_id, record in records.items():
            if self._dead_letter_script(
                keys=[stream_key(stream), dead_key], args=[group, event_id, encode_payload(record)]
            ):
                moved.append(event_id)
        return moved

    @_unavailable
    def delete_group(self, stream: str, group: str) -> bool:
        try:
            return bool(self.client.xgroup_destroy(stream_key(stream), group))
        except ResponseError:  # the stream was never written to: no group either
            return False

    @_unavailable
    def pending(self, stream: str, group: str, *, limit: int = 100) -> list[PendingEvent]:
        try:
            rows = self.client.xpending_range(stream_key(stream), group, min="-", max="+", count=limit)
        except ResponseError as exc:
            raise GroupNotFound(stream, group) from exc
        return [
            PendingEvent(
                row["message_id"], row["consumer"], row["time_since_delivered"], row["times_delivered"]
            )
            for row in rows
        ]

    @_unavailable
    def claim_stale(
        self,
        stream: str,
        group: str,
        consumer: str,
        *,
        min_idle_ms: int,
        limit: int = 100,
        max_deliveries: int | None = None,
    ) -> ClaimResult:
        key = stream_key(stream)
        dead: list[str] = []
        if max_deliveries is not None:
            dead_definition = self.registry.get(dead_letter_stream(stream))
            try:
                stale = self.client.xpending_range(
                    key, group, min="-", max="+", count=limit, idle=min_idle_ms + 1
                )
            except ResponseError as exc:
                raise GroupNotFound(stream, group) from exc
            for row in stale:
                if row["times_delivered"] < max_deliveries:
                    continue
                entries = self.client.xrange(key, row["message_id"], row["message_id"])
                if not entries:  # trimmed: XAUTOCLAIM below reports it as deleted
                    continue
                record = dead_letter_record(
                    stream,
                    group,
                    row["message_id"],
                    row["consumer"],
                    row["times_delivered"],
                    decode_payload(entries[0][1]["payload"]),
                )
                moved = self._dead_letter_script(
                    keys=[key, stream_key(dead_definition.name)],
                    args=[group, row["message_id"], encode_payload(record)],
                )
                if moved:
                    dead.append(row["message_id"])
        try:
            _, entries, deleted = self.client.xautoclaim(
                key, group, consumer, min_idle_ms, "0-0", count=limit
            )
        except ResponseError as exc:
            raise GroupNotFound(stream, group) from exc
        events = [_entry_event(stream, entry) for entry in entries if entry[1] is not None]
        return ClaimResult(events, dead, list(deleted))

    # -- operations ------------------------------------------------------------------------------

    @_unavailable
    def stats(self, stream: str) -> StreamStats:
        self.registry.get(stream)
        key = stream_key(stream)
        try:
            info = self.client.xinfo_stream(key)
        except ResponseError:  # never published to
            return StreamStats(stream, 0, 0, None, None, str(ZERO_ID), [], 0)
        groups = [
            GroupStats(group["name"], group["pending"], group["last-delivered-id"], group.get("lag"))
            for group in sorted(self.client.xinfo_groups(key), key=lambda group: group["name"])
        ]
        first, last = info.get("first-entry"), info.get("last-entry")
        trimmed = self.client.get(trimmed_marker(stream)) or str(ZERO_ID)
        return StreamStats(
            stream=stream,
            length=info["length"],
            events_added=info["entries-added"],
            first_id=first[0] if first else None,
            last_id=last[0] if last else None,
            max_deleted_id=str(max(EventId.parse(info["max-deleted-entry-id"]), EventId.parse(trimmed))),
            groups=groups,
            dead_lettered=self.client.xlen(stream_key(dead_letter_stream(stream))),
            **dict(zip(("rate_1m", "rate_5m"), publish_rates(stream, self.client.mget), strict=True)),
        )

    @_unavailable
    def trim(self, stream: str) -> int:
        definition = self.registry.get(stream)
        if not (definition.max_count or definition.max_age_s):
            return 0
        return self._trim_script(
            keys=[stream_key(stream), trimmed_marker(stream)], args=retention_args(definition, 0)
        )
