"""`junction events`: declared streams; publish, tail, replay and the statistics of events.

Every command first brings the platform store to the code's revision and syncs the stream
declarations of JUNCTION_STREAMS_DIR into the registry, so a stream declared in YAML is usable at
once (a broken declaration, or one of a stream the API owns, fails the command with
`file: field: reason`); `transfer` hands a stream over between the API and its file instead. The backend is Redis when
JUNCTION_REDIS_URL is set, else the platform store.

Positions (`--from`, `--to`): an event id (`1700000000000-0`, inclusive), an ISO date-time (naive is
UTC), or a duration ago (`15m`, `12h`, `7d`).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

from orchestration.cli.common import render_table
from orchestration.errors import JunctionError
from orchestration.kernel.times import parse_duration, parse_instant

if TYPE_CHECKING:
    from orchestration.kernel.conditions import Condition
    from resources.event_stream import EventStream

PUBLISH_BATCH = 500


class EventInputError(JunctionError):
    """Events given on the command line or in a file are not JSON."""


class EventsRejected(JunctionError):
    """Some published events were rejected (each is listed above the error)."""


def open_stream() -> EventStream:
    from orchestration.store.bootstrap import migrate_store
    from resources.event_stream import open_event_stream

    migrate_store()
    stream = open_event_stream()
    stream.registry.sync_declared()
    return stream


def parse_moment(text: str, option: str) -> datetime:
    duration = parse_duration(text)
    if duration is not None:
        return datetime.now(UTC) - duration
    moment = parse_instant(text)
    if moment is None:
        raise click.BadParameter(
            f"{text!r} is neither an event id (1700000000000-0), an ISO date-time nor a duration ago (15m, 12h)",
            param_hint=option,
        )
    return moment


def start_cursor(text: str) -> str:
    """`--from` as a read cursor: the position just before the first event wanted."""
    from resources.event_stream import EventId

    if EventId.looks_like(text):
        return str(EventId.parse(text).previous())
    return str(EventId.just_before(parse_moment(text, "--from")))


def end_id(text: str) -> str:
    """`--to` as the last id wanted (inclusive)."""
    from resources.event_stream import EventId

    if EventId.looks_like(text):
        return str(EventId.parse(text))
    return str(EventId.last_at(parse_moment(text, "--to")))


def parse_filter(text: str | None) -> Condition | None:
    from orchestration.kernel.conditions import parse_condition
    from orchestration.kernel.spec_errors import SpecError

    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--filter") from None
    try:
        return parse_condition(data)
    except SpecError as exc:
        raise click.BadParameter(str(exc).replace("\n", "; "), param_hint="--filter") from None


def matches(condition: Condition | None, payload: Any) -> bool:
    from orchestration.kernel.conditions import evaluate

    return condition is None or (isinstance(payload, dict) and evaluate(condition, payload))


def event_line(event) -> str:
    return json.dumps({"id": event.id, "time": event.time.isoformat(), "payload": event.payload})


@click.group()
def events() -> None:
    """Event streams: declared in JUNCTION_STREAMS_DIR; Redis Streams or the platform store."""


@events.command()
@click.option("--json", "as_json", is_flag=True, help="Print the declarations as JSON.")
def streams(as_json: bool) -> None:
    """List the declared streams (after syncing the YAML declarations)."""
    declared = open_stream().registry.list()
    if as_json:
        click.echo(json.dumps([definition.to_json() for definition in declared], indent=2))
        return
    rows = [
        (
            d.name,
            d.origin,
            str(d.max_count or "-"),
            f"{d.max_age_s}s" if d.max_age_s else "-",
            "yes" if d.payload_schema else "no",
            d.description,
        )
        for d in declared
    ]
    click.echo(render_table(("STREAM", "ORIGIN", "MAX COUNT", "MAX AGE", "SCHEMA", "DESCRIPTION"), rows))


@events.command()
@click.argument("stream")
@click.option(
    "--to",
    "owner",
    type=click.Choice(["yaml", "api"]),
    required=True,
    help="yaml: the file of the streams folder declaring STREAM; api: PUT /gateway/v1/streams/STREAM.",
)
def transfer(stream: str, owner: str) -> None:
    """Hand STREAM over to another owner (its origin); only the owner changes a stream.

    \b
    --to yaml: a file of JUNCTION_STREAMS_DIR declares STREAM (a stream the API declared first);
               its declaration applies now, and the YAML sync keeps it from then on.
    --to api:  no file declares STREAM any more (remove it from its file first); its declaration is
               kept, and PUT /gateway/v1/streams/STREAM changes it from then on.
    Its events stay. Audited as stream.transfer.
    """
    from orchestration.cli.keys import cli_actor
    from orchestration.kernel import audit
    from orchestration.store.bootstrap import migrate_store
    from resources.event_stream import StreamRegistry

    migrate_store()
    before, definition = StreamRegistry.for_url().transfer(stream, owner)
    audit.append(
        "stream.transfer",
        actor=cli_actor(),
        target=f"stream:{stream}",
        origin="cli",
        details={"from": before, "to": definition.origin},
    )
    click.echo(f"stream {stream}: owner {before} -> {definition.origin}")


def read_payloads(data: str) -> list[Any]:
    """DATA: a JSON value (an array is several events), or @file.jsonl / @- (one event per line)."""
    if not data.startswith("@"):
        try:
            value = json.loads(data)
        except json.JSONDecodeError as exc:
            raise EventInputError(f"the event is not JSON: {exc}") from None
        return value if isinstance(value, list) else [value]
    name = data[1:]
    try:
        lines = (
            sys.stdin.read().splitlines() if name == "-" else open(name, encoding="utf-8").read().splitlines()
        )  # noqa: SIM115
    except OSError as exc:
        raise EventInputError(f"cannot read {name}: {exc.strerror or exc}") from None
    payloads = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            payloads.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EventInputError(f"{name}: line {number}: not JSON: {exc}") from None
    return payloads


@events.command()
@click.argument("stream")
@click.argument("data")
@click.option("--key", "idempotency_key", help="Idempotency key of a single event.")
@click.option(
    "--key-field", help="Take each event's idempotency key from this payload field (files, arrays)."
)
def publish(stream: str, data: str, idempotency_key: str | None, key_field: str | None) -> None:
    """Publish DATA to STREAM: a JSON event, a JSON array of events, or @file.jsonl (@- for stdin).

    Prints one line per event: its index, accepted / duplicate / rejected, and the id or the reason.
    Exits non-zero if any event was rejected.
    """
    from resources.event_stream import EventToPublish

    payloads = read_payloads(data)
    if idempotency_key and len(payloads) != 1:
        raise click.UsageError("--key applies to a single event; use --key-field for several")
    items = []
    for payload in payloads:
        key = idempotency_key
        if key_field and isinstance(payload, dict) and payload.get(key_field) is not None:
            key = str(payload[key_field])
        items.append(EventToPublish(payload, key))
    with open_stream() as event_stream:
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        for start in range(0, len(items), PUBLISH_BATCH):
            for result in event_stream.publish_batch(stream, items[start : start + PUBLISH_BATCH]).results:
                counts[result.status] += 1
                detail = result.id if result.status != "rejected" else result.reason
                click.echo(f"{start + result.index}\t{result.status}\t{detail}")
    click.echo(", ".join(f"{count} {status}" for status, count in counts.items()), err=True)
    if counts["rejected"]:
        raise EventsRejected(f"{counts['rejected']} of {len(items)} events were rejected")


@events.command()
@click.argument("stream")
@click.option("--from", "start", help="First event: id, ISO date-time or duration ago. Default: the oldest.")
@click.option(
    "--filter",
    "filter_json",
    help='Only events matching a condition: {"field": "amount", "op": "gt", "value": 100}.',
)
@click.option(
    "--follow", "-f", is_flag=True, help="Keep waiting for new events (without --from: new ones only)."
)
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many (matching) events.")
def tail(stream: str, start: str | None, filter_json: str | None, follow: bool, limit: int | None) -> None:
    """Print the events of STREAM as JSON lines (id, time, payload)."""
    condition = parse_filter(filter_json)
    after = start_cursor(start) if start else ("$" if follow else None)
    shown = 0
    with open_stream() as event_stream:
        for event in event_stream.iter_events(stream, after_id=after, follow=follow, block_ms=1000):
            if not matches(condition, event.payload):
                continue
            click.echo(event_line(event))
            shown += 1
            if limit is not None and shown >= limit:
                return


def first_id(text: str) -> str:
    """`--from` as the first id wanted (inclusive)."""
    from resources.event_stream import EventId

    if EventId.looks_like(text):
        return str(EventId.parse(text))
    return str(EventId.just_before(parse_moment(text, "--from")).next())


@events.command()
@click.argument("stream")
@click.option("--from", "start", required=True, help="First event: id, ISO date-time or duration ago.")
@click.option("--to", "end", help="Last event (inclusive): id, ISO date-time or duration ago. Default: now.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    show_default=True,
    help="JSON Lines file to write.",
)
@click.option("--filter", "filter_json", help="Only events matching a condition (JSON).")
@click.option(
    "--as-runs",
    is_flag=True,
    help="Launch the stream trigger's batches of the range again as new runs (through the running "
    "platform at JUNCTION_DAGSTER_URL, as POST /gateway/v1/streams/STREAM/replays does).",
)
@click.option(
    "--trigger",
    help="With --as-runs: the trigger (its sensor's name). Default: the stream's only trigger.",
)
@click.option(
    "--replay-id",
    help="With --as-runs: names the replay in its run keys (replay:ID:...); the same id again launches "
    "nothing new. Default: a fresh id, so every call re-runs.",
)
@click.pass_context
def replay(
    ctx: click.Context,
    stream: str,
    start: str,
    end: str | None,
    output: str,
    filter_json: str | None,
    as_runs: bool,
    trigger: str | None,
    replay_id: str | None,
) -> None:
    """Write the events of STREAM from --from to --to as JSON Lines (id, time, payload), or with
    --as-runs launch a stream trigger's batches of those events again as new Dagster runs.

    Fails, naming the range, if retention already removed events of the requested range.

    \b
    --as-runs: the batches the trigger would make from --from (a trailing partial batch is not
    replayed), at most 100 runs per call, each with run key replay:REPLAY_ID:<original key> and
    tagged junction/via=cli and junction/actor=<OS user>; a run already holding its key is skipped.
    Prints each run as it is launched or skipped, then a summary. Audited as events.replay.
    """
    if as_runs:
        given = [
            option
            for option, name in (("--output", "output"), ("--filter", "filter_json"))
            if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
        ]
        if given:
            raise click.UsageError(f"{' and '.join(given)} write events to a file; --as-runs launches runs")
        replay_runs(stream, start, end, trigger, replay_id)
        return
    for option, value in (("--trigger", trigger), ("--replay-id", replay_id)):
        if value is not None:
            raise click.UsageError(f"{option} applies to --as-runs only")
    condition = parse_filter(filter_json)
    after = start_cursor(start)
    until = end_id(end) if end else end_id(datetime.now(UTC).isoformat())
    written, first, last = 0, None, None
    with open_stream() as event_stream, click.open_file(output, "w", encoding="utf-8") as out:
        for event in event_stream.iter_events(stream, after_id=after, until_id=until):
            if not matches(condition, event.payload):
                continue
            out.write(event_line(event) + "\n")
            written += 1
            first = first or event.id
            last = event.id
    span = f" ({first} .. {last})" if written else ""
    click.echo(f"replayed {written} events of {stream}{span} to {output}", err=True)


class ReplayFailed(JunctionError):
    """Dagster could not be reached or refused a replayed run."""


def replay_runs(stream: str, start: str, end: str | None, trigger: str | None, replay_id: str | None) -> None:
    """`replay --as-runs`: the gateway's replay (`sensors.replays.replay_as_runs`), from the command line."""
    import re

    import anyio

    from orchestration.cli.keys import cli_actor
    from orchestration.gateway.dagster_client import DagsterClient, DagsterRequestError, DagsterUnavailable
    from orchestration.settings import get_settings
    from sensors import replays

    if replay_id is not None and not re.match(replays.REPLAY_ID_PATTERN, replay_id):
        raise click.BadParameter("1-64 letters, digits, '.', '_' or '-'", param_hint="--replay-id")
    first = first_id(start)
    last = end_id(end) if end else end_id(datetime.now(UTC).isoformat())
    dagster_url = get_settings().dagster_url

    def show(run: replays.ReplayedRun) -> None:
        what = "launched" if run.launched else "skipped (already launched)"
        click.echo(
            f"{what}\t{run.run_key}\trun {run.run_id}\t{run.first_id} .. {run.last_id} ({run.count} events)"
        )

    async def call(event_stream) -> replays.ReplayOutcome:
        client = DagsterClient(dagster_url, timeout_s=60)
        try:
            return await replays.replay_as_runs(
                client,
                event_stream,
                stream=stream,
                trigger=trigger,
                first_id=first,
                last_id=last,
                replay_id=replay_id or replays.new_replay_id(),
                actor=cli_actor(),
                via="cli",
                progress=show,
            )
        finally:
            await client.aclose()

    with open_stream() as event_stream:
        try:
            outcome = anyio.run(call, event_stream)
        except DagsterUnavailable as exc:
            raise ReplayFailed(
                f"{exc} (replaying as runs needs the running platform: start `junction dev`, or point "
                "JUNCTION_DAGSTER_URL at its Dagster webserver)"
            ) from None
        except DagsterRequestError as exc:
            raise ReplayFailed(f"Dagster refused a replayed run: {exc}") from None
    click.echo(
        f"replay {outcome.replay_id} of {stream} through {outcome.trigger} ({first} .. {last}): "
        f"{outcome.launched} run(s) requested, {outcome.skipped} skipped as already launched",
        err=True,
    )


