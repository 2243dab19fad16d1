"""The serving gateway: FastAPI app, request schemas, dynamic batcher, worker processes, text-embedding
cache, Prometheus metrics, settings and the `openset` command line."""
