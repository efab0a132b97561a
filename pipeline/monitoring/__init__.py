"""Watching the champion in production: the prediction log (docs/monitoring.md)."""
