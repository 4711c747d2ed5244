"""Serve the ensemble over an OpenAI-compatible HTTP API: K experts + router as one model (paper §4.3).

    ddfm serve --experts runs/expert-0 runs/expert-1 --router runs/partition/router.json
    ddfm serve --router runs/partition/router.json \\
               --upstream 0=http://gpu0:8000/v1 1=http://gpu1:8000/v1        # gateway mode

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (text and ``image_url``
parts, ``stream: true`` as server-sent events in OpenAI's chunk format), ``GET /health``
and ``GET /metrics`` (Prometheus text format). Each response carries the routing weights
p(S_k | z) (eq. 29, top-k renormalised) in an extension field
``"ddfm": {"weights": [K], "experts": [K names], "routed_to": [names with w_k > 0], "mode"}``.

Two backends behind the same HTTP layer:

* **local** — the experts are loaded here (:class:`ddfm.ensemble.Ensemble`). A
  :class:`DynamicBatcher` worker thread collects the requests that arrive within a short
  window and hands them to ``Ensemble.generate`` together, so requests routed to the same
  expert decode in one batch; generation never runs on the event loop.
* **gateway** — ``--upstream k=URL`` per expert: the route is computed here with the
  :class:`~ddfm.router.Router` (top-1), and the request is forwarded, streaming included,
  to expert k's own OpenAI-compatible server (vLLM, TGI, another ``ddfm serve``). With
  top-1 routing a request needs exactly one expert, so this is how serving scales past
  one machine.

Safety: binds 127.0.0.1 unless told otherwise; optional bearer ``--api-key``; limits on
body bytes (and the time to send them), image pixels, prompt and output tokens (and
their sum against the experts' context) and concurrent requests (429). Bad input
of any kind is a 4xx with an OpenAI-style body ``{"error": {"message", "type", "param",
"code"}}`` naming the problem; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import hmac
import io
import json
import logging
import os
import queue
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import httpx
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ddfm.config import arg
from ddfm.ensemble.config import EnsembleConfig

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- config

@dataclass
class ServeConfig:
    """``ddfm serve``: the ensemble (or a gateway to remote experts) behind an OpenAI-style API."""

    ensemble: EnsembleConfig = arg("the ensemble (shared by generate, eval and serve); in gateway mode only "
                                   "--router and --router-temperature apply", default_factory=EnsembleConfig)
    model_name: str = arg("model id reported by /v1/models and accepted in requests", default="ddfm")
    host: str = arg("address to bind; 127.0.0.1 keeps the server local", default="127.0.0.1")
    port: int = arg("TCP port", default=8000)
    api_key: Optional[str] = arg("require 'Authorization: Bearer KEY' on /v1/* (default: env DDFM_API_KEY, "
                                 "else no key)", default=None)
    max_body_bytes: int = arg("largest request body in bytes", default=8 * 1024 * 1024)
    max_image_pixels: int = arg("largest image (width x height) accepted", default=4096 * 4096)
    max_prompt_tokens: int = arg("longest prompt in tokens (image tokens included)", default=2048)
    max_output_tokens: int = arg("largest max_tokens a request may ask for", default=512)
    default_max_tokens: Optional[int] = arg("max_tokens when a request gives none (default: 64, at most "
                                            "max_output_tokens)", default=None)
    max_concurrent: int = arg("requests in flight before new ones get 429", default=64)
    body_timeout: float = arg("seconds a client may take to send its request body (then 408)", default=30.0)
    max_batch_size: int = arg("requests decoded together in one generate call", default=8)
    batch_window_ms: float = arg("how long the batcher waits for more requests when idle", default=5.0)
    allow_remote_images: bool = arg("accept http(s):// image URLs (fetched by the server)", default=False)
    image_root: Optional[str] = arg("accept file:// URLs and paths to images under this directory", default=None)
    upstream: list[str] = arg("gateway mode: k=URL of expert k's OpenAI-compatible server (one per expert)",
                              default_factory=list)
    upstream_timeout: float = arg("seconds to wait for an upstream expert's response", default=60.0)
    upstream_connect_timeout: float = arg("seconds to wait for a connection to an upstream expert", default=3.0)
    upstream_api_key: Optional[str] = arg("bearer key sent to upstream experts", default=None)
    log_level: str = arg("uvicorn log level", default="info",
                         choices=("critical", "error", "warning", "info", "debug"))

    def __post_init__(self) -> None:
        self.upstream = [str(u) for u in self.upstream]
        if not self.ensemble.experts and not self.upstream:
            raise ValueError("serve: give --experts DIR... (local experts) or --upstream k=URL... (gateway mode)")
        if self.ensemble.experts and self.upstream:
            raise ValueError("serve: --experts and --upstream exclude each other (gateway mode forwards, "
                             "it does not load experts)")
        if self.default_max_tokens is None:
            self.default_max_tokens = min(64, self.max_output_tokens)
        for name in ("port", "max_body_bytes", "max_image_pixels", "max_prompt_tokens", "max_output_tokens",
                     "default_max_tokens", "max_concurrent", "max_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_output_tokens:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_output_tokens "
                             f"({self.max_output_tokens})")
        if self.batch_window_ms < 0:
            raise ValueError(f"batch_window_ms: must be >= 0, got {self.batch_window_ms}")
        if self.body_timeout <= 0:
            raise ValueError(f"body_timeout: must be positive, got {self.body_timeout}")
        if self.upstream_timeout <= 0 or self.upstream_connect_timeout <= 0:
            raise ValueError("upstream_timeout and upstream_connect_timeout must be positive")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise FileNotFoundError(f"image_root: not a directory: {self.image_root}")
        if self.upstream:
            upstreams = parse_upstreams(self.upstream)
            if len(upstreams) > 1 and self.ensemble.router is None:
                raise ValueError("upstream: gateway mode with several experts needs --router to route requests")
        if self.api_key is None:
            self.api_key = os.environ.get("DDFM_API_KEY") or None


def parse_upstreams(specs: list[str]) -> dict[int, str]:
    """``["0=http://h:8000/v1", ...]`` -> ``{0: "http://h:8000/v1", ...}`` (base URL ending in ``/v1``)."""
    out: dict[int, str] = {}
    for spec in specs:
        k, sep, url = spec.partition("=")
        if not sep or not k.strip().isdigit():
            raise ValueError(f"upstream: expected k=URL (e.g. 0=http://127.0.0.1:8001/v1), got {spec!r}")
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"upstream: URL of expert {k} must start with http:// or https://, got {url!r}")
        if not url.endswith("/v1"):
            url += "/v1"
        if int(k) in out:
            raise ValueError(f"upstream: expert {k} given twice")
        out[int(k)] = url
    return out


# --------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- request parsing

@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body, ready for the ensemble or an upstream.

    ``prompt``/``history``/``image`` are the last user turn, the turns before it as
    ``{"role", "content"}`` messages, and the request's one decoded image (RGB PIL).
    ``body`` is the original JSON object (forwarded unchanged in gateway mode).
    """

    model: str
    prompt: str
    history: list[dict[str, str]]
    image: Any
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    body: dict[str, Any]
    prompt_tokens: int | None = None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    def generation_key(self) -> tuple:
        """Requests with equal keys can share one ``Ensemble.generate`` call.

        A seeded sampling request gets a key of its own: its tokens must not depend on
        which other requests happened to arrive at the same time.
        """
        alone = id(self) if self.do_sample and self.seed is not None else None
        return (self.max_tokens, self.do_sample, self.temperature if self.do_sample else 0.0,
                self.top_p if self.do_sample else 1.0, tuple(self.stop), self.seed, alone)


