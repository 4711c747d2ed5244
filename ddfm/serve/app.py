"""The app factory: wires the config, a backend, the endpoints, admission and metrics."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import Response

from ddfm.ensemble import Ensemble
from ddfm.router import Router
from ddfm.serve import chat, completions, errors
from ddfm.serve import protocol as P
from ddfm.serve.admission import Admission, Slots
from ddfm.serve.backends import Backend, LocalBackend
from ddfm.serve.gateway import GatewayBackend, parse_upstreams
from ddfm.serve.metrics import CountRequests, Metrics

__all__ = ["create_app", "ServerState"]


@dataclass
class ServerState:
    """What the handlers share (``app.state.ddfm``)."""

    cfg: Any
    backend: Backend
    metrics: Metrics
    slots: Slots
    model_ids: list[str]
    started: float = field(default_factory=time.time)


def create_app(cfg, *, ensemble: Any = None, router: Any = None) -> FastAPI:
    """The FastAPI app of a :class:`~ddfm.serve.cli.ServeConfig`; pass a loaded ``ensemble``
    (local) or ``router`` (gateway) to reuse them, else they are loaded from ``cfg``."""
    metrics, slots = Metrics(), Slots(cfg.max_concurrent)
    backend = _backend(cfg, metrics, slots, ensemble, router)
    state = ServerState(cfg, backend, metrics, slots, [cfg.model_name])

    @asynccontextmanager
    async def lifespan(app):
        await backend.start()
        try:
            yield
        finally:  # uvicorn has finished the responses in flight (streams included) by now
            await backend.stop()

    app = FastAPI(title="ddfm", summary="K experts + router as one OpenAI-compatible model", lifespan=lifespan,
                  strict_content_type=False)  # a JSON body without a Content-Type is still JSON
    app.state.ddfm = state
    for r in (chat.router, completions.router, _info_router()):
        app.include_router(r)
    count_error = lambda err: metrics.errors.labels(code=str(err.code or err.type)).inc()  # noqa: E731
    errors.install(app, on_error=count_error)
    app.add_middleware(Admission, cfg=cfg, slots=slots, on_error=count_error)
    app.add_middleware(CountRequests, metrics=metrics)  # outermost: counts refusals too
    return app


def _info_router() -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health(http: HttpRequest):
        # the liveness probe: open to all, details only to a trusted request (admission.py)
        s = http.app.state.ddfm
        if not getattr(http.state, "ddfm_trusted", False):
            return {"status": "ok"}
        return {"status": "ok", "backend": s.backend.kind, "experts": s.backend.expert_names,
                "in_flight": s.slots.used, "uptime_s": round(time.time() - s.started, 1)}

    @router.get("/metrics")
    async def metrics(http: HttpRequest):
        s = http.app.state.ddfm
        s.metrics.in_flight.set(s.slots.used)
        return Response(s.metrics.render(), media_type=s.metrics.content_type)

    @router.get("/v1/models", response_model=P.ModelList)
    async def models(http: HttpRequest):
        s = http.app.state.ddfm
        ext = {"backend": s.backend.kind, "experts": s.backend.expert_names, "mode": s.backend.mode}
        return P.ModelList(data=[P.ModelCard(id=m, created=int(s.started), ddfm=ext) for m in s.model_ids])

    return router


def _backend(cfg, metrics: Metrics, slots: Slots, ensemble: Any, router: Any) -> Backend:
    if cfg.upstream:
        if router is None and cfg.ensemble.router is not None:
            router = Router.load(cfg.ensemble.router, temperature=cfg.ensemble.router_temperature)
        return GatewayBackend(router, parse_upstreams(cfg.upstream), cfg)
    if ensemble is None:
        ensemble = Ensemble.from_config(cfg.ensemble)
    return LocalBackend(ensemble, cfg, metrics, pending=lambda: slots.used)
