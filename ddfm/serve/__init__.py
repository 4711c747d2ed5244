"""Serve the ensemble over an OpenAI-compatible HTTP API: K experts + router as one model (paper §4.3).

    ddfm serve --experts runs/expert-0 runs/expert-1 --router runs/partition/router.json
    ddfm serve --router runs/partition/router.json \\
               --upstream 0=http://gpu0:8000/v1 1=http://gpu1:8000/v1        # gateway mode

Endpoints: ``POST /v1/chat/completions`` (:mod:`~ddfm.serve.chat`), ``POST /v1/completions``
(:mod:`~ddfm.serve.completions`, OpenAI's legacy API with ``echo`` and ``logprobs``, as
lm-evaluation-harness drives it), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(:mod:`~ddfm.serve.metrics`, prometheus_client) and the OpenAPI docs at ``/docs``.

The package, one file per job:

* ``cli.py`` — :class:`ServeConfig` (the CLI's options) and :func:`serve`;
* ``app.py`` — :func:`create_app`, which only wires the parts below;
* ``protocol.py`` — OpenAI's request and response bodies as pydantic models;
* ``errors.py`` — OpenAI's error schema, for our errors and FastAPI's validation errors;
* ``admission.py`` — Host header, API key, concurrency slots, body size and time (a middleware);
* ``connections.py`` — uvicorn's HTTP protocol with a request-head timeout and a connection
  cap, and the uvicorn config ``ddfm serve`` runs with;
* ``chat.py`` / ``completions.py`` — one handler per endpoint; ``params.py`` what they share;
* ``images.py`` — ``image_url`` parts to images, within the server's image policy (pixels,
  aspect ratio, shrunk to what the processor and router use);
* ``backends.py`` — the backend interface and the local ensemble backend;
  ``gateway.py`` — the gateway backend (route here, generate on expert k's server);
* ``batcher.py`` — continuous batching: one thread owns the running batch;
* ``streaming.py`` — server-sent events; ``metrics.py`` — Prometheus metrics.
"""

from ddfm.serve.app import ServerState, create_app
from ddfm.serve.backends import Backend, Job, LocalBackend, Output, Prompt
from ddfm.serve.batcher import Batcher
from ddfm.serve.cli import ServeConfig, serve
from ddfm.serve.errors import ApiError
from ddfm.serve.gateway import GatewayBackend, parse_upstreams
from ddfm.serve.metrics import Metrics
from ddfm.serve.streaming import sse

__all__ = ["ApiError", "Backend", "Batcher", "GatewayBackend", "Job", "LocalBackend", "Metrics", "Output", "Prompt",
           "ServeConfig", "ServerState", "create_app", "parse_upstreams", "serve", "sse"]
