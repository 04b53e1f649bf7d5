"""Alert rules (`resources/alerts.yaml`): signals, alert state, grouping, silences, inhibition and the
`alert_evaluation` sensor. See `evaluation.py` for the semantics (Alertmanager's)."""