@dataclass
class Limits:
    max_image_pixels: int
    max_output_tokens: int
    default_max_tokens: int
    allow_remote_images: bool = False
    image_root: str | None = None


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
               float: "number", type(None): "null"}


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"'{key}' must be a number, got {_type_name(value)}", key, "invalid_type")
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, got {value}", key)
    return float(value)


def _integer(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, got {_type_name(value)}", key, "invalid_type")
    return value


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; a syntax error says where."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bad("request body is not UTF-8 encoded JSON", None, "invalid_json") from None
    except json.JSONDecodeError as err:
        raise _bad(f"request body is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}",
                   None, "invalid_json") from None
    except RecursionError:
        raise _bad("request body is nested too deeply", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise _bad(f"request body must be a JSON object, got {_type_name(body)}", None, "invalid_type")
    return body


def parse_chat_request(body: dict[str, Any], limits: Limits, model_ids: list[str]) -> ChatRequest:
    """Validate a chat-completions body; every problem is an :class:`ApiError` naming the field."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model", "invalid_type" if model else "missing")
    if model not in model_ids:
        raise ApiError(404, f"model {model!r} does not exist; available: {', '.join(model_ids)}",
                       param="model", code="model_not_found")
    n = _integer(body, "n", 1)
    if n != 1:
        raise _bad(f"'n' must be 1 (one choice per request), got {n}", "n", "unsupported_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, got {_type_name(stream)}", "stream", "invalid_type")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
        include_usage = bool(opts.get("include_usage", False))
    max_tokens = _integer(body, "max_completion_tokens", None)
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _integer(body, "max_tokens", limits.default_max_tokens), "max_tokens"
    if max_tokens < 1:
        raise _bad(f"'{key}' must be at least 1, got {max_tokens}", key)
    if max_tokens > limits.max_output_tokens:
        raise _bad(f"'{key}' is {max_tokens}, more than this server's limit of {limits.max_output_tokens} "
                   "output tokens", key, "too_many_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise _bad("'top_p' must be greater than 0", "top_p")
    stop = _stop(body.get("stop"))
    seed = _integer(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise _bad(f"'seed' must be between 0 and 2**63 - 1, got {seed}", "seed")
    prompt, history, image = _messages(body.get("messages"), limits)
    return ChatRequest(model=model, prompt=prompt, history=history, image=image, max_tokens=max_tokens,
                       temperature=temperature, top_p=top_p, stop=stop, seed=seed, stream=stream,
                       include_usage=include_usage, body=body)


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("'stop' must be a non-empty string or a list of non-empty strings", "stop", "invalid_type")
    if len(stop) > 4:
        raise _bad(f"'stop' has {len(stop)} sequences; at most 4", "stop")
    return stop


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _messages(messages: Any, limits: Limits) -> tuple[str, list[dict[str, str]], Any]:
    """OpenAI messages -> (prompt of the last user turn, earlier turns, the one image or None)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required and must be a non-empty array", "messages",
                   "invalid_type" if messages is not None else "missing")
    turns: list[dict[str, str]] = []
    image = None
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(f"{where} must be an object, got {_type_name(msg)}", where, "invalid_type")
        role = msg.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(_ROLES)}, got {role!r}", f"{where}.role")
        text, img = _content(msg.get("content"), f"{where}.content", limits, allow_image=role == "user")
        if img is not None:
            if image is not None:
                raise _bad(f"{where}.content: only one image per request is supported", f"{where}.content",
                           "too_many_images")
            image = img
        turns.append({"role": _ROLES[role], "content": text})
    if turns[-1]["role"] != "user":
        raise _bad(f"the last message must have role 'user', got {turns[-1]['role']!r}",
                   f"messages[{len(turns) - 1}].role")
    return turns[-1]["content"], turns[:-1], image


