"""Evaluation: metrics, judges, verification and the report."""
