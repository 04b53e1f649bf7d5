"""The `alert_evaluation` sensor: every 30 s, evaluates `resources/alerts.yaml` against Dagster's
storage and the platform's stats and sends what is due; each tick's counts are its skip reason in
the Dagster UI. A bad alerts file fails the code location when it loads (`alert_definitions`) and,
if edited badly afterwards, the tick — never silently."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg

EVALUATION_INTERVAL_S = 30


@dg.sensor(
    name="alert_evaluation",
    description="Evaluates the alert rules (resources/alerts.yaml) and sends their notifications.",
    minimum_interval_seconds=EVALUATION_INTERVAL_S,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def alert_evaluation(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    from sensors.alerts.evaluation import evaluate_rules
    from sensors.alerts.rules import load_alert_rules
    from sensors.alerts.signals import SignalContext

    rules = load_alert_rules()
    if not rules.rules:
        return dg.SkipReason(f"no alert rules declared in {rules.path}")
    repository = context.repository_def
    check_keys = list(repository.asset_graph.asset_check_keys) if repository is not None else []
    signals = SignalContext(instance=context.instance, now=datetime.now(UTC), asset_check_keys=check_keys)
    try:
        result = evaluate_rules(rules, signals)
    finally:
        signals.close()
    for record in result.sent:
        context.log.info("alert notification %r sent to %r", record.subject, record.channel)
    if result.errors:
        for rule, error in result.errors.items():
            context.log.error("alert rule %r could not be evaluated: %s", rule, error)
    return dg.SkipReason(result.summary())


def alert_definitions(alerts_file: str | Path | None = None) -> dg.Definitions:
    """The alert sensor; the rules are validated now so a bad file fails the code location's load."""
    from sensors.alerts.rules import load_alert_rules

    load_alert_rules(alerts_file)
    return dg.Definitions(sensors=[alert_evaluation])