def _content(content: Any, where: str, limits: Limits, *, allow_image: bool) -> tuple[str, Any]:
    if isinstance(content, str):
        return content, None
    if content is None:
        return "", None
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or an array of parts, got {_type_name(content)}", where,
                   "invalid_type")
    texts, image = [], None
    for j, part in enumerate(content):
        p = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad(f"{p} must be an object, got {_type_name(part)}", p, "invalid_type")
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{p}.text must be a string", f"{p}.text", "invalid_type")
            texts.append(part["text"])
        elif kind == "image_url":
            if not allow_image:
                raise _bad(f"{p}: images are accepted only in user messages", p)
            if image is not None:
                raise _bad(f"{p}: only one image per request is supported", p, "too_many_images")
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str):
                raise _bad(f"{p}.image_url.url must be a string", f"{p}.image_url.url", "invalid_type")
            image = load_image_url(url, f"{p}.image_url.url", limits)
        else:
            raise _bad(f"{p}.type must be 'text' or 'image_url', got {kind!r}", f"{p}.type")
    return "\n".join(texts), image


# --------------------------------------------------------------------------- images

def load_image_url(url: str, param: str, limits: Limits):
    """Decode an ``image_url`` to an RGB PIL image, refusing what is not enabled.

    ``data:image/...;base64,...`` is always accepted; ``http(s)://`` only with
    ``allow_remote_images``; ``file://`` and plain paths only under ``image_root``.
    The pixel count is checked from the header, before the pixels are decoded.
    """
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise _bad(f"{param}: a data URL must look like data:image/png;base64,<data>", param, "invalid_image_url")
        try:
            data = base64.b64decode(payload.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise _bad(f"{param}: invalid base64 in data URL", param, "invalid_base64") from None
    elif url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise _bad(f"{param}: remote image URLs are disabled on this server (send a base64 data: URL, "
                       "or start the server with --allow-remote-images)", param, "image_url_not_allowed")
        data = _fetch_remote(url, param, limits)
    else:
        data = _read_local(url, param, limits)
    return decode_image(data, param, limits.max_image_pixels)


def decode_image(data: bytes, param: str, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise _bad(f"{param}: the image is empty", param, "invalid_image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # from the header: nothing decoded yet
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise _bad(f"{param}: the bytes are not an image PIL can read", param, "invalid_image") from None
    if w * h > max_pixels:
        raise _bad(f"{param}: image is {w}x{h} = {w * h} pixels, more than this server's limit of {max_pixels}",
                   param, "image_too_large")
    try:
        img.load()
        return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _bad(f"{param}: the image data is corrupt ({err})", param, "invalid_image") from None


def _fetch_remote(url: str, param: str, limits: Limits) -> bytes:
    cap = max(limits.max_image_pixels * 4, 1 << 20)
    try:
        with httpx.stream("GET", url, timeout=10.0, follow_redirects=True) as resp:
            if resp.status_code != 200:
                raise _bad(f"{param}: fetching the image gave HTTP {resp.status_code}", param, "image_fetch_failed")
            data = bytearray()
            for chunk in resp.iter_bytes():
                data += chunk
                if len(data) > cap:
                    raise _bad(f"{param}: remote image is larger than {cap} bytes", param, "image_too_large")
            return bytes(data)
    except httpx.HTTPError as err:
        raise _bad(f"{param}: could not fetch the image: {err}", param, "image_fetch_failed") from None


def _read_local(url: str, param: str, limits: Limits) -> bytes:
    if limits.image_root is None:
        raise _bad(f"{param}: local image paths are disabled on this server (send a base64 data: URL, or start "
                   "the server with --image-root DIR)", param, "image_url_not_allowed")
    path = url[len("file://"):] if url.startswith("file://") else url
    root = Path(limits.image_root).resolve()
    resolved = (root / path).resolve()
    if not resolved.is_relative_to(root):
        raise _bad(f"{param}: path is outside the server's image root", param, "image_url_not_allowed")
    if not resolved.is_file():
        raise _bad(f"{param}: no such image file under the image root: {path}", param, "image_not_found")
    return resolved.read_bytes()


# --------------------------------------------------------------------------- metrics

class Metrics:
    """Counters and one latency histogram, rendered in the Prometheus text format (0.0.4).

    Label values come from a fixed set (route templates, status codes, error codes,
    expert names), so the number of series is bounded whatever clients send.
    """

    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
    HELP = {
        "ddfm_requests_total": ("counter", "HTTP requests by route and status code"),
        "ddfm_errors_total": ("counter", "error responses by error code"),
        "ddfm_prompt_tokens_total": ("counter", "prompt tokens of answered chat completions"),
        "ddfm_completion_tokens_total": ("counter", "generated tokens of answered chat completions"),
        "ddfm_expert_requests_total": ("counter", "chat completions by the expert(s) that generated them"),
        "ddfm_batches_total": ("counter", "generate calls made by the dynamic batcher"),
        "ddfm_batched_requests_total": ("counter", "requests decoded by those generate calls"),
        "ddfm_requests_in_flight": ("gauge", "chat completions being processed now"),
        "ddfm_request_duration_seconds": ("histogram", "latency of answered chat completions"),
    }

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hist = [0] * (len(self.BUCKETS) + 1)
        self._hist_sum = 0.0

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._values[(name, ())] = value

    def observe(self, seconds: float) -> None:
        with self._lock:
            i = next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))
            self._hist[i] += 1
            self._hist_sum += seconds

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._values.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self) -> str:
        with self._lock:
            values, hist, hist_sum = dict(self._values), list(self._hist), self._hist_sum
        lines = []
        for name, (kind, help_text) in self.HELP.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
            if kind == "histogram":
                total = 0
                for bound, count in zip((*map(str, self.BUCKETS), "+Inf"), hist):
                    total += count
                    lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
                lines += [f"{name}_sum {hist_sum:.6f}", f"{name}_count {total}"]
                continue
            series = [(lab, v) for (n, lab), v in sorted(values.items()) if n == name]
            for lab, v in series or [((), 0.0)]:
                text = ",".join(f'{k}="{_escape_label(val)}"' for k, val in lab)
                lines.append(f"{name}{{{text}}} {_num(v)}" if text else f"{name} {_num(v)}")
        return "\n".join(lines) + "\n"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(v)


