"""`pipeline serve`: an HTTP server for a registered alias that follows it, batches concurrent
requests, and reports its health and metrics (docs/serving.md)."""
