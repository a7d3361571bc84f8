"""ServerMetrics: families, counts and buckets as vLLM v1 exposes them."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine.messages import RequestRecord, StepStats
from gateway.metrics import ServerMetrics, build_1_2_5_buckets

MODEL = "tiny-model"
REASONS = ["stop", "length", "stop", "abort", "error", "stop", "length"]

# Written out literally from vllm/v1/metrics/loggers.py (PrometheusStatLogger).
VLLM_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                     2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
VLLM_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]


def record(i: int, reason: str) -> RequestRecord:
    """Request i: arrives at 100+i, queued 0.01 s, prefill 0.05 s, then i+1 tokens 0.02 s apart."""
    arrival = 100.0 + i
    scheduled = arrival + 0.01
    tokens = [scheduled + 0.05 + 0.02 * k for k in range(i + 1)]
    return RequestRecord(arrival_time=arrival, finish_time=tokens[-1] + 0.001,
                         first_scheduled_time=scheduled, token_times=tokens,
                         num_prompt_tokens=10 + i, num_generation_tokens=i + 1,
                         finish_reason=reason, n=1, max_tokens=64)


def samples(metrics: ServerMetrics) -> dict[str, list]:
    """Sample name → list of (labels, value), from a parse of the rendered text."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(found: dict, name: str, **labels) -> float:
    matches = [v for lab, v in found[name] if all(lab.get(k) == w for k, w in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


def buckets_of(found: dict, name: str) -> list[float]:
    return [float(lab["le"]) for lab, _ in found[name + "_bucket"] if lab["le"] != "+Inf"]


@pytest.fixture
def filled() -> tuple[ServerMetrics, list[RequestRecord]]:
    metrics = ServerMetrics(MODEL, compat_vllm=True, max_model_len=2048)
    records = [record(i, reason) for i, reason in enumerate(REASONS)]
    for rec in records:
        metrics.on_request_finished(rec)
    return metrics, records


def test_request_success_counts_each_finish_reason(filled):
    metrics, _ = filled
    found = samples(metrics)
    for prefix in ("gateway:", "vllm:"):
        for reason in ("stop", "length", "abort", "error"):
            got = value(found, f"{prefix}request_success_total", finished_reason=reason)
            assert got == REASONS.count(reason)


def test_token_counters_equal_the_sums_over_records(filled):
    metrics, records = filled
    found = samples(metrics)
    assert value(found, "gateway:generation_tokens_total") == sum(
        r.num_generation_tokens for r in records)
    assert value(found, "vllm:prompt_tokens_total") == sum(r.num_prompt_tokens for r in records)


def test_request_histograms_count_every_record_once(filled):
    metrics, records = filled
    found = samples(metrics)
    k = len(records)
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds",
                 "request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds", "request_prompt_tokens",
                 "request_generation_tokens", "request_params_n", "request_params_max_tokens"):
        assert value(found, f"gateway:{name}_count", model_name=MODEL) == k, name
    # ITL has one sample per gap; TPOT only for requests with more than one token.
    gaps = sum(r.num_generation_tokens - 1 for r in records)
    assert value(found, "gateway:inter_token_latency_seconds_count") == gaps
    assert value(found, "gateway:request_time_per_output_token_seconds_count") == k - 1


def test_latency_sums_follow_the_timestamps(filled):
    metrics, records = filled
    found = samples(metrics)
    assert value(found, "gateway:time_to_first_token_seconds_sum") == pytest.approx(0.06 * 7)
    assert value(found, "gateway:request_queue_time_seconds_sum") == pytest.approx(0.01 * 7)
    assert value(found, "gateway:inter_token_latency_seconds_sum") == pytest.approx(
        0.02 * sum(r.num_generation_tokens - 1 for r in records))
    # every ITL gap is 0.02 s: all land at or under the 0.025 bucket, none under 0.01
    assert value(found, "gateway:inter_token_latency_seconds_bucket", le="0.01") == 0
    assert value(found, "gateway:inter_token_latency_seconds_bucket", le="0.025") == 21


def test_bucket_boundaries_equal_vllm(filled):
    metrics, _ = filled
    found = samples(metrics)
    for prefix in ("gateway:", "vllm:"):
        assert buckets_of(found, prefix + "time_to_first_token_seconds") == VLLM_TTFT_BUCKETS
        assert buckets_of(found, prefix + "inter_token_latency_seconds") == VLLM_ITL_BUCKETS
        assert buckets_of(found, prefix + "e2e_request_latency_seconds") == VLLM_E2E_BUCKETS
        assert buckets_of(found, prefix + "request_prompt_tokens") == [
            1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


def test_build_1_2_5_buckets_stops_at_the_maximum():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert build_1_2_5_buckets(8192)[-1] == 5000


def test_vllm_families_appear_only_with_compat():
    plain = ServerMetrics(MODEL)
    plain.on_request_finished(record(2, "stop"))
    names = set(samples(plain))
    assert "gateway:request_success_total" in names
    assert not any(n.startswith("vllm:") for n in names)
    assert any(n.startswith("vllm:") for n in samples(ServerMetrics(MODEL, compat_vllm=True)))


def test_on_step_sets_gauges_and_accumulates_counters():
    metrics = ServerMetrics(MODEL, compat_vllm=True)
    metrics.on_step(StepStats(num_running=3, num_waiting=2, kv_cache_usage=0.25,
                              num_preemptions=1, prefix_cache_queries=64,
                              prefix_cache_hits=32, num_batched_tokens=40))
    metrics.on_step(StepStats(num_running=1, num_waiting=0, kv_cache_usage=0.5,
                              prefix_cache_queries=16, num_batched_tokens=3))
    found = samples(metrics)
    assert value(found, "vllm:num_requests_running") == 1   # a gauge holds the last step
    assert value(found, "gateway:num_requests_waiting") == 0
    assert value(found, "vllm:kv_cache_usage_perc") == 0.5
    assert value(found, "gateway:num_preemptions_total") == 1
    assert value(found, "vllm:prefix_cache_queries_total") == 80
    assert value(found, "vllm:prefix_cache_hits_total") == 32
    assert value(found, "gateway:iteration_tokens_total_count") == 2
    assert value(found, "gateway:iteration_tokens_total_bucket", le="8.0") == 1


def test_request_without_tokens_skips_token_timing_histograms():
    metrics = ServerMetrics(MODEL)
    metrics.on_request_finished(RequestRecord(
        arrival_time=1.0, finish_time=1.5, first_scheduled_time=None, token_times=[],
        num_prompt_tokens=4, num_generation_tokens=0, finish_reason="abort"))
    found = samples(metrics)
    assert value(found, "gateway:request_success_total", finished_reason="abort") == 1
    assert value(found, "gateway:e2e_request_latency_seconds_count") == 1
    assert value(found, "gateway:time_to_first_token_seconds_count") == 0
    assert value(found, "gateway:request_queue_time_seconds_count") == 0
    assert value(found, "gateway:request_params_max_tokens_count") == 0


def test_concurrent_updates_lose_nothing():
    metrics = ServerMetrics(MODEL)

    def work():
        for i in range(200):
            metrics.on_step(StepStats(num_batched_tokens=1, prefix_cache_queries=1))
            metrics.on_request_finished(record(i % 3, "stop"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    found = samples(metrics)
    assert value(found, "gateway:prefix_cache_queries_total") == 800
    assert value(found, "gateway:request_success_total", finished_reason="stop") == 800


def test_two_instances_do_not_share_a_registry():
    ServerMetrics(MODEL).on_request_finished(record(0, "stop"))
    fresh = samples(ServerMetrics(MODEL))
    assert value(fresh, "gateway:request_success_total", finished_reason="stop") == 0


def test_recomputed_tokens_count_under_gateway_only_and_snapshots_move_only_the_gauges():
    metrics = ServerMetrics(MODEL, compat_vllm=True)
    metrics.on_step(StepStats(num_running=4, num_waiting=2, kv_cache_usage=0.5, num_preemptions=1,
                              num_recomputed_tokens=300, num_batched_tokens=304))
    metrics.on_step(StepStats(num_running=0, num_waiting=1, kv_cache_usage=0.0))   # after a drain: no step ran
    found = samples(metrics)
    assert value(found, "gateway:num_recomputed_tokens_total") == 300
    assert "vllm:num_recomputed_tokens_total" not in found   # not a vLLM family
    assert value(found, "vllm:num_requests_running") == 0 and value(found, "gateway:num_requests_waiting") == 1
    assert value(found, "gateway:kv_cache_usage_perc") == 0.0
    assert value(found, "gateway:num_preemptions_total") == 1
    assert value(found, "gateway:iteration_tokens_total_count") == 1   # a snapshot is no iteration
