"""Prometheus metrics on a per-app registry (two apps in one process never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5,
                   5.0, 10.0, 30.0)


class ServerMetrics:
    """Counters/histograms the routes feed, and gauges read from the engine at scrape time."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("corral_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("corral_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter("corral_generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram("corral_time_to_first_token_seconds",
                              "From request arrival to its first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("corral_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("corral_request_duration_seconds",
                                  "Whole request time", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_length = Gauge("corral_queue_length",
                                  "Requests waiting: admission queue + engine waiting",
                                  registry=r)
        self.running = Gauge("corral_running_sequences", "Sequences running in the engine",
                             registry=r)
        self.kv_usage = Gauge("corral_kv_cache_usage_ratio", "Fraction of KV blocks in use",
                              registry=r)
        self.kv_free = Gauge("corral_kv_free_blocks", "Free KV-cache blocks", registry=r)
        self.kv_total = Gauge("corral_kv_total_blocks", "KV-cache blocks in all", registry=r)

    def render(self, stats, admission_queued: int) -> bytes:
        """Refresh the engine gauges from `stats` (EngineStats) and return the text format."""
        self.queue_length.set(admission_queued + getattr(stats, "num_waiting", 0))
        self.running.set(getattr(stats, "num_running", 0))
        self.kv_usage.set(getattr(stats, "kv_usage", 0.0))
        self.kv_free.set(getattr(stats, "num_free_blocks", 0))
        self.kv_total.set(getattr(stats, "num_total_blocks", 0))
        return generate_latest(self.registry)
