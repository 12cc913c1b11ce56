"""Prometheus metrics for /metrics (prometheus-client), one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_ENGINE_STATS = ("running", "paused", "waiting", "kv_cache_usage", "free_blocks", "num_blocks", "prefix_cache_hit_rate",
                 "num_preemptions")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("minillm_num_requests_running", "Sequences in the running batch", registry=r)
        self.paused = Gauge("minillm_num_requests_paused", "Running streams paused for a reader that fell behind", registry=r)
        self.waiting = Gauge("minillm_num_requests_waiting", "Sequences waiting for admission", registry=r)
        self.kv_usage = Gauge("minillm_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use", registry=r)
        self.free_blocks = Gauge("minillm_kv_cache_free_blocks", "Free KV-cache blocks", registry=r)
        self.total_blocks = Gauge("minillm_kv_cache_blocks", "KV-cache blocks in all", registry=r)
        self.prefix_hit_rate = Gauge("minillm_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache", registry=r)
        # the rate's two counts, which add up across servers (replicas) and over any window, as vLLM's
        self.prefix_queries = Counter("minillm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hits = Counter("minillm_prefix_cache_hits", "Prompt tokens found in the prefix cache", registry=r)
        self.preemptions = Gauge("minillm_num_preemptions", "Sequences preempted so far", registry=r)
        self.prompt_tokens = Counter("minillm_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("minillm_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("minillm_requests", "Requests finished, by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("minillm_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("minillm_inter_token_latency_seconds", "Time between tokens", buckets=_LATENCY_BUCKETS, registry=r)
        self._engine_counts = {"prefix_cache_queries": 0, "prefix_cache_hits": 0}  # at the last render

    def render(self, stats: dict | None) -> bytes:
        """The registry, with the engine's latest published snapshot (`LLMEngine.stats`); without one (no
        engine process serving: loading, or restarting after a failure) the engine's gauges read 0."""
        stats = stats or dict.fromkeys(_ENGINE_STATS, 0)
        self.running.set(stats["running"])
        self.paused.set(stats["paused"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_cache_usage"])
        self.free_blocks.set(stats["free_blocks"])
        self.total_blocks.set(stats["num_blocks"])
        self.prefix_hit_rate.set(stats["prefix_cache_hit_rate"])
        self.preemptions.set(stats["num_preemptions"])
        for key, counter in (("prefix_cache_queries", self.prefix_queries), ("prefix_cache_hits", self.prefix_hits)):
            count = stats.get(key, 0)
            if count:  # the engine counts since it started: a restarted one starts again from 0
                counter.inc(count - self._engine_counts[key] if count >= self._engine_counts[key] else count)
                self._engine_counts[key] = count
        return generate_latest(self.registry)
