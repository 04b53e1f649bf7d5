"""One evaluation of the alert rules: signals → alert state → groups → notifications.

Alertmanager's semantics, on the platform store so they hold across daemon restarts:

- **Alerts**: each sample whose condition holds is an alert, identified by its labels (a fingerprint).
  It is `pending` until the condition has held for the rule's `for`, then `firing`; when the
  condition stops holding it is `resolved` (a pending one is simply dropped).
- **Muting**: a firing alert matching an active silence, or inhibited (an inhibit rule's source alert
  fires with the same `equal` labels), is not notified; it stays listed with `muted_by`.
- **Groups**: a rule's alerts sharing the `group_by` labels. A new group is notified `group_wait`
  after its first alert fires; a group whose firing set changed, at most every `group_interval`; an
  unchanged firing group, every `repeat_interval`; a group whose alerts all resolved gets one
  resolve notification (`send_resolved`) and closes.
- **Exactly once**: notification number N of a group goes to each channel under the dedupe key
  `alert:<group_key>:<N>:<channel>` (the notification layer's claim), and the group's state moves on
  only after the sends. An evaluation a crash interrupted sends the same N again: channels that got
  it answer "already sent", the others get it now.

A signal that fails (a stream backend down) is reported in the evaluation's errors and leaves that
rule's alerts as they were: a fault never resolves an alert silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from orchestration.kernel.conditions import evaluate
from sensors.alerts.rules import AlertRule, AlertRules
from sensors.alerts.signals import Sample, SignalContext
from sensors.alerts.silences import list_silences

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from resources.notifications import DeliveryRecord, Message

logger = logging.getLogger(__name__)

PENDING, FIRING, RESOLVED = "pending", "firing", "resolved"
# Resolved alerts stay listed this long.
RESOLVED_RETENTION = timedelta(hours=24)
SUMMARY_LIMIT = 20  # alerts named in one notification; the rest are counted


def fingerprint(labels: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:32]


def group_key(rule: AlertRule, labels: dict[str, str]) -> str:
    grouped = {name: labels.get(name, "") for name in rule.timing.group_by}
    return hashlib.sha256(json.dumps([rule.name, grouped], sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class Evaluation:
    """What one evaluation did: counts for the sensor's tick, errors, the notifications it sent."""

    samples: int = 0
    firing: int = 0
    pending: int = 0
    muted: int = 0
    resolved: int = 0
    errors: dict[str, str] = field(default_factory=dict)
    sent: list[DeliveryRecord] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = (
            f"{self.firing} firing ({self.muted} muted), {self.pending} pending, {self.resolved} resolved now; "
            f"{len(self.sent)} notification(s) sent"
        )
        if self.failed:
            text += f", {len(self.failed)} failed"
        if self.errors:
            text += "; signal errors: " + "; ".join(f"{rule}: {error}" for rule, error in self.errors.items())
        return text


def render_summary(rule: AlertRule, labels: dict[str, str], sample: Sample) -> str:
    from orchestration.kernel.templates import render

    template = rule.spec.summary
    if template is None:
        detail = f" ({sample.detail})" if sample.detail else ""
        return f"{rule.name}: value {sample.value:g}{detail}"
    context = {"rule": rule.name, "labels": labels, "value": sample.value, "detail": sample.detail}
    return render(template, context)


def inhibited(labels: dict[str, str], firing: Iterable[dict[str, str]], rules: AlertRules) -> bool:
    for inhibit in rules.inhibit:
        if not all(labels.get(k) == v for k, v in inhibit.target.items()):
            continue
        for source in firing:
            if source is labels:
                continue
            if all(source.get(k) == v for k, v in inhibit.source.items()) and all(
                source.get(name) == labels.get(name) for name in inhibit.equal
            ):
                return True
    return False


