"""The REST target: published rows pushed to an HTTP API (reverse sync, `target: {kind: rest}`).

An API is not a transaction, so the target keeps a **ledger** of what it sent: a Parquet file under
`$JUNCTION_HOME/rest/<pipeline>.sent.parquet` with one row per row the API accepted (the merge keys,
or the load id and digest for append, with the row's digest, the status and when). It is the
target's "file": staged rows are staged beside it as for a file target, the incremental state rides
in its metadata, and each publish replaces it in one atomic rename.

A publish reads the staged rows, picks what to send (merge: rows whose key is new or whose content
changed since it was last accepted; append: every row not already accepted for this load, so a
re-run publish step does not send a row twice) and sends them, one request per row or `batch_size`
rows, with the REST source's retry habits (`sources.rest.send`: backoff, `Retry-After`). An answer
that is not 2xx after the retries refuses the request's rows: they are quarantined with the status
and the body, next to the pipeline's other quarantine. Delivery is at least once - a process killed
mid-publish has its accepted rows sent again by the next publish - which is what `idempotency_key`
(sent as `Idempotency-Key`) is for.

More refused rows than `max_failed_rows` fail the publish after the ledger has recorded the accepted
ones and without moving the incremental cursor: a retry of the step sends only what is still
missing, and the next run reads the same window again.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from assets.etl.deletes import DeletePlan
from assets.etl.loads import LOAD_ID_COLUMN, FileTarget, PublishOutcome, quarantine_table
from assets.etl.quarantine import Quarantine
from assets.etl.sources.auth import open_auth
from assets.etl.sources.base import clip_record
from assets.etl.sources.rest import RateLimit, RetriesExhausted, mask, send
from assets.etl.spec import FileTargetSpec, RestTargetSpec
from assets.etl.state import CursorState
from orchestration.errors import ConfigurationError, JunctionError
from orchestration.kernel.times import duration_seconds

__all__ = ["PUBLISH_STEP", "RestTarget"]

PUBLISH_STEP = "publish"
DIGEST_COLUMN = "_junction_digest"
STATUS_COLUMN = "_junction_status"
SENT_AT_COLUMN = "_junction_sent_at"


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON values (times as ISO 8601 UTC, decimals as text): what templates and bodies see."""
    return orjson.loads(orjson.dumps(row, default=str, option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z))


