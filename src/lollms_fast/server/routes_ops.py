"""Operations (SPEC section 8): `/health` for load balancers and supervisors, `/metrics` for
Prometheus, `/openapi.json` describing every HTTP route.

The engine counts on its own thread (engine/metrics.py); the collector below only reads those
figures when Prometheus scrapes, so metrics cost the event loop nothing per token.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from importlib import resources

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from ..engine.metrics import EngineMetrics, HistogramSnapshot
from ..engine.types import FinishReason
from .keys import CHAT, ENGINE_CONTROL, ENGINE_METRICS
from .middlewares import public
from .responses import json_response

routes = web.RouteTableDef()

METRICS_REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry")


@routes.get("/health")
@public
async def health(request: web.Request) -> web.Response:
    """200 while a model is loaded and its engine thread runs; 503 otherwise."""
    control = request.app[ENGINE_CONTROL]
    engine = control.current
    if engine is not None and engine.running:
        return json_response({"status": "ok"})
    if not control.can_load:
        return json_response({"status": "error", "error": "this server runs without a model "
                                                          "engine"}, status=503)
    if engine is None:
        return json_response({"status": "loading"}, status=503)
    return json_response({"status": "error", "error": "the engine thread has stopped; "
                                                      "check the server log"}, status=503)


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_REGISTRY])
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


@functools.cache
def openapi_document() -> bytes:
    return resources.files("lollms_fast").joinpath("openapi.json").read_bytes()


@routes.get("/openapi.json")
@public
async def openapi(_request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(), content_type="application/json",
                        charset="utf-8")


def _histogram(name: str, doc: str, snap: HistogramSnapshot) -> HistogramMetricFamily:
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*snap.buckets, float("inf")), snap.counts, strict=True):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=snap.total)


class LollmsCollector(Collector):
    """Reads the engine's figures at scrape time."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        figures: EngineMetrics = self.app[ENGINE_METRICS]
        counts = figures.counters()
        unstarted = self.app[CHAT].failed_to_start  # refused before reaching the engine
        requests = CounterMetricFamily("lollms_requests", "Generations ended, by finish reason",
                                       labels=["finish_reason"])
        for reason in FinishReason:
            extra = unstarted if reason is FinishReason.ERROR else 0
            requests.add_metric([reason.value], counts[f"finished_{reason.value}"] + extra)
        yield requests
        yield CounterMetricFamily("lollms_prompt_tokens",
                                  "Prompt tokens of admitted generations",
                                  value=counts["prompt_tokens"])
        yield CounterMetricFamily("lollms_prompt_tokens_reused",
                                  "Prompt tokens taken from a cached prefix, not decoded",
                                  value=counts["prompt_tokens_reused"])
        yield CounterMetricFamily("lollms_generated_tokens", "Tokens generated",
                                  value=counts["generated_tokens"])
        yield CounterMetricFamily("lollms_decode_steps",
                                  "llama_decode calls; one serves every active slot (lollms "
                                  "and /v1 requests share it)", value=counts["decode_steps"])
        yield CounterMetricFamily("lollms_grammar_masks",
                                  "Sampled tokens a grammar refused, so that the grammar "
                                  "filtered the whole row", value=counts["grammar_masks"])
        lookups = CounterMetricFamily(
            "lollms_kv_cache_lookups",
            "Admissions by where their prompt prefix came from (slot, ram, disk, miss)",
            labels=["tier"])
        for tier in ("slot", "ram", "disk", "miss"):
            lookups.add_metric([tier], counts[f"kv_{tier}"])
        yield lookups
        engine = self.app[ENGINE_CONTROL].current
        stats = engine.stats() if engine is not None else {}
        tiers = engine.kv_cache.sizes() if engine is not None and engine.kv_cache else {}
        size = GaugeMetricFamily("lollms_kv_cache_bytes", "Bytes of KV states held by tier",
                                 labels=["tier"])
        entries = GaugeMetricFamily("lollms_kv_cache_entries",
                                    "Stored sequence states by tier", labels=["tier"])
        for tier in ("ram", "disk"):
            size.add_metric([tier], tiers.get(f"{tier}_bytes", 0))
            entries.add_metric([tier], tiers.get(f"{tier}_entries", 0))
        yield size
        yield entries
        slots = GaugeMetricFamily("lollms_slots", "Generation slots by state",
                                  labels=["state"])
        total = stats.get("slots", 0)
        reading, generating = stats.get("slots_reading", 0), stats.get("slots_generating", 0)
        slots.add_metric(["idle"], total - reading - generating)
        slots.add_metric(["prompt"], reading)
        slots.add_metric(["generating"], generating)
        yield slots
        yield GaugeMetricFamily("lollms_queue_length", "Generations waiting for a slot",
                                value=stats.get("queued", 0))
        yield _histogram("lollms_time_to_first_token_seconds",
                         "From submission to the first generated token",
                         figures.time_to_first_token.snapshot())
        yield _histogram("lollms_inter_token_seconds",
                         "Between two generated tokens of one answer",
                         figures.inter_token.snapshot())
        yield _histogram("lollms_request_duration_seconds",
                         "From submission to the end of a generation",
                         figures.request_duration.snapshot())


def metrics_registry(app: web.Application) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(LollmsCollector(app))
    return registry
