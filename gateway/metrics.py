"""Prometheus families for /metrics: one `ServerMetrics` owns its own CollectorRegistry.

Names, metric types, labels (`model_name`, `engine`) and histogram buckets follow vLLM v1's
PrometheusStatLogger (vllm/v1/metrics/loggers.py) so that dashboards and autoscaling rules
written for vLLM work unchanged. Every family is created under the `gateway:` prefix and,
with compat_vllm=True, a second time under `vllm:`; one call updates both.

Side effects, in order:
  1. __init__ registers every family in the private registry (never the global one, so
     several instances can live in one process, e.g. in tests) and binds the label values.
  2. on_step (engine thread, every step, and between steps whenever adds, aborts or calls
     changed the scheduler: those snapshots carry zero counts) sets the scheduler gauges,
     increments the per-step counters and observes iteration tokens. So the gauges are fresh
     within one engine-loop turn, also when no step runs (a disconnect storm leaves running 0).
     num_requests_waiting counts what --max-waiting-requests limits: accepted, not yet scheduled.
  3. on_request_finished (API event loop, once per request) increments the token and
     success counters and observes the request histograms.
  4. render (any thread) serialises the registry.
prometheus_client metrics are internally locked, so 2-4 may run concurrently.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest

from gateway.engine.messages import RequestRecord, StepStats

PREFIX = "gateway:"
VLLM_PREFIX = "vllm:"
ENGINE_INDEX = "0"   # vLLM labels every series with its engine index; we run one engine
# "rejected": refused before the engine ran anything (429 queue full, 400 at admission), so
# neither an error nor an abort of work done; such requests touch no other family.
FINISH_REASONS = ("stop", "length", "abort", "error", "rejected")

# Buckets copied from vLLM v1 (PrometheusStatLogger.__init__).
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
PARAMS_N_BUCKETS = [1, 2, 5, 10, 20]

GAUGES = {
    "num_requests_running": "Number of requests in model execution batches.",
    "num_requests_waiting": "Number of requests waiting to be processed.",   # incl. preempted
    "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
}
# prometheus_client appends `_total` to counter names, as vLLM's exposition shows.
COUNTERS = {
    "num_preemptions": "Cumulative number of preemption from the engine.",
    "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "prompt_tokens": "Number of prefill tokens processed.",
    "generation_tokens": "Number of generation tokens processed.",
}
# Ours only, so not mirrored under vllm: (no vLLM dashboard knows them).
GATEWAY_COUNTERS = {
    "num_recomputed_tokens": "Tokens computed again because a preemption had dropped their KV.",
}
REQUEST_SUCCESS = "request_success"


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value inclusive (vLLM's build_1_2_5_buckets)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


def histogram_specs(max_model_len: int) -> dict[str, tuple[str, list[float]]]:
    """Short name → (help, buckets) for every histogram family."""
    tokens = build_1_2_5_buckets(max_model_len)
    lat = REQUEST_LATENCY_BUCKETS
    return {
        "iteration_tokens_total": ("Histogram of number of tokens per engine_step.",
                                   ITERATION_TOKENS_BUCKETS),
        "time_to_first_token_seconds": ("Histogram of time to first token in seconds.",
                                        TTFT_BUCKETS),
        "inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.",
                                        ITL_BUCKETS),
        "request_time_per_output_token_seconds": (
            "Histogram of time_per_output_token_seconds per request.", ITL_BUCKETS),
        "e2e_request_latency_seconds": ("Histogram of e2e request latency in seconds.", lat),
        "request_queue_time_seconds": ("Histogram of time spent in WAITING phase for request.",
                                       lat),
        "request_inference_time_seconds": (
            "Histogram of time spent in RUNNING phase for request.", lat),
        "request_prefill_time_seconds": (
            "Histogram of time spent in PREFILL phase for request.", lat),
        "request_decode_time_seconds": ("Histogram of time spent in DECODE phase for request.",
                                        lat),
        "request_prompt_tokens": ("Number of prefill tokens processed.", tokens),
        "request_generation_tokens": ("Number of generation tokens processed.", tokens),
        "request_params_n": ("Histogram of the n request parameter.", PARAMS_N_BUCKETS),
        "request_params_max_tokens": ("Histogram of the max_tokens request parameter.", tokens),
    }


def _span(start: float | None, end: float | None) -> float | None:
    """end - start, or None when either end is unknown. Clamped at 0: timestamps come from
    two threads, and a histogram sum must never decrease."""
    if start is None or end is None:
        return None
    return max(0.0, end - start)


class ServerMetrics:
    """Every gateway family, mirrored under `vllm:` when compat_vllm is set."""

    def __init__(self, model_name: str, compat_vllm: bool = False, max_model_len: int = 8192):
        self.model_name = model_name
        self.compat_vllm = compat_vllm
        self.registry = CollectorRegistry(auto_describe=True)
        self.prefixes = (PREFIX, VLLM_PREFIX) if compat_vllm else (PREFIX,)
        labels = (model_name, ENGINE_INDEX)
        # short name → one bound child per prefix
        self._children: dict[str, list] = {}
        self._success: dict[str, list] = {}
        self._success_families: list[Counter] = []
        for prefix in self.prefixes:
            self._register_prefix(prefix, labels, max_model_len)

    @classmethod
    def from_config(cls, config, model_name: str) -> "ServerMetrics":
        """Build from gateway.config.Config (metrics_compat, max_model_len)."""
        return cls(model_name, compat_vllm=config.metrics_compat == "vllm",
                   max_model_len=config.max_model_len or 8192)

    def _register_prefix(self, prefix: str, labels: tuple[str, str], max_model_len: int) -> None:
        names = ["model_name", "engine"]
        reg = self.registry
        for short, doc in GAUGES.items():
            gauge = Gauge(prefix + short, doc, names, registry=reg)
            self._children.setdefault(short, []).append(gauge.labels(*labels))
        own = GATEWAY_COUNTERS if prefix == PREFIX else {}
        for short, doc in {**COUNTERS, **own}.items():
            counter = Counter(prefix + short, doc, names, registry=reg)
            self._children.setdefault(short, []).append(counter.labels(*labels))
        for short, (doc, buckets) in histogram_specs(max_model_len).items():
            hist = Histogram(prefix + short, doc, names, buckets=buckets, registry=reg)
            self._children.setdefault(short, []).append(hist.labels(*labels))
        success = Counter(prefix + REQUEST_SUCCESS, "Count of successfully processed requests.",
                          names + ["finished_reason"], registry=reg)
        self._success_families.append(success)
        # Pre-created so every reason exports an explicit 0, as vLLM does.
        for reason in FINISH_REASONS:
            self._success.setdefault(reason, []).append(success.labels(*labels, reason))

    # -- fan-out helpers: one call updates the family under every prefix ---------------

    def _set(self, short: str, value: float) -> None:
        for child in self._children[short]:
            child.set(value)

    def _inc(self, short: str, amount: float) -> None:
        if amount > 0:   # Counter.inc rejects negatives; 0 is a no-op anyway
            for child in self._children[short]:
                child.inc(amount)

    def _observe(self, short: str, value: float | None) -> None:
        if value is not None:
            for child in self._children[short]:
                child.observe(value)

    def _count_success(self, reason: str) -> None:
        if reason not in self._success:
            # An unexpected reason is still counted rather than lost.
            labels = (self.model_name, ENGINE_INDEX, reason)
            self._success[reason] = [f.labels(*labels) for f in self._success_families]
        for child in self._success[reason]:
            child.inc()

    # -- inputs -------------------------------------------------------------------------

    def on_step(self, stats: StepStats) -> None:
        """Engine thread, once per step and once per engine-loop turn that changed the scheduler."""
        self._set("num_requests_running", stats.num_running)
        self._set("num_requests_waiting", stats.num_waiting)
        self._set("kv_cache_usage_perc", stats.kv_cache_usage)
        self._inc("num_preemptions", stats.num_preemptions)
        self._inc("num_recomputed_tokens", stats.num_recomputed_tokens)
        self._inc("prefix_cache_queries", stats.prefix_cache_queries)
        self._inc("prefix_cache_hits", stats.prefix_cache_hits)
        if stats.num_batched_tokens > 0:   # an idle step scheduled nothing: not an iteration
            self._observe("iteration_tokens_total", stats.num_batched_tokens)

    def on_request_finished(self, rec: RequestRecord) -> None:
        """API event loop, once per finished request (any finish reason)."""
        if rec.finish_reason == "rejected":   # no tokens processed, no latency worth a histogram
            self._count_success(rec.finish_reason)
            return
        self._inc("prompt_tokens", rec.num_prompt_tokens)
        self._inc("generation_tokens", rec.num_generation_tokens)
        self._count_success(rec.finish_reason)
        self._observe_latencies(rec)
        self._observe("request_prompt_tokens", rec.num_prompt_tokens)
        self._observe("request_generation_tokens", rec.num_generation_tokens)
        self._observe("request_params_n", rec.n)
        if rec.max_tokens:   # vLLM skips requests that left max_tokens unset
            self._observe("request_params_max_tokens", rec.max_tokens)

    def _observe_latencies(self, rec: RequestRecord) -> None:
        times = rec.token_times
        first_token = times[0] if times else None
        self._observe("time_to_first_token_seconds", _span(rec.arrival_time, first_token))
        for earlier, later in zip(times, times[1:]):
            self._observe("inter_token_latency_seconds", max(0.0, later - earlier))
        decode = _span(first_token, rec.finish_time)
        if decode is not None and rec.num_generation_tokens > 1:
            self._observe("request_time_per_output_token_seconds",
                          decode / (rec.num_generation_tokens - 1))
        self._observe("e2e_request_latency_seconds", _span(rec.arrival_time, rec.finish_time))
        self._observe("request_queue_time_seconds",
                      _span(rec.arrival_time, rec.first_scheduled_time))
        self._observe("request_inference_time_seconds",
                      _span(rec.first_scheduled_time, rec.finish_time))
        self._observe("request_prefill_time_seconds", _span(rec.first_scheduled_time, first_token))
        self._observe("request_decode_time_seconds", decode)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