def evaluate_rules(
    rules: AlertRules,
    context: SignalContext,
    *,
    engine: Engine | None = None,
    send: Callable[..., DeliveryRecord] | None = None,
) -> Evaluation:
    """Evaluate every rule at `context.now`, update the alert state and send what is due."""
    from sqlalchemy import delete, select

    from orchestration.store import session_scope
    from orchestration.store.models import AlertGroup, SystemAlert

    now = context.now
    result = Evaluation()
    measured: dict[str, list[tuple[dict[str, str], Sample]]] = {}
    for rule in rules.rules.values():
        try:
            samples = rule.signal.measure(context, rule.params)
        except Exception as exc:  # noqa: BLE001 - one rule's fault must not stop the others
            logger.exception("alert rule %r: its signal %r failed", rule.name, rule.signal.kind)
            result.errors[rule.name] = f"{type(exc).__name__}: {exc}"
            continue
        result.samples += len(samples)
        holding = []
        for sample in samples:
            labels = {**rule.labels, **sample.labels}
            if evaluate(rule.condition, {**labels, "value": sample.value}):
                holding.append((labels, sample))
        measured[rule.name] = holding
    silences = [silence for silence in list_silences(engine) if silence.active(now)]

    with session_scope(engine) as session:
        alerts = {row.fingerprint: row for row in session.scalars(select(SystemAlert))}
        groups = {row.group_key: row for row in session.scalars(select(AlertGroup))}
        # Rules no longer declared: their alerts and groups go.
        for row in list(alerts.values()):
            if row.rule not in rules.rules:
                session.delete(alerts.pop(row.fingerprint))
        for row in list(groups.values()):
            if row.rule not in rules.rules:
                session.delete(groups.pop(row.group_key))
        of_rule: dict[str, list[Any]] = {}
        for row in alerts.values():
            of_rule.setdefault(row.rule, []).append(row)
        for name, holding in measured.items():
            rule = rules.rules[name]
            known = list(of_rule.get(name, []))
            seen = set()
            for labels, sample in holding:
                key = fingerprint(labels)
                seen.add(key)
                row = alerts.get(key)
                if row is None or row.status == RESOLVED:
                    if row is not None:
                        session.delete(row)
                        session.flush()
                    row = SystemAlert(
                        fingerprint=key,
                        rule=name,
                        labels=labels,
                        severity=rule.spec.severity,
                        status=PENDING,
                        active_since=now,
                        group_key=group_key(rule, labels),
                    )
                    session.add(row)
                    alerts[key] = row
                    known.append(row)
                summary = render_summary(rule, labels, sample)
                # Written only when it changed: an evaluation of steady alerts updates no row.
                if row.value != sample.value or row.summary != summary or row.updated_at is None:
                    row.value, row.summary, row.updated_at = sample.value, summary, now
                if row.status == PENDING and (now - row.active_since).total_seconds() >= rule.for_seconds:
                    row.status = FIRING
                    row.fired_at = now
            for row in known:
                if row.fingerprint in seen or row.status == RESOLVED or row not in session:
                    continue
                if row.status == PENDING:
                    session.delete(row)
                else:
                    row.status = RESOLVED
                    row.resolved_at = now
                    row.updated_at = now
                    result.resolved += 1
        session.flush()
        alerts = {key: row for key, row in alerts.items() if row in session}
        firing_labels = [row.labels for row in alerts.values() if row.status == FIRING]
        for row in alerts.values():
            if row.status != FIRING:
                row.muted_by = None
                continue
            silence = next((s for s in silences if s.mutes(row.labels)), None)
            row.muted_by = (
                silence.id
                if silence
                else "inhibited"
                if inhibited(row.labels, firing_labels, rules)
                else None
            )
        result.firing = sum(row.status == FIRING for row in alerts.values())
        result.pending = sum(row.status == PENDING for row in alerts.values())
        result.muted = sum(row.status == FIRING and row.muted_by is not None for row in alerts.values())
        due = _due_notifications(rules, alerts, groups, session, now)
        session.execute(
            delete(SystemAlert)
            .where(SystemAlert.status == RESOLVED)
            .where(SystemAlert.resolved_at < now - RESOLVED_RETENTION)
        )

    for notification in due:
        _notify(notification, result, engine, send)
        _advance(notification, engine, now)
    return result


@dataclass
class GroupNotification:
    rule: AlertRule
    group_key: str
    labels: dict[str, str]
    sequence: int
    firing: list[tuple[str, str]]  # (fingerprint, summary)
    resolved: list[str]  # summaries of alerts resolved since the last notification
    close: bool  # every alert resolved: the group closes after this notification


def _due_notifications(
    rules: AlertRules, alerts: dict, groups: dict, session: Any, now: datetime
) -> list[GroupNotification]:
    from orchestration.store.models import AlertGroup

    by_group: dict[str, list[Any]] = {}
    for row in alerts.values():
        by_group.setdefault(row.group_key, []).append(row)
    due: list[GroupNotification] = []
    for key in set(by_group) | set(groups):
        members = by_group.get(key, [])
        group = groups.get(key)
        rule_name = members[0].rule if members else group.rule
        rule = rules.rules[rule_name]
        firing = sorted(
            (row.fingerprint, row.summary) for row in members if row.status == FIRING and row.muted_by is None
        )
        if group is None:
            if not firing:
                continue  # only pending or muted alerts: nothing to tell yet
            labels = {name: members[0].labels.get(name, "") for name in rule.timing.group_by}
            group = AlertGroup(
                group_key=key, rule=rule_name, labels=labels, first_seen=now, notified=[], sequence=0
            )
            session.add(group)
            groups[key] = group
        notified = set(group.notified)
        current = {fp for fp, _ in firing}
        resolved = [row.summary for row in members if row.status == RESOLVED and row.fingerprint in notified]
        # Notified alerts that are now muted count as gone for this group's message, not resolved.
        if group.last_notified_at is None:
            is_due = bool(firing) and now >= group.first_seen + rule.interval("group_wait")
        elif not current:
            is_due = bool(notified) and now >= group.last_notified_at + rule.interval("group_interval")
        elif current != notified:
            is_due = now >= group.last_notified_at + rule.interval("group_interval")
        else:
            is_due = now >= group.last_notified_at + rule.interval("repeat_interval")
        if not current and not notified and not any(row.status == FIRING for row in members):
            session.delete(group)  # never notified and nothing fires any more
            continue
        if is_due:
            close = not current
            if close and not rule.spec.send_resolved:
                session.delete(group)
                continue
            due.append(
                GroupNotification(rule, key, dict(group.labels), group.sequence, firing, resolved, close)
            )
    return due


