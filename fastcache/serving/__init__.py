"""The service wing: engine (buckets, batching), one serving process, the HTTP API, metrics, the persistent compile
cache and Ray Serve replicas. The runtime (``fastcache/*.py``) imports nothing from here."""