# --------------------------------------------------------------------------- dynamic batching

@dataclass
class _Job:
    request: Any                      # ddfm.ensemble.Request
    key: tuple                        # ChatRequest.generation_key()
    on_delta: Callable[[str], None] | None
    future: concurrent.futures.Future


class DynamicBatcher:
    """One worker thread that decodes concurrent requests together.

    It takes the first waiting request, keeps collecting for ``window_s`` seconds (or
    until ``max_batch`` requests), groups them by generation parameters and makes one
    ``Ensemble.generate`` call per group. Inside that call each expert runs on the rows
    routed to it (its own KV cache, batched), so requests routed to the same expert
    decode together and an expert with no rows is not run at all. While a call runs,
    new requests queue up, so under load the next batch is ready immediately. A group
    whose batched call fails is retried one request at a time, so one bad request
    cannot fail its neighbours.

    ``pending()`` (optional) tells how many requests the server has in flight; the
    batcher waits for the window only while more are on their way than it holds, so a
    lone request is not delayed.
    """

    def __init__(self, ensemble: Any, *, window_s: float = 0.005, max_batch: int = 8,
                 metrics: Metrics | None = None, pending: Callable[[], int] | None = None):
        self.ensemble, self.window_s, self.max_batch = ensemble, window_s, max_batch
        self.metrics = metrics or Metrics()
        self.pending = pending
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="ddfm-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, request: Any, key: tuple, on_delta: Callable[[str], None] | None = None
               ) -> concurrent.futures.Future:
        """Queue one request; the future resolves to its ``Generation``."""
        job = _Job(request, key, on_delta, concurrent.futures.Future())
        self._queue.put(job)
        return job.future

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = self._collect(first)
            stop = any(j is None for j in jobs)
            jobs = [j for j in jobs if j is not None and j.future.set_running_or_notify_cancel()]
            for group in self._groups(jobs):
                self._run(group)
            if stop:
                return

    def _collect(self, first: _Job) -> list[_Job | None]:
        jobs: list[_Job | None] = [first]
        deadline = time.monotonic() + self.window_s
        while len(jobs) < self.max_batch and jobs[-1] is not None:
            more_coming = self.pending is None or self.pending() > len(jobs)
            timeout = deadline - time.monotonic() if more_coming else 0.0
            try:
                jobs.append(self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    @staticmethod
    def _groups(jobs: list[_Job]) -> list[list[_Job]]:
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        return list(groups.values())

    def _run(self, jobs: list[_Job]) -> None:
        max_new, do_sample, temperature, top_p, stop, seed, _ = jobs[0].key

        def on_token(i: int, delta: str) -> None:
            cb = jobs[i].on_delta
            if cb is not None and delta:
                cb(delta)

        kwargs = dict(max_new_tokens=max_new, do_sample=do_sample, temperature=temperature or 1.0,
                      top_p=top_p, stop=list(stop) or None, seed=seed)
        try:
            gens = self.ensemble.generate([j.request for j in jobs], on_token=on_token, **kwargs)
            self.metrics.inc("ddfm_batches_total")
            self.metrics.inc("ddfm_batched_requests_total", len(jobs))
            for job, gen in zip(jobs, gens):
                job.future.set_result(gen)
        except Exception as err:
            if len(jobs) == 1:
                log.exception("generation failed")
                jobs[0].future.set_exception(err)
                return
            for job in jobs:  # isolate the failure: one request at a time
                self._run([job])


# --------------------------------------------------------------------------- backends

def _round(weights: Any) -> list[float]:
    return [round(float(w), 6) for w in list(weights)]


class LocalBackend:
    """The experts loaded in this process, behind a :class:`DynamicBatcher`."""

    kind = "local"

    def __init__(self, ensemble: Any, cfg: ServeConfig, metrics: Metrics):
        import copy

        self.ensemble, self.cfg, self.metrics = ensemble, cfg, metrics
        self.batcher = DynamicBatcher(ensemble, window_s=cfg.batch_window_ms / 1000, max_batch=cfg.max_batch_size,
                                      metrics=metrics)
        self.mode = ensemble.mode
        self.expert_names = list(ensemble.expert_names)
        # Prompts are counted in request threads while the batcher thread encodes with the
        # ensemble's processor; a private copy (and a lock) keeps the two tokenizers apart.
        self._counter = copy.copy(ensemble)
        self._counter.processor = copy.deepcopy(ensemble.processor)
        self._counter.tokenizer = getattr(self._counter.processor, "tokenizer", self._counter.processor)
        self._count_lock = threading.Lock()
        ref = next(m for m in ensemble.experts if m is not None)
        self.context = getattr(ref.config.get_text_config(), "max_position_embeddings", None)

    async def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.batcher.stop)

    def prepare(self, req: ChatRequest) -> Any:
        """The ``ddfm.ensemble.Request`` of a validated chat request; checks the prompt length."""
        from ddfm.ensemble import Request

        request = Request(prompt=req.prompt, image=req.image, history=req.history or None)
        try:
            with self._count_lock:
                n = self._counter.count_prompt_tokens(request)
        except ValueError as err:  # e.g. an image sent to text-only experts
            raise _bad(str(err), "messages", "unsupported_input") from None
        if n > self.cfg.max_prompt_tokens:
            raise _bad(f"the prompt is {n} tokens (image tokens included), more than this server's limit of "
                       f"{self.cfg.max_prompt_tokens}", "messages", "context_length_exceeded")
        if self.context is not None and n + req.max_tokens > self.context:
            raise _bad(f"the prompt is {n} tokens and max_tokens is {req.max_tokens}: more than the experts' "
                       f"context of {self.context} tokens", "messages", "context_length_exceeded")
        req.prompt_tokens = n
        return request

    async def complete(self, req: ChatRequest, request: Any,
                       on_delta: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Generate; returns ``{"text", "finish_reason", "usage", "ddfm"}``."""
        fut = self.batcher.submit(request, req.generation_key(), on_delta)
        gen = await asyncio.wrap_future(fut)
        return {
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "usage": {"prompt_tokens": int(gen.prompt_tokens), "completion_tokens": int(gen.completion_tokens),
                      "total_tokens": int(gen.prompt_tokens) + int(gen.completion_tokens)},
            "ddfm": extension(gen.weights, gen.experts, self.mode, left_out=list(gen.left_out)),
        }


def extension(weights: Any, experts: list[str], mode: str, **extra: Any) -> dict[str, Any]:
    """The ``"ddfm"`` field of a response: weights (K,) aligned with the K expert names,
    the experts that actually generated (weight > 0) and the routing mode."""
    w = _round(weights)
    return {"weights": w, "experts": list(experts), "routed_to": [e for e, x in zip(experts, w) if x > 0],
            "mode": mode, **{k: v for k, v in extra.items() if v}}


class GatewayBackend:
    """Route locally (top-1), forward to expert k's own OpenAI-compatible server."""

    kind = "gateway"

    def __init__(self, router: Any, upstreams: dict[int, str], cfg: ServeConfig, metrics: Metrics):
        self.router, self.upstreams, self.cfg, self.metrics = router, upstreams, cfg, metrics
        k = int(router.k) if router is not None else 1
        missing = sorted(set(range(k)) - set(upstreams))
        extra = sorted(set(upstreams) - set(range(k)))
        if missing or extra:
            raise ValueError(f"upstream: the router has {k} experts (0..{k - 1}); "
                             + (f"no --upstream for {missing}" if missing else f"unknown experts {extra}"))
        self.k = k
        self.mode = "gateway-top1"
        headers = {"Authorization": f"Bearer {cfg.upstream_api_key}"} if cfg.upstream_api_key else {}
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(cfg.upstream_timeout, connect=cfg.upstream_connect_timeout),
            headers=headers, limits=httpx.Limits(max_connections=cfg.max_concurrent))
        self._models: dict[int, str] = {}

    @property
    def expert_names(self) -> list[str]:
        return [f"expert-{k}" for k in range(self.k)]

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        await self.client.aclose()

    def prepare(self, req: ChatRequest) -> Any:
        """Routing weights ``(K,)`` of the request: router on its image (or text), else the prior π_k."""
        if self.router is None:
            return [1.0]
        if self.router.modality == "text":
            w = self.router.route([req.prompt], top_k=1)[0]
        elif req.image is not None:
            w = self.router.route([req.image], top_k=1)[0]
        else:  # no image for an image router: top-1 of the prior p(S_k) = π_k, as the ensemble does
            from ddfm.mixture import top_k_renormalise

            w = top_k_renormalise(self.router.cluster_shares[None], 1)[0]
        return _round(w)

    async def _upstream_model(self, k: int) -> str:
        if k not in self._models:
            resp = await self._send(k, "GET", "/models")
            try:
                self._models[k] = resp.json()["data"][0]["id"]
            except (ValueError, KeyError, IndexError, TypeError):
                raise ApiError(502, f"upstream expert {k} at {self.upstreams[k]} answered /models without a model "
                               "id", type="upstream_error", code="bad_upstream_response") from None
        return self._models[k]

    async def _send(self, k: int, method: str, path: str, body: dict | None = None, stream: bool = False):
        url = self.upstreams[k] + path
        try:
            request = self.client.build_request(method, url, json=body)
            resp = await self.client.send(request, stream=stream)
        except httpx.TimeoutException:
            raise ApiError(503, f"upstream expert {k} at {url} did not answer within the timeout",
                           type="upstream_error", code="upstream_timeout", headers={"Retry-After": "5"}) from None
        except httpx.HTTPError as err:
            raise ApiError(503, f"upstream expert {k} at {url} is unreachable: {type(err).__name__}: {err}",
                           type="upstream_error", code="upstream_unavailable", headers={"Retry-After": "5"}) from None
        if resp.status_code != 200:
            text = (await resp.aread()).decode("utf-8", "replace")
            await resp.aclose()
            if resp.status_code == 404:
                self._models.pop(k, None)  # the upstream may have restarted with another model id
            raise _upstream_status(k, url, resp.status_code, text)
        return resp

    def _forward_body(self, req: ChatRequest, model: str) -> dict[str, Any]:
        return {**req.body, "model": model}

    async def complete(self, req: ChatRequest, weights: list[float]) -> dict[str, Any]:
        k = _argmax(weights)
        body = self._forward_body(req, await self._upstream_model(k))
        body["stream"] = False
        body.pop("stream_options", None)
        resp = await self._send(k, "POST", "/chat/completions", body)
        try:
            out = resp.json()
            out["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ApiError(502, f"upstream expert {k} answered with something that is not a chat completion",
                           type="upstream_error", code="bad_upstream_response") from None
        out["model"] = req.model
        out["ddfm"] = self.extension(weights, k)
        return out

    def extension(self, weights: list[float], k: int) -> dict[str, Any]:
        return extension(weights, self.expert_names, self.mode, upstream=self.upstreams[k])

    async def open_stream(self, req: ChatRequest, weights: list[float]):
        """Open the upstream SSE stream (errors raised here, before our 200 is sent)."""
        k = _argmax(weights)
        body = self._forward_body(req, await self._upstream_model(k))
        return k, await self._send(k, "POST", "/chat/completions", body, stream=True)

    async def relay(self, resp: Any, req: ChatRequest, weights: list[float], k: int,
                    usage: dict[str, int]) -> AsyncIterator[bytes]:
        """Upstream SSE chunks with our model id and the ``ddfm`` extension on the final chunk."""
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if isinstance(chunk, dict) and "choices" in chunk:
                    chunk["model"] = req.model
                    if chunk.get("usage"):
                        usage.update(chunk["usage"])
                    if any(c.get("finish_reason") for c in chunk.get("choices") or [] if isinstance(c, dict)):
                        chunk["ddfm"] = self.extension(weights, k)
                yield sse(chunk)
        except httpx.HTTPError as err:
            error = ApiError(502, f"upstream expert {k} broke off the stream: {type(err).__name__}: {err}",
                             type="upstream_error", code="upstream_stream_error")
            self.metrics.inc("ddfm_errors_total", code=error.code)
            yield sse(error.body())
        finally:
            await resp.aclose()
        yield b"data: [DONE]\n\n"


