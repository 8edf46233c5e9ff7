"""Prometheus collectors beyond the throttler's (toolkit queues)."""