def _digest(row: dict[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


class RestTarget(FileTarget):
    """Pushes published rows to an API; its file is the ledger of what the API accepted."""

    def __init__(self, spec: RestTargetSpec, base_dir: Path, run_id: str | None, pipeline: str):
        ledger = FileTargetSpec(kind="file", path=f"rest/{pipeline}.sent.parquet", format="parquet")
        super().__init__(ledger, base_dir, run_id)
        self.rest = spec
        self.description = f"{spec.method} {spec.url}"

    def current_schema(self) -> pa.Schema | None:
        return None  # an API holds no schema of ours to drift against

    def publish(
        self,
        mode: str,
        keys: list[str],
        state: CursorState | None = None,
        deletes: DeletePlan | None = None,
    ) -> PublishOutcome:
        if deletes is not None:
            raise ConfigurationError("load.deletes: applies to SQL and file targets, not REST targets")
        if mode not in ("append", "merge"):
            raise ConfigurationError(f"a REST target is loaded by append or merge, not {mode}")
        if not self.staged_path.exists():
            raise JunctionError(
                f"nothing is staged for {self.description}: materialize the staged asset first"
            )
        staged = pq.read_table(self.staged_path)
        load_id = staged.column(LOAD_ID_COLUMN)[0].as_py() if staged.num_rows else None
        rows = [_plain(row) for row in staged.drop_columns([LOAD_ID_COLUMN]).to_pylist()]
        identity = keys if mode == "merge" else [LOAD_ID_COLUMN, DIGEST_COLUMN]
        ledger = pq.read_table(self.path) if self.path.exists() else None
        sent = self._sent(ledger, identity)

        def ident(row: dict[str, Any], digest: str) -> tuple:
            if mode == "merge":
                return tuple(row.get(key) for key in keys)
            return (load_id, digest)

        digests = [_digest(row) for row in rows]
        pending, new, updated, unchanged = [], 0, 0, 0
        for row, digest in zip(rows, digests, strict=True):
            previous = sent.get(ident(row, digest))
            if previous == digest:
                unchanged += 1
                continue
            if previous is None:
                new += 1
            else:
                updated += 1
            pending.append((row, digest))

        quarantine = Quarantine()
        accepted = self._send(pending, quarantine)
        refused = len(pending) - len(accepted)
        if len(quarantine):
            self._append_quarantine(quarantine, load_id or "", self.run_id or "")
        over = refused > self.rest.max_failed_rows
        ledger = self._ledger_with(ledger, accepted, identity, ident, load_id)
        states = self._states()
        if state is not None and not over:
            states[state.pipeline] = state.as_json()
        self._replace_file(self.path, self._with_states(ledger, states), "parquet")
        if over:
            first = quarantine.to_table().slice(0, 1).to_pylist()[0]
            raise JunctionError(
                f"{self.description}: the API refused {refused:,} of {len(pending):,} rows sent "
                f"(max_failed_rows {self.rest.max_failed_rows}); they are quarantined in "
                f"{self.quarantine_path}; first: {first['reason']}. The accepted ones are recorded and "
                "will not be sent again; the cursor stays where it was"
            )
        self.staged_path.unlink()
        merge_counts: dict[str, int] = {}
        if mode == "merge":
            merge_counts = {"rows_new": new, "rows_updated": updated, "rows_unchanged": unchanged}
        return PublishOutcome(
            len(accepted),
            ledger.num_rows,
            rows_failed=refused,
            state=state if not over else None,
            **merge_counts,
        )

    # --- what was sent -----------------------------------------------------------------------------

    def _sent(self, ledger: pa.Table | None, identity: list[str]) -> dict[tuple, str]:
        if ledger is None or ledger.num_rows == 0:
            return {}
        if any(name not in ledger.column_names for name in identity):
            return {}  # a ledger of another load mode: everything counts as new
        columns = [ledger.column(name).to_pylist() for name in identity]
        digests = ledger.column(DIGEST_COLUMN).to_pylist()
        return {tuple(values): digest for *values, digest in zip(*columns, digests, strict=True)}

    def _ledger_with(
        self,
        ledger: pa.Table | None,
        accepted: list[tuple[dict[str, Any], str, int]],
        identity: list[str],
        ident: Any,
        load_id: str | None,
    ) -> pa.Table:
        now = datetime.now(UTC)
        fresh = pa.Table.from_pylist(
            [
                {
                    **{key: row.get(key) for key in identity if key not in (LOAD_ID_COLUMN, DIGEST_COLUMN)},
                    **({LOAD_ID_COLUMN: load_id} if LOAD_ID_COLUMN in identity else {}),
                    DIGEST_COLUMN: digest,
                    STATUS_COLUMN: status,
                    SENT_AT_COLUMN: now,
                }
                for row, digest, status in accepted
            ]
        )
        if ledger is None or ledger.num_rows == 0 or any(n not in ledger.column_names for n in identity):
            return fresh if fresh.num_rows else (ledger if ledger is not None else pa.table({}))
        if not fresh.num_rows:
            return ledger
        kept = ledger.join(fresh.select(identity), keys=identity, join_type="left anti")
        return pa.concat_tables([kept, fresh], promote_options="permissive")

    def _append_quarantine(self, quarantine: Quarantine, load_id: str, run_id: str) -> None:
        """Refused rows join the staging's quarantine of the same load (never replace it)."""
        rows = quarantine_table(quarantine, load_id, run_id)
        if self.quarantine_path.exists():
            rows = pa.concat_tables([pq.read_table(self.quarantine_path), rows], promote_options="permissive")
        self._replace_file(self.quarantine_path, rows, "parquet")

    # --- sending -----------------------------------------------------------------------------------

    def _send(
        self, pending: list[tuple[dict[str, Any], str]], quarantine: Quarantine
    ) -> list[tuple[dict[str, Any], str, int]]:
        """Send the pending rows; (row, digest, status) of the accepted ones, the others quarantined."""
        import httpx

        from orchestration.kernel.templates import TemplateRenderError, render, render_data
        from orchestration.settings import get_settings

        spec = self.rest
        auth = open_auth(spec.auth)
        secrets = auth.secrets if auth is not None else ()
        limit = RateLimit(spec.rate_limit)
        timeout = duration_seconds(spec.timeout)
        platform = {"url": get_settings().public_url.rstrip("/")}
        accepted: list[tuple[dict[str, Any], str, int]] = []

        def refuse(chunk: list[tuple[dict[str, Any], str]], reason: str) -> None:
            for row, _ in chunk:
                quarantine.add(
                    self.description,
                    PUBLISH_STEP,
                    mask(reason, secrets),
                    record=clip_record(orjson.dumps(row).decode()),
                )

        with httpx.Client(auth=auth, timeout=timeout, follow_redirects=True) as client:
            for start in range(0, len(pending), spec.batch_size):
                chunk = pending[start : start + spec.batch_size]
                rows = [row for row, _ in chunk]
                context = {"row": rows[0], "rows": rows, "platform": platform}
                try:
                    url = render(spec.url, context)
                    headers = render_data(spec.headers, context)
                    if spec.idempotency_key:
                        headers["Idempotency-Key"] = render(spec.idempotency_key, context)
                    body = self._body(rows, context, render, render_data)
                except (TemplateRenderError, ValueError) as exc:
                    refuse(chunk, f"target: {exc}")
                    continue
                limit.wait()
                try:
                    response = send(client, spec.method, url, spec.retry, json=body, headers=headers)
                except RetriesExhausted as exc:
                    refuse(chunk, f"{spec.method} {url} {exc.detail} after {exc.attempts} attempts")
                    continue
                if response.is_success:
                    accepted.extend((row, digest, response.status_code) for row, digest in chunk)
                else:
                    refuse(
                        chunk,
                        f"{spec.method} {url} answered {response.status_code}: {response.text[:300]}",
                    )
        return accepted

    def _body(
        self, rows: list[dict[str, Any]], context: dict[str, Any], render: Any, render_data: Any
    ) -> Any:
        body = self.rest.body
        if isinstance(body, str):
            text = render(body, context)
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"body did not render to JSON ({exc}): {text[:200]}") from None
        if body is None:
            bodies = rows
        else:
            bodies = [render_data(body, {**context, "row": row}) for row in rows]
        return bodies[0] if self.rest.batch_size == 1 else bodies


def open_rest_target(
    spec: RestTargetSpec, base_dir: Path, run_id: str | None, pipeline: str | None
) -> RestTarget:
    if pipeline is None:
        raise ConfigurationError("a REST target is opened for a pipeline (its ledger is named after it)")
    return RestTarget(spec, base_dir, run_id, pipeline)