def _argmax(weights: list[float]) -> int:
    return max(range(len(weights)), key=lambda k: weights[k])


def _upstream_status(k: int, url: str, status: int, text: str) -> ApiError:
    try:
        upstream_error = json.loads(text)["error"]
        message = upstream_error.get("message") or text
    except (ValueError, KeyError, TypeError, AttributeError):
        upstream_error, message = None, text[:500]
    if 400 <= status < 500 and status not in (401, 403, 404, 408):
        # the client's fault (e.g. too many tokens for that expert): pass it on as it is
        return ApiError(status, f"upstream expert {k}: {message}",
                        type=(upstream_error or {}).get("type", "invalid_request_error"),
                        param=(upstream_error or {}).get("param"), code=(upstream_error or {}).get("code"))
    return ApiError(502, f"upstream expert {k} at {url} answered HTTP {status}: {message}",
                    type="upstream_error", code="bad_upstream_response")


# --------------------------------------------------------------------------- HTTP

def sse(obj: Any) -> bytes:
    """One server-sent event: ``data: {json}\\n\\n``."""
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _completion(cid: str, created: int, model: str, out: dict[str, Any]) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "logprobs": None, "finish_reason": out["finish_reason"]}],
            "usage": out["usage"], "ddfm": out["ddfm"]}


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None,
           **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}], **extra}


