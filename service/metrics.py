"""Prometheus metrics of one app instance (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "process_memory"]


def process_memory() -> dict[str, int | None]:
    """This process's resident memory in bytes: ``anonymous`` (what it holds) and ``resident`` (with the mapped files'
    pages in RAM: the store's segments, the model); None where ``/proc`` does not say (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            kv = dict(line.split(":", 1) for line in f if line.startswith(("RssAnon", "RssFile", "RssShmem")))
    except OSError:
        return {"anonymous": None, "resident": None}
    kib = {k: int(v.split()[0]) * 1024 for k, v in kv.items()}
    return {"anonymous": kib.get("RssAnon"), "resident": sum(kib.values()) if kib else None}


class Metrics:
    """Latency per stage, batch sizes, queries by safety mode, unsafe/redirect counts, cache, jobs, requests,
    refused query images and the image memory in use."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "safe_retrieval_stage_seconds", "Latency of one request stage.", ["stage"], registry=r, buckets=LATENCY_BUCKETS
        )
        self.batch_size = Histogram(
            "safe_retrieval_batch_size", "Queries encoded per forward pass.", ["modality"], registry=r, buckets=BATCH_BUCKETS
        )
        self.queries = Counter(
            "safe_retrieval_queries_total", "Search queries by safety mode and query modality.", ["safety", "modality"],
            registry=r,
        )
        self.unsafe_queries = Counter("safe_retrieval_unsafe_queries_total", "Queries the model flagged unsafe.", registry=r)
        self.redirected_queries = Counter(
            "safe_retrieval_redirected_queries_total", "Queries moved toward safe content.", registry=r
        )
        self.cache = Counter("safe_retrieval_embedding_cache_total", "Query-embedding cache lookups.", ["result"], registry=r)
        self.requests = Counter(
            "safe_retrieval_http_requests_total", "HTTP responses by route and status.", ["route", "status"], registry=r
        )
        self.jobs = Gauge("safe_retrieval_jobs", "Admin jobs known to this server, by state.", ["state"], registry=r)
        self.ready = Gauge("safe_retrieval_ready", "1 when a model and a matching index are served.", registry=r)
        self.swaps = Counter("safe_retrieval_swaps_total", "Times the served model+index pair was replaced.", registry=r)
        self.images_refused = Counter(
            "safe_retrieval_images_refused_total", "Query images refused before decoding: busy (the image memory "
            "budget stayed full, 503) or too_large (over the whole budget, 400).", ["reason"], registry=r,
        )
        self.image_memory = Gauge(
            "safe_retrieval_image_memory_bytes", "Memory reserved by the decodes of query images in flight.", registry=r
        )
        self.store_disk = Gauge(
            "safe_retrieval_store_disk_bytes", "Bytes the served index generation takes on disk (embedded store).",
            ["storage"], registry=r,
        )
        self.memory = Gauge("safe_retrieval_process_memory_bytes", "Resident memory of this process.", ["kind"], registry=r)
        for state in JOB_STATES:
            self.jobs.labels(state).set(0)
        for reason in ("busy", "too_large"):
            self.images_refused.labels(reason)

    def note_footprint(self, footprint: dict) -> None:
        """Set the footprint gauges from ``service.routes.health.footprint``'s answer."""
        self.store_disk.clear()
        if footprint.get("disk_bytes") is not None:
            self.store_disk.labels(footprint["storage"]).set(footprint["disk_bytes"])
        for kind in ("anonymous", "resident"):
            if footprint.get(f"memory_{kind}_bytes") is not None:
                self.memory.labels(kind).set(footprint[f"memory_{kind}_bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
