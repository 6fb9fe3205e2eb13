"""Outputs of the pipeline: ClickHouse (raw events) and, later, alert notifications."""
