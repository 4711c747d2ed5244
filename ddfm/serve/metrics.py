"""``GET /metrics``: the official ``prometheus_client``, one registry per app.

Label values come from fixed sets (route templates, status codes, error codes, expert
names), so the number of series is bounded whatever clients send.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "CountRequests", "ROUTES"]

ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's counters, gauges and histograms in their own registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("ddfm_requests", "HTTP responses by route and status code", ["route", "status"],
                                registry=r)
        self.errors = Counter("ddfm_errors", "error responses by error code", ["code"], registry=r)
        self.prompt_tokens = Counter("ddfm_prompt_tokens", "prompt tokens of answered completions", registry=r)
        self.completion_tokens = Counter("ddfm_completion_tokens", "generated tokens of answered completions",
                                         registry=r)
        self.expert_requests = Counter("ddfm_expert_requests", "answered prompts by the expert(s) that generated "
                                       "them (weight > 0)", ["expert"], registry=r)
        self.in_flight = Gauge("ddfm_requests_in_flight", "completion requests being processed now", registry=r)
        self.duration = Histogram("ddfm_request_duration_seconds", "latency of answered completion requests",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.joined = Counter("ddfm_batch_joined", "prompts that joined the running batch", registry=r)
        self.steps = Counter("ddfm_decode_steps", "decode steps of the running batch (one token per row)",
                             registry=r)
        self.rows = Histogram("ddfm_batch_rows", "rows (requests) decoded together per step", buckets=ROW_BUCKETS,
                              registry=r)
        self.busy = Counter("ddfm_batcher_busy_seconds", "time the batcher thread spent admitting and decoding "
                            "(its utilisation: the rate of this counter)", registry=r)
        self.scored = Counter("ddfm_scored_prompts", "prompts scored for echo log-probabilities", registry=r)
        self.cancelled = Counter("ddfm_cancelled_requests", "requests whose client went away before the answer: "
                                 "their generation stopped at the next token (one per prompt)", registry=r)
        self.cancelled_tokens = Counter("ddfm_cancelled_tokens", "tokens not generated for requests whose client "
                                        "went away (max_tokens minus the tokens generated before the stop)",
                                        registry=r)

    def account(self, usage: dict, routed_to: list[str], seconds: float | None = None) -> None:
        """One answered prompt: its tokens, the experts it went to, and (once per request) its latency."""
        self.prompt_tokens.inc(int(usage.get("prompt_tokens") or 0))
        self.completion_tokens.inc(int(usage.get("completion_tokens") or 0))
        for name in routed_to:
            self.expert_requests.labels(expert=str(name)).inc()
        if seconds is not None:
            self.duration.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountRequests:
    """ASGI middleware: count every HTTP response by route and status (unknown paths as ``other``)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        route = route if route in ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route=route, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