def group_message(due: GroupNotification) -> Message:
    from resources.notifications import Message

    rule = due.rule
    grouped = ", ".join(f"{name}={value}" for name, value in due.labels.items() if name != "rule")
    scope = f" ({grouped})" if grouped else ""
    if due.close:
        subject = f"[RESOLVED] {rule.name}{scope}"
    else:
        subject = f"[FIRING:{len(due.firing)}] {rule.name}{scope}"
    lines = [f"• {summary}" for _, summary in due.firing[:SUMMARY_LIMIT]]
    if len(due.firing) > SUMMARY_LIMIT:
        lines.append(f"… and {len(due.firing) - SUMMARY_LIMIT} more firing")
    if due.resolved:
        lines.append("Resolved:" if due.firing else "All resolved:")
        lines.extend(f"• {summary}" for summary in due.resolved[:SUMMARY_LIMIT])
        if len(due.resolved) > SUMMARY_LIMIT:
            lines.append(f"… and {len(due.resolved) - SUMMARY_LIMIT} more resolved")
    if rule.spec.description:
        lines.extend(["", rule.spec.description])
    return Message(
        subject=subject,
        body="\n".join(lines),
        severity=rule.spec.severity,
        facts={
            **{k: v for k, v in due.labels.items()},
            "firing": str(len(due.firing)),
            "resolved": str(len(due.resolved)),
        },
        group_key=due.group_key,
        resolved=due.close,
        metadata={"alert_rule": rule.name, "group_key": due.group_key, "notification": due.sequence},
    )


def _notify(
    due: GroupNotification,
    result: Evaluation,
    engine: Engine | None,
    send: Callable[..., DeliveryRecord] | None,
) -> None:
    from resources.notifications import NotificationError
    from resources.notifications import send as send_notification

    send = send or send_notification
    message = group_message(due)
    for channel in due.rule.spec.channels:
        key = f"alert:{due.group_key}:{due.sequence}:{channel}"
        try:
            record = send(channel, message, origin=f"alert {due.rule.name}", engine=engine, dedupe_key=key)
        except NotificationError as exc:
            # Recorded as failed; the group's next notification (interval or repeat) tries again.
            logger.error("alert %r: notification to %r failed: %s", due.rule.name, channel, exc)
            result.failed.append(channel)
            continue
        if not record.repeated:
            result.sent.append(record)


def _advance(due: GroupNotification, engine: Engine | None, now: datetime) -> None:
    from orchestration.store import session_scope
    from orchestration.store.models import AlertGroup

    with session_scope(engine) as session:
        group = session.get(AlertGroup, due.group_key)
        if group is None:
            return
        if due.close:
            session.delete(group)
            return
        group.sequence = due.sequence + 1
        group.last_notified_at = now
        group.notified = [fp for fp, _ in due.firing]


def current_alerts(engine: Engine | None = None, *, include_resolved: bool = True) -> list[dict[str, Any]]:
    """The alert state as the API and the CLI show it, firing first."""
    from sqlalchemy import select

    from orchestration.store import session_scope
    from orchestration.store.models import SystemAlert

    order = {FIRING: 0, PENDING: 1, RESOLVED: 2}
    with session_scope(engine) as session:
        rows = list(session.scalars(select(SystemAlert)))
        found = [
            {
                "fingerprint": row.fingerprint,
                "rule": row.rule,
                "status": row.status,
                "severity": row.severity,
                "labels": row.labels,
                "value": row.value,
                "summary": row.summary,
                "active_since": row.active_since.isoformat(),
                "fired_at": row.fired_at.isoformat() if row.fired_at else None,
                "resolved_at": row.resolved_at.isoformat() if row.resolved_at else None,
                "muted_by": row.muted_by,
                "group_key": row.group_key,
            }
            for row in rows
            if include_resolved or row.status != RESOLVED
        ]
    return sorted(found, key=lambda alert: (order[alert["status"]], alert["rule"], alert["active_since"]))