_ROUTES = ("/v1/models", "/v1/chat/completions", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware: count every HTTP response by route and status (bounded labels)."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope.get("path", "")
        route = route if route in _ROUTES else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.inc("ddfm_requests_total", route=route, status=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(cfg: ServeConfig, *, ensemble: Any = None, router: Any = None):
    """The FastAPI app of ``cfg``; pass a loaded ``ensemble`` (local) or ``router`` (gateway) to reuse them.

    Without them the experts (or the router) are loaded from ``cfg``'s paths.
    """
    metrics = Metrics()
    backend = _build_backend(cfg, metrics, ensemble, router)
    limits = Limits(max_image_pixels=cfg.max_image_pixels, max_output_tokens=cfg.max_output_tokens,
                    default_max_tokens=cfg.default_max_tokens, allow_remote_images=cfg.allow_remote_images,
                    image_root=cfg.image_root)
    model_ids = [cfg.model_name]
    state = {"in_flight": 0, "started": time.time()}
    if backend.kind == "local":
        backend.batcher.pending = lambda: state["in_flight"]

    @asynccontextmanager
    async def lifespan(app):
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(title="ddfm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.backend, app.state.cfg = metrics, backend, cfg

    def error_response(err: ApiError) -> JSONResponse:
        metrics.inc("ddfm_errors_total", code=str(err.code or err.type))
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def _api_error(_, err: ApiError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(ApiError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, err: RequestValidationError):
        return error_response(_bad(f"invalid request: {err.errors()}", None, "invalid_request"))

    @app.exception_handler(Exception)
    async def _internal_error(_, err: Exception):
        log.exception("internal error")
        return error_response(ApiError(500, f"internal server error: {type(err).__name__}", type="server_error",
                                       code="internal_error"))

    def check_auth(http: HttpRequest) -> None:
        if not cfg.api_key:
            return
        header = http.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_body(http: HttpRequest) -> bytes:
        too_big = ApiError(413, f"request body is larger than this server's limit of {cfg.max_body_bytes} bytes",
                           code="request_too_large")
        length = http.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise too_big
        body = bytearray()

        async def read() -> None:
            async for chunk in http.stream():
                body.extend(chunk)
                if len(body) > cfg.max_body_bytes:
                    raise too_big

        try:  # a slow sender holds a concurrency slot: not for longer than this
            await asyncio.wait_for(read(), cfg.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {cfg.body_timeout} s",
                           code="request_timeout") from None
        return bytes(body)

    @app.get("/health")
    async def health():
        return {"status": "ok", "backend": backend.kind, "experts": backend.expert_names,
                "in_flight": state["in_flight"], "uptime_s": round(time.time() - state["started"], 1)}

    @app.get("/metrics")
    async def metrics_endpoint():
        metrics.set("ddfm_requests_in_flight", state["in_flight"])
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(http: HttpRequest):
        check_auth(http)
        return {"object": "list", "data": [
            {"id": m, "object": "model", "created": int(state["started"]), "owned_by": "ddfm",
             "ddfm": {"backend": backend.kind, "experts": backend.expert_names, "mode": backend.mode}}
            for m in model_ids]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        check_auth(http)
        if state["in_flight"] >= cfg.max_concurrent:
            raise ApiError(429, f"server busy: {cfg.max_concurrent} requests already in flight; retry later",
                           type="rate_limit_error", code="too_many_concurrent_requests",
                           headers={"Retry-After": "1"})
        state["in_flight"] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state["in_flight"] -= 1

        try:
            t0 = time.perf_counter()
            raw = await read_body(http)
            req, prepared = await asyncio.to_thread(_parse_and_prepare, raw, limits, model_ids, backend)
            if req.stream:
                # the slot is released when the stream ends (gateway) or the generation ends (local)
                events, on_close = await _start_stream(req, prepared, t0, release)
                return _EventStream(events, on_close)
            if backend.kind == "local":
                cid, created = _new_id()
                out = _completion(cid, created, req.model, await backend.complete(req, prepared))
            else:
                out = await backend.complete(req, prepared)
            _account(out.get("usage") or {}, out.get("ddfm") or {}, t0)
            release()
            return JSONResponse(out)
        except BaseException:
            release()
            raise

    def _account(usage: dict, ext: dict, t0: float) -> None:
        metrics.inc("ddfm_prompt_tokens_total", float(usage.get("prompt_tokens") or 0))
        metrics.inc("ddfm_completion_tokens_total", float(usage.get("completion_tokens") or 0))
        for name in ext.get("routed_to") or []:
            metrics.inc("ddfm_expert_requests_total", expert=str(name))
        metrics.observe(time.perf_counter() - t0)

    async def _start_stream(req: ChatRequest, prepared: Any, t0: float, release: Callable[[], None]):
        if backend.kind == "gateway":
            k, resp = await backend.open_stream(req, prepared)

            async def close() -> None:
                await resp.aclose()
                release()

            return _gateway_events(req, prepared, k, resp, t0), close
        # local: generation starts now and runs to its end even if the client goes away,
        # so it holds its concurrency slot until then (a client cannot queue unbounded work)
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[str | None] = asyncio.Queue()
        put = lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d)  # noqa: E731 (worker thread -> loop)
        task = asyncio.ensure_future(backend.complete(req, prepared, on_delta=put))

        def done(t: asyncio.Task) -> None:
            release()
            deltas.put_nowait(None)
            if not t.cancelled():
                t.exception()  # retrieved here or by the stream; never "never retrieved"

        task.add_done_callback(done)
        return _local_events(req, task, deltas, t0), None

    async def _gateway_events(req, weights, k, resp, t0) -> AsyncIterator[bytes]:
        usage: dict[str, int] = {}
        async for event in backend.relay(resp, req, weights, k, usage):
            yield event
        _account(usage, backend.extension(weights, k), t0)

    async def _local_events(req, task, deltas, t0) -> AsyncIterator[bytes]:
        cid, created = _new_id()
        yield sse(_chunk(cid, created, req.model, {"role": "assistant", "content": ""}))
        while (delta := await deltas.get()) is not None:
            yield sse(_chunk(cid, created, req.model, {"content": delta}))
        try:
            out = task.result()
        except Exception as err:  # headers are sent: report in-band, as OpenAI does
            error = ApiError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error",
                             code="internal_error")
            metrics.inc("ddfm_errors_total", code=error.code)
            yield sse(error.body())
        else:
            yield sse(_chunk(cid, created, req.model, {}, out["finish_reason"], ddfm=out["ddfm"]))
            if req.include_usage:
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                           "model": req.model, "choices": [], "usage": out["usage"]})
            _account(out["usage"], out["ddfm"], t0)
        yield b"data: [DONE]\n\n"

    app.add_middleware(_CountRequests, metrics=metrics)
    return app


class _EventStream(StreamingResponse):
    """Server-sent events whose ``on_close`` runs however the response ends (done, client gone, error)."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Any] | None):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self._on_close is not None:
                await self._on_close()


def _new_id() -> tuple[str, int]:
    return "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())


def _parse_and_prepare(raw: bytes, limits: Limits, model_ids: list[str], backend: Any) -> tuple[ChatRequest, Any]:
    # runs in a worker thread: image decoding, tokenising and routing stay off the event loop
    req = parse_chat_request(parse_json_body(raw), limits, model_ids)
    return req, backend.prepare(req)


def _build_backend(cfg: ServeConfig, metrics: Metrics, ensemble: Any, router: Any):
    if cfg.upstream:
        if router is None and cfg.ensemble.router is not None:
            from ddfm.router import Router

            router = Router.load(cfg.ensemble.router, temperature=cfg.ensemble.router_temperature)
        return GatewayBackend(router, parse_upstreams(cfg.upstream), cfg, metrics)
    if ensemble is None:
        ensemble = load_ensemble(cfg)
    return LocalBackend(ensemble, cfg, metrics)


def load_ensemble(cfg: ServeConfig) -> Any:
    """The ensemble of the serve config."""
    from ddfm.ensemble import Ensemble

    return Ensemble.from_config(cfg.ensemble)


def serve(cfg: ServeConfig) -> None:
    """Run the server until interrupted (``ddfm serve``)."""
    import uvicorn

    app = create_app(cfg)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", cfg.host)
    log.info("ddfm serve: %s backend, model %r on http://%s:%d/v1", app.state.backend.kind, cfg.model_name,
             cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                limit_concurrency=cfg.max_concurrent * 2 + 16, timeout_keep_alive=5)
