"""Alerts: rules (the record in schemas/alert_rules.py, kept on a compacted topic by
``rules.py``), the life of an alert as pure logic (``state.py``), the unusual-activity
score (``baseline.py``), and delivery to email, signed webhooks and Slack (``channels/``)."""