@events.command()
@click.argument("stream", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
def stats(stream: str | None, as_json: bool) -> None:
    """Per stream: events retained and ever added, first/last ids, groups (pending, lag), dead letters,
    and the publish rate over the last minute and five minutes."""
    with open_stream() as event_stream:
        names = [stream] if stream else [d.name for d in event_stream.registry.list()]
        figures = [event_stream.stats(name) for name in names]
    if as_json:
        click.echo(json.dumps([figure.to_json() for figure in figures], indent=2))
        return
    rows = [
        (
            f.stream,
            str(f.length),
            str(f.events_added),
            f.first_id or "-",
            f.last_id or "-",
            f.max_deleted_id,
            ", ".join(
                f"{g.name} (pending {g.pending}, lag {'?' if g.lag is None else g.lag})" for g in f.groups
            )
            or "-",
            str(f.dead_lettered),
            f"{f.rate_1m:g}/s",
            f"{f.rate_5m:g}/s",
        )
        for f in figures
    ]
    headers = (
        "STREAM",
        "LENGTH",
        "ADDED",
        "FIRST",
        "LAST",
        "MAX DELETED",
        "GROUPS",
        "DEAD-LETTERED",
        "RATE 1M",
        "RATE 5M",
    )
    click.echo(render_table(headers, rows))


CLOSES_WITHOUT_RETRY = {4001: "the gateway refused the key", 4009: "too many connections for this key"}


@events.command()
@click.argument("stream")
@click.option(
    "--from",
    "start",
    default="latest",
    show_default=True,
    help="latest, earliest, an event id (the events after it) or an ISO date-time.",
)
@click.option(
    "--filter", "filter_json", help="Only events matching a condition (JSON), evaluated by the gateway."
)
@click.option("--limit", type=click.IntRange(min=1), help="Stop after this many events.")
@click.option(
    "--url", help="The gateway's WebSocket URL. Default: JUNCTION_PUBLIC_URL + /gateway/v1/streams/ws."
)
@click.option(
    "--key",
    "api_key",
    envvar="JUNCTION_API_KEY",
    help="API key [env JUNCTION_API_KEY; default: the local admin key of `junction dev`].",
)
def subscribe(
    stream: str, start: str, filter_json: str | None, limit: int | None, url: str | None, api_key: str | None
) -> None:
    """Print the events of STREAM live, as JSON lines, through the gateway's WebSocket.

    After a network drop it reconnects (backing off up to 10 s) and resumes after the last event
    printed: nothing is missed or printed twice. Events that retention removed meanwhile are named
    on stderr (events_lost), never skipped silently.
    """
    import time

    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
    from websockets.sync.client import connect

    from orchestration.settings import get_settings

    settings = get_settings()
    parse_filter(filter_json)  # malformed JSON or a bad condition fails here, naming --filter
    condition = json.loads(filter_json) if filter_json else None  # sent as given: the gateway parses it
    url = url or (
        settings.public_url.rstrip("/").replace("http", "ws", 1) + settings.gateway_prefix + "/v1/streams/ws"
    )
    if not api_key:
        if not settings.admin_key_file.exists():
            raise click.UsageError("pass --key (or set JUNCTION_API_KEY): no local admin key was found")
        api_key = settings.admin_key_file.read_text().strip()
    position, shown, backoff_s = start, 0, 0.25
    while True:
        try:
            with connect(
                url, additional_headers={"Authorization": f"Bearer {api_key}"}, open_timeout=10
            ) as socket:
                message = {"type": "subscribe", "id": "cli", "stream": stream, "from": position}
                if condition is not None:
                    message["filter"] = condition
                socket.send(json.dumps(message))
                for frame in socket:
                    data = json.loads(frame)
                    kind = data["type"]
                    if kind == "subscribed":
                        # `latest` or a time resolved to an id: a reconnect resumes from there.
                        position = data["position"] or position
                        backoff_s = 0.25
                    elif kind == "events":
                        for event in data["events"]:
                            click.echo(json.dumps({k: event[k] for k in ("id", "time", "payload")}))
                            position = event["id"]
                            shown += 1
                            if limit is not None and shown >= limit:
                                return
                    elif kind == "events_lost":
                        click.echo(
                            f"events {data['from']} .. {data['to']} were removed by retention", err=True
                        )
                        position = data["to"]
                    elif kind == "ping":
                        socket.send('{"type":"pong"}')
                    elif kind == "error":
                        raise click.ClickException(f"{data.get('field') or stream}: {data['message']}")
        except ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            if code in CLOSES_WITHOUT_RETRY:
                raise click.ClickException(f"{CLOSES_WITHOUT_RETRY[code]}: {closed.rcvd.reason}") from None
            reason = f"closed ({code})" if code else "dropped"
        except InvalidStatus as exc:
            raise click.ClickException(f"{url}: {exc}") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            reason = f"unreachable ({exc.__class__.__name__})"
        click.echo(f"connection {reason}; resuming after {position} in {backoff_s:g} s", err=True)
        time.sleep(backoff_s)
        backoff_s = min(backoff_s * 2, 10)


def _add_subscriptions() -> None:
    from orchestration.cli.subscriptions import subscriptions

    events.add_command(subscriptions)


_add_subscriptions()
